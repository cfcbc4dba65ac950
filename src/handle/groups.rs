//! Joining and leaving groups: the node's bindings counted, the session's groups recorded,
//! presence changes applied before the answer.

use std::sync::Arc;

use hybrid_cluster_core::{ConnectionId, GroupName};

use super::ClusterHandle;
use crate::error::SendError;

impl ClusterHandle {
    /// Adds this handle's connection to `group`. The node's queue is bound to the group while
    /// it has members, so group messages reach exactly the nodes with members. Joining twice
    /// is not an error; a [reserved](GroupName::is_reserved) group is refused.
    pub async fn join(&self, group: &GroupName) -> Result<(), SendError> {
        refuse_reserved(group)?;
        self.join_group(group).await
    }

    /// [`join`](ClusterHandle::join), reserved groups included (a user's own group).
    pub(crate) async fn join_group(&self, group: &GroupName) -> Result<(), SendError> {
        let id = self.sender()?;
        let not_registered = |_| SendError::NotRegistered {
            connection: id.clone(),
        };
        let Some(join) = self.node.local.join(id, group).map_err(not_registered)? else {
            return Ok(());
        };
        if let Err(error) = self.change_membership(group, Some((id, join))).await {
            self.node.local.abandon(id, group, join);
            return Err(error);
        }
        self.presence_applied().await;
        self.save_groups(id).await;
        Ok(())
    }

    /// Waits until the presence changes of this node made so far are in the presence store
    /// (a join's or a leave's among them), so that a query after it sees it.
    ///
    /// Bounded by [`PRESENCE_QUERY_BOUND`](crate::PRESENCE_QUERY_BOUND): with the presence store
    /// out of reach, joins and leaves go on (the changes are applied once it is back, in order).
    async fn presence_applied(&self) {
        if let Some(changes) = self.node.local.presence()
            && self.user().is_some()
        {
            let applied = changes.wait_applied(changes.last());
            let _ = tokio::time::timeout(crate::PRESENCE_QUERY_BOUND, applied).await;
        }
    }

    /// Records the groups of connection `id` in its session, if it has one (a resume joins
    /// them again).
    async fn save_groups(&self, id: &ConnectionId) {
        let (Some(sessions), Some(slot)) = (&self.node.sessions, self.node.local.slot(id)) else {
            return;
        };
        let Some(session) = slot.with_session(|session| session.id) else {
            return;
        };
        let groups = self.node.local.groups_of(id);
        if let Err(error) = sessions.store.set_groups(session, id, &groups).await {
            tracing::warn!(connection = %id, error = %crate::error_chain(&error), "could not record a session's groups: a resume may not join them again");
        }
    }

    /// Counts one member more (`joining`, once its bind is done) or one less (`None`) in
    /// `group` on the node's topology, in a task of its own, so that a caller that gives up
    /// (a client closing mid-join) cannot leave a binding without its count. A member that
    /// went or left while its join was binding has the count it just got taken back: the
    /// leave or the departure did not take it, not knowing of it yet.
    async fn change_membership(
        &self,
        group: &GroupName,
        joining: Option<(&ConnectionId, u64)>,
    ) -> Result<(), SendError> {
        let node = Arc::clone(&self.node);
        let group = group.clone();
        let joining = joining.map(|(id, join)| (id.clone(), join));
        let change = tokio::spawn(async move {
            let Some((member, join)) = joining else {
                let removed = node.topology.remove_member(&group).await;
                if removed.is_err() {
                    node.local.retry_removal(group);
                }
                return removed;
            };
            let count = node.topology.add_member(&group).await?;
            if node.local.counted(&member, &group, join) {
                return Ok(count);
            }
            // Not this join's to keep: its outcome stands, the count goes back (now or by
            // the unbinding task).
            if let Err(error) = node.topology.remove_member(&group).await {
                tracing::warn!(%group, %error, "could not take back a join's count; retrying");
                node.local.retry_removal(group);
            }
            Ok(count)
        });
        match change.await {
            Ok(result) => result.map(|_| ()).map_err(SendError::Group),
            Err(_) => Err(SendError::Group(hybrid_cluster_core::BrokerError::Closed)),
        }
    }

    /// Removes this handle's connection from `group`. Leaving a group one is not in is not an
    /// error; a [reserved](GroupName::is_reserved) group is refused.
    pub async fn leave(&self, group: &GroupName) -> Result<(), SendError> {
        refuse_reserved(group)?;
        let id = self.sender()?;
        let not_registered = |_| SendError::NotRegistered {
            connection: id.clone(),
        };
        if !self.node.local.leave(id, group).map_err(not_registered)? {
            self.save_groups(id).await;
            return Ok(());
        }
        self.presence_applied().await;
        let changed = self.change_membership(group, None).await;
        self.save_groups(id).await;
        changed
    }
}

fn refuse_reserved(group: &GroupName) -> Result<(), SendError> {
    if group.is_reserved() {
        return Err(SendError::ReservedGroup {
            group: group.clone(),
        });
    }
    Ok(())
}
