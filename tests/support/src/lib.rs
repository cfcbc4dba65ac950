//! Helpers shared by hybrid-cluster's tests and benchmarks (dev only, never published).
//!
//! - [`browser`]: a real headless Chromium, one-shot (`--dump-dom`) or driven through the
//!   DevTools protocol;
//! - [`conformance`]: the contract of the backend traits (`Registry`, `Broker`) as cases any
//!   implementation must pass, run against the memory backends and the real servers alike;
//! - [`servers`]: the real Redis and RabbitMQ the suite runs against (`REDIS_URL`,
//!   `AMQP_URL`, loopback defaults), a unique cluster prefix per test, and the cleanup of
//!   everything a cluster under that prefix may leave in them;
//! - [`node`]: the node program (`examples/node.rs`) run as a real process;
//! - [`client`]: a WebSocket client of the node program's JSON protocol;
//! - [`limits`]: raising the open-file limit for thousands of connections;
//! - [`process`]: what a process holds (resident memory, open files), from `/proc`;
//! - [`proxy`]: a TCP proxy a test can cut, for network failures between a node and a server;
//! - [`rabbitmq`]: disturbing the shared RabbitMQ (restart, memory alarm) and putting it back.

#![allow(clippy::unwrap_used)]

pub mod browser;
pub mod client;
pub mod conformance;
pub mod limits;
pub mod node;
pub mod placement;
pub mod process;
pub mod proxy;
pub mod rabbitmq;
pub mod servers;

/// The error of every helper: what went wrong, in words.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
