//! Observing a cluster: metrics that match what was done, one trace id across two nodes, and
//! the status page rendered by a real headless Chromium. Embedded backends, real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::get;
use axum::serve::ListenerExt;
use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::server::{ServerConfig, router};
use hybrid_cluster::{Backends, Cluster, ClusterConfig, ConnectionId, NodeId};
use hybrid_cluster_test_support::browser;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

/// The process's one metrics recorder: nodes of different tests are told apart by their
/// `node` label.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

/// A node on `backends`, serving the node server (and `/metrics`) on a loopback port.
async fn node(backends: &Backends, name: &str) -> (Cluster, u16) {
    // Installed before the node starts, so that nothing it records is lost.
    let metrics = recorder().clone();
    spans();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = ClusterConfig::new(NodeId::new(name).unwrap(), "127.0.0.1", port);
    let cluster = Cluster::start(config, backends.clone()).await.unwrap();
    let app = router(cluster.clone(), ServerConfig::default()).route(
        "/metrics",
        get(move || std::future::ready(metrics.render())),
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (cluster, port)
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn client(port: u16) -> (Socket, String) {
    let (mut socket, _) = within(
        "the client connects",
        connect_async(format!("ws://127.0.0.1:{port}/ws")),
    )
    .await
    .unwrap();
    let welcome = next_json(&mut socket).await;
    (
        socket,
        welcome["connection_id"].as_str().unwrap().to_owned(),
    )
}

async fn next_json(socket: &mut Socket) -> Value {
    loop {
        match within("a frame arrives", socket.next()).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn send(socket: &mut Socket, request: Value) {
    socket
        .send(Message::text(request.to_string()))
        .await
        .unwrap();
}

async fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("the response arrives", stream.read_to_string(&mut response))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample of `metric` whose labels include all of `labels`, from a
/// Prometheus text exposition.
fn sample(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
            (name == metric).then_some((rest.trim_end_matches('}'), value))
        })
        .find(|(series_labels, _)| {
            labels.iter().all(|(k, v)| {
                series_labels
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            })
        })
        .and_then(|(_, value)| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_counts_what_was_done() {
    let backends = Backends::embedded();
    let (a, a_port) = node(&backends, "metrics-a").await;
    let (b, b_port) = node(&backends, "metrics-b").await;
    within(
        "a sees b",
        a.discovery().view().wait_until(|n| n.len() == 2),
    )
    .await;

    let (mut alice, _) = client(a_port).await;
    let (mut bob, bob_id) = client(b_port).await;
    for n in 0..3 {
        send(
            &mut alice,
            json!({"op": "send", "to": bob_id, "data": n, "id": n}),
        )
        .await;
        assert_eq!(next_json(&mut alice).await, json!({"type": "ack", "id": n}));
        assert_eq!(next_json(&mut bob).await["data"], n);
    }
    send(
        &mut alice,
        json!({"op": "broadcast", "data": "all", "id": "b"}),
    )
    .await;
    // The sender's own copy and its ack, in either order.
    let mut types = [next_json(&mut alice).await, next_json(&mut alice).await]
        .map(|frame| frame["type"].as_str().unwrap().to_owned());
    types.sort();
    assert_eq!(types, ["ack", "broadcast"]);
    assert_eq!(next_json(&mut bob).await["type"], "broadcast");
    // A send to a connection that never existed fails, and is counted as such.
    send(
        &mut alice,
        json!({"op": "send", "to": "metrics-b:00000000000000aa:9", "data": 0, "id": "x"}),
    )
    .await;
    assert_eq!(next_json(&mut alice).await["code"], "not_found");
    // A group bound, used and unbound: each request answers with two frames.
    for (op, id, expected) in [
        ("join", "j", ["ack", "joined"]),
        ("group", "g", ["ack", "group"]),
        ("leave", "l", ["ack", "left"]),
    ] {
        send(
            &mut alice,
            json!({"op": op, "group": "room", "data": 0, "id": id}),
        )
        .await;
        let mut types = [next_json(&mut alice).await, next_json(&mut alice).await]
            .map(|frame| frame["type"].as_str().unwrap().to_owned());
        types.sort();
        assert_eq!(types, expected, "{op}");
    }

    let exposition = http_get(a_port, "/metrics").await;
    let a_labels = |more: &[(&'static str, &'static str)]| {
        let mut labels = vec![("node", "metrics-a")];
        labels.extend_from_slice(more);
        labels
    };
    let value = |metric: &str, labels: &[(&str, &str)]| {
        sample(&exposition, metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{exposition}"))
    };
    assert_eq!(
        value(
            "hybrid_cluster_messages_sent_total",
            &a_labels(&[("kind", "unicast"), ("outcome", "ok")])
        ),
        3.0
    );
    assert_eq!(
        value(
            "hybrid_cluster_messages_sent_total",
            &a_labels(&[("kind", "unicast"), ("outcome", "error")])
        ),
        1.0
    );
    assert_eq!(
        value(
            "hybrid_cluster_messages_sent_total",
            &a_labels(&[("kind", "broadcast"), ("outcome", "ok")])
        ),
        1.0
    );
    assert_eq!(
        value(
            "hybrid_cluster_upgrades_total",
            &a_labels(&[("outcome", "accepted")])
        ),
        1.0
    );
    assert_eq!(value("hybrid_cluster_connections", &a_labels(&[])), 1.0);
    assert_eq!(value("hybrid_cluster_nodes", &a_labels(&[])), 2.0);
    assert!(
        value(
            "hybrid_cluster_discovery_changes_total",
            &a_labels(&[("change", "join")])
        ) >= 2.0
    );
    // The node's own load on the broker and the registry.
    let publishes = |route| {
        value(
            "hybrid_cluster_broker_publishes_total",
            &a_labels(&[("route", route)]),
        )
    };
    assert_eq!(
        publishes("node"),
        3.0,
        "the refused send never reached the broker"
    );
    assert_eq!(publishes("broadcast"), 1.0);
    assert_eq!(publishes("group"), 1.0);
    let bindings = |change| {
        value(
            "hybrid_cluster_broker_binding_changes_total",
            &a_labels(&[("change", change)]),
        )
    };
    assert_eq!(bindings("bind"), 3.0, "its own key, broadcast, the group");
    assert_eq!(bindings("unbind"), 1.0);
    assert_eq!(
        value("hybrid_cluster_broker_group_bindings", &a_labels(&[])),
        0.0
    );
    let registry = |op| {
        value(
            "hybrid_cluster_registry_operations_total",
            &a_labels(&[("op", op)]),
        )
    };
    assert_eq!(
        value(
            "hybrid_cluster_messages_dropped_total",
            &a_labels(&[("reason", "no_member")])
        ),
        0.0
    );
    assert_eq!(
        value("hybrid_cluster_peers_with_other_group_keys", &a_labels(&[])),
        0.0
    );
    assert!(registry("put_node") >= 1.0);
    assert!(registry("watch") >= 1.0);
    assert!(value("hybrid_cluster_registry_events_total", &a_labels(&[])) >= 1.0);
    let b_labels = |more: &[(&'static str, &'static str)]| {
        let mut labels = vec![("node", "metrics-b")];
        labels.extend_from_slice(more);
        labels
    };
    assert_eq!(
        value(
            "hybrid_cluster_messages_received_total",
            &b_labels(&[("kind", "unicast")])
        ),
        3.0
    );
    assert_eq!(
        value(
            "hybrid_cluster_messages_received_total",
            &b_labels(&[("kind", "broadcast")])
        ),
        1.0
    );
    assert!(
        value(
            "hybrid_cluster_send_duration_seconds_count",
            &a_labels(&[("kind", "unicast")])
        ) >= 4.0
    );

    drop((alice, bob));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Spans as they were opened: their name and their fields, as text.
#[derive(Clone, Default)]
struct Spans(Arc<parking_lot::Mutex<Vec<OpenedSpan>>>);

/// A span's name and its fields as text.
type OpenedSpan = (String, HashMap<String, String>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

/// The process's one span collector (a thread-local subscriber would miss spans opened on the
/// runtime's other threads, and tracing caches per call site whether anyone listens).
fn spans() -> &'static Spans {
    static SPANS: OnceLock<Spans> = OnceLock::new();
    SPANS.get_or_init(|| {
        let spans = Spans::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
            .unwrap();
        spans
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_id_follows_a_message_from_node_a_to_node_b() {
    let spans = spans();
    let backends = Backends::embedded();
    let (a, _) = node(&backends, "trace-a").await;
    let (b, b_port) = node(&backends, "trace-b").await;
    within(
        "a sees b",
        a.discovery().view().wait_until(|n| n.len() == 2),
    )
    .await;
    let (mut bob, bob_id) = client(b_port).await;

    let message_id = a
        .handle()
        .send(&bob_id.parse::<ConnectionId>().unwrap(), r#""traced""#)
        .await
        .unwrap();
    assert_eq!(next_json(&mut bob).await["data"], "traced");

    let spans = spans.0.lock().clone();
    let with = |name: &str, node: &str| {
        spans
            .iter()
            .find(|(span, fields)| {
                span == name
                    && fields.get("node").map(String::as_str) == Some(node)
                    && fields.get("message_id").map(String::as_str) == Some(&message_id.to_string())
            })
            .map(|(_, fields)| fields.clone())
            .unwrap_or_else(|| panic!("no {name} span on {node} among {spans:?}"))
    };
    let sent = with("hybrid_cluster.send", "trace-a");
    let delivered = with("hybrid_cluster.deliver", "trace-b");
    let trace_id = &sent["trace_id"];
    assert_eq!(trace_id.len(), 32, "{sent:?}");
    assert_eq!(
        &delivered["trace_id"], trace_id,
        "send {sent:?}, deliver {delivered:?}"
    );

    drop(bob);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_every_node_in_a_real_browser() {
    let backends = Backends::embedded();
    let mut nodes = Vec::new();
    for name in ["page-1", "page-2", "page-3"] {
        nodes.push(node(&backends, name).await);
    }
    let (first, port) = &nodes[0];
    within(
        "three nodes",
        first.discovery().view().wait_until(|n| n.len() == 3),
    )
    .await;
    let (_client, _) = client(*port).await;

    let url = format!("http://127.0.0.1:{port}/cluster");
    // The budget lets the page's script fetch and render before the DOM is dumped.
    let dom = within(
        "chromium renders the page",
        browser::dump_dom(&url, Duration::from_millis(5000)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for name in ["page-1", "page-2", "page-3"] {
        assert!(
            dom.contains(&format!("<tr data-node=\"{name}\">")),
            "no row for {name} in\n{dom}"
        );
    }
    assert!(
        dom.contains("3 nodes, 1 / 30000 connections")
            || dom.contains("3 nodes, 0 / 30000 connections"),
        "{dom}"
    );
    assert!(dom.contains("status active"), "{dom}");

    for (cluster, _) in nodes {
        cluster.shutdown().await.unwrap();
    }
}
