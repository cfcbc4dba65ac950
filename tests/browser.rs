//! Browser clients in a real headless Chromium (`CHROMIUM`, or `chromium` on the path, which
//! `./scripts/test.sh` installs): pages served from an origin of their own use the node
//! server's `/cluster/client.js`, or a plain `WebSocket`, against nodes started in this
//! process on the real Redis and RabbitMQ (`REDIS_URL`, `AMQP_URL`, loopback defaults), and
//! against node programs for the SIGTERM test (`cargo build --example node` first, as for the
//! load and fault tests: a stale build serves a stale `client.js`).
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
use hybrid_cluster::server::{self, ServerAuth, ServerConfig};
use hybrid_cluster::{Backends, Cluster, ClusterConfig, ClusterPrefix, ConnectionId, NodeId};
use hybrid_cluster_test_support::browser::{Browser, Page};
use hybrid_cluster_test_support::client::Client;
use hybrid_cluster_test_support::node::{NodeCluster, http_get};
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
        self.start_with(name, configure, ServerAuth::default())
            .await
    }

    /// [`start`](TestCluster::start), its server's clients identified as `auth` says.
    async fn start_with(
        &self,
        name: &str,
        configure: impl FnOnce(&mut ClusterConfig),
        auth: ServerAuth,
    ) -> Node {
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
        let app = server::router_with(cluster.clone(), ServerConfig::default(), auth);
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

/// A page that connects with `client.js` (imported from the node on `module_port`) to `url`, with
/// `options` (JavaScript object fields, added to short delays), and reports each welcome,
/// message, reconnection and close, then `ready` once `connect` resolved (the client is then
/// `window.client`) or `failed`.
fn client_page(module_port: u16, url: &str, options: &str) -> String {
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
        port = module_port,
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
/// nodes', so what it takes from them must allow other origins. (`/client.js` is served too,
/// for pages that test the client without a node.)
async fn serve_page(html: String) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let module = ([("content-type", "text/javascript")], server::CLIENT_JS);
    let app = axum::Router::new()
        .route("/", get(move || std::future::ready(Html(html))))
        .route("/client.js", get(move || std::future::ready(module)));
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
    assert!(body.contains("export async function connect(url, options = {})"));
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

    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "")).await;
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

/// With sessions, a page whose node is drained resumes its session on the other node through
/// `client.js`: the messages sent to its first connection id before, during and after the
/// move arrive once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_with_a_session_resumes_it_through_client_js_after_a_drain() {
    let tc = TestCluster::new("session");
    let sessions = |config: &mut ClusterConfig| config.sessions = Some(Default::default());
    let a = tc.start("a", sessions).await;
    let b = tc.start("b", sessions).await;
    tc.wait_for(&[&a, &b]).await;

    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "")).await;
    let first = tab.until("welcome", 1).await;
    let (drained, other) = if first["node_id"] == a.id() {
        (a, b)
    } else {
        (b, a)
    };
    let token = first["session"]
        .as_str()
        .expect("a session token")
        .to_owned();
    let old: ConnectionId = first["connection_id"].as_str().unwrap().parse().unwrap();
    let send = |n: u64| {
        let (handle, old) = (other.cluster.handle(), old.clone());
        async move {
            handle
                .send(&old, json!({ "n": n }).to_string())
                .await
                .unwrap()
        }
    };
    for n in 0..3 {
        send(n).await;
    }
    assert_eq!(tab.until("message", 3).await, json!({"n": 2}));

    drained.shutdown().await;
    for n in 3..6 {
        send(n).await;
    }
    let second = tab.until("welcome", 2).await;
    assert_eq!(
        second["session"],
        token.as_str(),
        "the same session: {second}"
    );
    for n in 6..9 {
        send(n).await;
    }
    for n in 0..9 {
        assert_eq!(tab.until("message", n + 1).await, json!({ "n": n }));
    }
    other.shutdown().await;
}

/// The same with node programs (`examples/node.rs`, built by `cargo build --example node`),
/// drained as an orchestrator does it: SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_node_program_gets_sigterm_reconnects_and_keeps_receiving() {
    let mut cluster = NodeCluster::new("browser-sigterm");
    let options = cluster.options();
    cluster.start("sigterm-1", &options).await;
    cluster.start("sigterm-2", &options).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let (port, url) = (cluster.nodes[0].port, cluster.nodes[0].ws_url());

    let mut tab = Tab::open(client_page(port, &url, "")).await;
    let first = tab.until("welcome", 1).await;
    let drained = cluster
        .nodes
        .iter()
        .position(|node| first["node_id"] == node.id.as_str())
        .unwrap_or_else(|| panic!("welcomed by no node of the cluster: {first}"));
    let other = 1 - drained;
    cluster.nodes[drained].signal("TERM").unwrap();
    let exited = cluster.nodes[drained].wait_exit(WAIT).await;
    assert!(
        exited.is_some_and(|status| status.success()),
        "{exited:?}\n{}",
        cluster.logs(20)
    );

    let reconnecting = tab.until("reconnecting", 1).await;
    assert_eq!(reconnecting["reason"], "drain", "{reconnecting}");
    let second = tab.until("welcome", 2).await;
    assert_eq!(
        second["node_id"],
        cluster.nodes[other].id.as_str(),
        "{second}"
    );
    let mut sender = Client::connect(&cluster.nodes[other].ws_url())
        .await
        .unwrap();
    let to = second["connection_id"].as_str().unwrap();
    sender
        .send(&json!({"op": "send", "to": to, "data": {"after": "sigterm"}}))
        .await
        .unwrap();
    assert_eq!(tab.until("message", 1).await, json!({"after": "sigterm"}));
    sender.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_using_client_js_against_a_full_node_is_welcomed_by_another() {
    let tc = TestCluster::new("full");
    let a = tc.start("a", |config| config.max_connections = 1).await;
    let b = tc.start("b", |_| {}).await;
    tc.wait_for(&[&a, &b]).await;
    let holder = hold_a_place(&a).await;

    // Sent on by `/cluster/placement`, before it connects.
    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "")).await;
    let welcome = tab.until("welcome", 1).await;
    assert_eq!(welcome["node_id"], b.id(), "{welcome}");
    // Without asking first: sent on by the full node's in-band redirect.
    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "placement: false")).await;
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
    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "")).await;
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
        let mut tab = Tab::open(client_page(a.port, &a.ws_url(), options)).await;
        let next = tab.until("reconnecting", 1).await;
        assert_eq!(next["reason"], "unavailable", "{options}: {next}");
        let delay = next["delayMs"].as_u64().unwrap();
        assert!((5000..6000).contains(&delay), "{options}: {next}");
    }
    let mut tab = Tab::open(client_page(a.port, &a.ws_url(), "maxAttempts: 1")).await;
    let failed = tab.until("failed", 1).await;
    assert_eq!(failed["code"], "gave_up", "{failed}");
    assert_eq!(tab.until("close", 1).await["code"], "gave_up");

    drop(holders);
    a.shutdown().await;
    b.shutdown().await;
}

/// The client's decisions, driven in the page through a fake `WebSocket` and a fake `fetch`
/// (no node): what it connects to after each kind of close, how requests settle, when it
/// waits and why.
const SCRIPTED: &str = r#"<script type="module">
import { ClusterClient } from "/client.js";
// Browsers before 2023 have no `URL.canParse`: the client must not need it.
delete URL.canParse;
const sockets = [];
const socketWaiters = [];
class FakeSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    sockets.push(this);
    for (const wake of socketWaiters.splice(0)) wake();
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code, reason) { this.end(code ?? 1005, reason ?? ""); }
  open() { this.readyState = 1; }
  frame(value) { this.onmessage({ data: JSON.stringify(value) }); }
  end(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose({ code, reason }));
  }
}
function socket(nth) {
  return new Promise((resolve) => {
    const check = () => sockets.length >= nth ? resolve(sockets[nth - 1]) : socketWaiters.push(check);
    check();
  });
}
const placements = [];
const fetched = [];
async function fakeFetch(url) {
  fetched.push(url);
  const [status, body] = placements.shift() ?? [404, null];
  return { status, ok: status === 200, json: async () => body ?? JSON.parse("<html>") };
}
try {
  const waits = [];
  const client = new ClusterClient("ws://home.test/ws?token=t", {
    WebSocket: FakeSocket, fetch: fakeFetch, minDelayMs: 1, maxDelayMs: 4, drainDelayMs: 1,
    retryJitterMs: 1, maxRedirects: 2,
    on: { reconnecting: (next) => waits.push(next.reason) },
  });
  const seen = {};
  // No placement to ask (404): the given URL.
  let s = await socket(1);
  seen.first = s.url;
  // The redirect frame, then a close whose reason was cut short.
  s.open(); s.frame({ type: "redirect", url: "ws://b.test/ws?token=t", reason: "full" }); s.end(4000, '{"type":"redirect"}');
  s = await socket(2);
  seen.byFrame = s.url;
  // Only the close's reason.
  s.open(); s.end(4000, JSON.stringify({ type: "redirect", url: "ws://c.test/ws?token=t" }));
  s = await socket(3);
  seen.byReason = s.url;
  // A third hop in a row is one too many: a failed attempt, back to the start.
  s.open(); s.end(4000, JSON.stringify({ type: "redirect", url: "ws://d.test/ws" }));
  s = await socket(4);
  seen.afterHopLimit = s.url;
  s.open(); s.frame({ type: "welcome", connection_id: "h:1:1", node_id: "h" });
  await client.ready;
  seen.welcome = client.welcome.node_id;
  const pending = client.send("x:1:1", { a: 1 }).catch((error) => error.code);
  const acked = client.broadcast(2).then(() => "ack");
  const refused = client.join("g").catch((error) => [error.code, error.message]);
  seen.sent = s.sent;
  s.frame({ type: "ack", id: 2 });
  s.frame({ type: "error", id: 3, code: "bad_request", message: "no" });
  seen.acked = await acked;
  seen.refused = await refused;
  // Lost: the pending send rejects; placement is asked again, says wait, then names a node.
  placements.push([503, { type: "unavailable", retry_after_ms: 5 }]);
  placements.push([200, { url: "ws://p.test/ws", node_id: "p" }]);
  s.end(1006, "");
  seen.pending = await pending;
  s = await socket(5);
  seen.placed = s.url;
  s.open(); s.frame({ type: "welcome", connection_id: "p:1:1", node_id: "p" });
  // Drained: straight to the node the reason names, the query string kept.
  s.end(1012, JSON.stringify({ reconnect: "ws://e.test/ws", node: "e" }));
  s = await socket(6);
  seen.drainedTo = s.url;
  seen.fetched = [...fetched];
  seen.waits = waits;
  client.close();
  seen.afterClose = await client.send("x:1:1", 1).catch((error) => error.code);
  // Another client: a request with no answer in time, then the nodes it learned of taking
  // turns with its own URL once that fails too.
  const before = sockets.length;
  const other = new ClusterClient("ws://home2.test/ws", {
    WebSocket: FakeSocket, fetch: fakeFetch, minDelayMs: 1, maxDelayMs: 4, drainDelayMs: 1,
    requestTimeoutMs: 100,
  });
  s = await socket(before + 1);
  s.open(); s.frame({ type: "welcome", connection_id: "k:1:1", node_id: "k" });
  await other.ready;
  seen.unanswered = await other.broadcast(1).catch((error) => error.code);
  // Presumed dead, the connection is closed and made again.
  s = await socket(before + 2);
  seen.afterTimeout = s.url;
  s.open(); s.frame({ type: "welcome", connection_id: "k:1:2", node_id: "k" });
  s.end(1012, JSON.stringify({ reconnect: "ws://f.test/ws", node: "f" }));
  const tried = [];
  for (let n = 3; n <= 5; n++) {
    s = await socket(before + n);
    tried.push(s.url);
    s.end(1006, "");
  }
  seen.turns = tried;
  other.close();
  report("done", seen);
} catch (error) {
  report("failed", String(error.stack));
}
</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_follows_redirects_placement_and_drains_and_settles_requests() {
    let mut tab = Tab::open(page(SCRIPTED)).await;
    let seen = tab.until("done", 1).await;
    let placement = "http://home.test/cluster/placement";
    assert_eq!(
        seen,
        json!({
            "first": "ws://home.test/ws?token=t",
            "byFrame": "ws://b.test/ws?token=t",
            "byReason": "ws://c.test/ws?token=t",
            "afterHopLimit": "ws://home.test/ws?token=t",
            "welcome": "h",
            "sent": [
                {"op": "send", "to": "x:1:1", "data": {"a": 1}, "id": 1},
                {"op": "broadcast", "data": 2, "id": 2},
                {"op": "join", "group": "g", "id": 3},
            ],
            "acked": "ack",
            "refused": ["bad_request", "no"],
            "pending": "disconnected",
            "placed": "ws://p.test/ws?token=t",
            "drainedTo": "ws://e.test/ws?token=t",
            "fetched": [placement, placement, placement, placement],
            "waits": ["failed", "lost", "unavailable", "drain"],
            "afterClose": "closed",
            "unanswered": "timeout",
            "afterTimeout": "ws://home2.test/ws",
            // Drained to f; f fails, then its own URL, then the node it learned of again.
            "turns": ["ws://f.test/ws", "ws://home2.test/ws", "ws://f.test/ws"],
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_speaks_to_users_and_stays_closed_once_its_user_is_disconnected() {
    use hybrid_cluster::{Identify, IdentityLayer, Jwt, UserId};
    let tc = TestCluster::new("users");
    let secret = b"browser-users-secret";
    let identify: std::sync::Arc<dyn Identify> = std::sync::Arc::new(Jwt::hs256(secret).unwrap());
    let auth = ServerAuth {
        identity: Some(IdentityLayer::new(identify).required()),
        admin_token: None,
    };
    let a = tc.start_with("a", |_| {}, auth).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap();
    let url = format!("{}?token={token}", a.ws_url());
    let mut tab = Tab::open(client_page(a.port, &url, "")).await;
    let welcome = tab.until("ready", 1).await;
    assert_eq!(welcome["user"], "alice", "{welcome}");

    let script = r#"(async () => {
  const settled = (promise) => promise.then(() => "ack", (error) => error.code);
  const joined = await settled(client.join("room"));
  const presence = await client.presence("room");
  return {
    joined,
    members: presence.members,
    sent: await settled(client.sendUser("alice", { to: "alice" })),
    nobody: await settled(client.sendUser("nobody", 1)),
  };
})()"#;
    let outcomes = within("the requests settle", tab.browser.eval(&tab.page, script))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        json!({"joined": "ack", "members": [{"user": "alice", "connections": 1}],
               "sent": "ack", "nobody": "not_found"})
    );
    assert_eq!(tab.until("message", 1).await, json!({"to": "alice"}));

    // An operator disconnects alice: the client closes for good, with the reason.
    let alice = UserId::new("alice").unwrap();
    within(
        "the user is disconnected",
        a.cluster
            .handle()
            .disconnect_user(&alice, "banned for spam"),
    )
    .await
    .unwrap();
    let close = tab.until("close", 1).await;
    assert_eq!(close["code"], "user_disconnected", "{close}");
    assert_eq!(close["message"], "banned for spam", "{close}");
    let reconnecting = within(
        "the page answers",
        tab.browser.eval(
            &tab.page,
            "document.querySelectorAll('[data-kind=\"reconnecting\"]').length",
        ),
    )
    .await
    .unwrap();
    assert_eq!(reconnecting, 0, "no reconnection after 4003");
    a.shutdown().await;
}
