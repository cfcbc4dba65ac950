//! Applying one node record to the view, step by step: read (and authenticate) it, refuse a
//! replay, work out its lease, then take it into the membership.

use std::time::{Duration, SystemTime};

use hybrid_cluster_core::error::error_chain;
use hybrid_cluster_core::live::LiveNodeInfo;
use hybrid_cluster_core::{
    Incarnation, NodeId, NodeInfo, NodeRecord, NodeRecordError, NodeStatus, RemovalCause,
};
use tokio::time::Instant;

use super::worker::{EXPIRY_GRACE, Worker};

/// The longest lease taken as told; a record claiming more is checked again after this.
const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// What applying a record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Applied {
    /// The membership changed.
    Changed,
    /// Taken, the membership as it was.
    Unchanged,
    /// Not taken: malformed, unauthenticated, stale or without a lease.
    Refused,
}

impl From<bool> for Applied {
    fn from(changed: bool) -> Self {
        if changed {
            Self::Changed
        } else {
            Self::Unchanged
        }
    }
}

/// What was last seen of a node, to tell a replayed record from a new one.
pub(super) struct LastSeen {
    incarnation: Incarnation,
    registered_at: SystemTime,
    last_heartbeat: SystemTime,
    /// When the node stopped being a member, if it has.
    pub(super) gone_since: Option<Instant>,
}

impl LastSeen {
    /// Why `info` is older than what was seen, if it is.
    fn refuses(&self, info: &NodeInfo) -> Option<&'static str> {
        if info.incarnation == self.incarnation {
            (info.last_heartbeat < self.last_heartbeat)
                .then_some("its last_heartbeat is older than a record already seen (a replay)")
        } else {
            (info.registered_at < self.registered_at).then_some(
                "it is of an incarnation registered before the one already seen (a replay)",
            )
        }
    }
}

/// Why a record was not taken: what kind of record it is (`malformed`, `unauthenticated`,
/// `stale`) and why, for the warning.
struct Refusal {
    what: &'static str,
    reason: String,
}

impl Refusal {
    fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}

impl Worker {
    /// Applies one record: whether the membership changed, or the record was refused.
    pub(super) fn apply(&mut self, record: NodeRecord) -> Applied {
        let (info, lease) = match self.admit(&record) {
            Ok(admitted) => admitted,
            Err(Refusal { what, reason }) => {
                self.skip(&record, what, &reason);
                return Applied::Refused;
            }
        };
        self.malformed.remove(&record.key);
        self.follow_lease(&info.node_id, lease);
        if info.status == NodeStatus::Offline {
            return Applied::from(self.remove(&info.node_id, RemovalCause::Left));
        }
        self.take(info)
    }

    /// Reads `record`, refuses a replay, and works out its lease: the record's info and how
    /// long it is live, or why it is not taken.
    fn admit(&mut self, record: &NodeRecord) -> Result<(NodeInfo, Option<Duration>), Refusal> {
        let info = self.read(record)?;
        self.refuse_replay(&info)?;
        let lease = self
            .lease_of(record, &info)
            .map_err(|reason| Refusal::new("stale", reason))?;
        Ok((info, lease))
    }

    /// Reads the record's info, checking its signature when the cluster has a secret and that
    /// it names the node of its key.
    fn read(&self, record: &NodeRecord) -> Result<NodeInfo, Refusal> {
        let read = match &self.secret {
            Some(secret) => NodeInfo::from_signed_json(&record.value, secret),
            None => NodeInfo::from_json(&record.value),
        };
        match read {
            Ok(info) if info.node_id == record.node => Ok(info),
            Ok(info) => Err(Refusal::new(
                "malformed",
                format!("it names node {}", info.node_id),
            )),
            Err(error @ (NodeRecordError::Unsigned | NodeRecordError::BadSignature)) => {
                Err(Refusal::new("unauthenticated", error.to_string()))
            }
            Err(error) => Err(Refusal::new("malformed", error_chain(&error))),
        }
    }

    /// With a secret: refuses a record older than one already seen of the same node, and
    /// remembers this one.
    fn refuse_replay(&mut self, info: &NodeInfo) -> Result<(), Refusal> {
        if self.secret.is_none() {
            return Ok(());
        }
        let older = self
            .seen
            .get(&info.node_id)
            .and_then(|seen| seen.refuses(info));
        if let Some(reason) = older {
            return Err(Refusal::new("unauthenticated", reason));
        }
        self.seen.insert(
            info.node_id.clone(),
            LastSeen {
                incarnation: info.incarnation,
                registered_at: info.registered_at,
                last_heartbeat: info.last_heartbeat,
                gone_since: None,
            },
        );
        Ok(())
    }

    /// Checks the node's record again when its lease should have run out (`None`: the
    /// registry tells no leases, nothing to check).
    fn follow_lease(&mut self, node: &NodeId, lease: Option<Duration>) {
        match lease {
            // A lease longer than a day is nobody's (a forged or broken event): checked then.
            Some(lease) => {
                self.set_deadline(node, Instant::now() + lease.min(MAX_LEASE) + EXPIRY_GRACE);
            }
            None => self.clear_deadline(node),
        }
    }

    /// Takes a live record into the membership: updates a known node's info in place, or
    /// makes it a member (a join, or a restart under a new incarnation).
    fn take(&mut self, info: NodeInfo) -> Applied {
        match self.members.get(&info.node_id) {
            Some(live) if live.get().incarnation == info.incarnation => {
                if *live.get() != info {
                    live.update(info);
                    self.updates.send_replace(self.epoch.current());
                }
                Applied::Unchanged
            }
            Some(_) => {
                tracing::info!(node = %info.node_id, incarnation = %info.incarnation, "node restarted");
                let live = LiveNodeInfo::with_epoch(info.clone(), self.epoch.clone());
                self.members.insert(info.node_id, live);
                Applied::Changed
            }
            None => self.join(info),
        }
    }

    /// Makes a new node a member; one that comes back under the incarnation it left with gets
    /// its old cell back, so every holder of the cell follows it again.
    fn join(&mut self, info: NodeInfo) -> Applied {
        tracing::info!(
            node = %info.node_id,
            url = %info.ws_url(),
            status = %info.status,
            "node joined"
        );
        let live = match self.departed.remove(&info.node_id) {
            Some((live, _)) if live.get().incarnation == info.incarnation => {
                live.update(info.clone());
                live
            }
            _ => LiveNodeInfo::with_epoch(info.clone(), self.epoch.clone()),
        };
        self.members.insert(info.node_id, live);
        Applied::Changed
    }

    /// How long `record` (read as `info`) is live from now on this node's clock: the lease the
    /// registry tells (`None`: it tells none), no longer than the record's own signed lease
    /// allows. Refused (with why) when the registry tells leases and this record has none (a
    /// key written by hand, or left without a TTL), or when the record's own lease ended longer
    /// ago than the clock skew allows (left over, or replayed).
    fn lease_of(
        &self,
        record: &NodeRecord,
        info: &NodeInfo,
    ) -> Result<Option<Duration>, &'static str> {
        if record.expires_in.is_none() && self.registry.reports_leases() {
            return Err(
                "its key has no lease (written by hand, or left over): taken as a crashed node's",
            );
        }
        let Some(ends) = info.lease_ends_at() else {
            return Ok(record.expires_in);
        };
        let now = SystemTime::now();
        let left = match ends.duration_since(now) {
            Ok(left) => left.saturating_add(self.max_clock_skew),
            Err(past) if past.duration() <= self.max_clock_skew => {
                self.max_clock_skew - past.duration()
            }
            Err(_) => {
                return Err(
                    "its own lease ended before now, beyond the clock skew allowed: a stale or replayed record",
                );
            }
        };
        Ok(Some(record.expires_in.map_or(left, |told| told.min(left))))
    }

    /// Skips a record that cannot be used (`what`: malformed or unauthenticated), reporting
    /// it once per distinct value. The record's content is not logged: only its key and why.
    fn skip(&mut self, record: &NodeRecord, what: &str, reason: &str) {
        if self.malformed.get(&record.key) != Some(&record.value) {
            tracing::warn!(key = %record.key, reason, "skipping a {what} node record");
            self.malformed
                .insert(record.key.clone(), record.value.clone());
        }
    }
}
