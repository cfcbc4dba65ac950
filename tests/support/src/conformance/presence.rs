//! The contract of [`PresenceStore`]: each node's share of each group counted apart, the
//! cluster-wide count that says who arrived and who left, reaping a node's shares once, and
//! expiry.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster_core::{ConnectionId, GroupName, Incarnation, NodeId, PresenceStore, UserId};

const TTL: Duration = Duration::from_secs(60);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Connection `n` of a run of node `name`.
fn conn(name: &str, n: u64) -> ConnectionId {
    ConnectionId::new(node(name), Incarnation::from_u64(7), n)
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

/// `(user, node, connections)` of every share of `group`, sorted.
async fn shares(store: &Arc<dyn PresenceStore>, name: &str) -> Vec<(String, String, u64)> {
    let mut shares: Vec<_> = store
        .members(&group(name))
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.user.to_string(), s.node.to_string(), s.connections))
        .collect();
    shares.sort();
    shares
}

/// `(connections, new)` of a join.
async fn join(
    store: &Arc<dyn PresenceStore>,
    group: &GroupName,
    user: &UserId,
    connection: &ConnectionId,
) -> (u64, bool) {
    let joined = store.join(group, user, connection, TTL).await.unwrap();
    (joined.connections, joined.new)
}

/// Each node's share counts apart; the cluster-wide count says who arrived (1) and who left
/// (0); a join or leave made again counts once and answers as the first did; a leave of a
/// connection never counted changes nothing.
pub async fn counts_span_nodes_and_say_who_arrived_and_who_left(store: Arc<dyn PresenceStore>) {
    let room = group("room: 1");
    let (alice, bob) = (user("alice@example.com"), user("bob"));
    let (a1, a2, a3, b1) = (conn("n1", 1), conn("n2", 1), conn("n1", 2), conn("n1", 3));
    assert_eq!(
        join(&store, &room, &alice, &a1).await,
        (1, true),
        "alice arrives"
    );
    assert_eq!(join(&store, &room, &alice, &a2).await, (2, true));
    assert_eq!(join(&store, &room, &alice, &a3).await, (3, true));
    assert_eq!(join(&store, &room, &alice, &a3).await, (3, false), "once");
    assert_eq!(
        join(&store, &room, &bob, &b1).await,
        (1, true),
        "bob arrives"
    );
    assert_eq!(
        shares(&store, "room: 1").await,
        [
            ("alice@example.com".into(), "n1".into(), 2),
            ("alice@example.com".into(), "n2".into(), 1),
            ("bob".into(), "n1".into(), 1),
        ]
    );
    assert_eq!(store.leave(&room, &alice, &a1).await.unwrap(), Some(2));
    assert_eq!(store.leave(&room, &alice, &a3).await.unwrap(), Some(1));
    assert_eq!(
        store.leave(&room, &alice, &a3).await.unwrap(),
        Some(1),
        "again: once"
    );
    assert_eq!(
        store.leave(&room, &alice, &a2).await.unwrap(),
        Some(0),
        "alice left"
    );
    assert_eq!(store.leave(&room, &alice, &a2).await.unwrap(), Some(0));
    assert_eq!(store.leave(&group("other"), &bob, &b1).await.unwrap(), None);
    assert_eq!(
        shares(&store, "room: 1").await,
        [("bob".into(), "n1".into(), 1)]
    );
    assert_eq!(store.leave(&room, &bob, &b1).await.unwrap(), Some(0));
    assert!(shares(&store, "room: 1").await.is_empty());
    // Back after leaving: counted anew.
    assert_eq!(join(&store, &room, &alice, &a1).await, (1, true));
}

/// Reaping a node takes its shares, and tells who left a group altogether, once; the node's
/// keep-alive then says its entries are gone.
pub async fn a_reaped_node_takes_its_shares_and_only_the_first_reap_tells(
    store: Arc<dyn PresenceStore>,
) {
    let (g, h) = (group("g"), group("h"));
    let (alice, bob) = (user("alice"), user("bob"));
    for (in_group, who, connection) in [
        (&g, &alice, conn("n1", 1)),
        (&g, &alice, conn("n1", 2)),
        (&h, &alice, conn("n1", 1)),
        (&g, &bob, conn("n1", 3)),
        (&g, &bob, conn("n2", 1)),
    ] {
        join(&store, in_group, who, &connection).await;
    }
    assert!(
        store
            .keep_alive(&node("n1"), vec![g.clone()], TTL)
            .await
            .unwrap()
    );
    let left: BTreeSet<(String, String)> = store
        .reap(&node("n1"))
        .await
        .unwrap()
        .into_iter()
        .map(|(group, user)| (group.to_string(), user.to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> =
        [("g".into(), "alice".into()), ("h".into(), "alice".into())].into();
    assert_eq!(left, expected, "bob is still in g on n2");
    assert!(
        store.reap(&node("n1")).await.unwrap().is_empty(),
        "once only"
    );
    assert_eq!(shares(&store, "g").await, [("bob".into(), "n2".into(), 1)]);
    assert!(shares(&store, "h").await.is_empty());
    assert_eq!(
        store.leave(&g, &bob, &conn("n1", 3)).await.unwrap(),
        None,
        "reaped"
    );
    assert!(
        !store
            .keep_alive(&node("n1"), vec![g.clone()], TTL)
            .await
            .unwrap(),
        "n1's entries are gone: it counts them again"
    );
    assert!(
        store
            .keep_alive(&node("n2"), vec![g.clone()], TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        join(&store, &g, &bob, &conn("n1", 3)).await,
        (2, true),
        "n1 counts anew"
    );
}

/// A node's entries go a ttl after it stops keeping them alive.
pub async fn a_nodes_entries_expire_unless_kept_alive(store: Arc<dyn PresenceStore>) {
    let g = group("g");
    let short = Duration::from_millis(400);
    store
        .join(&g, &user("gone"), &conn("n1", 1), short)
        .await
        .unwrap();
    store
        .join(&g, &user("kept"), &conn("n2", 1), short)
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        store
            .keep_alive(&node("n2"), vec![g.clone()], short)
            .await
            .unwrap();
    }
    let left = shares(&store, "g").await;
    assert!(
        left.iter().any(|(user, ..)| user == "kept"),
        "kept alive: {left:?}"
    );
    // The Redis keys of a group are shared: "gone" expires with them once n2 stops too.
    tokio::time::sleep(short * 2).await;
    assert!(shares(&store, "g").await.is_empty());
}
