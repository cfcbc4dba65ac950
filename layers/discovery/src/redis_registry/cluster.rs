//! A [`RedisRegistry`] on a Redis Cluster: commands through redis-rs's cluster client, change
//! events on a sharded channel in the slot of the cluster's keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use hybrid_cluster_core::registry::RegistryEvents;
use hybrid_cluster_core::{ClusterPrefix, RedisUrl, RegistryError, RegistryEvent};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionInfo, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::keys::{KeyLayout, parse_event};
use super::{RedisOptions, RedisRegistry, Subscriber, classify};

/// A [`RedisRegistry`] on a Redis Cluster, from [`RedisRegistry::connect_cluster`].
pub type RedisClusterRegistry = RedisRegistry<ClusterConnection>;

/// The seed nodes of a Redis Cluster, shared by the registry's clones.
pub(super) type Seeds = Arc<[ConnectionInfo]>;

/// Change events a watcher holds before it reads them; past this, it lists the registry again.
const PUSH_CAPACITY: usize = 1024;

/// How many times a command is tried again after a redirection or a lost node; with the waits
/// below, a failover of a few seconds passes without an error.
const RETRIES: u32 = 6;
const MIN_RETRY_WAIT: Duration = Duration::from_millis(100);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(1);

impl RedisRegistry<ClusterConnection> {
    /// Connects to the Redis Cluster that `seeds` belong to, for the cluster `prefix`.
    ///
    /// Each seed is a [`RedisUrl`] (the forms `--redis` takes); the first that answers tells
    /// the client every node and slot, so one live seed is enough. All seeds must agree on the
    /// user, password, TLS and database (a Redis Cluster only has database 0). Every key of
    /// `prefix` carries one hash tag, so they all live in one slot: scripts and transactions
    /// run on that slot's master, and change events use Redis 7's sharded pub/sub
    /// (`SPUBLISH`/`SSUBSCRIBE`) on a channel of the same slot.
    ///
    /// When the slot's master fails over, commands follow the redirection to the new master
    /// (tried again for a few seconds) and a watcher's stream ends when the server drops its
    /// subscription, so the [`ClusterView`](crate::ClusterView) subscribes and lists again, as
    /// after a lost connection to a single Redis. `options.client_name` is not reported on a
    /// cluster: redis-rs's cluster client does not pass it on.
    ///
    /// Fails with [`RegistryError::InvalidArgument`] without seeds, with
    /// [`RegistryError::Unavailable`] when no seed answers within the connection timeout, and
    /// with [`RegistryError::Backend`] when the seeds disagree or the servers refuse the
    /// connection (a wrong password, a server that is not in cluster mode).
    pub async fn connect_cluster(
        seeds: &[RedisUrl],
        prefix: &ClusterPrefix,
        options: RedisOptions,
    ) -> Result<Self, RegistryError> {
        if seeds.is_empty() {
            return Err(RegistryError::InvalidArgument {
                reason: "a Redis Cluster needs at least one seed URL",
            });
        }
        let infos = seeds
            .iter()
            .map(|url| url.to_connection_string().into_connection_info())
            .collect::<Result<Seeds, _>>()
            .map_err(classify)?;
        let client = builder(&infos, &options).build().map_err(classify)?;
        let connection = super::within(
            options.connection_timeout * 3,
            client.get_async_connection(),
        )
        .await?;
        Ok(Self {
            connection,
            subscriber: Subscriber::Sharded(infos),
            keys: KeyLayout::new(prefix),
            servers: seeds.to_vec(),
            options,
        })
    }
}

fn builder(seeds: &Seeds, options: &RedisOptions) -> ClusterClientBuilder {
    ClusterClientBuilder::new(seeds.iter().cloned())
        .connection_timeout(options.connection_timeout)
        .response_timeout(options.response_timeout)
        // Each try has the response timeout; the retries through a failover need more.
        .overall_response_timeout(Some(options.response_timeout * 3))
        .retries(RETRIES)
        .min_retry_wait(u64::try_from(MIN_RETRY_WAIT.as_millis()).unwrap_or(u64::MAX))
        .max_retry_wait(u64::try_from(MAX_RETRY_WAIT.as_millis()).unwrap_or(u64::MAX))
}

/// What a watcher's pushes tell it beyond its messages: set by redis-rs's connection task,
/// read by the stream.
#[derive(Default)]
struct Signals {
    /// A message did not fit: list again.
    lagged: AtomicBool,
    /// The subscription is gone (its node disconnected, or the server dropped it when the
    /// slot moved): the stream ends so the watcher subscribes again.
    ended: AtomicBool,
}

/// Hands redis-rs's pushes to the stream without ever blocking its connection task: what does
/// not fit is remembered as a signal.
fn push_sender(
    sender: mpsc::Sender<PushInfo>,
    signals: Arc<Signals>,
) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
    move |push: PushInfo| {
        let kind = push.kind.clone();
        match sender.try_send(push) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let signal = match kind {
                    PushKind::SMessage => &signals.lagged,
                    _ => &signals.ended,
                };
                signal.store(true, Ordering::Release);
                Ok(())
            }
            // The stream is gone: nobody listens any more.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }
}

/// Subscribes to the sharded events channel, through a cluster client of its own (redis-rs
/// hands a client's pushes to one sender, given when it is built).
pub(super) async fn watch_sharded(
    seeds: Seeds,
    keys: KeyLayout,
    options: RedisOptions,
) -> Result<RegistryEvents, RegistryError> {
    let limit = options.connection_timeout + options.response_timeout;
    let (sender, mut receiver) = mpsc::channel::<PushInfo>(PUSH_CAPACITY);
    let signals = Arc::new(Signals::default());
    let client: ClusterClient = builder(&seeds, &options)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(push_sender(sender, signals.clone()))
        .build()
        .map_err(classify)?;
    let subscribe = async {
        let mut connection = client.get_async_connection().await?;
        connection.ssubscribe(keys.events_channel()).await?;
        Ok::<_, redis::RedisError>(connection)
    };
    let connection = super::within(limit, subscribe).await?;
    let events = futures_util::stream::poll_fn(move |cx| {
        // The connection keeps the subscription as long as the stream.
        let _subscription = &connection;
        loop {
            if signals.ended.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            if signals.lagged.swap(false, Ordering::AcqRel) {
                return Poll::Ready(Some(Ok(RegistryEvent::Lagged)));
            }
            let Some(push) = std::task::ready!(receiver.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            match read_push(&keys, push) {
                Pushed::Event(event) => return Poll::Ready(Some(Ok(event))),
                Pushed::Nothing => {}
                Pushed::End(why) => {
                    tracing::info!(
                        channel = %keys.events_channel(),
                        why,
                        "the Redis Cluster ended the discovery subscription; subscribing again"
                    );
                    signals.ended.store(true, Ordering::Release);
                }
            }
        }
    });
    Ok(Box::pin(events) as RegistryEvents)
}

/// What one push means to a watcher.
enum Pushed {
    Event(RegistryEvent),
    Nothing,
    End(&'static str),
}

fn read_push(keys: &KeyLayout, push: PushInfo) -> Pushed {
    match push.kind {
        // `smessage`, channel, payload.
        PushKind::SMessage => {
            let Some(Value::BulkString(payload)) = push.data.get(1) else {
                tracing::warn!(
                    channel = %keys.events_channel(),
                    "ignoring a sharded message without a payload"
                );
                return Pushed::Nothing;
            };
            match parse_event(keys, payload) {
                Ok(event) => Pushed::Event(event),
                Err(reason) => {
                    tracing::warn!(
                        channel = %keys.events_channel(),
                        reason,
                        "ignoring a malformed discovery event"
                    );
                    Pushed::Nothing
                }
            }
        }
        // The watcher never unsubscribes: the server did, because the slot moved (a failover,
        // a resharding).
        PushKind::SUnsubscribe => Pushed::End("the server dropped the sharded subscription"),
        PushKind::Disconnection => Pushed::End("a connection to the cluster was lost"),
        _ => Pushed::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(kind: PushKind, data: Vec<Value>) -> PushInfo {
        PushInfo { kind, data }
    }

    #[test]
    fn pushes_read_to_events_or_the_end_of_the_subscription() {
        let keys = KeyLayout::new(&ClusterPrefix::default());
        let channel = Value::BulkString(keys.events_channel().as_bytes().to_vec());
        let message = push(
            PushKind::SMessage,
            vec![channel.clone(), Value::BulkString(b"left n1".to_vec())],
        );
        assert!(matches!(
            read_push(&keys, message),
            Pushed::Event(RegistryEvent::Removed { .. })
        ));
        for ignored in [
            push(PushKind::SMessage, vec![channel.clone()]),
            push(
                PushKind::SMessage,
                vec![channel.clone(), Value::BulkString(b"joined n1".to_vec())],
            ),
            push(PushKind::SSubscribe, vec![channel.clone(), Value::Int(1)]),
        ] {
            assert!(matches!(read_push(&keys, ignored), Pushed::Nothing));
        }
        for ending in [
            push(PushKind::SUnsubscribe, vec![channel, Value::Int(0)]),
            push(PushKind::Disconnection, vec![]),
        ] {
            assert!(matches!(read_push(&keys, ending), Pushed::End(_)));
        }
    }

    #[tokio::test]
    async fn no_seed_is_refused_before_any_connection() {
        let error =
            RedisRegistry::connect_cluster(&[], &ClusterPrefix::default(), RedisOptions::default())
                .await
                .unwrap_err();
        assert!(matches!(error, RegistryError::InvalidArgument { .. }));
    }
}
