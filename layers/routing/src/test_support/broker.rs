//! A memory broker with knobs, for the unit tests: it delegates to a [`MemoryBroker`] and can
//! hold publishes at a gate, switch its flow, fail its next publishes, and hold binds of one
//! key at a gate. It records the id of every message published.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Broker, BrokerError, BrokerMessage, ConsumeOptions, Deliveries, NodeId, PublishError,
    QueueOptions, RoutingKey,
};
use hybrid_cluster_memory::MemoryBroker;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// A memory broker whose publishes wait for a gate, whose flow can be switched, whose next
/// publishes can be made to fail, and whose binds of one key wait for a gate.
#[derive(Debug, Default)]
pub(crate) struct TestBroker {
    pub(crate) inner: MemoryBroker,
    gate: Option<Arc<Semaphore>>,
    slow_bind: Option<(RoutingKey, Arc<Semaphore>)>,
    /// `Some(true)`: ready; `Some(false)`: failed; `None`: pushing back (the default).
    flow: Mutex<(Option<bool>, Option<Waker>)>,
    /// Publishes to fail, from the next one on ("connection lost" after the message reached
    /// its queue).
    pub(crate) fail_next: AtomicUsize,
    /// The ids of the messages published, in call order.
    pub(crate) published: Mutex<Vec<String>>,
}

impl TestBroker {
    /// A broker whose publishes each wait for a permit of the gate returned.
    pub(crate) fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let broker = Self {
            gate: Some(Arc::clone(&gate)),
            ..Self::default()
        };
        (broker, gate)
    }

    /// A broker whose binds of `key` each wait for a permit of the gate returned; its flow is
    /// ready, like the memory broker's.
    pub(crate) fn slow_bind(key: RoutingKey) -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let broker = Self {
            slow_bind: Some((key, Arc::clone(&gate))),
            flow: Mutex::new((Some(true), None)),
            ..Self::default()
        };
        (broker, gate)
    }

    /// `Some(true)`: ready; `Some(false)`: failed; `None`: pushing back.
    pub(crate) fn set_flow(&self, flow: Option<bool>) {
        let waker = {
            let mut state = self.flow.lock();
            state.0 = flow;
            state.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Broker for TestBroker {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.declare_queue(node, options)
    }
    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.delete_queue(node)
    }
    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>> {
        let bind = self.inner.bind(node, key);
        let gate = self
            .slow_bind
            .as_ref()
            .and_then(|(slow, gate)| (slow == key).then(|| Arc::clone(gate)));
        Box::pin(async move {
            if let Some(gate) = gate {
                let _ = gate.acquire().await;
            }
            bind.await
        })
    }
    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.unbind(node, key)
    }
    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        self.published.lock().push(message.message_id.clone());
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        // Ordered at the call, like a real backend.
        let publish = self.inner.publish(key, message);
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if failing {
                return Err(PublishError::Broker(BrokerError::Unavailable {
                    source: "connection lost".into(),
                }));
            }
            publish.await
        })
    }
    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>> {
        self.inner.consume(node, options)
    }
    fn poll_flow(&self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        let mut state = self.flow.lock();
        match state.0 {
            Some(true) => Poll::Ready(Ok(())),
            Some(false) => Poll::Ready(Err(BrokerError::Closed)),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
