//! Where a lone cross-node message's time goes, from what the nodes record anyway: the
//! sending node's `hybrid_cluster.send` span (opened once the client's frame is parsed into an
//! envelope, closed at the broker's confirmation), the receiving node's
//! `hybrid_cluster.deliver` span (opened once the delivery is decoded, verified and
//! deduplicated, closed once the message is in its connection's inbox), and the trace-level
//! `hybrid_cluster.stage.*` events between them (a frame read, a publish queued and taken by
//! the publisher, a delivery from lapin and pulled by the receiver, an inbox item taken by its socket
//! task and written). A tracing layer records when each happens, only while a breakdown is
//! being measured: otherwise its filter turns them away at the cost of one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The stages of a message: the path's eleven, and the confirmation beside it.
pub(crate) const STAGES: usize = 12;

const SEND: &str = "hybrid_cluster.send";
const DELIVER: &str = "hybrid_cluster.deliver";

/// One moment of a message's life on the nodes, in the order of its path (the confirmation,
/// beside the path, last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    FrameRead,
    SendOpened,
    PublishQueued,
    Publishing,
    Consumed,
    Pulled,
    DeliverOpened,
    DeliverClosed,
    InboxTaken,
    Written,
    SendClosed,
}

/// The marks of the path, in order, with the event or span that makes each.
const PATH: [(Mark, &str); 10] = [
    (Mark::FrameRead, "hybrid_cluster.stage.frame_read"),
    (Mark::SendOpened, SEND),
    (Mark::PublishQueued, "hybrid_cluster.stage.publish_queued"),
    (Mark::Publishing, "hybrid_cluster.stage.publishing"),
    (Mark::Consumed, "hybrid_cluster.stage.consumed"),
    (Mark::Pulled, "hybrid_cluster.stage.pulled"),
    (Mark::DeliverOpened, DELIVER),
    (Mark::DeliverClosed, DELIVER),
    (Mark::InboxTaken, "hybrid_cluster.stage.inbox_taken"),
    (Mark::Written, "hybrid_cluster.stage.written"),
];

/// What each stage of [`stages`] is, for the report: the path's stages, then the
/// confirmation beside it.
pub(crate) const STAGE_NAMES: [&str; STAGES] = [
    "client → A reads the frame (client write, loopback, A's socket task wakes)",
    "A: frame → envelope (parse, checks, ordered sender)",
    "A: envelope → publish queued (forwarding service, encode)",
    "A: publish queued → publisher takes it (publisher task wakes, batch)",
    "A: basic_publish → RabbitMQ → lapin's delivery on B (the broker hop as raw AMQP measures it)",
    "B: lapin's delivery → receiver pulls it (forwarding task, channel, receiver wakes)",
    "B: pulled → checked (decode, verify, dedupe)",
    "B: checked → in the inbox",
    "B: inbox → socket task takes it (wake)",
    "B: taken → written (render, socket write)",
    "B written → client has it (loopback, client wakes, reads)",
    "A: envelope → RabbitMQ's confirmation (beside the path)",
];

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

fn recorded(name: &str) -> bool {
    PATH.iter().any(|(_, n)| *n == name)
}

fn wanted(metadata: &Metadata<'_>) -> bool {
    RECORDING.load(Ordering::Acquire) && recorded(metadata.name())
}

fn push(mark: Mark) {
    let at = Instant::now();
    MARKS.lock().push((mark, at));
}

struct Marks;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Marks {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        push(match attrs.metadata().name() {
            SEND => Mark::SendOpened,
            _ => Mark::DeliverOpened,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        push(match span.name() {
            SEND => Mark::SendClosed,
            _ => Mark::DeliverClosed,
        });
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let name = event.metadata().name();
        if let Some((mark, _)) = PATH.iter().find(|(_, n)| *n == name) {
            push(*mark);
        }
    }
}

/// The layer recording marks, for `serve::init_logging_with`.
pub(crate) fn layer() -> impl Layer<tracing_subscriber::Registry> + Send + Sync {
    // Asked at every span or event of those (an atomic load), since recording comes and goes;
    // every other callsite is turned away once for good.
    let filter =
        dynamic_filter_fn(|metadata, _| wanted(metadata)).with_callsite_filter(|metadata| {
            if recorded(metadata.name()) {
                Interest::sometimes()
            } else {
                Interest::never()
            }
        });
    Marks.with_filter(filter)
}

/// The stages of one message (see [`STAGE_NAMES`]), from the client's send (`sent`) and
/// receipt (`received`) and the marks recorded meanwhile: each mark of the path is the first
/// of its kind after the one before it. `None` when a mark is missing.
pub(crate) fn stages(
    marks: &[(Mark, Instant)],
    sent: Instant,
    received: Instant,
) -> Option<[Duration; STAGES]> {
    let mut marks = marks.to_vec();
    marks.sort_by_key(|(_, at)| *at);
    let mut times = [sent; STAGES];
    let mut from = 0;
    for (i, (wanted, _)) in PATH.iter().enumerate() {
        let found = marks[from..].iter().position(|(m, _)| m == wanted)? + from;
        times[i + 1] = marks[found].1;
        from = found + 1;
    }
    times[11] = received;
    let confirmed = marks.iter().find(|(m, _)| *m == Mark::SendClosed)?.1;
    let mut stages = [Duration::ZERO; STAGES];
    for i in 0..11 {
        stages[i] = times[i + 1].saturating_duration_since(times[i]);
    }
    stages[11] = confirmed.saturating_duration_since(times[2]);
    Some(stages)
}

/// Where the slowest messages' extra time went: of the `share` slowest by their path's total,
/// each stage's mean excess over its own median, largest first, with its part of the whole
/// excess.
pub(crate) fn tail(samples: &[[Duration; STAGES]], share: f64) -> Vec<(usize, f64, f64)> {
    if samples.is_empty() {
        return Vec::new();
    }
    let path_total = |s: &[Duration; STAGES]| s[..11].iter().sum::<Duration>();
    let medians: Vec<f64> = (0..11)
        .map(|i| {
            let mut all: Vec<f64> = samples.iter().map(|s| s[i].as_secs_f64()).collect();
            all.sort_by(f64::total_cmp);
            all[all.len() / 2]
        })
        .collect();
    let mut by_total: Vec<&[Duration; STAGES]> = samples.iter().collect();
    by_total.sort_by_key(|s| std::cmp::Reverse(path_total(s)));
    let count = ((samples.len() as f64 * share).ceil() as usize).clamp(1, samples.len());
    let slow = &by_total[..count];
    let mut excess: Vec<(usize, f64)> = (0..11)
        .map(|i| {
            let mean = slow.iter().map(|s| s[i].as_secs_f64()).sum::<f64>() / count as f64;
            (i, (mean - medians[i]).max(0.0) * 1e6)
        })
        .collect();
    let whole: f64 = excess.iter().map(|(_, e)| e).sum();
    excess.sort_by(|a, b| b.1.total_cmp(&a.1));
    excess
        .into_iter()
        .map(|(i, e)| (i, e, if whole > 0.0 { e / whole } else { 0.0 }))
        .collect()
}
