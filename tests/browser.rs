//! Browser clients in a real headless Chromium (`CHROMIUM`, or `chromium` on the path, which
//! `./scripts/test.sh` installs): pages served from an origin of their own use the node
//! server's `/cluster/client.js`, or a plain `WebSocket`, against nodes started in this
//! process on the real Redis and RabbitMQ (`REDIS_URL`, `AMQP_URL`, loopback defaults).
//!
//! A page reports what happens as list items of its DOM (`<li data-kind=… data-value=…>`,
//! the latest kind also as its title); the test awaits, through the DevTools protocol, the
//! promise `until(kind, nth)`, which resolves once the page has reported it. Every wait is
//! bounded, none is a sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use axum::response::Html;
use axum::routing::get;
use futures_util::StreamExt;
use hybrid_cluster::discovery::DiscoveryConfig;
use hybrid_cluster::server::{self, ServerConfig};
use hybrid_cluster::{Backends, Cluster, ClusterConfig, ClusterPrefix, ConnectionId, NodeId};
use hybrid_cluster_test_support::browser::{Browser, Page};
use hybrid_cluster_test_support::node::http_get;
use hybrid_cluster_test_support::servers;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// The bound of every wait (a browser starting on a loaded machine is slow).
const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One test's cluster on the real servers, under a prefix of its own, removed when dropped.
struct TestCluster {
    test: String,
    prefix: ClusterPrefix,
    nodes: Mutex<Vec<NodeId>>,
}

/// A node started by a test, serving the node server on a loopback port.
struct Node {
    cluster: Cluster,
    port: u16,
    server: JoinHandle<()>,
}

impl Node {
    fn id(&self) -> &str {
        self.cluster.node_id().as_str()
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Drains the node and stops it: its clients are closed with 1012 and a reason naming
    /// another node.
    async fn shutdown(self) {
        within("a node shuts down", self.cluster.shutdown())
            .await
            .unwrap();
        self.server.abort();
    }
}

impl TestCluster {
    fn new(test: &str) -> Self {
        let prefix = ClusterPrefix::new(format!("browser-{test}-{:08x}", rand::random::<u32>()))
            .expect("a valid prefix");
        Self {
            test: test.to_owned(),
            prefix,
            nodes: Mutex::new(Vec::new()),
        }
    }

    /// Starts node `{test}-{name}`, after `configure` adjusted its configuration.
    async fn start(&self, name: &str, configure: impl FnOnce(&mut ClusterConfig)) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let id = NodeId::new(format!("{}-{name}", self.test)).unwrap();
        self.nodes.lock().push(id.clone());
        let mut config = ClusterConfig::new(id, "127.0.0.1", port);
        config.prefix = self.prefix.clone();
        config.discovery = DiscoveryConfig::default().with_heartbeat(Duration::from_millis(200));
        configure(&mut config);
        let backends = Backends::servers(
            servers::redis_url().parse().expect("REDIS_URL"),
            servers::amqp_url().parse().expect("AMQP_URL"),
        );
        let cluster = Cluster::start(config, backends)
            .await
            .expect("Redis and RabbitMQ are running (./scripts/test.sh starts them)");
        let app = server::router(cluster.clone(), ServerConfig::default());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Node {
            cluster,
            port,
            server,
        }
    }

    /// Waits until every one of `nodes` sees them all.
    async fn wait_for(&self, nodes: &[&Node]) {
        for node in nodes {
            within(
                "the nodes see each other",
                node.cluster
                    .discovery()
                    .view()
                    .wait_until(|members| members.len() == nodes.len()),
            )
            .await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let prefix = self.prefix.to_string();
        let nodes: Vec<String> = self.nodes.lock().iter().map(ToString::to_string).collect();
        let cleaning = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(servers::remove_cluster(&prefix, &nodes));
        });
        let _ = cleaning.join();
    }
}

/// A native client of `node`, welcomed: it holds one of the node's places.
async fn hold_a_place(node: &Node) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let (mut socket, _) = within("a native client connects", connect_async(node.ws_url()))
        .await
        .unwrap();
    match within("its welcome", socket.next()).await {
        Some(Ok(Message::Text(text))) => {
            let welcome: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(welcome["node_id"], node.id(), "{welcome}");
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    socket
}

// ---------------------------------------------------------------------------------------------
// Pages

/// The page's half of the reporting: `report(kind, value)` adds a list item (and sets the
/// title); `until(kind, nth)` resolves with the value of the `nth` item of `kind`, read from
/// the DOM, once there is one.
const REPORTING: &str = r#"<script>
const waiters = [];
function report(kind, value) {
  const item = document.createElement("li");
  item.dataset.kind = kind;
  item.dataset.value = JSON.stringify(value ?? null);
  item.textContent = kind + " " + item.dataset.value;
  document.getElementById("reports").append(item);
  document.title = kind;
  for (const waiter of waiters.splice(0)) waiter();
}
function until(kind, nth = 1) {
  return new Promise((resolve) => {
    const check = () => {
      const items = document.querySelectorAll(`li[data-kind="${kind}"]`);
      if (items.length >= nth) resolve(JSON.parse(items[nth - 1].dataset.value));
      else waiters.push(check);
    };
    check();
  });
}
</script>"#;

fn page(body_script: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>loading</title>{REPORTING}</head>\
         <body><ol id=\"reports\"></ol>{body_script}</body></html>"
    )
}

/// A page that connects with `client.js` (imported from `module_from`'s node) to `url`, with
/// `options` (JavaScript object fields, added to short delays), and reports each welcome,
/// message, reconnection and close, then `ready` once `connect` resolved (the client is then
/// `window.client`) or `failed`.
fn client_page(module_from: &Node, url: &str, options: &str) -> String {
    page(&format!(
        r#"<script type="module">
import {{ connect }} from "http://127.0.0.1:{port}/cluster/client.js";
try {{
  const on = {{
    welcome: (welcome) => report("welcome", welcome),
    reconnecting: (next) => report("reconnecting", next),
    frame: (frame) => {{ if (frame.type === "message") report("message", frame.data); }},
    close: (close) => report("close", close),
  }};
  // Short delays: the test waits for what they delay.
  const client = await connect({url:?}, {{ minDelayMs: 50, maxDelayMs: 1000, drainDelayMs: 200, on, {options} }});
  window.client = client;
  report("ready", client.welcome);
}} catch (error) {{
  report("failed", {{ code: error.code, message: String(error.message) }});
}}
</script>"#,
        port = module_from.port,
    ))
}

/// A page that opens a plain `WebSocket` to `url` and reports the frames it got and the close.
fn socket_page(url: &str) -> String {
    page(&format!(
        r#"<script>
const frames = [];
const socket = new WebSocket({url:?});
socket.onmessage = (event) => frames.push(JSON.parse(event.data));
socket.onclose = (event) => report("close", {{ code: event.code, reason: event.reason, frames }});
</script>"#
    ))
}

/// Serves `html` at `/` on a loopback port of its own: the page's origin is none of the
/// nodes', so what it takes from them must allow other origins.
async fn serve_page(html: String) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/", get(move || std::future::ready(Html(html))));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://127.0.0.1:{port}/"), server)
}

/// A page open in its own headless Chromium.
struct Tab {
    browser: Browser,
    page: Page,
    _server: JoinHandle<()>,
}

impl Tab {
    async fn open(html: String) -> Self {
        let (url, server) = serve_page(html).await;
        let mut browser = within("chromium starts", Browser::launch())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let page = within("the page loads", browser.open(&url))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            browser,
            page,
            _server: server,
        }
    }

    /// The value of the page's `nth` report of `kind`, once it made it.
    async fn until(&mut self, kind: &str, nth: usize) -> Value {
        let expression = format!("until({kind:?}, {nth})");
        match timeout(WAIT, self.browser.eval(&self.page, &expression)).await {
            Ok(Ok(value)) => value,
            Ok(Err(error)) => panic!("{error}"),
            Err(_) => {
                let reports = self
                    .browser
                    .eval(&self.page, "document.getElementById('reports').innerText")
                    .await;
                panic!(
                    "timed out waiting for report {nth} of {kind}; the page reported {reports:?}\n{}",
                    self.browser.diagnostics()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A plain GET's head and body.
async fn get_with_head(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("the response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_client_as_a_module_to_any_origin() {
    let tc = TestCluster::new("module");
    let node = tc.start("a", |_| {}).await;
    let (head, body) = get_with_head(node.port, "/cluster/client.js").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/javascript; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(body.contains("export function connect(url, options = {})"));
    assert_eq!(body, server::CLIENT_JS);
    assert_eq!(http_get(node.port, "/healthz").await.unwrap().0, 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_node_is_drained_reconnects_through_client_js_and_keeps_receiving() {
    let tc = TestCluster::new("drain");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    tc.wait_for(&[&a, &b]).await;

    let mut tab = Tab::open(client_page(&a, &a.ws_url(), "")).await;
    let first = tab.until("welcome", 1).await;
    // Placement may put the page on either node: the one it is on is drained.
    let (drained, other) = if first["node_id"] == a.id() {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(first["node_id"], drained.id(), "{first}");

    drained.shutdown().await;
    let reconnecting = tab.until("reconnecting", 1).await;
    assert_eq!(reconnecting["reason"], "drain", "{reconnecting}");
    let second = tab.until("welcome", 2).await;
    assert_eq!(second["node_id"], other.id(), "{second}");
    assert_ne!(second["connection_id"], first["connection_id"]);

    // A message sent to its new connection arrives.
    let connection: ConnectionId = second["connection_id"].as_str().unwrap().parse().unwrap();
    other
        .cluster
        .handle()
        .send(&connection, r#"{"after":"drain"}"#)
        .await
        .unwrap();
    assert_eq!(tab.until("message", 1).await, json!({"after": "drain"}));
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_using_client_js_against_a_full_node_is_welcomed_by_another() {
    let tc = TestCluster::new("full");
    let a = tc.start("a", |config| config.max_connections = 1).await;
    let b = tc.start("b", |_| {}).await;
    tc.wait_for(&[&a, &b]).await;
    let holder = hold_a_place(&a).await;

    // Sent on by `/cluster/placement`, before it connects.
    let mut tab = Tab::open(client_page(&a, &a.ws_url(), "")).await;
    let welcome = tab.until("welcome", 1).await;
    assert_eq!(welcome["node_id"], b.id(), "{welcome}");
    // Without asking first: sent on by the full node's in-band redirect.
    let mut tab = Tab::open(client_page(&a, &a.ws_url(), "placement: false")).await;
    let welcome = tab.until("welcome", 1).await;
    assert_eq!(welcome["node_id"], b.id(), "{welcome}");

    drop(holder);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_websocket_to_a_full_node_gets_an_in_band_redirect_not_a_bare_1006() {
    let tc = TestCluster::new("inband");
    let a = tc.start("a", |config| config.max_connections = 1).await;
    let b = tc.start("b", |_| {}).await;
    tc.wait_for(&[&a, &b]).await;
    let holder = hold_a_place(&a).await;

    let mut tab = Tab::open(socket_page(&a.ws_url())).await;
    let close = tab.until("close", 1).await;
    assert_eq!(close["code"], 4000, "{close}");
    assert_eq!(
        close["frames"],
        json!([{"type": "redirect", "url": b.ws_url(), "reason": "full"}]),
        "{close}"
    );
    let reason: Value = serde_json::from_str(close["reason"].as_str().unwrap()).unwrap();
    assert_eq!(reason["url"], b.ws_url(), "{close}");

    drop(holder);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_requests_settle_on_the_ack_or_the_error_and_close_stops_it() {
    let tc = TestCluster::new("requests");
    let a = tc.start("a", |_| {}).await;
    let mut tab = Tab::open(client_page(&a, &a.ws_url(), "")).await;
    // `connect` resolved with the client it welcomed.
    let welcome = tab.until("ready", 1).await;
    assert_eq!(welcome["node_id"], a.id(), "{welcome}");
    assert_eq!(tab.until("welcome", 1).await, welcome);

    let missing = format!("{}:00000000000000aa:9", a.id());
    let script = format!(
        r#"(async () => {{
  const settled = (promise) => promise.then(() => "ack", (error) => error.code);
  const me = client.welcome.connection_id;
  return {{
    join: await settled(client.join("room")),
    group: await settled(client.group("room", {{ to: "room" }})),
    send: await settled(client.send(me, {{ to: "me" }})),
    broadcast: await settled(client.broadcast("all")),
    leave: await settled(client.leave("room")),
    missing: await settled(client.send({missing:?}, 1)),
    bad: await settled(client.send(me)),
  }};
}})()"#
    );
    let outcomes = within("the requests settle", tab.browser.eval(&tab.page, &script))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        json!({"join": "ack", "group": "ack", "send": "ack", "broadcast": "ack", "leave": "ack",
               "missing": "not_found", "bad": "bad_request"})
    );
    assert_eq!(tab.until("message", 1).await, json!({"to": "me"}));

    let after_close =
        "client.close(); client.broadcast(1).then(() => 'sent', (error) => error.code)";
    let refused = within(
        "the request is refused",
        tab.browser.eval(&tab.page, after_close),
    )
    .await
    .unwrap();
    assert_eq!(refused, "closed");
    assert_eq!(tab.until("close", 1).await["code"], "closed");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_told_no_node_has_room_gives_up_after_max_attempts() {
    let tc = TestCluster::new("nospace");
    let a = tc.start("a", |config| config.max_connections = 1).await;
    let b = tc.start("b", |config| config.max_connections = 1).await;
    tc.wait_for(&[&a, &b]).await;
    let holders = (hold_a_place(&a).await, hold_a_place(&b).await);
    // Each node learns that the other is full from its heartbeat.
    for (node, other) in [(&a, &b), (&b, &a)] {
        within(
            "the other node's count is published",
            node.cluster.discovery().view().wait_until(|nodes| {
                nodes
                    .iter()
                    .any(|n| n.node_id.as_str() == other.id() && n.connection_count == 1)
            }),
        )
        .await;
    }

    // Told by `/cluster/placement` (503), then by the node itself (close 4001): it waits the
    // 5 s it was told, plus jitter.
    for options in ["maxAttempts: 2", "maxAttempts: 2, placement: false"] {
        let mut tab = Tab::open(client_page(&a, &a.ws_url(), options)).await;
        let next = tab.until("reconnecting", 1).await;
        assert_eq!(next["reason"], "unavailable", "{options}: {next}");
        let delay = next["delayMs"].as_u64().unwrap();
        assert!((5000..6000).contains(&delay), "{options}: {next}");
    }
    let mut tab = Tab::open(client_page(&a, &a.ws_url(), "maxAttempts: 1")).await;
    let failed = tab.until("failed", 1).await;
    assert_eq!(failed["code"], "gave_up", "{failed}");
    assert_eq!(tab.until("close", 1).await["code"], "gave_up");

    drop(holders);
    a.shutdown().await;
    b.shutdown().await;
}
