//! Conformance suites for the backend traits: the contract of [`Registry`] and [`Broker`]
//! written once, as cases any implementation must pass, so that the embedded memory backends
//! provably behave like Redis and RabbitMQ.
//!
//! Each case is an `async fn` taking the backend under test (fresh: nothing of another case in
//! it). A test crate runs every case against one backend with [`registry_conformance!`](crate::registry_conformance) or
//! [`broker_conformance!`](crate::broker_conformance), given an `async fn` that makes a fresh backend for a case (named,
//! for a unique prefix) and the [`Cleanup`] to run after it:
//!
//! ```ignore
//! async fn memory(_case: &str) -> (Arc<dyn Registry>, Cleanup) {
//!     (Arc::new(MemoryRegistry::new()), Box::pin(async {}))
//! }
//! hybrid_cluster_test_support::registry_conformance!(memory);
//! ```
//!
//! [`Registry`]: hybrid_cluster_core::Registry
//! [`Broker`]: hybrid_cluster_core::Broker

pub mod broker;
pub mod presence;
pub mod registry;
pub mod sessions;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// What to run after a case that passed: removing what it left in a server.
pub type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long a case waits for something that should happen at once, before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// `future`, or a panic naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {WAIT:?}"))
}

/// Runs every case of [`registry`] as a test of its own, in a module named after `$make`, an
/// `async fn(&str) -> (Arc<dyn Registry>, Cleanup)` in scope that makes a fresh registry for
/// the case it is given.
#[macro_export]
macro_rules! registry_conformance {
    ($make:ident) => {
        $crate::__conformance_cases!(
            $make,
            registry,
            a_record_put_is_read_back_and_listed,
            a_record_put_again_replaces_the_last_and_renews_its_lease,
            a_removed_record_is_gone_at_once,
            a_record_whose_lease_ran_out_is_gone,
            a_lease_shorter_than_a_millisecond_counts_as_one,
            leases_are_reported_when_the_registry_says_so,
            watchers_see_puts_and_removals_in_order,
            routes_point_at_a_connection_for_their_lease,
            route_names_are_checked,
        );
    };
}

/// Runs every case of [`broker`] as a test of its own, in a module named after `$make`, an
/// `async fn(&str) -> (Arc<dyn Broker>, Cleanup)` in scope that makes a fresh broker for the
/// case it is given (the queues a case uses are those of [`broker::NODES`]).
#[macro_export]
macro_rules! broker_conformance {
    ($make:ident) => {
        $crate::__conformance_cases!(
            $make,
            broker,
            a_message_reaches_the_queue_bound_to_its_key_as_it_was_sent,
            a_key_no_queue_is_bound_to_is_unroutable,
            a_broadcast_reaches_every_bound_queue_once,
            a_group_reaches_the_queues_bound_to_it_until_unbound,
            messages_keep_the_order_they_were_published_in,
            a_dropped_publish_is_still_delivered,
            a_requeued_message_comes_again_marked_redelivered,
            a_dead_lettered_message_never_comes_again,
            what_a_closed_consumer_left_unsettled_goes_to_the_next_marked_redelivered,
            a_queue_has_one_consumer_at_a_time,
            prefetch_bounds_the_deliveries_not_settled,
            a_full_queue_refuses_a_publish,
            a_deleted_queue_takes_its_messages_and_bindings_with_it,
            a_queue_is_deleted_if_empty_only,
            declaring_and_binding_again_changes_nothing,
            a_queue_declared_again_with_other_options_is_refused,
            an_unused_queue_expires,
        );
    };
}

/// Runs every case of [`sessions`] as a test of its own, in a module named after `$make`, an
/// `async fn(&str) -> (Arc<dyn SessionStore>, Cleanup)` in scope that makes a fresh store.
#[macro_export]
macro_rules! session_store_conformance {
    ($make:ident) => {
        $crate::__conformance_cases!(
            $make,
            sessions,
            a_claim_hands_the_session_over_and_the_log_reads_past_a_seq,
            an_append_by_a_former_owner_is_refused_with_the_owner_in_force,
            the_log_keeps_its_bounds_and_says_where_it_starts,
            an_orphan_append_is_numbered_after_the_last_and_held_once,
            a_nodes_sessions_are_those_that_had_a_connection_on_it,
            sessions_expire_unless_kept_alive_and_end_at_once,
        );
    };
}

/// The [`PresenceStore`](hybrid_cluster_core::PresenceStore) suite against one backend, made
/// by `$make(case) -> (Arc<dyn PresenceStore>, Cleanup)`.
#[macro_export]
macro_rules! presence_store_conformance {
    ($make:ident) => {
        $crate::__conformance_cases!(
            $make,
            presence,
            counts_span_nodes_and_say_who_arrived_and_who_left,
            a_reaped_node_takes_its_shares_and_only_the_first_reap_tells,
            a_nodes_entries_expire_unless_kept_alive,
        );
    };
}

/// The tests of one suite's cases against one backend: see [`registry_conformance!`](crate::registry_conformance).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($make:ident, $suite:ident, $($case:ident),+ $(,)?) => {
        mod $make {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (backend, cleanup) = super::$make(stringify!($case)).await;
                    $crate::conformance::$suite::$case(backend).await;
                    cleanup.await;
                }
            )+
        }
    };
}
