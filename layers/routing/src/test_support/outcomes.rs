//! What a receiver did with its deliveries, read from the metrics it records, as users scrape
//! them: `hybrid_cluster_broker_deliveries_total` by `outcome`.
//!
//! Shared by the unit tests and `tests/rabbitmq.rs` (which includes this file by its path).

use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use parking_lot::Mutex;

/// The counts of one receiver's outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Handed to the destination and acknowledged.
    pub(crate) handled: u64,
    /// Duplicates dropped (and acknowledged).
    pub(crate) duplicates: u64,
    /// Dead-lettered: malformed, refused by the destination, or rejected.
    pub(crate) dead_lettered: u64,
    /// Failed authentication (dead-lettered too).
    pub(crate) rejected: u64,
}

/// Reads the counts a receiver recorded into its own recorder.
#[derive(Clone, Debug)]
pub(crate) struct Outcomes {
    snapshotter: Snapshotter,
    // A snapshot takes the counts out of the recorder: they add up here.
    totals: Arc<Mutex<Counts>>,
}

impl Outcomes {
    /// Runs `start` (which calls `Receiver::run`, registering the receiver's metrics) with a
    /// recorder of its own, and returns what it returned with a reader of the counts.
    pub(crate) fn record<T>(start: impl FnOnce() -> T) -> (T, Self) {
        let recorder = DebuggingRecorder::new();
        let outcomes = Self {
            snapshotter: recorder.snapshotter(),
            totals: Arc::default(),
        };
        (metrics::with_local_recorder(&recorder, start), outcomes)
    }

    /// The counts now.
    pub(crate) fn get(&self) -> Counts {
        let mut totals = self.totals.lock();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let DebugValue::Counter(value) = value else {
                continue;
            };
            if key.name() != "hybrid_cluster_broker_deliveries_total" {
                continue;
            }
            let outcome = key
                .labels()
                .find(|label| label.key() == "outcome")
                .map(|label| label.value().to_owned());
            let count = match outcome.as_deref() {
                Some("handled") => &mut totals.handled,
                Some("duplicate") => &mut totals.duplicates,
                Some("dead_lettered") => &mut totals.dead_lettered,
                Some("rejected") => &mut totals.rejected,
                other => panic!("an unknown outcome: {other:?}"),
            };
            *count += value;
        }
        *totals
    }
}
