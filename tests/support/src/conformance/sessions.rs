//! The contract of [`SessionStore`]: sessions owned by one connection at a time, their bounded
//! logs, claims, orphan appends and expiry.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hybrid_cluster_core::{
    Appended, ConnectionId, GroupName, Incarnation, LogEntry, MessageId, NodeId, SessionId,
    SessionLimits, SessionRecord, SessionStore,
};

/// Limits that never expire a session during a case.
const LIMITS: SessionLimits = SessionLimits {
    resume_window: Duration::from_secs(60),
    max_messages: 1000,
    max_bytes: 1 << 20,
};

fn connection(node: &str, n: u64) -> ConnectionId {
    ConnectionId::new(NodeId::new(node).unwrap(), Incarnation::from_u64(7), n)
}

fn entry(seq: u64, text: &str) -> LogEntry {
    LogEntry {
        seq,
        message_id: MessageId::random(),
        bytes: Bytes::copy_from_slice(text.as_bytes()),
    }
}

async fn created(
    store: &Arc<dyn SessionStore>,
    owner: &ConnectionId,
    limits: &SessionLimits,
) -> SessionId {
    let id = SessionId::random();
    let groups: BTreeSet<GroupName> = ["room".parse().unwrap()].into();
    let record = SessionRecord {
        id,
        owner: owner.clone(),
        groups,
        last_seq: 0,
        first_seq: 1,
    };
    store.create(&record, limits).await.unwrap();
    id
}

fn texts(entries: &[LogEntry]) -> Vec<(u64, String)> {
    entries
        .iter()
        .map(|entry| (entry.seq, String::from_utf8(entry.bytes.to_vec()).unwrap()))
        .collect()
}

/// A claim hands the session over with its groups and seq, and the log reads past a seq.
pub async fn a_claim_hands_the_session_over_and_the_log_reads_past_a_seq(
    store: Arc<dyn SessionStore>,
) {
    let (first, second) = (connection("node-b", 1), connection("node-a", 9));
    let id = created(&store, &first, &LIMITS).await;
    for seq in 1..=2 {
        let appended = store
            .append(id, &first, vec![entry(seq, &format!("m{seq}"))], &LIMITS)
            .await
            .unwrap();
        assert_eq!(appended, Appended::Stored(seq));
    }
    // Several at once: all kept, the highest answered.
    let batch = (3..=5).map(|seq| entry(seq, &format!("m{seq}"))).collect();
    let appended = store.append(id, &first, batch, &LIMITS).await.unwrap();
    assert_eq!(appended, Appended::Stored(5));
    let before = store
        .claim(id, &second, &LIMITS)
        .await
        .unwrap()
        .expect("the session");
    assert_eq!(before.owner, first);
    assert_eq!((before.last_seq, before.first_seq), (5, 1));
    assert_eq!(before.groups, ["room".parse().unwrap()].into());
    let missed = store.read(id, 3).await.unwrap();
    assert_eq!(texts(&missed), [(4, "m4".to_owned()), (5, "m5".to_owned())]);
    assert_eq!(store.read(id, 5).await.unwrap(), []);
    // Both connection ids lead to the session.
    assert_eq!(store.session_of(&first).await.unwrap(), Some(id));
    assert_eq!(store.session_of(&second).await.unwrap(), Some(id));
    assert_eq!(
        store.session_of(&connection("node-c", 1)).await.unwrap(),
        None
    );
    store.end(id, &second).await.unwrap();
}

/// The owner left behind learns where its session went; the new owner appends on.
pub async fn an_append_by_a_former_owner_is_refused_with_the_owner_in_force(
    store: Arc<dyn SessionStore>,
) {
    let (first, second) = (connection("node-b", 1), connection("node-a", 9));
    let id = created(&store, &first, &LIMITS).await;
    store
        .append(id, &first, vec![entry(1, "one")], &LIMITS)
        .await
        .unwrap();
    store.claim(id, &second, &LIMITS).await.unwrap();
    let refused = store
        .append(id, &first, vec![entry(2, "late")], &LIMITS)
        .await
        .unwrap();
    assert_eq!(refused, Appended::Moved(second.clone()));
    assert_eq!(
        store
            .append(id, &second, vec![entry(2, "two")], &LIMITS)
            .await
            .unwrap(),
        Appended::Stored(2)
    );
    assert_eq!(
        texts(&store.read(id, 0).await.unwrap()),
        [(1, "one".to_owned()), (2, "two".to_owned())]
    );
    // Groups are the owner's to set.
    let other: BTreeSet<GroupName> = ["other".parse().unwrap()].into();
    store.set_groups(id, &first, &other).await.unwrap();
    let third = connection("node-c", 3);
    let record = store.claim(id, &third, &LIMITS).await.unwrap().unwrap();
    assert_eq!(record.groups, ["room".parse().unwrap()].into());
    store.set_groups(id, &third, &other).await.unwrap();
    let record = store.claim(id, &second, &LIMITS).await.unwrap().unwrap();
    assert_eq!(record.groups, other);
    store.end(id, &second).await.unwrap();
}

/// Past its bounds the log lets its oldest go and says where it starts.
pub async fn the_log_keeps_its_bounds_and_says_where_it_starts(store: Arc<dyn SessionStore>) {
    let owner = connection("node-b", 1);
    let limits = SessionLimits {
        max_messages: 3,
        max_bytes: 10,
        ..LIMITS
    };
    let id = created(&store, &owner, &limits).await;
    for seq in 1..=5 {
        store
            .append(id, &owner, vec![entry(seq, "ab")], &limits)
            .await
            .unwrap();
    }
    let record = store.claim(id, &owner, &limits).await.unwrap().unwrap();
    assert_eq!(
        (record.first_seq, record.last_seq),
        (3, 5),
        "three messages kept"
    );
    store
        .append(id, &owner, vec![entry(6, "0123456789")], &limits)
        .await
        .unwrap();
    let record = store.claim(id, &owner, &limits).await.unwrap().unwrap();
    assert_eq!(
        (record.first_seq, record.last_seq),
        (6, 6),
        "ten bytes kept"
    );
    // A message alone is kept whatever its size.
    store
        .append(id, &owner, vec![entry(7, "0123456789abc")], &limits)
        .await
        .unwrap();
    assert_eq!(
        texts(&store.read(id, 0).await.unwrap()),
        [(7, "0123456789abc".to_owned())]
    );
    store.end(id, &owner).await.unwrap();
    // An empty log starts after the last seq.
    let id = created(&store, &owner, &limits).await;
    let record = store.claim(id, &owner, &limits).await.unwrap().unwrap();
    assert_eq!((record.first_seq, record.last_seq), (1, 0));
    store.end(id, &owner).await.unwrap();
}

/// With its owner gone, a message is numbered by the store, once.
pub async fn an_orphan_append_is_numbered_after_the_last_and_held_once(
    store: Arc<dyn SessionStore>,
) {
    let (gone, next) = (connection("node-b", 1), connection("node-a", 2));
    let id = created(&store, &gone, &LIMITS).await;
    let held = entry(1, "one");
    store
        .append(id, &gone, vec![held.clone()], &LIMITS)
        .await
        .unwrap();
    let again = store
        .append_orphan(id, &gone, held.message_id, held.bytes.clone(), &LIMITS)
        .await
        .unwrap();
    assert_eq!(again, Appended::Stored(1), "held already: kept its number");
    let new = MessageId::random();
    let stored = store
        .append_orphan(id, &gone, new, Bytes::from_static(b"two"), &LIMITS)
        .await
        .unwrap();
    assert_eq!(stored, Appended::Stored(2));
    store.claim(id, &next, &LIMITS).await.unwrap();
    let held_after_claim = store
        .append_orphan(id, &gone, held.message_id, held.bytes.clone(), &LIMITS)
        .await
        .unwrap();
    assert_eq!(
        held_after_claim,
        Appended::Stored(1),
        "held: not sent on to the new owner"
    );
    let moved = store
        .append_orphan(id, &gone, MessageId::random(), Bytes::new(), &LIMITS)
        .await
        .unwrap();
    assert_eq!(moved, Appended::Moved(next.clone()));
    assert_eq!(
        texts(&store.read(id, 0).await.unwrap()),
        [(1, "one".to_owned()), (2, "two".to_owned())]
    );
    store.end(id, &next).await.unwrap();
}

/// A node's sessions are those that had a connection on it, named by that connection.
pub async fn a_nodes_sessions_are_those_that_had_a_connection_on_it(store: Arc<dyn SessionStore>) {
    let node = |name: &str| NodeId::new(name).unwrap();
    let (b1, b2, a1) = (
        connection("node-b", 1),
        connection("node-b", 2),
        connection("node-a", 1),
    );
    let first = created(&store, &b1, &LIMITS).await;
    let second = created(&store, &b2, &LIMITS).await;
    let third = created(&store, &a1, &LIMITS).await;
    let ids = |records: Vec<SessionRecord>| {
        let mut ids: Vec<SessionId> = records.into_iter().map(|record| record.id).collect();
        ids.sort();
        ids
    };
    let mut on_b = vec![first, second];
    on_b.sort();
    let found = store.sessions_on(&node("node-b")).await.unwrap();
    assert!(
        found
            .iter()
            .all(|record| record.groups.contains(&"room".parse().unwrap()))
    );
    assert_eq!(ids(found), on_b);
    let a2 = connection("node-a", 2);
    store.claim(second, &a2, &LIMITS).await.unwrap();
    store.end(first, &b1).await.unwrap();
    // Moved away, the second is still one node-b held, under its connection there.
    let held = store.sessions_on(&node("node-b")).await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].id, &held[0].owner), (second, &b2));
    let mut on_a = vec![second, third];
    on_a.sort();
    assert_eq!(ids(store.sessions_on(&node("node-a")).await.unwrap()), on_a);
    assert_eq!(ids(store.sessions_on(&node("node-c")).await.unwrap()), []);
    store.end(second, &a2).await.unwrap();
    store.end(third, &a1).await.unwrap();
}

/// A session not kept alive expires a resume window after its last write; ended ones at once.
pub async fn sessions_expire_unless_kept_alive_and_end_at_once(store: Arc<dyn SessionStore>) {
    let limits = SessionLimits {
        resume_window: Duration::from_millis(400),
        ..LIMITS
    };
    let (kept, left) = (connection("node-b", 1), connection("node-b", 2));
    let kept_id = created(&store, &kept, &limits).await;
    let left_id = created(&store, &left, &limits).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        store.keep_alive(&[kept_id], &limits).await.unwrap();
    }
    assert_eq!(store.session_of(&left).await.unwrap(), None, "expired");
    assert_eq!(store.claim(left_id, &left, &limits).await.unwrap(), None);
    assert_eq!(
        store
            .append(left_id, &left, vec![entry(1, "x")], &limits)
            .await
            .unwrap(),
        Appended::Unknown
    );
    assert_eq!(
        store.session_of(&kept).await.unwrap(),
        Some(kept_id),
        "kept alive"
    );
    // Only its owner ends it.
    store.end(kept_id, &left).await.unwrap();
    assert_eq!(store.session_of(&kept).await.unwrap(), Some(kept_id));
    store.end(kept_id, &kept).await.unwrap();
    assert_eq!(store.session_of(&kept).await.unwrap(), None);
    assert_eq!(store.read(kept_id, 0).await.unwrap(), []);
}
