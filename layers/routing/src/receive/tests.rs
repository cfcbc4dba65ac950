use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hybrid_cluster_core::{
    Broker, BrokerMessage, ConsumeOptions, NodeId, QueueOptions, RoutingKey, Target,
};
use hybrid_cluster_memory::MemoryBroker;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tower::service_fn;

use super::*;

fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

async fn node_queue(broker: &MemoryBroker, id: &str) -> NodeId {
    let id = node(id);
    broker
        .declare_queue(&id, &QueueOptions::default())
        .await
        .unwrap();
    broker
        .bind(&id, &RoutingKey::Node(id.clone()))
        .await
        .unwrap();
    id
}

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
    let stats = receiver.stats();
    let (tx, mut rx) = mpsc::channel(8);
    let run = receiver.run(channel_destination(tx));
    let check = async {
        assert_eq!(recv(&mut rx).await.payload_text(), Some("one"));
        assert_eq!(recv(&mut rx).await.payload_text(), Some("two"));
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
    assert!(
        logged.contains("hc-origin"),
        "names what was wrong: {logged}"
    );
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
    let stats = receiver.stats();
    let run = tokio::spawn(receiver.run(channel_destination(tx)));
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
    assert_eq!(broker.queue_len(&b), Some(0));
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
