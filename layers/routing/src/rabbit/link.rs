//! The connection: made, its topology declared, watched, and made again when lost.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt;
use hybrid_cluster_core::{ConsumerState, NodeId, QueueOptions, RoutingKey};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Event, ExchangeKind};
use tokio::sync::mpsc;
use tower::retry::backoff::Backoff;
use tracing::{debug, info, warn};

use super::consumer;
use super::error::RabbitError;
use super::shared::{Address, Link, Shared, shut_down};
use super::wire;

pub(crate) type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Connects to `address`, within the configured time; `role` ends the connection's name.
async fn connect(
    shared: &Shared,
    address: &Address,
    role: &str,
) -> Result<(Connection, Events), RabbitError> {
    let mut properties = ConnectionProperties::default();
    if let Some(name) = &shared.config.connection_name {
        properties = properties.with_connection_name(format!("{name} ({role})").into());
    }
    let connecting = Connection::connect(&address.uri, properties);
    let connection = match tokio::time::timeout(shared.config.connect_timeout, connecting).await {
        Err(_) => {
            return Err(RabbitError::ConnectTimeout {
                url: address.url.clone(),
                after: shared.config.connect_timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(RabbitError::Connect {
                url: address.url.clone(),
                source,
            });
        }
        Ok(Ok(connection)) => connection,
    };
    let events: Events = Box::pin(connection.events_listener());
    Ok((connection, events))
}

/// Declares the cluster's exchange and its dead-letter exchange, then the dead-letter queue
/// (see [`declare_dead_letter_queue`]).
async fn declare_cluster(
    shared: &Shared,
    connection: &Connection,
    channel: &Channel,
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let names = &shared.names;
    channel
        .exchange_declare(
            names.exchange.clone(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.dead_letter.clone(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    // On a channel of its own: a refusal closes it.
    let dead_letter_channel = connection.create_channel().await?;
    match declare_dead_letter_queue(shared, &dead_letter_channel).await {
        Ok(()) => {
            let _ = dead_letter_channel.close(200, "OK".into()).await;
            Ok(())
        }
        Err(error) if wire::is_connection_error(&error) && !connection.status().connected() => {
            Err(error)
        }
        Err(error) => {
            // On a RabbitMQ cluster, a classic queue is unavailable while its node is down:
            // dead letters are for inspection, so routing goes on without them meanwhile.
            warn!(%error, "the dead-letter queue is unavailable; dead letters are dropped until it is back");
            Ok(())
        }
    }
}

/// Declares the dead-letter queue and binds it to the dead-letter exchange.
async fn declare_dead_letter_queue(shared: &Shared, channel: &Channel) -> lapin::Result<()> {
    let names = &shared.names;
    let arguments = wire::dead_letter_arguments(
        shared.config.dead_letter_max_length,
        shared.config.dead_letter_expires,
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(names.dead_letter.clone(), options, arguments)
        .await?;
    channel
        .queue_bind(
            names.dead_letter.clone(),
            names.dead_letter.clone(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

pub(crate) async fn declare_queue(
    shared: &Shared,
    channel: &Channel,
    node: &NodeId,
    options: &QueueOptions,
) -> lapin::Result<()> {
    let Ok(queue) = shared.names.queue(node) else {
        return Ok(());
    };
    // Durable in every mode: the queue and its bindings outlive a broker restart (RabbitMQ 4
    // refuses transient queues that are not exclusive); the messages' own durability is the
    // publisher's (persistent or not).
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            queue,
            durable,
            wire::queue_arguments(options, &shared.names),
        )
        .await
        .map(drop)
}

pub(crate) async fn bind(
    shared: &Shared,
    channel: &Channel,
    node: &NodeId,
    key: &RoutingKey,
) -> lapin::Result<()> {
    let (Ok(queue), Ok(key)) = (shared.names.queue(node), wire::short(key.to_string())) else {
        return Ok(());
    };
    channel
        .queue_bind(
            queue,
            shared.names.exchange.clone(),
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// A consumer to heal once its connection is published: node, consumer id, stream.
pub(crate) type Healing = Vec<(
    NodeId,
    u64,
    mpsc::Sender<Result<hybrid_cluster_core::Delivery, hybrid_cluster_core::BrokerError>>,
)>;

/// Establishes the connection on one of the broker's addresses, trying each once in turn
/// from the one at `first` (see [`establish_at`]). When all fail, the error is the last
/// address's; with several addresses, each failure is logged.
pub(crate) async fn establish(
    shared: &Arc<Shared>,
    first: usize,
) -> Result<(Link, Events, Healing), RabbitError> {
    let count = shared.addresses.len();
    let mut last_error = RabbitError::NoAddress;
    for offset in 0..count {
        let index = (first + offset) % count;
        let Some(address) = shared.addresses.get(index) else {
            continue;
        };
        match establish_at(shared, address).await {
            Ok(established) => {
                shared.current.store(index, Ordering::Relaxed);
                return Ok(established);
            }
            Err(error) => {
                if count > 1 {
                    warn!(
                        url = %address.url,
                        error = %hybrid_cluster_core::error::error_chain(&error),
                        "connecting to a RabbitMQ address failed; trying the next"
                    );
                }
                last_error = error;
            }
        }
    }
    Err(last_error)
}

/// Connects to `address` and declares everything this broker declared before, then starts
/// its consumers again. Returns the new connection, not yet published, and the consumers that
/// could not be started on it (to heal once it is).
async fn establish_at(
    shared: &Arc<Shared>,
    address: &Address,
) -> Result<(Link, Events, Healing), RabbitError> {
    let (connection, events) = connect(shared, address, "consuming").await?;
    let (publishing, publishing_events) = connect(shared, address, "publishing").await?;
    let events: Events = Box::pin(futures_util::stream::select(events, publishing_events));
    let connection = Arc::new(connection);
    let channel = connection
        .create_channel()
        .await
        .map_err(RabbitError::Amqp)?;
    declare_cluster(shared, &connection, &channel)
        .await
        .map_err(RabbitError::Amqp)?;
    // From here on, an operation done on an older connection is done again on this one.
    let (link, queues, bindings) = {
        let mut state = shared.state.lock();
        state.generation += 1;
        let link = Link {
            generation: state.generation,
            connection,
            publishing: Arc::new(publishing),
        };
        (link, state.queues.clone(), state.bindings.clone())
    };
    declare_again(shared, &link, channel, &queues, &bindings).await?;
    let healing = resume_consumers(shared, &link).await?;
    Ok((link, events, healing))
}

/// Declares on `link` the queues and bindings made through this broker before.
async fn declare_again(
    shared: &Shared,
    link: &Link,
    mut channel: Channel,
    queues: &BTreeMap<NodeId, QueueOptions>,
    bindings: &BTreeSet<(NodeId, RoutingKey)>,
) -> Result<(), RabbitError> {
    // A refused declaration (another declaration of the queue with other arguments) closes
    // the channel: warn, and go on with a new one.
    for (node, options) in queues {
        if let Err(error) = declare_queue(shared, &channel, node, options).await {
            channel = replay_failed(link, error, "declaring a node queue again", node).await?;
        }
    }
    for (node, key) in bindings {
        if let Err(error) = bind(shared, &channel, node, key).await {
            channel = replay_failed(link, error, "binding a node queue again", node).await?;
        }
    }
    Ok(())
}

/// Starts every live consumer again on `link`. Returns those that could not be started while
/// the connection stays up, to heal once it is published.
async fn resume_consumers(shared: &Arc<Shared>, link: &Link) -> Result<Healing, RabbitError> {
    let consumers: Vec<(NodeId, u64, u16, mpsc::Sender<_>)> = {
        let mut state = shared.state.lock();
        state
            .consumers
            .retain(|_, entry| !entry.deliveries.is_closed());
        state
            .consumers
            .iter()
            .map(|(node, entry)| {
                let deliveries = entry.deliveries.clone();
                (node.clone(), entry.id, entry.prefetch, deliveries)
            })
            .collect()
    };
    let mut healing = Healing::new();
    for (node, id, prefetch, deliveries) in consumers {
        let Ok(queue) = shared.names.queue(&node) else {
            continue;
        };
        match consumer::start(link, &queue, prefetch).await {
            Ok((channel, lapin_consumer)) => {
                shared.set_consumer_state(&node, id, ConsumerState::Consuming);
                tokio::spawn(consumer::forward(
                    Arc::clone(shared),
                    link.clone(),
                    node,
                    id,
                    channel,
                    lapin_consumer,
                    deliveries,
                ));
            }
            Err(error)
                if wire::is_connection_error(&error) && !link.connection.status().connected() =>
            {
                return Err(RabbitError::Amqp(error));
            }
            Err(error) => {
                // Its queue could not be declared again, or another consumer holds it: keep
                // trying on this connection once it is up.
                warn!(%node, %error, "resuming a consumer failed; trying again");
                let interrupted = ConsumerState::Interrupted {
                    reason: format!("resuming it failed: {error}"),
                };
                shared.set_consumer_state(&node, id, interrupted);
                healing.push((node, id, deliveries));
            }
        }
    }
    Ok(healing)
}

async fn replay_failed(
    link: &Link,
    error: lapin::Error,
    what: &str,
    node: &NodeId,
) -> Result<Channel, RabbitError> {
    if wire::is_connection_error(&error) && !link.connection.status().connected() {
        return Err(RabbitError::Amqp(error));
    }
    warn!(%node, %error, "{what} failed");
    link.connection
        .create_channel()
        .await
        .map_err(RabbitError::Amqp)
}

enum Watched {
    Lost(String),
    Shutdown,
}

/// Follows the connection's events until it is lost or the broker shuts down.
async fn watch(
    shared: &Shared,
    link: &Link,
    events: &mut Events,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Watched {
    loop {
        tokio::select! {
            () = shut_down(shutdown) => return Watched::Shutdown,
            () = shared.broken.notified() => {
                if shared.broken_generation.load(Ordering::SeqCst) >= link.generation {
                    return Watched::Lost("a channel failed".into());
                }
            }
            event = events.next() => match event {
                None => return Watched::Lost("the connection ended".into()),
                Some(Event::Error(error)) => {
                    if !link.is_connected() {
                        return Watched::Lost(error.to_string());
                    }
                    // A channel-level error (a refused declaration): the connection is fine.
                    debug!(%error, "channel error");
                }
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(%reason, "RabbitMQ blocked publishing");
                    shared.set_blocked(true);
                }
                Some(Event::ConnectionUnblocked) => {
                    info!("RabbitMQ unblocked publishing");
                    shared.set_blocked(false);
                }
                Some(_) => {}
            },
        }
    }
}

/// Closes both connections of `link` at once, each within 5 s (a connection blocked by a
/// resource alarm may never answer its close: the other one must not wait for it).
pub(crate) async fn close(link: &Link) {
    let bound = Duration::from_secs(5);
    let _ = tokio::join!(
        tokio::time::timeout(bound, link.publishing.close(200, "OK".into())),
        tokio::time::timeout(bound, link.connection.close(200, "OK".into())),
    );
}

/// Keeps the broker connected: watches the connection, and when it is lost connects again
/// (through the other addresses first) with exponential backoff and jitter between rounds
/// (the first round at once), declaring the topology again and resuming consumers.
pub(crate) async fn supervise(shared: Arc<Shared>, mut link: Link, mut events: Events) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        match watch(&shared, &link, &mut events, &mut shutdown).await {
            Watched::Shutdown => {
                close(&link).await;
                return;
            }
            Watched::Lost(reason) => {
                warn!(url = %shared.url(), %reason, "lost the connection to RabbitMQ; reconnecting");
            }
        }
        shared.set_down();
        close(&link).await;
        let Some((new_link, new_events)) = reconnect(&shared, &mut shutdown).await else {
            return;
        };
        link = new_link;
        events = new_events;
    }
}

/// Connects again, each outage with a backoff of its own, until it works (the new connection
/// is published and its consumers that could not be resumed are healed) or the broker shuts
/// down (`None`). Each round tries every address, the one after the lost connection's first
/// (the lost one is likely down) and the lost one last; the backoff is between rounds.
async fn reconnect(
    shared: &Arc<Shared>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(Link, Events)> {
    let mut backoff = shared.config.reconnect_backoff();
    let next = shared.current.load(Ordering::Relaxed) + 1;
    loop {
        let attempt = tokio::select! {
            () = shut_down(shutdown) => return None,
            attempt = establish(shared, next) => attempt,
        };
        match attempt {
            Ok((link, events, healing)) => {
                shared.set_up(link.clone());
                info!(url = %shared.url(), generation = link.generation, "reconnected to RabbitMQ");
                for (node, id, deliveries) in healing {
                    tokio::spawn(consumer::heal(
                        Arc::clone(shared),
                        link.clone(),
                        node,
                        id,
                        deliveries,
                    ));
                }
                return Some((link, events));
            }
            Err(error) => {
                let wait = backoff.next_backoff();
                warn!(
                    error = %hybrid_cluster_core::error::error_chain(&error),
                    retry_in = ?super::config::until(&wait),
                    "reconnecting to RabbitMQ failed"
                );
                tokio::select! {
                    () = shut_down(shutdown) => return None,
                    () = wait => {}
                }
            }
        }
    }
}
