use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hybrid_cluster_core::{
    BrokerError, ConsumeOptions, GroupName, NodeId, QueueOptions, RoutingKey, Target,
};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::ServiceExt;
use tower_test::mock::Spawn;

use super::*;
use crate::test_support::broker::TestBroker;
use crate::test_support::outcomes::Outcomes;
use crate::test_support::{node, node_queue};

fn to(b: &NodeId) -> Envelope {
    Envelope::text(node("a"), Target::Node(b.clone()), "x")
}

fn config(max_in_flight: usize) -> ForwardConfig {
    ForwardConfig {
        max_in_flight,
        ..ForwardConfig::default()
    }
}

#[tokio::test]
async fn unconfirmed_messages_bound_readiness() {
    let (broker, gate) = TestBroker::gated();
    broker.set_flow(Some(true));
    let b = node_queue(&broker, "b").await;
    let broker = Arc::new(broker);
    let mut service = Spawn::new(Forward::with_config(broker.clone(), config(2)));

    assert_ready_ok!(service.poll_ready());
    let mut first = tokio_test::task::spawn(service.call(to(&b)));
    assert_ready_ok!(service.poll_ready());
    let second = service.call(to(&b));
    // Two sent, none confirmed: the third waits.
    assert_pending!(service.poll_ready());
    assert_pending!(first.poll());

    // A clone shares the bound.
    let mut clone = Spawn::new(service.get_ref().clone());
    assert_pending!(clone.poll_ready());

    // The broker confirms the first: a slot frees and the waiting service is woken.
    gate.add_permits(1);
    assert!(first.is_woken());
    assert_ready_ok!(first.poll());
    assert!(service.is_woken());
    assert_ready_ok!(service.poll_ready());
    assert_pending!(clone.poll_ready());

    // Dropping a response future gives its slot back too.
    drop(second);
    assert!(clone.is_woken());
    assert_ready_ok!(clone.poll_ready());
}

#[tokio::test]
async fn broker_flow_control_is_reported_by_poll_ready() {
    let broker = Arc::new(TestBroker::default());
    let mut service = Spawn::new(Forward::new(broker.clone()));
    assert_pending!(service.poll_ready());
    broker.set_flow(Some(true));
    assert!(service.is_woken());
    assert_ready_ok!(service.poll_ready());

    broker.set_flow(None);
    assert_pending!(service.poll_ready());
    broker.set_flow(Some(false));
    assert!(service.is_woken());
    let err = assert_ready!(service.poll_ready()).unwrap_err();
    assert!(matches!(err, ForwardError::Broker(BrokerError::Closed)));
}

#[tokio::test]
async fn a_disarmed_clone_gives_its_place_back_and_leaves_the_line() {
    let (broker, _gate) = TestBroker::gated();
    broker.set_flow(Some(true));
    let broker = Arc::new(broker);
    let mut idle = Spawn::new(Forward::with_config(broker.clone(), config(1)));
    let mut other = Spawn::new(idle.get_ref().clone());

    // Ready, then not called: the one place is held...
    assert_ready_ok!(idle.poll_ready());
    assert!(idle.get_ref().is_ready());
    assert_pending!(other.poll_ready());
    // ...until the caller gives it back.
    assert!(idle.get_mut().disarm());
    assert!(!idle.get_ref().is_ready());
    assert!(other.is_woken());
    assert_ready_ok!(other.poll_ready());

    // A clone waiting in line that disarms leaves the line: the place goes to the next one.
    assert_pending!(idle.poll_ready());
    let mut third = Spawn::new(other.get_ref().clone());
    assert_pending!(third.poll_ready());
    assert!(idle.get_mut().disarm());
    assert!(!idle.get_mut().disarm(), "nothing left to give back");
    assert!(other.get_mut().disarm());
    assert!(third.is_woken());
    assert_ready_ok!(third.poll_ready());
}

#[tokio::test]
async fn a_failed_readiness_gives_its_place_back() {
    let broker = Arc::new(TestBroker::default());
    broker.set_flow(Some(false));
    let mut failing = Spawn::new(Forward::with_config(broker.clone(), config(1)));
    assert!(assert_ready!(failing.poll_ready()).is_err());
    assert!(!failing.get_ref().is_ready());
    assert_eq!(failing.get_ref().available_permits(), 1);
}

#[tokio::test]
async fn clones_waiting_for_a_place_are_served_in_the_order_they_asked() {
    let (broker, _gate) = TestBroker::gated();
    broker.set_flow(Some(true));
    let broker = Arc::new(broker);
    let mut holder = Spawn::new(Forward::with_config(broker.clone(), config(1)));
    assert_ready_ok!(holder.poll_ready());
    let mut waiting: Vec<_> = (0..5)
        .map(|_| Spawn::new(holder.get_ref().clone()))
        .collect();
    for clone in &mut waiting {
        assert_pending!(clone.poll_ready());
    }
    // A newcomer that tries without waiting cannot jump the line.
    let mut newcomer = Spawn::new(holder.get_ref().clone());
    holder.get_mut().disarm();
    assert_pending!(newcomer.poll_ready());
    for i in 0..waiting.len() {
        // Only the first in line has a place; the others still wait.
        for later in waiting.iter_mut().skip(i + 1) {
            assert_pending!(later.poll_ready());
        }
        assert_ready_ok!(waiting[i].poll_ready());
        waiting[i].get_mut().disarm();
    }
    assert_ready_ok!(newcomer.poll_ready());
}

#[tokio::test]
async fn failures_are_typed_and_nothing_is_sent_for_refused_envelopes() {
    let broker = TestBroker::default();
    broker.set_flow(Some(true));
    let b = node_queue(&broker, "b").await;
    let broker = Arc::new(broker);
    let service = Forward::with_config(
        broker.clone(),
        ForwardConfig {
            max_in_flight: 4,
            max_payload: 8,
            ..ForwardConfig::default()
        },
    );

    // Called without poll_ready.
    let err = service.clone().call(to(&b)).await.unwrap_err();
    assert!(matches!(err, ForwardError::NotReady));

    let gone = Target::Node(node("gone"));
    let err = service
        .clone()
        .oneshot(Envelope::text(node("a"), gone.clone(), "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { ref target } if *target == gone));
    assert!(!err.is_transient());

    let room = Target::Group(GroupName::new("empty-room").unwrap());
    let err = service
        .clone()
        .oneshot(Envelope::text(node("a"), room, "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { .. }));

    let big = Envelope::binary(node("a"), Target::Node(b.clone()), vec![0u8; 9]);
    let err = service.clone().oneshot(big).await.unwrap_err();
    assert!(matches!(
        err,
        ForwardError::PayloadTooLarge { len: 9, max: 8 }
    ));

    let mut reserved = to(&b);
    reserved
        .headers
        .insert("hc-target".into(), "node:evil".into());
    let err = service.clone().oneshot(reserved).await.unwrap_err();
    assert!(matches!(err, ForwardError::Encode(_)));
    assert!(std::error::Error::source(&err).is_some());

    // Only the unroutable ones reached the broker.
    assert_eq!(broker.published.lock().len(), 2);
    assert_eq!(broker.inner.queue_len(&b), Some(0));
    // And every permit came back.
    assert_eq!(service.available_permits(), 4);
}

#[tokio::test]
async fn a_full_queue_rejects() {
    let broker = TestBroker::default();
    broker.set_flow(Some(true));
    let b = node("b");
    let options = QueueOptions {
        max_length: Some(1),
        ..QueueOptions::default()
    };
    broker.declare_queue(&b, &options).await.unwrap();
    broker.bind(&b, &RoutingKey::Node(b.clone())).await.unwrap();
    let service = Forward::new(Arc::new(broker));
    service.clone().oneshot(to(&b)).await.unwrap();
    let err = service.oneshot(to(&b)).await.unwrap_err();
    assert!(matches!(err, ForwardError::Rejected { .. }));
}

#[tokio::test]
async fn messages_are_ordered_at_call_time() {
    let (broker, gate) = TestBroker::gated();
    broker.set_flow(Some(true));
    let b = node_queue(&broker, "b").await;
    let broker = Arc::new(broker);
    let mut service = Spawn::new(Forward::with_config(broker.clone(), config(16)));
    let mut futures = Vec::new();
    let mut ids = Vec::new();
    for n in 0..5 {
        assert_ready_ok!(service.poll_ready());
        let envelope = Envelope::text(node("a"), Target::Node(b.clone()), format!("{n}"));
        ids.push(envelope.id.to_string());
        futures.push(service.call(envelope));
    }
    // Await them in reverse: the order is the calls'.
    gate.add_permits(5);
    for future in futures.into_iter().rev() {
        future.await.unwrap();
    }
    let mut deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let delivery = futures_util::StreamExt::next(&mut deliveries)
            .await
            .unwrap()
            .unwrap();
        got.push(delivery.message.message_id.clone());
    }
    assert_eq!(got, ids);
}

#[derive(Clone)]
struct RetryTransient(usize);

impl tower::retry::Policy<Envelope, (), tower::BoxError> for RetryTransient {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Envelope,
        result: &mut Result<(), tower::BoxError>,
    ) -> Option<Self::Future> {
        let transient = match result {
            Ok(()) => false,
            Err(e) => {
                e.is::<tower::timeout::error::Elapsed>()
                    || e.downcast_ref::<ForwardError>()
                        .is_some_and(ForwardError::is_transient)
            }
        };
        (transient && self.0 > 0).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, request: &Envelope) -> Option<Envelope> {
        Some(request.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn composes_with_timeout_and_retry() {
    let broker = TestBroker::default();
    broker.set_flow(Some(true));
    let b = node_queue(&broker, "b").await;
    broker.fail_next.store(2, Ordering::SeqCst);
    let broker = Arc::new(broker);
    let stack = tower::ServiceBuilder::new()
        .retry(RetryTransient(3))
        .timeout(Duration::from_secs(1))
        .service(Forward::new(broker.clone()));
    let envelope = to(&b);
    let id = envelope.id.to_string();
    stack.oneshot(envelope).await.unwrap();
    // Two transient failures ("connection lost" after the message reached the queue), then
    // success; every attempt carried the same id...
    let published = broker.published.lock().clone();
    assert_eq!(published, vec![id.clone(), id.clone(), id]);
    assert_eq!(broker.inner.queue_len(&b), Some(3));

    // ...so the receiver hands it over once and drops the two copies.
    let deliveries = broker
        .consume(&b, &ConsumeOptions::default())
        .await
        .unwrap();
    let receiver = crate::Receiver::new(deliveries);
    let handed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handed);
    let local = tower::service_fn(move |_: Envelope| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<_, std::convert::Infallible>(()))
    });
    let (run, stats) = Outcomes::record(|| receiver.run(local));
    let run = tokio::spawn(run);
    // Every copy settled: counted, and acknowledged (after its hand-over).
    tokio::time::timeout(Duration::from_secs(5), async {
        while stats.get().duplicates < 2 || broker.inner.queue_len(&b) != Some(0) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(handed.load(Ordering::SeqCst), 1);
    assert_eq!(stats.get().handled, 1);
    run.abort();
}
