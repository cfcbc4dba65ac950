//! The contract of [`PresenceStore`]: each node's share of each group counted apart, the
//! cluster-wide count that says who arrived and who left, reaping a node's shares once, and
//! expiry.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster_core::{GroupName, NodeId, PresenceStore, UserId};

const TTL: Duration = Duration::from_secs(60);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
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

/// Each node's share counts apart; the cluster-wide count says who arrived (1) and who left
/// (0); a leave a node never counted changes nothing.
pub async fn counts_span_nodes_and_say_who_arrived_and_who_left(store: Arc<dyn PresenceStore>) {
    let (n1, n2, room) = (node("n1"), node("n2"), group("room: 1"));
    let (alice, bob) = (user("alice@example.com"), user("bob"));
    assert_eq!(
        store.join(&n1, &room, &alice, TTL).await.unwrap(),
        1,
        "alice arrives"
    );
    assert_eq!(store.join(&n2, &room, &alice, TTL).await.unwrap(), 2);
    assert_eq!(store.join(&n1, &room, &alice, TTL).await.unwrap(), 3);
    assert_eq!(
        store.join(&n1, &room, &bob, TTL).await.unwrap(),
        1,
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
    assert_eq!(store.leave(&n1, &room, &alice).await.unwrap(), Some(2));
    assert_eq!(store.leave(&n1, &room, &alice).await.unwrap(), Some(1));
    assert_eq!(
        store.leave(&n1, &room, &alice).await.unwrap(),
        None,
        "n1 counts none"
    );
    assert_eq!(
        store.leave(&n2, &room, &alice).await.unwrap(),
        Some(0),
        "alice left"
    );
    assert_eq!(store.leave(&n2, &room, &alice).await.unwrap(), None);
    assert_eq!(store.leave(&n1, &group("other"), &bob).await.unwrap(), None);
    assert_eq!(
        shares(&store, "room: 1").await,
        [("bob".into(), "n1".into(), 1)]
    );
    assert_eq!(store.leave(&n1, &room, &bob).await.unwrap(), Some(0));
    assert!(shares(&store, "room: 1").await.is_empty());
}

/// Reaping a node takes its shares, and tells who left a group altogether, once.
pub async fn a_reaped_node_takes_its_shares_and_only_the_first_reap_tells(
    store: Arc<dyn PresenceStore>,
) {
    let (n1, n2) = (node("n1"), node("n2"));
    let (g, h) = (group("g"), group("h"));
    let (alice, bob) = (user("alice"), user("bob"));
    for (on, in_group, who) in [
        (&n1, &g, &alice),
        (&n1, &g, &alice),
        (&n1, &h, &alice),
        (&n1, &g, &bob),
        (&n2, &g, &bob),
    ] {
        store.join(on, in_group, who, TTL).await.unwrap();
    }
    let left: BTreeSet<(String, String)> = store
        .reap(&n1)
        .await
        .unwrap()
        .into_iter()
        .map(|(group, user)| (group.to_string(), user.to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> =
        [("g".into(), "alice".into()), ("h".into(), "alice".into())].into();
    assert_eq!(left, expected, "bob is still in g on n2");
    assert!(store.reap(&n1).await.unwrap().is_empty(), "once only");
    assert_eq!(shares(&store, "g").await, [("bob".into(), "n2".into(), 1)]);
    assert!(shares(&store, "h").await.is_empty());
    assert_eq!(store.leave(&n1, &g, &bob).await.unwrap(), None, "reaped");
    assert_eq!(
        store.join(&n1, &g, &bob, TTL).await.unwrap(),
        2,
        "n1 counts anew"
    );
}

/// A node's entries go a ttl after it stops keeping them alive.
pub async fn a_nodes_entries_expire_unless_kept_alive(store: Arc<dyn PresenceStore>) {
    let (n1, n2, g) = (node("n1"), node("n2"), group("g"));
    let short = Duration::from_millis(400);
    store.join(&n1, &g, &user("gone"), short).await.unwrap();
    store.join(&n2, &g, &user("kept"), short).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        store.keep_alive(&n2, vec![g.clone()], short).await.unwrap();
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
