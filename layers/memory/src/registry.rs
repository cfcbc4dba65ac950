//! The in-memory [`Registry`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_core::future::BoxFuture;
use hybrid_cluster_core::registry::check_route_name;
use hybrid_cluster_core::{
    ConnectionId, NodeId, NodeRecord, Registry, RegistryError, RegistryEvent, RegistryEvents,
    RemovalCause,
};
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// Events a watcher may fall behind by before it is told it [lagged](RegistryEvent::Lagged).
const EVENT_CAPACITY: usize = 1024;

/// How long an idle watcher sleeps when no lease is pending.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// A [`Registry`] kept in memory and shared by its clones.
///
/// Leases are measured with tokio's clock. An expired record is dropped the next time the
/// registry is used, or when a watcher's timer fires at the lease's end, whichever comes first;
/// watchers are then sent [`RegistryEvent::Removed`] with [`RemovalCause::Expired`], like Redis
/// removing an expired key lazily or by its active expiry cycle.
#[derive(Clone)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<RegistryEvent>,
    sessions: crate::MemorySessionStore,
    presence: crate::MemoryPresenceStore,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<NodeId, Leased<Bytes>>,
    routes: HashMap<String, Leased<ConnectionId>>,
}

struct Leased<T> {
    value: T,
    expires_at: Instant,
}

impl Leased<Bytes> {
    fn to_record(&self, node: &NodeId) -> NodeRecord {
        NodeRecord {
            node: node.clone(),
            key: node_key(node),
            value: self.value.clone(),
            expires_in: Some(self.expires_at.saturating_duration_since(Instant::now())),
        }
    }
}

fn node_key(node: &NodeId) -> String {
    format!("nodes:{node}")
}

fn deadline(lease: Duration) -> Instant {
    Instant::now() + lease.max(Duration::from_millis(1))
}

impl Shared {
    /// Drops expired entries and tells watchers; called with the state locked, so events are
    /// sent in the order the changes were made.
    fn reap(&self, state: &mut State) {
        let now = Instant::now();
        let expired: Vec<NodeId> = state
            .nodes
            .iter()
            .filter(|(_, leased)| leased.expires_at <= now)
            .map(|(node, _)| node.clone())
            .collect();
        for node in expired {
            state.nodes.remove(&node);
            self.send(RegistryEvent::Removed {
                node,
                cause: RemovalCause::Expired,
            });
        }
        state.routes.retain(|_, leased| leased.expires_at > now);
    }

    fn send(&self, event: RegistryEvent) {
        // No watcher at all is not an error: nobody is listening yet.
        let _ = self.events.send(event);
    }

    fn locked<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock();
        self.reap(&mut state);
        f(&mut state)
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.state
            .lock()
            .nodes
            .values()
            .map(|leased| leased.expires_at)
            .min()
    }
}

impl MemoryRegistry {
    /// A new, empty registry.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                events,
                sessions: crate::MemorySessionStore::new(),
                presence: crate::MemoryPresenceStore::new(),
            }),
        }
    }

    /// The session store that goes with this registry: shared by its clones, as every node of
    /// a cluster on the same Redis shares its sessions.
    pub fn sessions(&self) -> crate::MemorySessionStore {
        self.shared.sessions.clone()
    }

    /// The presence store that goes with this registry, shared by its clones.
    pub fn presence(&self) -> crate::MemoryPresenceStore {
        self.shared.presence.clone()
    }

    /// The nodes with a live record, in id order (for troubleshooting and tests).
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.shared
            .locked(|state| state.nodes.keys().cloned().collect())
    }

    /// How long `node`'s lease has left, if it has a live record.
    pub fn lease_remaining(&self, node: &NodeId) -> Option<Duration> {
        let now = Instant::now();
        self.shared.locked(|state| {
            state
                .nodes
                .get(node)
                .map(|leased| leased.expires_at.saturating_duration_since(now))
        })
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("nodes", &self.node_ids())
            .finish()
    }
}

fn done<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(ready(value))
}

impl Registry for MemoryRegistry {
    fn put_node(
        &self,
        node: &NodeId,
        record: Bytes,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let node = node.clone();
        self.shared.locked(|state| {
            state.nodes.insert(
                node.clone(),
                Leased {
                    value: record.clone(),
                    expires_at: deadline(lease),
                },
            );
            self.shared.send(RegistryEvent::Updated(NodeRecord {
                key: node_key(&node),
                node,
                value: record,
                expires_in: Some(lease.max(Duration::from_millis(1))),
            }));
        });
        done(Ok(()))
    }

    fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.shared.locked(|state| {
            if state.nodes.remove(node).is_some() {
                self.shared.send(RegistryEvent::Removed {
                    node: node.clone(),
                    cause: RemovalCause::Left,
                });
            }
        });
        done(Ok(()))
    }

    fn node(&self, node: &NodeId) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>> {
        let record = self
            .shared
            .locked(|state| state.nodes.get(node).map(|leased| leased.to_record(node)));
        done(Ok(record))
    }

    /// Every record carries its lease.
    fn reports_leases(&self) -> bool {
        true
    }

    fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>> {
        let records = self.shared.locked(|state| {
            state
                .nodes
                .iter()
                .map(|(node, leased)| leased.to_record(node))
                .collect()
        });
        done(Ok(records))
    }

    fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>> {
        let watch = Watch {
            events: BroadcastStream::new(self.shared.events.subscribe()),
            shared: Arc::clone(&self.shared),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        };
        done(Ok(Box::pin(watch) as RegistryEvents))
    }

    fn put_route(
        &self,
        name: &str,
        connection: &ConnectionId,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return done(Err(e));
        }
        self.shared.locked(|state| {
            state.routes.insert(
                name.to_owned(),
                Leased {
                    value: connection.clone(),
                    expires_at: deadline(lease),
                },
            );
        });
        done(Ok(()))
    }

    fn route(&self, name: &str) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return done(Err(e));
        }
        let route = self
            .shared
            .locked(|state| state.routes.get(name).map(|leased| leased.value.clone()));
        done(Ok(route))
    }

    fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return done(Err(e));
        }
        self.shared.locked(|state| state.routes.remove(name));
        done(Ok(()))
    }
}

/// One watcher: the registry's events, plus a timer at the next lease's end so expiries are
/// reported even when nobody else touches the registry.
struct Watch {
    shared: Arc<Shared>,
    events: BroadcastStream<RegistryEvent>,
    timer: Pin<Box<Sleep>>,
}

impl Watch {
    fn rearm(&mut self) {
        let at = self
            .shared
            .next_expiry()
            .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        self.timer.as_mut().reset(at);
    }
}

impl Stream for Watch {
    type Item = Result<RegistryEvent, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.events).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    this.rearm();
                    return Poll::Ready(Some(Ok(event)));
                }
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(_)))) => {
                    this.rearm();
                    return Poll::Ready(Some(Ok(RegistryEvent::Lagged)));
                }
                // The sender lives in `shared`, which this stream holds: never closed.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A lease may have run out: reaping sends its removal, which the loop then reads.
            this.shared.locked(|_| ());
            this.rearm();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use hybrid_cluster_core::Incarnation;

    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_renewed_expires_and_watchers_are_told() {
        let registry = MemoryRegistry::new();
        let mut events = registry.watch().await.unwrap();
        let lease = Duration::from_secs(15);
        registry
            .put_node(&node("a"), Bytes::from_static(b"{}"), lease)
            .await
            .unwrap();
        registry
            .put_node(&node("b"), Bytes::from_static(b"{}"), lease)
            .await
            .unwrap();
        for expected in ["a", "b"] {
            match events.next().await {
                Some(Ok(RegistryEvent::Updated(record))) => assert_eq!(record.node, node(expected)),
                other => panic!("expected an update, got {other:?}"),
            }
        }

        // b keeps heart-beating, a stops.
        for step in [5, 5, 4] {
            tokio::time::advance(Duration::from_secs(step)).await;
            registry
                .put_node(&node("b"), Bytes::from_static(b"{}"), lease)
                .await
                .unwrap();
            assert!(matches!(
                events.next().await,
                Some(Ok(RegistryEvent::Updated(_)))
            ));
        }
        let started = Instant::now();
        assert_eq!(
            events.next().await.unwrap().unwrap(),
            RegistryEvent::Removed {
                node: node("a"),
                cause: RemovalCause::Expired
            }
        );
        // The removal came at the end of a's lease (15 s, one second after b's last renewal),
        // reported by the watcher's own timer.
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        let live: Vec<_> = registry
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.node)
            .collect();
        assert_eq!(live, vec![node("b")]);
        assert!(registry.node(&node("a")).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_watcher_reports_an_expiry_at_the_end_of_the_lease() {
        let registry = MemoryRegistry::new();
        let mut events = registry.watch().await.unwrap();
        registry
            .put_node(
                &node("a"),
                Bytes::from_static(b"{}"),
                Duration::from_secs(3),
            )
            .await
            .unwrap();
        assert!(matches!(
            events.next().await,
            Some(Ok(RegistryEvent::Updated(_)))
        ));
        let started = Instant::now();
        // Nobody touches the registry: the paused clock runs to the watcher's timer.
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(
            event,
            RegistryEvent::Removed {
                node: node("a"),
                cause: RemovalCause::Expired
            }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_leave_is_reported_at_once() {
        let registry = MemoryRegistry::new();
        registry
            .put_node(
                &node("a"),
                Bytes::from_static(b"{}"),
                Duration::from_secs(15),
            )
            .await
            .unwrap();
        let mut events = registry.watch().await.unwrap();
        registry.remove_node(&node("a")).await.unwrap();
        assert_eq!(
            events.next().await.unwrap().unwrap(),
            RegistryEvent::Removed {
                node: node("a"),
                cause: RemovalCause::Left
            }
        );
        assert!(registry.nodes().await.unwrap().is_empty());
        // Removing again is not an error and tells nobody anything.
        registry.remove_node(&node("a")).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_watcher_is_told_it_lagged() {
        let registry = MemoryRegistry::new();
        let mut events = registry.watch().await.unwrap();
        for i in 0..(EVENT_CAPACITY + 10) {
            registry
                .put_node(
                    &node(&format!("n{i}")),
                    Bytes::new(),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        }
        assert_eq!(events.next().await.unwrap().unwrap(), RegistryEvent::Lagged);
        assert_eq!(registry.nodes().await.unwrap().len(), EVENT_CAPACITY + 10);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_are_leased() {
        let registry = MemoryRegistry::new();
        let connection = ConnectionId::new(node("a"), Incarnation::from_u64(1), 7);
        registry
            .put_route("user:42", &connection, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(registry.route("user:42").await.unwrap(), Some(connection));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(registry.route("user:42").await.unwrap(), None);
        assert!(matches!(
            registry.route("").await,
            Err(RegistryError::InvalidArgument { .. })
        ));
    }
}
