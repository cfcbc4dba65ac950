//! Users, for real: node programs (each a process of its own) on the real Redis and RabbitMQ,
//! identifying clients by JWT. A user's connections on two nodes each get every `send_user`
//! once, in order; an operator's disconnect closes all of them on every node; a bad or
//! expired token gets 401 before any upgrade; a flooding client is refused past its rate
//! limit, then closed, while its neighbours are served as before.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hybrid_cluster_test_support::client::{Client, Ended};
use hybrid_cluster_test_support::node::{NodeCluster, NodeOptions, http_request};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The bound of every wait on frames or nodes.
const WAIT: Duration = Duration::from_secs(30);

const JWT_SECRET: &str = "users-test-jwt-secret";
const ADMIN_TOKEN: &str = "users-test-admin-token";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `user`, signed with `secret`, expiring `ttl` seconds from now (negative:
/// expired that long ago).
fn token_with(user: &str, secret: &str, ttl: i64) -> String {
    let exp = now() as i64 + ttl;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn token(user: &str) -> String {
    token_with(user, JWT_SECRET, 600)
}

/// A node that identifies clients by JWT (the secret from the environment) and has an admin
/// token.
fn with_auth(cluster: &NodeCluster) -> NodeOptions {
    let mut options = cluster.options();
    options.env.extend([
        (
            "HYBRID_CLUSTER_JWT_SECRET".to_owned(),
            JWT_SECRET.to_owned(),
        ),
        (
            "HYBRID_CLUSTER_ADMIN_TOKEN".to_owned(),
            ADMIN_TOKEN.to_owned(),
        ),
    ]);
    options
}

/// Starts the nodes `names` of `cluster` with `options`, waits until each sees them all, and
/// returns their WebSocket URLs, in order (node `i` is `cluster.nodes[i]`).
async fn start_all<const N: usize>(
    cluster: &mut NodeCluster,
    names: [&str; N],
    options: &NodeOptions,
) -> [String; N] {
    for name in names {
        cluster.start(name, options).await;
    }
    cluster.wait_for_nodes(N, WAIT).await;
    std::array::from_fn(|i| cluster.nodes[i].ws_url())
}

async fn connect_as(node_url: &str, user: &str) -> Client {
    let client = Client::connect(&format!("{node_url}?token={}", token(user)))
        .await
        .unwrap();
    assert_eq!(
        client.user.as_deref(),
        Some(user),
        "the welcome names the user"
    );
    client
}

/// The next frame of `client` that is not an `ack`, within [`WAIT`].
async fn next_frame(client: &mut Client, cluster: &NodeCluster) -> Value {
    loop {
        match client.next_json(WAIT).await {
            Ok(Ok(frame)) if frame["type"] == "ack" => continue,
            Ok(Ok(frame)) => return frame,
            Ok(Err(ended)) => panic!("{}: ended: {ended:?}\n{}", client.id, cluster.logs(30)),
            Err(error) => panic!("{error}\n{}", cluster.logs(30)),
        }
    }
}

/// Sends `op` and waits for its answer: the `ack` or `error` naming `id`.
async fn request(client: &mut Client, op: Value, cluster: &NodeCluster) -> Value {
    let id = op["id"].clone();
    client.send(&op).await.unwrap();
    loop {
        let frame = match client.next_json(WAIT).await {
            Ok(Ok(frame)) => frame,
            other => panic!(
                "{}: no answer to {op}: {other:?}\n{}",
                client.id,
                cluster.logs(30)
            ),
        };
        if frame["id"] == id && (frame["type"] == "ack" || frame["type"] == "error") {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_connections_on_two_nodes_gets_each_send_user_once_on_each() {
    const MESSAGES: u64 = 200;
    let mut cluster = NodeCluster::new("users-send");
    let options = with_auth(&cluster);
    let [url_a, url_b] = start_all(&mut cluster, ["users-a", "users-b"], &options).await;

    let mut alice = vec![
        connect_as(&url_a, "alice").await,
        connect_as(&url_a, "alice").await,
        connect_as(&url_b, "alice").await,
    ];
    let mut carol = connect_as(&url_b, "carol").await;
    let mut anonymous = Client::connect(&url_b).await.unwrap();
    assert_eq!(anonymous.user, None, "no token: no user");
    let mut bob = connect_as(&url_b, "bob").await;

    let ops: Vec<Value> = (0..MESSAGES)
        .map(|n| json!({"op": "send_user", "user": "alice", "data": n, "id": n}))
        .collect();
    bob.send_all(&ops).await.unwrap();
    let mut answered = 0;
    while answered < MESSAGES {
        let frame = bob.next_json(WAIT).await.unwrap().unwrap();
        assert_eq!(frame["type"], "ack", "every send_user is acked: {frame}");
        answered += 1;
    }
    for client in &mut alice {
        for n in 0..MESSAGES {
            let frame = next_frame(client, &cluster).await;
            assert_eq!(frame["type"], "message", "{frame}");
            assert_eq!(frame["user"], "alice", "{frame}");
            assert_eq!(frame["from"], bob.id.as_str(), "{frame}");
            assert_eq!(frame["data"], n, "each message once, in order: {frame}");
        }
    }
    // Nothing more for any of them, nor for the others: a marker sent to each comes next.
    for client in alice.iter_mut().chain([&mut carol, &mut anonymous]) {
        let to = client.id.clone();
        bob.send(&json!({"op": "send", "to": to, "data": "marker"}))
            .await
            .unwrap();
        let frame = next_frame(client, &cluster).await;
        assert_eq!(frame["data"], "marker", "{}: got {frame}", client.id);
    }

    // A user with no connection: not_found. A user's own group is not for clients.
    let nobody = request(
        &mut bob,
        json!({"op": "send_user", "user": "nobody", "data": 1, "id": "x"}),
        &cluster,
    )
    .await;
    assert_eq!(nobody["code"], "not_found", "{nobody}");
    for op in ["join", "leave"] {
        let refused = request(
            &mut carol,
            json!({"op": op, "group": "~user:alice", "id": op}),
            &cluster,
        )
        .await;
        assert_eq!(refused["code"], "bad_request", "{refused}");
    }
    // When alice's connections on a go, she is still reached on b, and only there.
    for client in alice.drain(..2) {
        client.close().await;
    }
    let ack = request(
        &mut bob,
        json!({"op": "send_user", "user": "alice", "data": "later", "id": "later"}),
        &cluster,
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(next_frame(&mut alice[0], &cluster).await["data"], "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disconnects_a_user_from_every_node() {
    let mut cluster = NodeCluster::new("users-kick");
    let options = with_auth(&cluster);
    let [url_a, url_b] = start_all(&mut cluster, ["kick-a", "kick-b"], &options).await;
    let b = 1;
    let mut mallory = vec![
        connect_as(&url_a, "mallory").await,
        connect_as(&url_b, "mallory").await,
        connect_as(&url_b, "mallory").await,
    ];
    let mut bob = connect_as(&url_a, "bob").await;
    let port = cluster.nodes[b].port;
    let path = "/cluster/users/mallory/disconnect";
    let post = |token: &'static str, body: &'static str| async move {
        let auth = format!("Bearer {token}");
        http_request(port, "POST", path, &[("Authorization", &auth)], body)
            .await
            .unwrap()
    };

    let (status, body) = post("wrong-token", "").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = post(ADMIN_TOKEN, r#"{"reason":"banned for spam"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""disconnected":true"#), "{body}");
    for client in &mut mallory {
        match client.next_json(WAIT).await.unwrap() {
            Err(Ended::Closed(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4003, "{frame:?}");
                assert_eq!(frame.reason.as_str(), "banned for spam");
            }
            other => panic!("{}: expected a close, got {other:?}", client.id),
        }
    }
    // Bob is not touched.
    let to = bob.id.clone();
    let ack = request(
        &mut bob,
        json!({"op": "send", "to": to, "data": 1, "id": 1}),
        &cluster,
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Once the closed connections are gone everywhere, the user is not found.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = post(ADMIN_TOKEN, "").await;
        if status == 404 {
            assert!(body.contains("not_found"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "mallory is still found\n{}",
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status and body of an upgrade to `url` that is refused before it happens.
async fn refused_upgrade(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|body| String::from_utf8_lossy(body).into_owned())
                .unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Ok(_) => panic!("{url}: the upgrade was accepted"),
        Err(error) => panic!("{url}: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bad_or_expired_token_gets_401_before_the_upgrade() {
    let mut cluster = NodeCluster::new("users-auth");
    let mut options = with_auth(&cluster);
    options.args.push("--require-auth".to_owned());
    let a = cluster.start("auth-a", &options).await;
    let url = cluster.nodes[a].ws_url();

    let (status, body) = refused_upgrade(&url).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("a token is required"), "{body}");
    let expired = token_with("alice", JWT_SECRET, -3600);
    let (status, body) = refused_upgrade(&format!("{url}?token={expired}")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "{body}");
    let forged = token_with("alice", "another-secret", 600);
    let (status, body) = refused_upgrade(&format!("{url}?token={forged}")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature"), "{body}");
    let (status, body) = refused_upgrade(&format!("{url}?token=not.a.jwt")).await;
    assert_eq!(status, 401, "{body}");

    // The header works as the query does.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut upgrade = url.as_str().into_client_request().unwrap();
    upgrade.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("dave")).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(upgrade).await.unwrap();
    use futures_util::StreamExt;
    let welcome = socket.next().await.unwrap().unwrap();
    let welcome: Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["user"], "dave", "{welcome}");

    // No token appears in the log.
    let log = cluster.nodes[a].log();
    assert!(
        !log.contains(&expired) && !log.contains(JWT_SECRET),
        "{log}"
    );
}

/// What a flooding client saw: requests acked (or, for binary frames, answered
/// `bad_request`), requests refused, and its close code. `binary`: it sends binary frames,
/// which count against the limit as requests do.
async fn flood(mut flooder: Client, requests: u64, binary: bool) -> (u64, u64, Option<u16>) {
    let me = flooder.id.clone();
    if binary {
        let _ = flooder.send_binary(&[0u8; 64], requests as usize).await;
    } else {
        let ops: Vec<Value> = (0..requests)
            .map(|n| json!({"op": "send", "to": me, "data": n, "id": n}))
            .collect();
        let _ = flooder.send_all(&ops).await;
    }
    let (mut acks, mut refused) = (0, 0);
    loop {
        match flooder.next_json(WAIT).await.unwrap() {
            Ok(frame) if frame["type"] == "ack" || frame["code"] == "bad_request" => acks += 1,
            Ok(frame) if frame["code"] == "rate_limited" => {
                assert!(
                    binary || frame["id"].is_u64(),
                    "the refusal names its request: {frame}"
                );
                refused += 1;
            }
            Ok(_) => {}
            Err(Ended::Closed(frame)) => {
                return (acks, refused, frame.map(|frame| u16::from(frame.code)));
            }
            Err(Ended::Dropped) => panic!("{me}: dropped without a close frame"),
        }
    }
}

/// Round trips of `pairs` (sender, receiver), `rounds` each, paced at 20 per second (within
/// their own limit).
async fn round_trips(pairs: &mut [(Client, Client)], rounds: u64) -> Vec<Duration> {
    let mut rtts = Vec::new();
    for n in 0..rounds {
        for (sender, receiver) in pairs.iter_mut() {
            let started = Instant::now();
            let to = receiver.id.clone();
            sender
                .send(&json!({"op": "send", "to": to, "data": n}))
                .await
                .unwrap();
            let frame = receiver.next_json(WAIT).await.unwrap().unwrap();
            assert_eq!(frame["data"], n, "{frame}");
            rtts.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rtts.sort();
    rtts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_refused_then_closed_while_its_neighbours_are_served() {
    const RATE: u64 = 50;
    const FLOODERS: usize = 10;
    const REQUESTS: u64 = 2000;
    let mut cluster = NodeCluster::new("users-flood");
    let options = cluster.options().arg("--rate-limit", RATE);
    let [url_a, url_b] = start_all(&mut cluster, ["flood-a", "flood-b"], &options).await;
    let a = 0;
    // Neighbours: pairs on the flooders' node, one talking within the node, one across.
    let mut pairs = Vec::new();
    for url in [&url_a, &url_b] {
        let sender = Client::connect(&url_a).await.unwrap();
        let receiver = Client::connect(url).await.unwrap();
        pairs.push((sender, receiver));
    }
    let quiet = round_trips(&mut pairs, 10).await;

    // Each flooder sends 2,000 requests at once (to itself), 40 times its burst: the burst is
    // acked, the rest refused, and the 100th refusal closes the connection with 1008.
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        flooders.push(Client::connect(&url_a).await.unwrap());
    }
    let neighbours = tokio::spawn(async move { round_trips(&mut pairs, 20).await });
    // The first sends binary frames: not requests, but counted as ones.
    let floods: Vec<_> = flooders
        .into_iter()
        .enumerate()
        .map(|(i, flooder)| tokio::spawn(flood(flooder, REQUESTS, i == 0)))
        .collect();
    for flood in floods {
        let (acks, refused, close) = flood.await.unwrap();
        assert_eq!(close, Some(1008));
        assert!(
            (RATE..=RATE * 2).contains(&acks),
            "the burst passes, little more: {acks} acked"
        );
        assert_eq!(refused, 99, "every refusal is answered before the close");
    }
    let busy = neighbours.await.unwrap();
    println!(
        "neighbours' round trips: quiet p50 {:?} max {:?}; beside {FLOODERS} flooders p50 {:?} max {:?}",
        quiet[quiet.len() / 2],
        quiet[quiet.len() - 1],
        busy[busy.len() / 2],
        busy[busy.len() - 1],
    );
    // Not a benchmark: a bound only a node stalled by the flood would miss.
    let slowest = busy[busy.len() - 1];
    assert!(
        slowest < Duration::from_secs(1),
        "a neighbour waited {slowest:?}"
    );

    let (_, metrics) = cluster.nodes[a].get("/metrics").await.unwrap();
    let count = |action: &str| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("hybrid_cluster_rate_limited_total")
                    && line.contains(&format!("action=\"{action}\""))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("refused"), 99.0 * FLOODERS as f64, "{metrics}");
    assert_eq!(count("closed"), FLOODERS as f64, "{metrics}");
}

/// Notes `frame` in `events` when it is a presence event of the room; false otherwise.
fn note_event(frame: &Value, events: &mut Vec<(String, String)>) -> bool {
    let Some(kind @ ("presence_join" | "presence_leave")) = frame["type"].as_str() else {
        return false;
    };
    assert_eq!(frame["group"], "room", "{frame}");
    events.push((kind.to_owned(), frame["user"].as_str().unwrap().to_owned()));
    true
}

/// Reads `client`'s frames until a group message with `marker` as data comes, noting the
/// presence events in `events`; returns them all, and empties `events`.
async fn presence_events(
    client: &mut Client,
    events: &mut Vec<(String, String)>,
    marker: &str,
    cluster: &NodeCluster,
) -> Vec<(String, String)> {
    loop {
        let frame = next_frame(client, cluster).await;
        if !note_event(&frame, events) && frame["type"] == "group" && frame["data"] == marker {
            return std::mem::take(events);
        }
    }
}

/// The members of `room` as `client` asks them: (user, connections), and the nodes named
/// unreachable.
async fn members(
    client: &mut Client,
    events: &mut Vec<(String, String)>,
    cluster: &NodeCluster,
) -> (Vec<(String, u64)>, Value) {
    client
        .send(&json!({"op": "presence", "group": "room", "id": "who"}))
        .await
        .unwrap();
    loop {
        let frame = next_frame(client, cluster).await;
        note_event(&frame, events);
        if frame["type"] == "presence" {
            assert_eq!(frame["id"], "who", "{frame}");
            let members = frame["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["user"].as_str().unwrap().to_owned(),
                        m["connections"].as_u64().unwrap(),
                    )
                })
                .collect();
            return (members, frame["unreachable"].clone());
        }
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

async fn join_room(client: &mut Client, cluster: &NodeCluster) {
    let id = format!("join-{}", client.id);
    let answer = request(
        client,
        json!({"op": "join", "group": "room", "id": id}),
        cluster,
    )
    .await;
    assert_eq!(answer["type"], "ack", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_right_across_three_nodes_and_each_change_is_announced_once() {
    let mut cluster = NodeCluster::new("users-presence");
    let options = with_auth(&cluster);
    let urls = start_all(
        &mut cluster,
        ["presence-a", "presence-b", "presence-c"],
        &options,
    )
    .await;
    let c = 2;

    // Watchers on a and b see every event of the room.
    let mut watcher_a = connect_as(&urls[0], "watcher-a").await;
    join_room(&mut watcher_a, &cluster).await;
    let mut watcher_b = connect_as(&urls[1], "watcher-b").await;
    join_room(&mut watcher_b, &cluster).await;
    let mut alice_a = connect_as(&urls[0], "alice").await;
    join_room(&mut alice_a, &cluster).await;
    let mut alice_b = connect_as(&urls[1], "alice").await;
    join_room(&mut alice_b, &cluster).await;
    let mut bob_c = connect_as(&urls[2], "bob").await;
    join_room(&mut bob_c, &cluster).await;
    let marker = |n: u32| json!({"op": "group", "group": "room", "data": format!("marker-{n}")});
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    watcher_a.send(&marker(1)).await.unwrap();
    assert_eq!(
        presence_events(&mut watcher_b, &mut seen_b, "marker-1", &cluster).await,
        // (Its own arrival came before its join's ack, which `join_room` read past.)
        pairs(&[("presence_join", "alice"), ("presence_join", "bob")]),
        "alice arrives once for her two connections"
    );
    let _ = presence_events(&mut watcher_a, &mut seen_a, "marker-1", &cluster).await;
    let (listed, unreachable) = members(&mut watcher_b, &mut seen_b, &cluster).await;
    assert_eq!(
        listed,
        [
            ("alice".to_owned(), 2),
            ("bob".to_owned(), 1),
            ("watcher-a".to_owned(), 1),
            ("watcher-b".to_owned(), 1)
        ]
    );
    assert!(unreachable.is_null(), "{unreachable}");

    // Alice's connection on a closes: she is still there on b; leaving there, she is gone.
    alice_a.close().await;
    let answer = request(
        &mut alice_b,
        json!({"op": "leave", "group": "room", "id": "l"}),
        &cluster,
    )
    .await;
    assert_eq!(answer["type"], "ack", "{answer}");
    // Bob's node dies with him: after its lease, one peer reaps it and says so once.
    cluster.nodes[c].signal("KILL").unwrap();
    drop(bob_c);
    let deadline = Instant::now() + WAIT;
    loop {
        let (listed, _) = members(&mut watcher_a, &mut seen_a, &cluster).await;
        if listed.iter().all(|(user, _)| user != "bob") {
            assert_eq!(
                listed,
                [("watcher-a".to_owned(), 1), ("watcher-b".to_owned(), 1)]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob is still listed\n{}",
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reaped: the node is not named unreachable any more either.
    let (_, unreachable) = members(&mut watcher_a, &mut seen_a, &cluster).await;
    assert!(unreachable.is_null(), "{unreachable}");
    // Each watcher gets both departures (the reaping node announces bob's after the store
    // forgot him), then nothing more up to a marker sent after them: once each.
    for (watcher, seen) in [(&mut watcher_a, &mut seen_a), (&mut watcher_b, &mut seen_b)] {
        while seen.len() < 2 {
            let frame = next_frame(watcher, &cluster).await;
            note_event(&frame, seen);
        }
        let mut departures = std::mem::take(seen);
        departures.sort();
        assert_eq!(
            departures,
            pairs(&[("presence_leave", "alice"), ("presence_leave", "bob")]),
            "{}",
            watcher.id
        );
    }
    watcher_b.send(&marker(2)).await.unwrap();
    for (watcher, seen) in [(&mut watcher_a, &mut seen_a), (&mut watcher_b, &mut seen_b)] {
        let more = presence_events(watcher, seen, "marker-2", &cluster).await;
        assert!(more.is_empty(), "{}: announced twice: {more:?}", watcher.id);
    }

    // A join and a presence query sent together: the answer counts the join.
    let mut carol = connect_as(&urls[1], "carol").await;
    carol
        .send_all(&[
            json!({"op": "join", "group": "room"}),
            json!({"op": "presence", "group": "room", "id": "who"}),
        ])
        .await
        .unwrap();
    let answer = loop {
        let frame = next_frame(&mut carol, &cluster).await;
        if frame["type"] == "presence" {
            break frame;
        }
    };
    assert!(
        answer["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"] == "carol"),
        "{answer}"
    );

    // Everyone gone: the room's presence is gone from Redis.
    watcher_a.close().await;
    watcher_b.close().await;
    alice_b.close().await;
    carol.close().await;
    let mut redis = redis::Client::open(hybrid_cluster_test_support::servers::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{{{}}}:presence:room", cluster.prefix);
    let deadline = Instant::now() + WAIT;
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(Instant::now() < deadline, "{key} is left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_rsa_public_key_takes_rs256_tokens_only() {
    let mut cluster = NodeCluster::new("users-rsa");
    let key = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/identity/testdata/rsa-public.pem"
    );
    let mut options = cluster.options().arg("--jwt-public-key", key);
    options.args.push("--require-auth".to_owned());
    let a = cluster.start("rsa-a", &options).await;
    let url = cluster.nodes[a].ws_url();
    let private = include_bytes!("../src/identity/testdata/rsa-private.pem");
    let exp = now() + 600;
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "carol", "exp": exp}),
        &EncodingKey::from_rsa_pem(private).unwrap(),
    )
    .unwrap();
    let carol = Client::connect(&format!("{url}?token={signed}"))
        .await
        .unwrap();
    assert_eq!(carol.user.as_deref(), Some("carol"));
    // A token signed with HMAC over the public key (algorithm confusion) is refused.
    let confused = token_with(
        "mallory",
        &String::from_utf8_lossy(include_bytes!("../src/identity/testdata/rsa-public.pem")),
        600,
    );
    let (status, body) = refused_upgrade(&format!("{url}?token={confused}")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("algorithm"), "{body}");
}

/// A Redis user of its own for one node, so that its connections, and no other test's, can be
/// killed with `CLIENT KILL USER`; returns the user and the node's `--redis` URL.
async fn redis_user(redis: &mut redis::aio::MultiplexedConnection, name: &str) -> (String, String) {
    let user = hybrid_cluster_test_support::servers::unique_prefix(name);
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg(&["on", ">victim-password", "~*", "&*", "+@all"][..])
        .query_async(redis)
        .await
        .unwrap();
    (
        user.clone(),
        format!("redis://{user}:victim-password@127.0.0.1:6379"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_stays_right_while_a_nodes_redis_connections_are_killed() {
    const USERS: usize = 20;
    let mut redis = redis::Client::open(hybrid_cluster_test_support::servers::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (victim, victim_url) = redis_user(&mut redis, "hc-presence-victim").await;
    let mut cluster = NodeCluster::new("users-redis-kill");
    let mut options = with_auth(&cluster);
    options.servers = false;
    options.args.extend([
        "--redis".to_owned(),
        victim_url,
        "--amqp".to_owned(),
        hybrid_cluster_test_support::servers::amqp_url(),
    ]);
    let a = cluster.start("kill-a", &options).await;
    let b = cluster.start("kill-b", &with_auth(&cluster)).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let (url_a, url_b) = (cluster.nodes[a].ws_url(), cluster.nodes[b].ws_url());
    let mut watcher = connect_as(&url_b, "watcher").await;
    join_room(&mut watcher, &cluster).await;
    let kill = || async {
        let mut redis = redis::Client::open(hybrid_cluster_test_support::servers::redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "USER", victim.as_str()][..])
            .query_async(&mut redis)
            .await
            .unwrap();
        killed
    };

    // Users join on a while its Redis connections are killed, again and again.
    let (mut users, mut killed) = (Vec::new(), 0);
    for k in 0..USERS {
        if k % 4 == 0 {
            killed += kill().await;
        }
        let mut client = connect_as(&url_a, &format!("user-{k}")).await;
        join_room(&mut client, &cluster).await;
        users.push(client);
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let (listed, _) = members(&mut watcher, &mut seen, &cluster).await;
        if listed.len() == USERS + 1 {
            assert!(listed.iter().all(|(_, n)| *n == 1), "{listed:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listed: {listed:?}\n{}",
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each arrival once (the watcher's own came before its join's ack).
    while seen.len() < USERS {
        let frame = next_frame(&mut watcher, &cluster).await;
        note_event(&frame, &mut seen);
    }
    let arrivals: std::collections::BTreeSet<_> = seen.drain(..).collect();
    assert_eq!(arrivals.len(), USERS, "{arrivals:?}");

    // They go, with more kills: each departure once, and only the watcher is left.
    for (k, client) in users.into_iter().enumerate() {
        if k % 4 == 0 {
            killed += kill().await;
        }
        client.close().await;
    }
    assert!(
        killed >= 10,
        "node a's connections were killed {killed} times in all"
    );
    while seen.len() < USERS {
        let frame = next_frame(&mut watcher, &cluster).await;
        note_event(&frame, &mut seen);
    }
    let departures: std::collections::BTreeSet<_> = seen.drain(..).collect();
    assert_eq!(departures.len(), USERS, "{departures:?}");
    assert!(departures.iter().all(|(kind, _)| kind == "presence_leave"));
    let (listed, _) = members(&mut watcher, &mut seen, &cluster).await;
    assert_eq!(listed, [("watcher".to_owned(), 1)]);
    watcher
        .send(&json!({"op": "group", "group": "room", "data": "end"}))
        .await
        .unwrap();
    let more = presence_events(&mut watcher, &mut seen, "end", &cluster).await;
    assert!(more.is_empty(), "announced twice: {more:?}");
    let () = redis::cmd("ACL")
        .arg(&["DELUSER", victim.as_str()][..])
        .query_async(&mut redis)
        .await
        .unwrap_or(());
}

/// Asks `watcher` for the room's members until they are `want` (within [`WAIT`]).
async fn wait_for(
    watcher: &mut Client,
    seen: &mut Vec<(String, String)>,
    cluster: &NodeCluster,
    want: Vec<(String, u64)>,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (members, _) = members(watcher, seen, cluster).await;
        if members == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{members:?}\n{}",
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_for_gone_and_back_counts_its_members_again() {
    let mut cluster = NodeCluster::new("users-paused");
    let options = with_auth(&cluster);
    let [url_a, url_b] = start_all(&mut cluster, ["paused-a", "paused-b"], &options).await;
    let a = 0;
    let mut watcher = connect_as(&url_b, "watcher").await;
    join_room(&mut watcher, &cluster).await;
    let mut alice = connect_as(&url_a, "alice").await;
    join_room(&mut alice, &cluster).await;
    let mut seen = Vec::new();
    let listed = |who: &[&str]| -> Vec<(String, u64)> {
        who.iter().map(|user| ((*user).to_owned(), 1)).collect()
    };
    wait_for(
        &mut watcher,
        &mut seen,
        &cluster,
        listed(&["alice", "watcher"]),
    )
    .await;

    // Paused past its lease, a is taken for gone: alice is reaped and said to leave.
    cluster.nodes[a].signal("STOP").unwrap();
    wait_for(&mut watcher, &mut seen, &cluster, listed(&["watcher"])).await;
    // Back, a finds its presence gone and counts alice again: she is said to arrive.
    cluster.nodes[a].signal("CONT").unwrap();
    wait_for(
        &mut watcher,
        &mut seen,
        &cluster,
        listed(&["alice", "watcher"]),
    )
    .await;
    while seen.len() < 3 {
        let frame = next_frame(&mut watcher, &cluster).await;
        note_event(&frame, &mut seen);
    }
    assert_eq!(
        std::mem::take(&mut seen),
        pairs(&[
            ("presence_join", "alice"),
            ("presence_leave", "alice"),
            ("presence_join", "alice"),
        ])
    );
    // Her leave is announced once, and the list is right.
    let answer = request(
        &mut alice,
        json!({"op": "leave", "group": "room", "id": "l"}),
        &cluster,
    )
    .await;
    assert_eq!(answer["type"], "ack", "{answer}");
    wait_for(&mut watcher, &mut seen, &cluster, listed(&["watcher"])).await;
    watcher
        .send(&json!({"op": "group", "group": "room", "data": "end"}))
        .await
        .unwrap();
    let more = presence_events(&mut watcher, &mut seen, "end", &cluster).await;
    assert_eq!(more, pairs(&[("presence_leave", "alice")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_user_whose_client_is_away_waits_in_its_session() {
    let mut cluster = NodeCluster::new("users-session");
    let mut options = with_auth(&cluster);
    options.args.push("--sessions".to_owned());
    let [url_a, url_b] = start_all(&mut cluster, ["session-a", "session-b"], &options).await;
    let alice = connect_as(&url_a, "alice").await;
    let session = alice.session.clone().expect("a session token");
    // Away (1001 keeps the session), then sent to as a user from another node.
    alice.close_with(1001).await;
    let mut bob = connect_as(&url_b, "bob").await;
    let ack = request(
        &mut bob,
        json!({"op": "send_user", "user": "alice", "data": "while away", "id": 1}),
        &cluster,
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Back on the other node, with the session and a token: the message is replayed.
    let url = format!("{url_b}?token={}&resume={session}&last=0", token("alice"));
    let mut back = Client::connect(&url).await.unwrap();
    assert_eq!(back.user.as_deref(), Some("alice"));
    let resumed = next_frame(&mut back, &cluster).await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["missed"], 1, "{resumed}");
    let missed = next_frame(&mut back, &cluster).await;
    assert_eq!(missed["type"], "message", "{missed}");
    assert_eq!(missed["user"], "alice", "{missed}");
    assert_eq!(missed["data"], "while away", "{missed}");
    // And the user is reached on the node they came back to.
    let ack = request(
        &mut bob,
        json!({"op": "send_user", "user": "alice", "data": "back", "id": 2}),
        &cluster,
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(next_frame(&mut back, &cluster).await["data"], "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_users_session_ends_and_cannot_be_resumed() {
    let mut cluster = NodeCluster::new("users-kick-session");
    let mut options = with_auth(&cluster);
    options.args.push("--sessions".to_owned());
    let [url_a] = start_all(&mut cluster, ["kick-session-a"], &options).await;
    let mut mallory = connect_as(&url_a, "mallory").await;
    let session = mallory.session.clone().expect("a session token");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, body) = http_request(
        cluster.nodes[0].port,
        "POST",
        "/cluster/users/mallory/disconnect",
        &[("Authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    match mallory.next_json(WAIT).await.unwrap() {
        Err(Ended::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 4003),
        other => panic!("expected a close, got {other:?}"),
    }
    let url = format!("{url_a}?token={}&resume={session}&last=0", token("mallory"));
    let mut back = Client::connect(&url).await.unwrap();
    let resumed = next_frame(&mut back, &cluster).await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["recovered"], false, "the session ended: {resumed}");
}
