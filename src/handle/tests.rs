#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;
use crate::cluster::Cluster;
use crate::config::{Backends, ClusterConfig};
use crate::hybrid::{Admission, admit};

async fn node(max_in_flight: usize) -> Cluster {
    let mut config = ClusterConfig::new(NodeId::new("places").unwrap(), "127.0.0.1", 1);
    config.forward.max_in_flight = max_in_flight;
    Cluster::start(config, Backends::embedded()).await.unwrap()
}

fn connect(cluster: &Cluster) -> ClusterConnection {
    match admit(&cluster.node, None) {
        Admission::Accept(connection) => connection,
        _ => panic!("the node admits"),
    }
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .expect("it does not hang")
}

#[tokio::test]
async fn senders_idle_after_a_local_send_hold_no_place() {
    let cluster = node(4).await;
    let connections: Vec<ClusterConnection> = (0..20).map(|_| connect(&cluster)).collect();
    // Each readies its sender (as a socket task does before a request it has not read
    // yet), sends to itself on this node, then goes idle, its sender kept.
    let mut idle = Vec::new();
    for connection in &connections {
        let mut sender = connection.handle().ordered();
        within(sender.ready()).await.unwrap();
        within(sender.send(connection.id(), "to me")).await.unwrap();
        idle.push(sender);
    }
    assert_eq!(
        cluster.node.in_flight(),
        0,
        "no place is held by an idle sender"
    );
    within(cluster.handle().send(Target::Broadcast, "still flowing"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_local_send_never_waits_for_a_place_and_a_disarmed_sender_gives_its_back() {
    let cluster = node(2).await;
    let a = connect(&cluster);
    let b = connect(&cluster);
    let mut holders = [a.handle().ordered(), b.handle().ordered()];
    for holder in &mut holders {
        within(holder.ready()).await.unwrap();
    }
    // Every place is taken; a send within the node does not need one.
    within(a.handle().send(b.id(), "local")).await.unwrap();
    let mut waiting = a.handle().ordered();
    let mut ready = tokio_test::task::spawn(waiting.ready());
    assert!(ready.poll().is_pending());
    assert!(holders[0].disarm());
    assert!(ready.is_woken());
    assert!(ready.poll().is_ready());
}

#[tokio::test]
async fn one_send_reaches_a_connection_a_group_or_everyone_and_refuses_a_node() {
    let cluster = node(4).await;
    let mut a = connect(&cluster);
    let mut b = connect(&cluster);
    let room = GroupName::new("room").unwrap();
    within(b.handle().join(&room)).await.unwrap();
    let handle = a.handle().clone();
    within(handle.send(b.id(), "to b")).await.unwrap();
    within(handle.send(&room, vec![1u8, 2])).await.unwrap();
    within(handle.send(Target::Broadcast, String::from("to all")))
        .await
        .unwrap();
    let mut received = Vec::new();
    for _ in 0..3 {
        match within(futures_util::StreamExt::next(b.inbox())).await {
            Some(InboxItem::Message(message)) => {
                received.push((message.target.clone(), message.kind))
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
    assert_eq!(
        received,
        [
            (Target::Connection(b.id().clone()), PayloadKind::Text),
            (Target::Group(room), PayloadKind::Binary),
            (Target::Broadcast, PayloadKind::Text),
        ]
    );
    // The broadcast reached its sender too; the node is no target.
    assert!(matches!(
        within(futures_util::StreamExt::next(a.inbox())).await,
        Some(InboxItem::Message(_))
    ));
    let refused = within(handle.send(Target::Node(cluster.node_id().clone()), "x")).await;
    assert!(
        matches!(refused, Err(SendError::UnsupportedTarget { .. })),
        "{refused:?}"
    );
}
