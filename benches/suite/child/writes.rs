//! A broadcast's time on the server side, as the child's nodes record it: from the moment the
//! sending node read the client's frame (`hybrid_cluster.stage.frame_read`) to the moment the
//! last node wrote it to its last client (`hybrid_cluster.stage.written`, after inbox frames).
//! Recorded only between [`watch`] and [`span`]; otherwise the layer's filter turns the two
//! events away at the cost of one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tracing::subscriber::Interest;
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::layer::Context;

const READ: &str = "hybrid_cluster.stage.frame_read";
const WRITTEN: &str = "hybrid_cluster.stage.written";

static WATCHING: AtomicBool = AtomicBool::new(false);
static EPOCH: OnceLock<Instant> = OnceLock::new();
/// Nanoseconds since `EPOCH`, plus one (zero: not yet).
static FIRST_READ: AtomicU64 = AtomicU64::new(0);
static LAST_WRITTEN: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Starts recording, forgetting what was recorded before.
pub(crate) fn watch() {
    FIRST_READ.store(0, Ordering::Release);
    LAST_WRITTEN.store(0, Ordering::Release);
    WATCHING.store(true, Ordering::Release);
}

/// Stops recording; the time from the first frame read to the last frame written since
/// [`watch`], if both happened in that order.
pub(crate) fn span() -> Option<Duration> {
    WATCHING.store(false, Ordering::Release);
    let (read, written) = (
        FIRST_READ.load(Ordering::Acquire),
        LAST_WRITTEN.load(Ordering::Acquire),
    );
    (read > 0 && written >= read).then(|| Duration::from_nanos(written - read))
}

struct Writes;

impl<S: Subscriber> Layer<S> for Writes {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let at = now();
        match event.metadata().name() {
            READ => {
                let _ = FIRST_READ.compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire);
            }
            _ => {
                LAST_WRITTEN.fetch_max(at, Ordering::AcqRel);
            }
        }
    }
}

/// The layer recording, for `serve::init_logging_with`.
pub(crate) fn layer() -> impl Layer<tracing_subscriber::Registry> + Send + Sync {
    let filter = dynamic_filter_fn(|metadata, _| {
        WATCHING.load(Ordering::Acquire) && matches!(metadata.name(), READ | WRITTEN)
    })
    .with_callsite_filter(|metadata| {
        if matches!(metadata.name(), READ | WRITTEN) {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    });
    Writes.with_filter(filter)
}
