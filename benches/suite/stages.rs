//! Where a lone cross-node message's time goes, from the spans the nodes open anyway: the
//! sending node's `hybrid_cluster.send` (opened once the client's frame is read and parsed
//! into an envelope, closed at the broker's confirmation) and the receiving node's
//! `hybrid_cluster.deliver` (opened once the delivery is decoded, verified and deduplicated,
//! closed once the message is in its connection's inbox). A tracing layer records when each
//! opens and closes, only while a breakdown is being measured: otherwise its filter turns the
//! spans away at the cost of one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

const SEND: &str = "hybrid_cluster.send";
const DELIVER: &str = "hybrid_cluster.deliver";

/// One moment of a message's life on the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    SendOpened,
    SendClosed,
    DeliverOpened,
    DeliverClosed,
}

static RECORDING: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Vec<(Mark, Instant)>> = Mutex::new(Vec::new());

/// Starts recording marks, forgetting earlier ones.
pub(crate) fn start() {
    MARKS.lock().clear();
    RECORDING.store(true, Ordering::Release);
}

/// Stops recording.
pub(crate) fn stop() {
    RECORDING.store(false, Ordering::Release);
}

/// Takes the marks recorded since the last take.
pub(crate) fn take() -> Vec<(Mark, Instant)> {
    std::mem::take(&mut *MARKS.lock())
}

fn wanted(metadata: &Metadata<'_>) -> bool {
    RECORDING.load(Ordering::Acquire) && matches!(metadata.name(), SEND | DELIVER)
}

struct Marks;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Marks {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mark = match attrs.metadata().name() {
            SEND => Mark::SendOpened,
            _ => Mark::DeliverOpened,
        };
        MARKS.lock().push((mark, Instant::now()));
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let mark = match span.name() {
            SEND => Mark::SendClosed,
            _ => Mark::DeliverClosed,
        };
        MARKS.lock().push((mark, Instant::now()));
    }
}

/// The layer recording marks, for `serve::init_logging_with`.
pub(crate) fn layer() -> impl Layer<tracing_subscriber::Registry> + Send + Sync {
    // Asked at every span of the two (an atomic load), since recording comes and goes; every
    // other callsite is turned away once for good.
    let filter =
        dynamic_filter_fn(|metadata, _| wanted(metadata)).with_callsite_filter(|metadata| {
            if matches!(metadata.name(), SEND | DELIVER) {
                Interest::sometimes()
            } else {
                Interest::never()
            }
        });
    Marks.with_filter(filter)
}

/// The stages of one message, from the client's send (`sent`) and receipt (`received`) and
/// the marks recorded meanwhile: client → sending node's envelope, → receiving node's checked
/// delivery, → its inbox, → the receiving client; and the send's confirmation after its
/// envelope. `None` when a mark is missing.
pub(crate) fn stages(
    marks: &[(Mark, Instant)],
    sent: Instant,
    received: Instant,
) -> Option<[Duration; 5]> {
    let at = |wanted: Mark| marks.iter().find(|(m, _)| *m == wanted).map(|(_, t)| *t);
    let (send_open, deliver_open, deliver_close, send_close) = (
        at(Mark::SendOpened)?,
        at(Mark::DeliverOpened)?,
        at(Mark::DeliverClosed)?,
        at(Mark::SendClosed)?,
    );
    Some([
        send_open.saturating_duration_since(sent),
        deliver_open.saturating_duration_since(send_open),
        deliver_close.saturating_duration_since(deliver_open),
        received.saturating_duration_since(deliver_close),
        send_close.saturating_duration_since(send_open),
    ])
}

/// What each stage of [`stages`] is, for the report.
pub(crate) const STAGE_NAMES: [&str; 5] = [
    "client → node A's envelope (WS read, parse)",
    "A's envelope → B's checked delivery (publish, RabbitMQ, consume, decode, verify, dedupe)",
    "B's delivery → the inbox",
    "inbox → client (socket task, write, WS)",
    "A's envelope → RabbitMQ's confirmation (beside the path)",
];
