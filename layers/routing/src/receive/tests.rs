use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use std::sync::Arc;

use hybrid_cluster_core::{
    Broker, BrokerMessage, ConsumeOptions, MessageId, NodeId, RoutingKey, Target,
};
use hybrid_cluster_memory::MemoryBroker;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tower::service_fn;

use super::*;
use crate::codec::EnvelopeCodec;
use crate::test_support::outcomes::{Counts, Outcomes};
use crate::test_support::{node, node_queue};

async fn send(broker: &MemoryBroker, envelope: &Envelope) {
    broker
        .publish(&envelope.routing_key(), envelope.to_message().unwrap())
        .await
        .unwrap();
}

/// A local destination that forwards to a channel, refusing payloads equal to "refuse".
fn channel_destination(
    tx: mpsc::Sender<Envelope>,
) -> impl Service<Envelope, Response = (), Error = BoxError, Future: Send> + Send + 'static {
    service_fn(move |envelope: Envelope| {
        let tx = tx.clone();
        async move {
            if envelope.payload_text() == Some("refuse") {
                return Err::<(), BoxError>("no such connection".into());
            }
            tx.send(envelope).await.map_err(BoxError::from)
        }
    })
}

async fn recv(rx: &mut mpsc::Receiver<Envelope>) -> Envelope {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message in time")
        .expect("the receiver is running")
}

/// Waits until `queue` is empty: every message of it settled. The receiver acknowledges a
/// message after its hand-over, once the destination's task had its turn.
async fn settled(broker: &MemoryBroker, queue: &NodeId) {
    let emptied = async {
        while broker.queue_len(queue) != Some(0) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), emptied)
        .await
        .expect("the queue was emptied");
}

/// Records every tracing event's fields as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = self.0.lock();
        let _ = write!(text, "{} ", event.metadata().level());
        event.record(&mut Fields(&mut text));
        text.push('\n');
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_good_ones_keep_flowing() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    let good = |text: &str| Envelope::text(node("a"), Target::Node(b.clone()), text);
    send(&broker, &good("one")).await;
    // A message without the envelope headers, carrying a secret payload.
    let malformed = BrokerMessage {
        message_id: MessageId::random().to_string(),
        headers: BTreeMap::new(),
        body: "top-secret-payload".into(),
    };
    broker
        .publish(&RoutingKey::Node(b.clone()), malformed)
        .await
        .unwrap();
    send(&broker, &good("two")).await;

    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let receiver = Receiver::new(deliveries);
    let (tx, mut rx) = mpsc::channel(8);
    let (run, stats) = Outcomes::record(|| receiver.run(channel_destination(tx)));
    let check = async {
        assert_eq!(recv(&mut rx).await.payload_text(), Some("one"));
        assert_eq!(recv(&mut rx).await.payload_text(), Some("two"));
        settled(&broker, &b).await;
    };
    tokio::select! {
        result = run => panic!("the receiver stopped: {result:?}"),
        () = check => {}
    }
    assert_eq!(stats.get().dead_lettered, 1);
    assert_eq!(stats.get().handled, 2);
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].message.body[..], b"top-secret-payload");
    assert_eq!(broker.queue_len(&b), Some(0));

    let logged = capture.0.lock().clone();
    assert!(
        logged.contains("malformed message dead-lettered"),
        "{logged}"
    );
    assert!(logged.contains("hc-meta"), "names what was wrong: {logged}");
    assert!(
        !logged.contains("top-secret"),
        "never the payload: {logged}"
    );
}

#[tokio::test]
async fn refused_messages_are_dead_lettered() {
    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    for text in ["refuse", "ok"] {
        send(
            &broker,
            &Envelope::text(node("a"), Target::Node(b.clone()), text),
        )
        .await;
    }
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let receiver = Receiver::new(deliveries);
    let (run, stats) = Outcomes::record(|| receiver.run(channel_destination(tx)));
    let run = tokio::spawn(run);
    assert_eq!(recv(&mut rx).await.payload_text(), Some("ok"));
    assert_eq!(stats.get().dead_lettered, 1);
    assert_eq!(broker.dead_letters().len(), 1);
    run.abort();
}

#[tokio::test]
async fn a_message_is_acknowledged_only_after_its_handoff() {
    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    let first = Envelope::text(node("a"), Target::Node(b.clone()), "first");
    send(&broker, &first).await;

    // A destination that never completes its handoff.
    let (entered_tx, mut entered) = mpsc::channel(1);
    let stuck = service_fn(move |_: Envelope| {
        let entered_tx = entered_tx.clone();
        async move {
            let _ = entered_tx.send(()).await;
            std::future::pending::<Result<(), BoxError>>().await
        }
    });
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let run = tokio::spawn(Receiver::new(deliveries).run(stuck));
    entered.recv().await.unwrap();
    // The node goes down mid-handoff: the message was not acknowledged...
    run.abort();
    let _ = run.await;
    assert_eq!(broker.queue_len(&b), Some(1));

    // ...so the next consumer gets it again.
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let run = tokio::spawn(Receiver::new(deliveries).run(channel_destination(tx)));
    let again = recv(&mut rx).await;
    assert_eq!(again.id, first.id);
    settled(&broker, &b).await;
    run.abort();
}

#[tokio::test]
async fn the_loop_ends_with_its_deliveries() {
    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let run = tokio::spawn(Receiver::new(deliveries).run(channel_destination(tx)));
    broker.delete_queue(&b).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), run).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))));
}

/// The stack's readiness is the destination's: while the destination pushes back, no delivery
/// is taken on, not even one it would never see (a malformed one).
#[tokio::test]
async fn a_destination_pushing_back_holds_every_delivery() {
    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    let malformed = BrokerMessage {
        message_id: MessageId::random().to_string(),
        headers: BTreeMap::new(),
        body: "not an envelope".into(),
    };
    broker
        .publish(&RoutingKey::Node(b.clone()), malformed)
        .await
        .unwrap();
    send(
        &broker,
        &Envelope::text(node("a"), Target::Node(b.clone()), "good"),
    )
    .await;
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let (destination, mut handle) = tower_test::mock::pair::<Envelope, ()>();
    handle.allow(0);
    let (run, stats) = Outcomes::record(|| Receiver::new(deliveries).run(destination));
    let run = tokio::spawn(run);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(broker.dead_letters().is_empty());
    assert_eq!(stats.get(), Counts::default());

    handle.allow(1);
    let (envelope, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(envelope.payload_text(), Some("good"));
    respond.send_response(());
    assert_eq!(broker.dead_letters().len(), 1);
    tokio::time::timeout(Duration::from_secs(5), async {
        while stats.get().handled < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        stats.get(),
        Counts {
            handled: 1,
            dead_lettered: 1,
            ..Counts::default()
        }
    );
    run.abort();
}

mod authenticated {
    use std::time::SystemTime;

    use hybrid_cluster_core::{AuthError, ClusterSecret};
    use tower::ServiceExt;

    use super::*;
    use crate::{Forward, ForwardConfig};

    fn secret() -> ClusterSecret {
        ClusterSecret::new("the cluster secret of these tests").unwrap()
    }

    /// Taken by the tests that reach the rejection warning: tracing caches a callsite's
    /// interest when it is first hit, and a test hitting it on another thread while the
    /// capturing test sets its subscriber can make the capture miss it.
    static REJECTION_CALLSITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn signed_config() -> ReceiveConfig {
        ReceiveConfig::default().with_secret(secret())
    }

    fn signing(broker: &Arc<MemoryBroker>) -> Forward<MemoryBroker> {
        Forward::with_config(
            broker.clone(),
            ForwardConfig::default().with_secret(secret()),
        )
    }

    async fn publish(broker: &MemoryBroker, to: &NodeId, message: BrokerMessage) {
        broker
            .publish(&RoutingKey::Node(to.clone()), message)
            .await
            .unwrap();
    }

    /// Runs a receiver with `config` on `b`'s queue until `expected` payloads arrived, in order,
    /// and returns its counts.
    async fn receive(
        broker: &MemoryBroker,
        b: &NodeId,
        config: ReceiveConfig,
        expected: &[&str],
    ) -> Counts {
        let deliveries = broker.consume(b, &ConsumeOptions::default()).await.unwrap();
        let receiver = Receiver::with_config(deliveries, config);
        let (tx, mut rx) = mpsc::channel(16);
        let (run, stats) = Outcomes::record(|| receiver.run(channel_destination(tx)));
        let check = async {
            for text in expected {
                assert_eq!(recv(&mut rx).await.payload_text(), Some(*text));
            }
            settled(broker, b).await;
        };
        tokio::select! {
            result = run => panic!("the receiver stopped: {result:?}"),
            () = check => {}
        }
        assert!(rx.try_recv().is_err(), "nothing more was handed over");
        assert_eq!(broker.queue_len(b), Some(0));
        stats.get()
    }

    #[tokio::test]
    async fn signed_messages_flow_while_unsigned_and_forged_ones_are_dead_lettered() {
        let _serial = REJECTION_CALLSITE.lock().await;
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let broker = Arc::new(MemoryBroker::new());
        let b = node_queue(&broker, "b").await;
        let forward = signing(&broker);
        let to_b = |text: &str| Envelope::text(node("a"), Target::Node(b.clone()), text);

        forward.clone().oneshot(to_b("one")).await.unwrap();
        // Unsigned, as a node without the secret sends.
        let unsigned = to_b("top-secret-unsigned");
        send(&broker, &unsigned).await;
        // Signed with another cluster's secret.
        let mut other = to_b("top-secret-other-secret");
        other.sign(&ClusterSecret::new("another cluster's secret, as long").unwrap());
        send(&broker, &other).await;
        // Signed, then its payload replaced on the way.
        let mut altered = to_b("one");
        altered.sign(&secret());
        let mut message = altered.to_message().unwrap();
        message.body = "top-secret-injected".into();
        publish(&broker, &b, message).await;
        // Signed, then its origin rewritten by someone without the secret.
        let mut moved = to_b("top-secret-moved");
        moved.sign(&secret());
        let mut message = moved.to_message().unwrap();
        let meta = message.headers["hc-meta"].replacen(" a ", " c ", 1);
        message.headers.insert("hc-meta".into(), meta);
        publish(&broker, &b, message).await;
        forward.clone().oneshot(to_b("two")).await.unwrap();

        let stats = receive(&broker, &b, signed_config(), &["one", "two"]).await;
        assert_eq!(
            (stats.handled, stats.rejected, stats.dead_lettered),
            (2, 4, 4)
        );
        assert_eq!(broker.dead_letters().len(), 4);

        let logged = capture.0.lock().clone();
        assert_eq!(
            logged
                .matches("unauthenticated message dead-lettered")
                .count(),
            4,
            "{logged}"
        );
        for (id, reason) in [
            (unsigned.id, "not signed"),
            (other.id, "signature does not match"),
            (altered.id, "signature does not match"),
        ] {
            let line = logged
                .lines()
                .find(|line| line.contains(&id.to_string()))
                .unwrap_or_else(|| panic!("a warning names {id}: {logged}"));
            assert!(line.contains("claimed_origin=a"), "{line}");
            assert!(line.contains(reason), "{line}");
            assert!(line.starts_with("WARN"), "{line}");
        }
        assert!(logged.contains("claimed_origin=c"), "{logged}");
        assert!(
            !logged.contains("top-secret"),
            "never the payload: {logged}"
        );
        assert!(
            !logged.contains("cluster secret"),
            "never the secret: {logged}"
        );
    }

    #[tokio::test]
    async fn a_receiver_without_the_secret_still_reads_signed_messages() {
        let broker = Arc::new(MemoryBroker::new());
        let b = node_queue(&broker, "b").await;
        signing(&broker)
            .oneshot(Envelope::text(node("a"), Target::Node(b.clone()), "signed"))
            .await
            .unwrap();
        let stats = receive(&broker, &b, ReceiveConfig::default(), &["signed"]).await;
        assert_eq!((stats.handled, stats.rejected), (1, 0));
    }

    #[tokio::test]
    async fn a_replayed_message_is_refused_and_counted() {
        let broker = Arc::new(MemoryBroker::new());
        let b = node_queue(&broker, "b").await;
        let mut captured = Envelope::text(node("a"), Target::Node(b.clone()), "pay 10");
        captured.sign(&secret());
        let captured = captured.to_message().unwrap();
        publish(&broker, &b, captured.clone()).await;
        // The same message, published again by someone who captured it.
        publish(&broker, &b, captured.clone()).await;
        let mut end = Envelope::text(node("a"), Target::Node(b.clone()), "end");
        end.sign(&secret());
        send(&broker, &end).await;

        let stats = receive(&broker, &b, signed_config(), &["pay 10", "end"]).await;
        // Acknowledged and dropped, as a redelivery would be: it never reached the destination.
        assert_eq!((stats.handled, stats.duplicates, stats.rejected), (2, 1, 0));
    }

    #[tokio::test]
    async fn a_replay_is_refused_even_once_its_id_is_forgotten() {
        let _serial = REJECTION_CALLSITE.lock().await;
        let broker = Arc::new(MemoryBroker::new());
        let b = node_queue(&broker, "b").await;
        // A memory of one id: the first message's id is forgotten when the second is handled.
        let config = ReceiveConfig {
            dedupe_memory: dedupe::BYTES_PER_ID,
            ..signed_config()
        };
        let first = Envelope::text(node("a"), Target::Node(b.clone()), "first");
        let signed = |text: &str, after_first_ms: u64| {
            let mut envelope = Envelope::text(node("a"), Target::Node(b.clone()), text);
            envelope.sent_at = first.sent_at + Duration::from_millis(after_first_ms);
            envelope.sign(&secret());
            envelope
        };
        let captured = signed("first", 0).to_message().unwrap();
        publish(&broker, &b, captured.clone()).await;
        send(&broker, &signed("second", 1)).await;
        publish(&broker, &b, captured).await;
        send(&broker, &signed("end", 2)).await;

        let stats = receive(&broker, &b, config, &["first", "second", "end"]).await;
        assert_eq!((stats.handled, stats.duplicates, stats.rejected), (3, 0, 1));
    }

    #[tokio::test]
    async fn stale_and_future_messages_are_dead_lettered() {
        let _serial = REJECTION_CALLSITE.lock().await;
        let broker = Arc::new(MemoryBroker::new());
        let b = node_queue(&broker, "b").await;
        let window = ReceiveConfig::default().replay_window;
        let beyond = window + Duration::from_secs(5);
        for sent_at in [SystemTime::now() - beyond, SystemTime::now() + beyond] {
            let mut envelope = Envelope::text(node("a"), Target::Node(b.clone()), "old news");
            envelope.sent_at = sent_at;
            envelope.sign(&secret());
            assert!(matches!(
                envelope.verify(&secret(), SystemTime::now(), window),
                Err(AuthError::Stale { .. } | AuthError::FromTheFuture { .. })
            ));
            send(&broker, &envelope).await;
        }
        signing(&broker)
            .oneshot(Envelope::text(node("a"), Target::Node(b.clone()), "fresh"))
            .await
            .unwrap();
        let stats = receive(&broker, &b, signed_config(), &["fresh"]).await;
        assert_eq!(
            (stats.handled, stats.rejected, stats.dead_lettered),
            (1, 2, 2)
        );
    }
}

/// A destination that keeps a message somewhere first ([`AckAfter`]) has it acknowledged only
/// once that is done, while the receiver goes on with the next messages.
#[tokio::test]
async fn a_message_kept_first_is_acknowledged_once_kept_and_the_next_ones_flow_meanwhile() {
    let broker = MemoryBroker::new();
    let b = node_queue(&broker, "b").await;
    for text in ["one", "two"] {
        send(
            &broker,
            &Envelope::text(node("a"), Target::Node(b.clone()), text),
        )
        .await;
    }
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let (kept, keeping) = tokio::sync::oneshot::channel::<()>();
    let keeping = Arc::new(Mutex::new(Some(keeping)));
    let (tx, mut rx) = mpsc::channel(8);
    let destination = service_fn(move |envelope: Envelope| {
        let (tx, keeping) = (tx.clone(), keeping.lock().take());
        async move {
            tx.send(envelope).await.map_err(BoxError::from)?;
            let after = keeping.map(|keeping| -> BoxFuture<'static, ()> {
                Box::pin(async move {
                    let _ = keeping.await;
                })
            });
            Ok::<_, BoxError>(AckAfter(after))
        }
    });
    let run = tokio::spawn(Receiver::new(deliveries).run(destination));
    assert_eq!(recv(&mut rx).await.payload_text(), Some("one"));
    assert_eq!(recv(&mut rx).await.payload_text(), Some("two"));
    let only_the_first_waits = async {
        while broker.queue_len(&b) != Some(1) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), only_the_first_waits)
        .await
        .expect("the second acknowledged, the first not yet");
    kept.send(()).unwrap();
    settled(&broker, &b).await;
    run.abort();
}
