//! Sessions, for real: node programs (each a process of its own) with `--sessions` on the real
//! Redis and RabbitMQ. A client whose node drains (SIGTERM) or is killed (SIGKILL) while a
//! thousand numbered messages are sent to its old connection id resumes on another node with
//! its token and last `seq`, and gets every message once, in order, and its group's messages
//! after; a token that is forged, expired or ended starts a new session, said so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hybrid_cluster_test_support::client::{Client, Ended};
use hybrid_cluster_test_support::node::{NodeCluster, NodeOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The bound of every wait on frames or nodes.
const WAIT: Duration = Duration::from_secs(60);

/// Messages sent to the client that moves.
const MESSAGES: u64 = 1000;

/// The options of a node with sessions whose window is `window_ms`.
fn with_sessions(cluster: &NodeCluster, window_ms: u64) -> NodeOptions {
    let mut options = cluster.options();
    options.heartbeat_ms = 500;
    options.args.push("--sessions".to_owned());
    options.arg("--session-window-ms", window_ms)
}

/// What a client that follows its session has received so far.
#[derive(Default)]
struct Received {
    /// The `data` of each message, in the order received.
    data: Vec<u64>,
    /// The `seq` of the last message.
    last_seq: u64,
    /// Group messages received.
    group: Vec<Value>,
}

impl Received {
    /// Takes one frame: checks that its `seq` follows the last.
    fn take(&mut self, frame: &Value) {
        let Some(seq) = frame["seq"].as_u64() else {
            return;
        };
        assert_eq!(seq, self.last_seq + 1, "seq out of order: {frame}");
        self.last_seq = seq;
        match frame["type"].as_str() {
            Some("message") => self
                .data
                .push(frame["data"].as_u64().expect("numbered data")),
            Some("group") => self.group.push(frame.clone()),
            _ => panic!("a numbered frame of another kind: {frame}"),
        }
    }
}

/// Reads `client`'s frames into `received` until `done`, or until the connection ends
/// (returned); panics past [`WAIT`].
async fn read_until(
    client: &mut Client,
    received: &mut Received,
    cluster: &NodeCluster,
    mut done: impl FnMut(&Received) -> bool,
) -> Option<Ended> {
    let deadline = Instant::now() + WAIT;
    while !done(received) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_json(left).await {
            Ok(Ok(frame)) => received.take(&frame),
            Ok(Err(ended)) => return Some(ended),
            Err(error) => panic!(
                "{error}; after {} messages\n{}",
                received.data.len(),
                cluster.logs(40)
            ),
        }
    }
    None
}

/// Sends [`MESSAGES`] numbered messages to `to`, a few at a time, then reads every answer:
/// returns the errors.
async fn send_numbered(mut sender: Client, to: String) -> Vec<Value> {
    for i in 0..MESSAGES {
        let op = json!({"op":"send","to":to,"data":i,"id":i});
        sender.send(&op).await.unwrap();
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut errors = Vec::new();
    let mut answered = 0;
    while answered < MESSAGES {
        match sender.next_json(WAIT).await.unwrap() {
            Ok(frame) if frame["type"] == "ack" => answered += 1,
            Ok(frame) if frame["type"] == "error" => {
                answered += 1;
                errors.push(frame);
            }
            Ok(_) => {}
            Err(ended) => panic!("the sender's connection ended: {ended:?}"),
        }
    }
    errors
}

/// Joins `client` to the group `room`, and checks it was told so.
async fn join_room(client: &mut Client) {
    client
        .send(&json!({"op":"join","group":"room","id":"join"}))
        .await
        .unwrap();
    let joined = client.next_json(WAIT).await.unwrap().unwrap();
    assert_eq!(joined["type"], "joined", "{joined}");
}

/// Connects to `url` resuming `token` after `last`; returns the client and its `resumed`.
async fn resume(url: &str, token: &str, last: u64) -> (Client, Value) {
    let url = format!("{url}?resume={token}&last={last}");
    let mut client = Client::connect(&url).await.unwrap();
    let resumed = client.next_json(WAIT).await.unwrap().unwrap();
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    (client, resumed)
}

/// A client on node b, a member of `room`, while a client on node a sends it a thousand
/// numbered messages; node b gets `signal` after the first 300; the client resumes on node a.
async fn resumes_on_another_node_after(signal: &str) {
    let mut cluster = NodeCluster::new(&format!("sessions-{}", signal.to_lowercase()));
    let options = with_sessions(&cluster, 120_000);
    let a = cluster.start("a", &options).await;
    let b = cluster.start("b", &options).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let mut receiver = Client::connect(&cluster.nodes[b].ws_url()).await.unwrap();
    let token = receiver
        .session
        .clone()
        .expect("a session token in the welcome");
    join_room(&mut receiver).await;
    let sender = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();
    let sending = tokio::spawn(send_numbered(sender, receiver.id.clone()));

    let mut received = Received::default();
    let ended = read_until(&mut receiver, &mut received, &cluster, |r| {
        r.data.len() >= 300
    })
    .await;
    assert!(ended.is_none(), "the connection ended early: {ended:?}");
    cluster.nodes[b].signal(signal).unwrap();
    // What was written before the end is read; then the connection ends.
    let ended = read_until(&mut receiver, &mut received, &cluster, |_| false).await;
    assert!(ended.is_some());

    let (mut resumed, frame) = resume(&cluster.nodes[a].ws_url(), &token, received.last_seq).await;
    assert_eq!(frame["recovered"], true, "{frame}\n{}", cluster.logs(30));
    assert_eq!(
        resumed.session.as_deref(),
        Some(token.as_str()),
        "the same session"
    );
    let ended = read_until(&mut resumed, &mut received, &cluster, |r| {
        r.data.len() as u64 >= MESSAGES
    })
    .await;
    assert!(ended.is_none(), "{ended:?}\n{}", cluster.logs(30));
    let expected: Vec<u64> = (0..MESSAGES).collect();
    if let Some(at) = (0..received.data.len()).find(|&i| received.data[i] != expected[i]) {
        let around = &received.data[at.saturating_sub(3)..(at + 10).min(received.data.len())];
        panic!(
            "not every message once in order: at {at} came {around:?}\n{}",
            cluster.logs(30)
        );
    }
    let errors = sending.await.unwrap();
    assert!(errors.is_empty(), "every send acked: {errors:?}");

    // Its group membership came with it.
    let mut other = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();
    other
        .send(&json!({"op":"group","group":"room","data":"after","id":"g"}))
        .await
        .unwrap();
    read_until(&mut resumed, &mut received, &cluster, |r| {
        !r.group.is_empty()
    })
    .await;
    assert_eq!(received.group[0]["data"], "after");
    // No duplicate came after the last one.
    let extra = resumed.next_json(Duration::from_millis(500)).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
    other.close().await;
    resumed.close_with(1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_after_a_drain_and_misses_nothing() {
    resumes_on_another_node_after("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_after_a_crash_and_misses_nothing() {
    resumes_on_another_node_after("KILL").await;
}

/// A client away while its node stays up resumes elsewhere and gets what was sent meanwhile;
/// the messages sent to its old id after the move reach it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_away_from_a_live_node_resumes_elsewhere() {
    let mut cluster = NodeCluster::new("sessions-away");
    let options = with_sessions(&cluster, 120_000);
    let a = cluster.start("a", &options).await;
    let b = cluster.start("b", &options).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let receiver = Client::connect(&cluster.nodes[b].ws_url()).await.unwrap();
    let (token, old_id) = (receiver.session.clone().unwrap(), receiver.id.clone());
    receiver.abort();
    let mut sender = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();
    let send = |i: u64| json!({"op":"send","to":old_id,"data":i,"id":i});
    for i in 0..5 {
        sender.send(&send(i)).await.unwrap();
        let ack = sender.next_json(WAIT).await.unwrap().unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (mut resumed, frame) = resume(&cluster.nodes[a].ws_url(), &token, 0).await;
    assert_eq!(frame["recovered"], true, "{frame}");
    // An ack says RabbitMQ has the message: node b may take the last ones only after the
    // resume, and send them on.
    assert!(frame["missed"].as_u64().unwrap() <= 5, "{frame}");
    let mut received = Received::default();
    read_until(&mut resumed, &mut received, &cluster, |r| r.data.len() == 5).await;
    for i in 5..10 {
        sender.send(&send(i)).await.unwrap();
        let ack = sender.next_json(WAIT).await.unwrap().unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    read_until(&mut resumed, &mut received, &cluster, |r| {
        r.data.len() == 10
    })
    .await;
    assert_eq!(received.data, (0..10).collect::<Vec<_>>());
    assert_eq!(received.last_seq, 10);
    // The token is a credential: no log line holds it, nor the session's id.
    let id = token.split('.').nth(1).unwrap();
    for node in &cluster.nodes {
        assert!(
            !node.log().contains(id),
            "{}: the session id logged",
            node.id
        );
    }
}

/// A forged token, one of a session that expired, and one of a session its client ended get
/// `recovered: false` and a new session: never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_expired_or_ended_token_starts_a_new_session() {
    let mut cluster = NodeCluster::new("sessions-refused");
    let node = cluster.start("a", &with_sessions(&cluster, 400)).await;
    cluster.wait_for_nodes(1, WAIT).await;
    let url = cluster.nodes[node].ws_url();

    let forged = format!("s1.{:032x}", rand::random::<u128>());
    for token in [forged.as_str(), "not-a-token"] {
        let (client, frame) = resume(&url, token, 3).await;
        assert_eq!(frame, json!({"type":"resumed","recovered":false}));
        assert_ne!(client.session.as_deref(), Some(token), "a new session");
        client.close_with(1000).await;
    }

    let away = Client::connect(&url).await.unwrap();
    let expired = away.session.clone().unwrap();
    away.abort();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (client, frame) = resume(&url, &expired, 0).await;
    assert_eq!(frame["recovered"], false, "expired: {frame}");
    client.close_with(1000).await;

    let leaving = Client::connect(&url).await.unwrap();
    let ended = leaving.session.clone().unwrap();
    leaving.close_with(1000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, frame) = resume(&url, &ended, 0).await;
    assert_eq!(frame["recovered"], false, "ended: {frame}");
    client.close_with(1000).await;

    // Counted: two new sessions, four resumes that recovered nothing.
    let (status, metrics) = cluster.nodes[node].get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    for (outcome, count) in [("new", 2), ("not_recovered", 4), ("recovered", 0)] {
        let series = format!(
            "hybrid_cluster_sessions_opened_total{{node=\"a\",outcome=\"{outcome}\"}} {count}"
        );
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
}

/// Group messages and unicasts still in the queue of a node that crashed reach the session
/// that was on it, once resumed elsewhere: node b is paused (SIGSTOP) while they are sent, so
/// they wait in its queue, then killed; the node that takes its queue over sends them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_crashed_nodes_queue_held_for_a_session_reaches_it_resumed() {
    let mut cluster = NodeCluster::new("sessions-held");
    let options = with_sessions(&cluster, 120_000);
    let a = cluster.start("a", &options).await;
    let b = cluster.start("b", &options).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let mut receiver = Client::connect(&cluster.nodes[b].ws_url()).await.unwrap();
    let (token, old_id) = (receiver.session.clone().unwrap(), receiver.id.clone());
    join_room(&mut receiver).await;

    cluster.nodes[b].signal("STOP").unwrap();
    let mut sender = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();
    for i in 0..6u64 {
        let op = if i % 2 == 0 {
            json!({"op":"group","group":"room","data":i,"id":i})
        } else {
            json!({"op":"send","to":old_id,"data":i,"id":i})
        };
        sender.send(&op).await.unwrap();
        let ack = sender.next_json(WAIT).await.unwrap().unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    cluster.nodes[b].signal("KILL").unwrap();
    receiver.abort();

    let (mut resumed, frame) = resume(&cluster.nodes[a].ws_url(), &token, 0).await;
    assert_eq!(frame, json!({"type":"resumed","recovered":true,"missed":0}));
    let mut got = Vec::new();
    let mut last_seq = 0;
    while got.len() < 6 {
        let frame = resumed
            .next_json(WAIT)
            .await
            .unwrap_or_else(|error| panic!("{error} after {got:?}\n{}", cluster.logs(30)))
            .unwrap_or_else(|ended| panic!("ended: {ended:?} after {got:?}\n{}", cluster.logs(30)));
        let seq = frame["seq"].as_u64().expect("numbered");
        assert_eq!(seq, last_seq + 1, "{frame}");
        last_seq = seq;
        got.push((
            frame["type"].as_str().unwrap().to_owned(),
            frame["data"].as_u64().unwrap(),
        ));
    }
    let expected: Vec<(String, u64)> = (0..6)
        .map(|i| (if i % 2 == 0 { "group" } else { "message" }.to_owned(), i))
        .collect();
    assert_eq!(got, expected, "each once, in the order sent");
    let extra = resumed.next_json(Duration::from_millis(500)).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
}
