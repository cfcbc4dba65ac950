//! The connection an upgrade was admitted as.

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::ConnectionId;
use parking_lot::Mutex;

use super::ClusterHandle;
use super::session::ResumeRequest;
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
}

impl ClusterConnection {
    pub(crate) fn new(handle: ClusterHandle, inbox: Inbox) -> Self {
        Self {
            handle,
            inbox,
            resume: None,
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
