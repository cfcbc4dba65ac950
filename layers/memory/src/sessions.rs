//! An in-memory [`SessionStore`]: sessions and their logs in one process, expiring on tokio's
//! clock like their Redis keys do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Appended, ConnectionId, GroupName, LogEntry, MessageId, NodeId, RegistryError, SessionId,
    SessionLimits, SessionRecord, SessionStore,
};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Sessions kept in memory, shared by its clones (every node of a process gets one).
#[derive(Clone, Debug, Default)]
pub struct MemorySessionStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<SessionId, Stored>,
    index: HashMap<ConnectionId, SessionId>,
}

#[derive(Debug)]
struct Stored {
    record: SessionRecord,
    log: BTreeMap<u64, (MessageId, Bytes)>,
    bytes: usize,
    expires_at: Instant,
    /// Every connection id indexed to it, dropped from the index with it.
    connections: Vec<ConnectionId>,
}

impl Stored {
    fn trim(&mut self, limits: &SessionLimits) {
        while self.log.len() > limits.max_messages.max(1)
            || (self.bytes > limits.max_bytes && self.log.len() > 1)
        {
            let Some((_, (_, bytes))) = self.log.pop_first() else {
                break;
            };
            self.bytes -= bytes.len();
        }
        self.record.first_seq = self
            .log
            .keys()
            .next()
            .copied()
            .unwrap_or(self.record.last_seq + 1);
    }

    fn insert(&mut self, seq: u64, message_id: MessageId, bytes: Bytes, limits: &SessionLimits) {
        self.bytes += bytes.len();
        if let Some((_, old)) = self.log.insert(seq, (message_id, bytes)) {
            self.bytes -= old.len();
        }
        self.record.last_seq = self.record.last_seq.max(seq);
        self.trim(limits);
    }

    fn holds(&self, message_id: MessageId) -> Option<u64> {
        self.log
            .iter()
            .rev()
            .find(|(_, (id, _))| *id == message_id)
            .map(|(seq, _)| *seq)
    }
}

impl MemorySessionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the live session `id`, after dropping it if it expired.
    fn with<T>(&self, id: SessionId, f: impl FnOnce(Option<&mut Stored>, &mut State) -> T) -> T {
        let mut state = self.state.lock();
        if state
            .sessions
            .get(&id)
            .is_some_and(|stored| stored.expires_at <= Instant::now())
        {
            remove(&mut state, id);
        }
        let mut stored = state.sessions.remove(&id);
        let result = f(stored.as_mut(), &mut state);
        if let Some(stored) = stored {
            state.sessions.insert(id, stored);
        }
        result
    }
}

fn remove(state: &mut State, id: SessionId) {
    if let Some(stored) = state.sessions.remove(&id) {
        for connection in stored.connections {
            if state.index.get(&connection) == Some(&id) {
                state.index.remove(&connection);
            }
        }
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl SessionStore for MemorySessionStore {
    fn create(
        &self,
        record: &SessionRecord,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let mut state = self.state.lock();
        let stored = Stored {
            record: SessionRecord {
                last_seq: 0,
                first_seq: 1,
                ..record.clone()
            },
            log: BTreeMap::new(),
            bytes: 0,
            expires_at: Instant::now() + limits.resume_window,
            connections: vec![record.owner.clone()],
        };
        state.index.insert(record.owner.clone(), record.id);
        state.sessions.insert(record.id, stored);
        ready(Ok(()))
    }

    fn append(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        entries: Vec<LogEntry>,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        let limits = *limits;
        ready(Ok(self.with(session, |stored, _| {
            let Some(stored) = stored else {
                return Appended::Unknown;
            };
            if stored.record.owner != *owner {
                return Appended::Moved(stored.record.owner.clone());
            }
            let mut highest = 0;
            for entry in entries {
                highest = highest.max(entry.seq);
                stored.insert(entry.seq, entry.message_id, entry.bytes, &limits);
            }
            Appended::Stored(highest)
        })))
    }

    fn append_orphan(
        &self,
        session: SessionId,
        expected_owner: &ConnectionId,
        message_id: MessageId,
        bytes: Bytes,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        let limits = *limits;
        ready(Ok(self.with(session, |stored, _| {
            let Some(stored) = stored else {
                return Appended::Unknown;
            };
            if let Some(seq) = stored.holds(message_id) {
                return Appended::Stored(seq);
            }
            if stored.record.owner != *expected_owner {
                return Appended::Moved(stored.record.owner.clone());
            }
            let seq = stored.record.last_seq + 1;
            stored.insert(seq, message_id, bytes, &limits);
            Appended::Stored(seq)
        })))
    }

    fn claim(
        &self,
        session: SessionId,
        new_owner: &ConnectionId,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, RegistryError>> {
        let limits = *limits;
        let new_owner = new_owner.clone();
        ready(Ok(self.with(session, |stored, state| {
            let stored = stored?;
            let before = stored.record.clone();
            stored.record.owner = new_owner.clone();
            stored.expires_at = Instant::now() + limits.resume_window;
            stored.connections.push(new_owner.clone());
            state.index.insert(new_owner, session);
            Some(before)
        })))
    }

    fn read(
        &self,
        session: SessionId,
        after: u64,
    ) -> BoxFuture<'static, Result<Vec<LogEntry>, RegistryError>> {
        ready(Ok(self.with(session, |stored, _| {
            stored.map_or_else(Vec::new, |stored| {
                stored
                    .log
                    .range(after.saturating_add(1)..)
                    .map(|(seq, (message_id, bytes))| LogEntry {
                        seq: *seq,
                        message_id: *message_id,
                        bytes: bytes.clone(),
                    })
                    .collect()
            })
        })))
    }

    fn set_groups(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        groups: &BTreeSet<GroupName>,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let groups = groups.clone();
        self.with(session, |stored, _| {
            if let Some(stored) = stored.filter(|stored| stored.record.owner == *owner) {
                stored.record.groups = groups;
            }
        });
        ready(Ok(()))
    }

    fn session_of(
        &self,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<SessionId>, RegistryError>> {
        let id = self.state.lock().index.get(connection).copied();
        let live = id.filter(|id| self.with(*id, |stored, _| stored.is_some()));
        ready(Ok(live))
    }

    fn keep_alive(
        &self,
        sessions: &[SessionId],
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        for id in sessions {
            self.with(*id, |stored, _| {
                if let Some(stored) = stored {
                    stored.expires_at = Instant::now() + limits.resume_window;
                }
            });
        }
        ready(Ok(()))
    }

    fn end(
        &self,
        session: SessionId,
        owner: &ConnectionId,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let mut state = self.state.lock();
        if state
            .sessions
            .get(&session)
            .is_some_and(|stored| stored.record.owner == *owner)
        {
            remove(&mut state, session);
        }
        ready(Ok(()))
    }

    fn sessions_on(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<SessionRecord>, RegistryError>> {
        let now = Instant::now();
        let found = self
            .state
            .lock()
            .sessions
            .values()
            .filter(|stored| stored.expires_at > now)
            .filter_map(|stored| {
                let held = stored.connections.iter().rfind(|c| c.node() == node)?;
                Some(SessionRecord {
                    owner: held.clone(),
                    ..stored.record.clone()
                })
            })
            .collect();
        ready(Ok(found))
    }
}
