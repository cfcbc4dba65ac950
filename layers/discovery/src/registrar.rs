//! This node's registration: its record, renewed on every heartbeat.

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::error::error_chain;
use hybrid_cluster_core::node::now_millis;
use hybrid_cluster_core::{NodeInfo, NodeStatus, Registry};
use parking_lot::Mutex;
use tokio_util::task::AbortOnDropHandle;
use tower::retry::backoff::{Backoff, MakeBackoff};

use crate::config::DiscoveryConfig;
use crate::error::DiscoveryError;
use crate::stats::{ConnectionCounter, ResourceSampler};

/// Keeps this node registered: writes its [`NodeInfo`] under a lease at start, then renews it
/// every heartbeat with fresh figures, until the node leaves.
///
/// On every heartbeat the record gets the connection count from the
/// [`ConnectionCounter`], and the CPU and memory of this process over the last interval
/// (`sysinfo`), unless a [provider](DiscoveryConfig::with_provider) was given. An update pushed
/// with [`update_node_info`](Registrar::update_node_info) or
/// [`set_status`](Registrar::set_status) is written at once, so peers see it without waiting
/// for the next heartbeat.
///
/// When the registry cannot be reached, the heartbeat logs it and retries with backoff (never
/// later than the next heartbeat); the first write that succeeds registers the node again.
/// Dropping the registrar stops the heartbeat without removing the record, as a crash would:
/// peers drop the node when its lease runs out. [`leave`](Registrar::leave) removes it at once.
pub struct Registrar {
    shared: Arc<Shared>,
    /// Dropping it stops the heartbeat.
    heartbeat: AbortOnDropHandle<()>,
}

struct Shared {
    registry: Arc<dyn Registry>,
    config: DiscoveryConfig,
    /// Serialises writes, so a pushed update and a heartbeat never interleave.
    writer: tokio::sync::Mutex<Writer>,
    /// The info as last written.
    current: Mutex<NodeInfo>,
}

struct Writer {
    base: NodeInfo,
    status: NodeStatus,
    sampler: ResourceSampler,
    left: bool,
}

impl Shared {
    /// Builds this heartbeat's info and writes it.
    async fn write(&self) -> Result<NodeInfo, DiscoveryError> {
        let mut writer = self.writer.lock().await;
        if writer.left {
            return Err(DiscoveryError::Left);
        }
        let mut info = match &self.config.provider {
            Some(provider) => provider().await,
            None => {
                let usage = writer.sampler.sample();
                let mut info = writer.base.clone();
                info.connection_count = self.config.connections.get();
                info.cpu_usage_percent = usage.cpu_percent;
                info.memory_usage_bytes = usage.memory_bytes;
                info.memory_usage_percent = usage.memory_percent;
                info
            }
        };
        // Identity, status and time are the registrar's, whatever a provider returned.
        info.node_id = writer.base.node_id.clone();
        info.incarnation = writer.base.incarnation;
        info.registered_at = writer.base.registered_at;
        info.status = writer.status;
        info.last_heartbeat = now_millis();
        info.lease_ms = Some(u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX));
        let record = match &self.config.secret {
            Some(secret) => info.to_signed_json(secret),
            None => info.to_json(),
        }
        .map_err(DiscoveryError::InvalidNodeInfo)?;
        self.registry
            .put_node(&info.node_id, record.into(), self.config.lease)
            .await?;
        *self.current.lock() = info.clone();
        Ok(info)
    }

    async fn heartbeat(self: Arc<Self>) {
        let mut reconnect = self.config.reconnect_backoff();
        // Some while the registry cannot be reached: the backoff of the retries.
        let mut failing = None;
        loop {
            match &mut failing {
                None => tokio::time::sleep(self.config.heartbeat).await,
                // Never later than the next heartbeat would be.
                Some(backoff) => {
                    let retry = Backoff::next_backoff(backoff);
                    let _ = tokio::time::timeout(self.config.heartbeat, retry).await;
                }
            }
            match self.write().await {
                Ok(info) => {
                    if failing.take().is_some() {
                        tracing::info!(node = %info.node_id, "registered again after the registry came back");
                    }
                }
                Err(DiscoveryError::Left) => return,
                Err(error) => {
                    let node = self.current.lock().node_id.clone();
                    if failing.is_some() {
                        tracing::debug!(%node, error = %error_chain(&error), "heartbeat failed again");
                    } else {
                        tracing::warn!(%node, error = %error_chain(&error), "heartbeat failed; retrying");
                        failing = Some(reconnect.make_backoff());
                    }
                }
            }
        }
    }
}

impl Registrar {
    /// Registers `info` at once and starts the heartbeat.
    ///
    /// Fails when the configuration cannot work, when `info` is invalid, or when the first
    /// write does not reach the registry: a node that cannot register says so at start-up.
    pub async fn start(
        registry: Arc<dyn Registry>,
        info: NodeInfo,
        config: DiscoveryConfig,
    ) -> Result<Self, DiscoveryError> {
        config.check()?;
        info.validate().map_err(DiscoveryError::InvalidNodeInfo)?;
        let shared = Arc::new(Shared {
            registry,
            writer: tokio::sync::Mutex::new(Writer {
                status: info.status,
                base: info.clone(),
                sampler: ResourceSampler::new(),
                left: false,
            }),
            current: Mutex::new(info),
            config,
        });
        shared.write().await?;
        let heartbeat = AbortOnDropHandle::new(tokio::spawn(Arc::clone(&shared).heartbeat()));
        Ok(Self { shared, heartbeat })
    }

    /// The info as last written.
    pub fn info(&self) -> NodeInfo {
        self.shared.current.lock().clone()
    }

    /// The counter whose value every heartbeat publishes as the connection count.
    pub fn connections(&self) -> &ConnectionCounter {
        &self.shared.config.connections
    }

    /// Replaces this node's info and writes it at once. The node's identity (id, incarnation,
    /// registration time) and status stay the registrar's; the connection count, CPU and memory
    /// are measured again on the next heartbeat unless a provider supplies them.
    pub async fn update_node_info(&self, info: NodeInfo) -> Result<NodeInfo, DiscoveryError> {
        {
            let mut writer = self.shared.writer.lock().await;
            if info.node_id != writer.base.node_id {
                return Err(DiscoveryError::WrongNode {
                    expected: writer.base.node_id.clone(),
                    found: info.node_id,
                });
            }
            info.validate().map_err(DiscoveryError::InvalidNodeInfo)?;
            let (incarnation, registered_at) = (writer.base.incarnation, writer.base.registered_at);
            writer.base = info;
            writer.base.incarnation = incarnation;
            writer.base.registered_at = registered_at;
        }
        self.shared.write().await
    }

    /// Sets this node's status and writes it at once. `Draining` keeps the node visible to
    /// its peers while balancers stop choosing it.
    pub async fn set_status(&self, status: NodeStatus) -> Result<NodeInfo, DiscoveryError> {
        self.shared.writer.lock().await.status = status;
        self.shared.write().await
    }

    /// Writes this node's record now, with fresh figures, instead of waiting for the heartbeat.
    pub async fn refresh(&self) -> Result<NodeInfo, DiscoveryError> {
        self.shared.write().await
    }

    /// Leaves the cluster: stops the heartbeat and removes the record at once, which tells
    /// every peer (graceful leave). Later writes fail with [`DiscoveryError::Left`].
    pub async fn leave(&self) -> Result<(), DiscoveryError> {
        self.heartbeat.abort();
        let mut writer = self.shared.writer.lock().await;
        writer.left = true;
        self.shared
            .registry
            .remove_node(&writer.base.node_id)
            .await?;
        Ok(())
    }
}

impl fmt::Debug for Registrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registrar")
            .field("info", &self.info())
            .field("config", &self.shared.config)
            .finish()
    }
}
