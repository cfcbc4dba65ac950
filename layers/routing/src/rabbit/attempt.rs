//! One operation's tries across connections, within the outage bound.

use hybrid_cluster_core::{BrokerError, NodeId};
use tokio::time::Instant;

use super::shared::{Link, Shared};
use super::wire;

/// One operation's tries across connections.
pub(super) struct Attempt<'a> {
    shared: &'a Shared,
    deadline: Instant,
    pub(super) min_generation: u64,
}

impl<'a> Attempt<'a> {
    pub(super) fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            deadline: Instant::now() + shared.config.outage_timeout,
            min_generation: 0,
        }
    }

    pub(super) async fn link(&self) -> Result<Link, BrokerError> {
        self.shared
            .wait_link(self.min_generation, self.deadline)
            .await
    }

    /// Whether to try again on the next connection (the error was the connection's), or the
    /// error to return.
    pub(super) fn failed(
        &mut self,
        error: lapin::Error,
        link: &Link,
        node: &NodeId,
        consuming: bool,
    ) -> Result<(), BrokerError> {
        if wire::is_connection_error(&error) && !link.connection.status().connected() {
            self.shared.report_broken(link.generation);
            self.min_generation = link.generation + 1;
            return Ok(());
        }
        Err(wire::broker_error(error, node, consuming))
    }
}
