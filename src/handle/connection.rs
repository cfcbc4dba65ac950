//! The connection an upgrade was admitted as.

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::{BrokerError, ConnectionId, GroupName, UserId};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::ClusterHandle;
use super::session::ResumeRequest;
use crate::error::SendError;
use crate::local::Inbox;

/// One WebSocket connection admitted by the cluster layer: its id, its [`Inbox`] of messages
/// from anywhere in the cluster, and a [`ClusterHandle`] that sends as it.
///
/// The layer puts it in the upgrade request's extensions; take it with
/// [`ClusterConnection::take`] (plain hyper) or as an axum extractor, and move it into the
/// socket task. Dropping it (or its inbox) removes the connection from the node.
#[derive(Debug)]
pub struct ClusterConnection {
    pub(super) handle: ClusterHandle,
    pub(super) inbox: Inbox,
    /// The session the upgrade asked to resume, if it did.
    pub(super) resume: Option<ResumeRequest>,
    /// Who the connection belongs to, when its upgrade said.
    user: Option<UserId>,
    /// The join of the user's group (what makes messages to the user reach it), under way.
    user_group: UserGroup,
}

/// Where a connection's join of its user's group is.
#[derive(Debug)]
enum UserGroup {
    /// Joining, in a task of its own (started at admission).
    Joining(JoinHandle<Result<(), SendError>>),
    /// Not started: no runtime at admission.
    NotStarted,
    /// Joined, or no user.
    Done,
}

impl ClusterConnection {
    pub(crate) fn new(handle: ClusterHandle, inbox: Inbox) -> Self {
        Self {
            handle,
            inbox,
            resume: None,
            user: None,
            user_group: UserGroup::Done,
        }
    }

    /// This connection as one of `user`'s: it joins the user's group at once (in a task of
    /// its own, so that a client going mid-join cannot leave a binding behind).
    pub(crate) fn of_user(mut self, user: Option<UserId>) -> Self {
        if let Some(user) = &user {
            self.user_group = match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let handle = self.handle.clone();
                    let group = GroupName::of_user(user);
                    UserGroup::Joining(
                        runtime.spawn(async move { handle.join_group(&group).await }),
                    )
                }
                Err(_) => UserGroup::NotStarted,
            };
        }
        self.user = user;
        self
    }

    /// The user this connection belongs to, when its upgrade said (see
    /// [`IdentityLayer`](crate::IdentityLayer)).
    pub fn user(&self) -> Option<&UserId> {
        self.user.as_ref()
    }

    /// Waits until messages to this connection's user reach it: its node's queue bound to the
    /// user's group. Await it before telling the client it is connected; a connection without
    /// a user is ready at once. Fails when the broker refused the bind (messages to the user
    /// would miss this connection: close it).
    pub async fn reachable(&mut self) -> Result<(), SendError> {
        match std::mem::replace(&mut self.user_group, UserGroup::Done) {
            UserGroup::Done => Ok(()),
            UserGroup::Joining(task) => task
                .await
                .unwrap_or(Err(SendError::Group(BrokerError::Closed))),
            UserGroup::NotStarted => match &self.user {
                Some(user) => self.handle.join_group(&GroupName::of_user(user)).await,
                None => Ok(()),
            },
        }
    }

    /// This connection, asked to resume a session (see
    /// [`open_session`](ClusterConnection::open_session)).
    pub fn with_resume(mut self, resume: Option<ResumeRequest>) -> Self {
        self.resume = resume;
        self
    }

    /// Takes the connection the cluster layer put in a request's extensions.
    pub fn take(extensions: &mut http::Extensions) -> Option<Self> {
        extensions
            .get::<ConnectionSlot>()
            .and_then(ConnectionSlot::take)
    }

    /// The connection's cluster-wide id.
    pub fn id(&self) -> &ConnectionId {
        self.inbox.connection_id()
    }

    /// The handle that sends as this connection.
    pub fn handle(&self) -> &ClusterHandle {
        &self.handle
    }

    /// The connection's inbox.
    pub fn inbox(&mut self) -> &mut Inbox {
        &mut self.inbox
    }

    /// Splits into the sending handle and the inbox, for a socket task that reads and writes
    /// in separate halves. The connection lives as long as the inbox.
    pub fn into_parts(self) -> (ClusterHandle, Inbox) {
        (self.handle, self.inbox)
    }
}

/// The request extension holding an admitted connection until a handler takes it. Dropped
/// with the request when nobody takes it, which removes the connection.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<Mutex<Option<ClusterConnection>>>);

impl ConnectionSlot {
    pub(crate) fn new(connection: ClusterConnection) -> Self {
        Self(Arc::new(Mutex::new(Some(connection))))
    }

    /// Takes the connection, once.
    pub fn take(&self) -> Option<ClusterConnection> {
        self.0.lock().take()
    }
}

impl fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionSlot")
            .field(&self.0.lock().as_ref().map(ClusterConnection::id))
            .finish()
    }
}
