//! The cluster layer stacked by hand, as a user would: under tower's timeout on an axum
//! router, and on a plain hyper server with tokio-tungstenite, without axum. The backends are
//! embedded, so no server is needed; the sockets are real (loopback).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{Method, Request};
use http_body_util::Full;
use hybrid_cluster::server::{self, ServerConfig};
use hybrid_cluster::{
    Backends, Cluster, ClusterConfig, ClusterConnection, ConnectionId, ConnectionSlot, GroupName,
    InboxItem, NodeId, PlacementMode, PlacementPolicy, SendError, Target,
};
use hybrid_cluster_test_support::placement::refused_in_band;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tower::timeout::TimeoutLayer;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

/// A node on `backends`, and the listener its server is to use.
async fn start(backends: &Backends, name: &str) -> (Cluster, TcpListener) {
    start_with(backends, name, |_| {}).await
}

/// A node on `backends` configured by `configure`, and the listener its server is to use.
async fn start_with(
    backends: &Backends,
    name: &str,
    configure: impl FnOnce(&mut ClusterConfig),
) -> (Cluster, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = ClusterConfig::new(NodeId::new(name).unwrap(), "127.0.0.1", port);
    configure(&mut config);
    let cluster = Cluster::start(config, backends.clone()).await.unwrap();
    (cluster, listener)
}

fn ws_url(listener: &TcpListener) -> String {
    format!("ws://{}/ws", listener.local_addr().unwrap())
}

type ClientSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn next_text(socket: &mut ClientSocket) -> String {
    loop {
        match within("a frame arrives", socket.next()).await {
            Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A plain HTTP/1.1 GET: the status and the body.
async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("the HTTP response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// axum, with tower's timeout

async fn ws_handler(upgrade: WebSocketUpgrade, connection: ClusterConnection) -> Response {
    upgrade.on_upgrade(move |socket| {
        server::serve_connection(socket, connection, ServerConfig::default())
    })
}

async fn timed_out(error: BoxError) -> StatusCode {
    if error.is::<Elapsed>() {
        StatusCode::REQUEST_TIMEOUT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

#[tokio::test]
async fn the_layer_stacks_with_tower_timeout_on_an_axum_router() {
    let (cluster, listener) = start(&Backends::embedded(), "axum-node").await;
    let port = listener.local_addr().unwrap().port();
    let url = ws_url(&listener);
    let app = Router::new()
        .route("/ws", get(ws_handler))
        .route("/never", get(std::future::pending::<&'static str>))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(timed_out))
                .layer(TimeoutLayer::new(Duration::from_millis(200)))
                .layer(cluster.layer()),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // One WebSocket round trip through the whole stack.
    let (mut socket, _) = within("the upgrade", connect_async(&url)).await.unwrap();
    let welcome: Value = serde_json::from_str(&next_text(&mut socket).await).unwrap();
    assert_eq!(welcome["node_id"], "axum-node");
    let id = welcome["connection_id"].as_str().unwrap().to_owned();
    assert_eq!(cluster.local_connections(), 1);
    let op = json!({"op": "send", "to": id, "data": "round trip", "id": 1});
    socket.send(Message::text(op.to_string())).await.unwrap();
    let mut frames: Vec<Value> = Vec::new();
    for _ in 0..2 {
        frames.push(serde_json::from_str(&next_text(&mut socket).await).unwrap());
    }
    frames.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    assert_eq!(
        frames,
        vec![
            json!({"type": "ack", "id": 1}),
            json!({"type": "message", "from": id, "data": "round trip"}),
        ]
    );

    // The timeout still applies to ordinary requests, which the cluster layer passes on.
    assert_eq!(http_get(port, "/never").await.0, 408);

    // Shutting down closes the socket with 1012; with no other node, the reason is `{}`.
    let (shutdown, close) = tokio::join!(cluster.shutdown(), async {
        loop {
            match within("the close frame", socket.next()).await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    });
    shutdown.unwrap();
    let close = close.unwrap();
    assert_eq!(u16::from(close.code), 1012);
    assert_eq!(close.reason.as_str(), "{}");
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// hyper and tokio-tungstenite, no axum

fn response(status: u16) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .body(Full::default())
        .unwrap()
}

/// Answers a WebSocket upgrade the cluster layer admitted: the 101 here, then the socket in a
/// task of its own.
async fn upgrade(
    mut request: Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let Some(connection) = ClusterConnection::take(request.extensions_mut()) else {
        return Ok(response(500));
    };
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
        return Ok(response(400));
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(&mut request).await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        pump(socket, connection).await;
    });
    Ok(http::Response::builder()
        .status(101)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(Full::default())
        .unwrap())
}

/// Says the connection's id, then writes its inbox to the socket until either side closes.
async fn pump<S>(mut socket: WebSocketStream<S>, connection: ClusterConnection)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (_handle, mut inbox) = connection.into_parts();
    let id = inbox.connection_id().to_string();
    if socket.send(Message::text(id)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            item = inbox.next() => match item {
                Some(InboxItem::Message(envelope)) => {
                    let text = envelope.payload_text().unwrap_or_default().to_owned();
                    if socket.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                Some(InboxItem::Close(frame)) => {
                    let frame = CloseFrame {
                        code: frame.code.into(),
                        reason: frame.reason.into(),
                    };
                    let _ = socket.close(Some(frame)).await;
                    return;
                }
                // Notices of undelivered sends: this test server sends nothing itself.
                Some(_) => {}
                None => return,
            },
            frame = socket.next() => match frame {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Serves `service` with hyper on `listener`, upgrades allowed.
async fn serve_hyper<S>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = http::Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

#[tokio::test]
async fn a_plain_hyper_server_takes_the_connection_and_a_message_crosses_nodes() {
    let backends = Backends::embedded();
    let (a, a_listener) = start(&backends, "hyper-a").await;
    let (b, b_listener) = start(&backends, "hyper-b").await;
    for node in [&a, &b] {
        within(
            "both nodes see each other",
            node.discovery().view().wait_until(|nodes| nodes.len() == 2),
        )
        .await;
    }
    let b_url = ws_url(&b_listener);
    let a_url = ws_url(&a_listener);
    let mut servers = Vec::new();
    for (node, listener) in [(&a, a_listener), (&b, b_listener)] {
        let service = ServiceBuilder::new()
            .layer(node.layer())
            .service(service_fn(upgrade));
        servers.push(tokio::spawn(serve_hyper(listener, service)));
    }

    let (mut socket, response) = within("the upgrade", connect_async(&b_url)).await.unwrap();
    assert_eq!(response.status(), 101);
    let id: ConnectionId = next_text(&mut socket).await.parse().unwrap();
    assert_eq!(id.node().as_str(), "hyper-b");
    assert_eq!(b.local_connections(), 1);

    // From node A's handle to the client on node B, through the shared broker.
    a.handle().send(&id, "from A").await.unwrap();
    assert_eq!(next_text(&mut socket).await, "from A");
    b.handle().send(&id, "from B").await.unwrap();
    assert_eq!(next_text(&mut socket).await, "from B");
    a.handle().send(Target::Broadcast, "to all").await.unwrap();
    assert_eq!(next_text(&mut socket).await, "to all");

    // B leaves: its client is closed with 1012 and told to go to A.
    let (shutdown, close) = tokio::join!(b.shutdown(), async {
        match within("the close frame", socket.next()).await {
            Some(Ok(Message::Close(frame))) => frame,
            other => panic!("expected a close frame, got {other:?}"),
        }
    });
    shutdown.unwrap();
    let close = close.unwrap();
    assert_eq!(u16::from(close.code), 1012);
    let reason: Value = serde_json::from_str(close.reason.as_str()).unwrap();
    assert_eq!(reason, json!({"node": "hyper-a", "reconnect": a_url}));
    assert_eq!(b.local_connections(), 0);

    // The client goes there.
    let (mut socket, _) = within("the upgrade", connect_async(&a_url)).await.unwrap();
    let id: ConnectionId = next_text(&mut socket).await.parse().unwrap();
    assert_eq!(id.node().as_str(), "hyper-a");
    a.handle().send(&id, "welcome back").await.unwrap();
    assert_eq!(next_text(&mut socket).await, "welcome back");

    socket.close(None).await.unwrap();
    a.shutdown().await.unwrap();
    for server in servers {
        server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Requests that are not upgrades

#[tokio::test]
async fn requests_that_are_not_upgrades_pass_through_untouched() {
    let (cluster, _listener) = start(&Backends::embedded(), "passthrough").await;
    // The inner service tells what it was given: the request's method, path, headers and
    // body, and whether it carried a cluster connection.
    let inner = service_fn(|request: Request<String>| async move {
        let slot = request.extensions().get::<ConnectionSlot>().is_some();
        let mut response = http::Response::builder()
            .status(StatusCode::IM_A_TEAPOT)
            .header("x-method", request.method().as_str())
            .header("x-uri", request.uri().to_string())
            .header("x-slot", slot.to_string());
        for (name, value) in request.headers() {
            response = response.header(format!("x-echo-{name}"), value);
        }
        Ok::<_, Infallible>(response.body(request.into_body()).unwrap())
    });
    let mut service = ServiceBuilder::new().layer(cluster.layer()).service(inner);

    let requests = [
        // A plain GET of the WebSocket path.
        Request::get("/ws?x=1").body("plain".to_owned()).unwrap(),
        // Upgrade headers, but not a GET.
        Request::builder()
            .method(Method::POST)
            .uri("/ws")
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "Upgrade")
            .body("post".to_owned())
            .unwrap(),
        // An upgrade to another protocol.
        Request::get("/ws")
            .header(UPGRADE, "h2c")
            .header(CONNECTION, "Upgrade")
            .body("h2c".to_owned())
            .unwrap(),
        // `Upgrade: websocket` without `Connection: upgrade`.
        Request::get("/ws")
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "keep-alive")
            .body("keep-alive".to_owned())
            .unwrap(),
    ];
    for request in requests {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let headers = request.headers().clone();
        let body = request.body().clone();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT, "{uri}");
        assert_eq!(response.headers()["x-method"], method.as_str());
        assert_eq!(response.headers()["x-uri"], uri.to_string().as_str());
        assert_eq!(response.headers()["x-slot"], "false", "{method} {uri}");
        for (name, value) in &headers {
            assert_eq!(&response.headers()[format!("x-echo-{name}")], value);
        }
        assert_eq!(
            response.headers().len(),
            3 + headers.len(),
            "no header added"
        );
        assert_eq!(response.body(), &body);
        assert_eq!(cluster.local_connections(), 0);
    }

    // A real upgrade request through the same stack is admitted; the inner service does not
    // take the connection, so it goes with the request.
    let upgrade = Request::get("/ws")
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .body(String::new())
        .unwrap();
    let response = service.ready().await.unwrap().call(upgrade).await.unwrap();
    assert_eq!(response.headers()["x-slot"], "true");
    assert_eq!(cluster.local_connections(), 0);

    cluster.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The node's own handle

/// A node's own handle sends as no connection, so it cannot join a group; it says so.
#[tokio::test]
async fn a_node_handle_cannot_join_a_group_and_says_why() {
    let (cluster, _listener) = start(&Backends::embedded(), "node-handle").await;
    let group = GroupName::new("g").unwrap();
    let join = cluster.handle().join(&group).await;
    let leave = cluster.handle().leave(&group).await;
    assert!(!cluster.is_draining());
    cluster.shutdown().await.unwrap();
    for error in [join.unwrap_err(), leave.unwrap_err()] {
        assert!(
            matches!(error, SendError::NoConnection),
            "a running node's handle was refused with: {error}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Custom backends: a broker whose consumer can be lost, and whose group binds can wait

/// The memory broker with what a test scripts: the consumer state it reports (as a broker
/// that loses its consumer, and restores it, would), or group binds that wait for the test's
/// permit. Group binds and unbinds done are counted.
#[derive(Debug)]
struct ScriptedBroker {
    inner: hybrid_cluster::MemoryBroker,
    /// The consumer state reported, when the test scripts one.
    state: Option<tokio::sync::watch::Sender<hybrid_cluster::ConsumerState>>,
    gated: bool,
    /// Told when a gated group bind starts waiting.
    binding: std::sync::Arc<tokio::sync::Notify>,
    /// A permit lets one gated group bind through.
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    /// Group binds and unbinds done.
    group_changes: std::sync::Arc<parking_lot::Mutex<(usize, usize)>>,
}

impl ScriptedBroker {
    /// Reporting its consumer's state as the test sets it.
    fn losing() -> Self {
        let state = tokio::sync::watch::Sender::new(hybrid_cluster::ConsumerState::Consuming);
        Self {
            state: Some(state),
            ..Self::gated(false)
        }
    }

    /// With group binds waiting for the test's permits when `gated`.
    fn gated(gated: bool) -> Self {
        Self {
            inner: hybrid_cluster::MemoryBroker::new(),
            state: None,
            gated,
            binding: std::sync::Arc::new(tokio::sync::Notify::new()),
            gate: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
            group_changes: std::sync::Arc::default(),
        }
    }
}

impl hybrid_cluster::Broker for ScriptedBroker {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &hybrid_cluster::QueueOptions,
    ) -> futures_util::future::BoxFuture<'static, Result<(), hybrid_cluster::BrokerError>> {
        self.inner.declare_queue(node, options)
    }
    fn delete_queue(
        &self,
        node: &NodeId,
    ) -> futures_util::future::BoxFuture<'static, Result<(), hybrid_cluster::BrokerError>> {
        self.inner.delete_queue(node)
    }
    fn bind(
        &self,
        node: &NodeId,
        key: &hybrid_cluster::RoutingKey,
    ) -> futures_util::future::BoxFuture<'static, Result<(), hybrid_cluster::BrokerError>> {
        let binding = self.inner.bind(node, key);
        if !matches!(key, hybrid_cluster::RoutingKey::Group(_)) {
            return binding;
        }
        let gate = self
            .gated
            .then(|| (self.binding.clone(), self.gate.clone()));
        let changes = self.group_changes.clone();
        Box::pin(async move {
            if let Some((told, gate)) = gate {
                told.notify_one();
                gate.acquire().await.unwrap().forget();
            }
            let bound = binding.await;
            changes.lock().0 += 1;
            bound
        })
    }
    fn unbind(
        &self,
        node: &NodeId,
        key: &hybrid_cluster::RoutingKey,
    ) -> futures_util::future::BoxFuture<'static, Result<(), hybrid_cluster::BrokerError>> {
        let unbinding = self.inner.unbind(node, key);
        if !matches!(key, hybrid_cluster::RoutingKey::Group(_)) {
            return unbinding;
        }
        let changes = self.group_changes.clone();
        Box::pin(async move {
            let unbound = unbinding.await;
            changes.lock().1 += 1;
            unbound
        })
    }
    fn publish(
        &self,
        key: &hybrid_cluster::RoutingKey,
        message: hybrid_cluster::BrokerMessage,
    ) -> futures_util::future::BoxFuture<'static, Result<(), hybrid_cluster::PublishError>> {
        self.inner.publish(key, message)
    }
    fn consume(
        &self,
        node: &NodeId,
        options: &hybrid_cluster::ConsumeOptions,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<hybrid_cluster::Deliveries, hybrid_cluster::BrokerError>,
    > {
        self.inner.consume(node, options)
    }
    fn consumer_state(
        &self,
        _: &NodeId,
    ) -> Option<tokio::sync::watch::Receiver<hybrid_cluster::ConsumerState>> {
        self.state
            .as_ref()
            .map(tokio::sync::watch::Sender::subscribe)
    }
}

/// While a node's consumer is lost it is Degraded: `/healthz` answers 503 saying why, its
/// record says `degraded` (so no balancer picks it) and it sends new clients away; once the
/// consumer is back, it is Active and healthy again.
#[tokio::test]
async fn a_node_that_cannot_receive_is_degraded_until_it_can() {
    use hybrid_cluster::{ConsumerState, NodeStatus};
    let broker = std::sync::Arc::new(ScriptedBroker::losing());
    let backends = Backends::Custom {
        registry: std::sync::Arc::new(hybrid_cluster::MemoryRegistry::new()),
        broker: broker.clone(),
        sessions: std::sync::Arc::new(hybrid_cluster::MemorySessionStore::new()),
        presence: std::sync::Arc::new(hybrid_cluster::MemoryPresenceStore::new()),
    };
    // Refused in HTTP, so that the refusal is an error of the upgrade (in-band refusals are
    // tested on their own).
    let (cluster, listener) = start_with(&backends, "losing", |config| {
        config.placement_mode = PlacementMode::Redirect;
    })
    .await;
    let port = listener.local_addr().unwrap().port();
    let app = server::router(cluster.clone(), ServerConfig::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    assert_eq!(http_get(port, "/healthz").await.0, 200);

    let own_status = |cluster: &Cluster| {
        cluster
            .nodes()
            .iter()
            .find(|n| n.node_id == *cluster.node_id())
            .map(|n| n.status)
    };
    broker
        .state
        .as_ref()
        .unwrap()
        .send_replace(ConsumerState::Interrupted {
            reason: "its queue was deleted".to_owned(),
        });
    within(
        "the node is degraded in its record",
        cluster
            .discovery()
            .view()
            .wait_until(|nodes| nodes.iter().any(|n| n.status == NodeStatus::Degraded)),
    )
    .await;
    assert_eq!(own_status(&cluster), Some(NodeStatus::Degraded));
    let (status, body) = http_get(port, "/healthz").await;
    assert_eq!(status, 503);
    assert!(body.contains("its queue was deleted"), "{body}");
    // A new client is not taken while the node cannot receive.
    let refused = connect_async(format!("ws://127.0.0.1:{port}/ws")).await;
    assert!(refused.is_err(), "a degraded node accepted a client");

    broker
        .state
        .as_ref()
        .unwrap()
        .send_replace(ConsumerState::Consuming);
    within(
        "the node is active again",
        cluster
            .discovery()
            .view()
            .wait_until(|nodes| nodes.iter().all(|n| n.status == NodeStatus::Active)),
    )
    .await;
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    let (_socket, _) = within(
        "a client is taken again",
        connect_async(format!("ws://127.0.0.1:{port}/ws")),
    )
    .await
    .unwrap();
}

/// A node behind TLS or a proxy names its public URL: redirects to it (and close reasons
/// naming it) use that URL, not the one made of its address and port.
#[tokio::test]
async fn redirects_name_a_nodes_public_url() {
    let backends = Backends::embedded();
    let (full, full_listener) = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut config = ClusterConfig::new(NodeId::new("full").unwrap(), "127.0.0.1", port);
        config.max_connections = 0;
        // The 307's `Location:` (the in-band redirect's URL is tested on its own).
        config.placement_mode = PlacementMode::Redirect;
        (
            Cluster::start(config, backends.clone()).await.unwrap(),
            listener,
        )
    };
    let behind_tls = {
        let mut config = ClusterConfig::new(NodeId::new("tls").unwrap(), "10.0.0.9", 5001);
        config.public_url = Some("wss://chat.example.org/socket".to_owned());
        Cluster::start(config, backends.clone()).await.unwrap()
    };
    within(
        "the full node sees both",
        full.discovery().view().wait_until(|n| n.len() == 2),
    )
    .await;
    let port = full_listener.local_addr().unwrap().port();
    let app = server::router(full.clone(), ServerConfig::default());
    tokio::spawn(async move { axum::serve(full_listener, app).await });
    match connect_async(format!("ws://127.0.0.1:{port}/ws?room=1")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 307);
            assert_eq!(
                response.headers()["location"],
                "wss://chat.example.org/socket?room=1"
            );
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
    // A URL that is not a WebSocket one is refused at start, naming the field.
    let mut config = ClusterConfig::new(NodeId::new("bad").unwrap(), "10.0.0.9", 5001);
    config.public_url = Some("https://chat.example.org".to_owned());
    let error = Cluster::start(config, backends).await.unwrap_err();
    let chain = hybrid_cluster::error_chain(&error);
    assert!(chain.contains("public_url"), "{chain}");
    drop(behind_tls);
}

// ---------------------------------------------------------------------------------------------
// In-band placement and the pre-flight route

/// Serves the node server of `cluster` on `listener`; its WebSocket URL.
fn serve_node(cluster: &Cluster, listener: TcpListener) -> String {
    let url = ws_url(&listener);
    let app = server::router(cluster.clone(), ServerConfig::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Waits until each of `nodes` sees all of them.
async fn wait_for_each_other(nodes: &[&Cluster]) {
    for node in nodes {
        within(
            "the nodes see each other",
            node.discovery()
                .view()
                .wait_until(|seen| seen.len() == nodes.len()),
        )
        .await;
    }
}

/// The value of `hybrid_cluster_upgrades_total` for `node` and `outcome` in a Prometheus
/// text exposition (0 when absent).
fn upgrades(exposition: &str, node: &str, outcome: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| line.starts_with("hybrid_cluster_upgrades_total{"))
        .filter(|line| line.contains(&format!("node=\"{node}\"")))
        .filter(|line| line.contains(&format!("outcome=\"{outcome}\"")))
        .find_map(|line| line.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

/// A plain HTTP/1.1 GET: the status, the head and the body.
async fn http_get_with_head(port: u16, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("the HTTP response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// A full node sends a new client to another in the WebSocket itself (the default mode): a
/// `101`, the redirect frame naming the other node with the client's query string, then close
/// 4000 with the same JSON; the socket was never a connection of the node, and the upgrade
/// is counted as redirected.
#[tokio::test]
async fn a_full_node_redirects_in_band_keeping_the_query_string() {
    // Records this test's nodes (a current-thread runtime: every task runs on this thread).
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let backends = Backends::embedded();
    let (full, full_listener) = start_with(&backends, "inband-full", |config| {
        config.max_connections = 1;
    })
    .await;
    let (roomy, roomy_listener) = start(&backends, "inband-roomy").await;
    wait_for_each_other(&[&full, &roomy]).await;
    let full_url = serve_node(&full, full_listener);
    let roomy_url = serve_node(&roomy, roomy_listener);

    let (mut first, _) = within("the upgrade", connect_async(&full_url))
        .await
        .unwrap();
    let welcome: Value = serde_json::from_str(&next_text(&mut first).await).unwrap();
    assert_eq!(welcome["node_id"], "inband-full");

    let refusal = refused_in_band(&format!("{full_url}?room=lobby"))
        .await
        .unwrap();
    let expected = json!({
        "type": "redirect",
        "url": format!("{roomy_url}?room=lobby"),
        "reason": "full",
    });
    assert_eq!(refusal.frame, expected);
    assert_eq!(refusal.code, hybrid_cluster::CLOSE_REDIRECT);
    assert_eq!(refusal.code, 4000);
    assert_eq!(refusal.reason, expected);
    assert_eq!(full.local_connections(), 1);
    let exposition = metrics.render();
    assert_eq!(upgrades(&exposition, "inband-full", "accepted"), 1.0);
    assert_eq!(upgrades(&exposition, "inband-full", "redirected"), 1.0);

    // The client goes where it was told, and is welcomed there.
    let (mut second, _) = within(
        "the upgrade",
        connect_async(expected["url"].as_str().unwrap()),
    )
    .await
    .unwrap();
    let welcome: Value = serde_json::from_str(&next_text(&mut second).await).unwrap();
    assert_eq!(welcome["node_id"], "inband-roomy");
    assert_eq!(full.local_connections(), 1);
    assert_eq!(roomy.local_connections(), 1);

    drop((first, second));
    full.shutdown().await.unwrap();
    roomy.shutdown().await.unwrap();
}

/// A draining node's new clients are redirected in-band with the reason "draining", and its
/// pre-flight route names the other node.
#[tokio::test]
async fn a_draining_node_redirects_in_band_saying_so() {
    let backends = Backends::embedded();
    let (draining, draining_listener) = start(&backends, "inband-draining").await;
    let (other, other_listener) = start(&backends, "inband-other").await;
    wait_for_each_other(&[&draining, &other]).await;
    let draining_port = draining_listener.local_addr().unwrap().port();
    let draining_url = serve_node(&draining, draining_listener);
    let other_url = serve_node(&other, other_listener);

    draining.drain().await.unwrap();
    let refusal = refused_in_band(&draining_url).await.unwrap();
    let expected = json!({"type": "redirect", "url": other_url, "reason": "draining"});
    assert_eq!(refusal.frame, expected);
    assert_eq!(refusal.code, 4000);
    assert_eq!(refusal.reason, expected);
    assert_eq!(draining.local_connections(), 0);

    let (status, _, body) = http_get_with_head(draining_port, "/cluster/placement").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"url": other_url, "node_id": "inband-other"})
    );

    draining.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// A node with room whose balancer places a client on another node (the always-optimal
/// policy) redirects it in-band with the reason "balance".
#[tokio::test]
async fn a_node_with_room_redirects_in_band_for_balance() {
    let backends = Backends::embedded();
    let (small, small_listener) = start_with(&backends, "inband-small", |config| {
        config.max_connections = 10;
        config.placement = PlacementPolicy::AlwaysOptimal;
    })
    .await;
    let (big, big_listener) = start_with(&backends, "inband-big", |config| {
        config.max_connections = 1000;
    })
    .await;
    wait_for_each_other(&[&small, &big]).await;
    let small_url = serve_node(&small, small_listener);
    let big_url = serve_node(&big, big_listener);

    // Both empty: a tie, which the balancer may break either way; until one client is here.
    let mut kept = None;
    for _ in 0..3 {
        let (mut socket, _) = within("the upgrade", connect_async(&small_url))
            .await
            .unwrap();
        let first: Value = serde_json::from_str(&next_text(&mut socket).await).unwrap();
        if first["type"] == "welcome" {
            kept = Some(socket);
            break;
        }
    }
    let kept = kept.expect("the small node kept none of three clients");
    // One client of 10 here, none of 1000 there: the balancer picks the big node.
    let refusal = refused_in_band(&small_url).await.unwrap();
    let expected = json!({"type": "redirect", "url": big_url, "reason": "balance"});
    assert_eq!(refusal.frame, expected);
    assert_eq!((refusal.code, &refusal.reason), (4000, &expected));
    assert_eq!(small.local_connections(), 1);

    drop(kept);
    small.shutdown().await.unwrap();
    big.shutdown().await.unwrap();
}

/// When no node has room, a client is told in-band to come back later (4001), by the layer
/// around a plain hyper service as around the node server; the refusal is counted as such.
#[tokio::test]
async fn no_room_anywhere_is_said_in_band_on_a_plain_hyper_server() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let (cluster, listener) = start_with(&Backends::embedded(), "inband-none", |config| {
        config.max_connections = 0;
    })
    .await;
    let url = ws_url(&listener);
    let service = ServiceBuilder::new()
        .layer(cluster.layer())
        .service(service_fn(upgrade));
    let server = tokio::spawn(serve_hyper(listener, service));

    let refusal = refused_in_band(&url).await.unwrap();
    let expected = json!({"type": "unavailable", "retry_after_ms": 5000});
    assert_eq!(refusal.frame, expected);
    assert_eq!(refusal.code, hybrid_cluster::CLOSE_UNAVAILABLE);
    assert_eq!(refusal.code, 4001);
    assert_eq!(refusal.reason, expected);
    // A client that offers subprotocols (as a page may) gets the first selected: a browser
    // fails a handshake that selects none.
    let mut offering = url.as_str().into_client_request().unwrap();
    offering.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().unwrap(),
    );
    let refusal = refused_in_band(offering).await.unwrap();
    assert_eq!(refusal.frame, expected);
    assert_eq!(cluster.local_connections(), 0);
    let exposition = metrics.render();
    assert_eq!(upgrades(&exposition, "inband-none", "refused"), 2.0);
    assert_eq!(upgrades(&exposition, "inband-none", "accepted"), 0.0);

    cluster.shutdown().await.unwrap();
    server.abort();
}

/// A request the layer cannot upgrade itself (here: a service called directly, with no
/// connection behind it) gets the redirect mode's HTTP answer even in the in-band mode.
#[tokio::test]
async fn without_hyper_upgrade_support_the_in_band_mode_answers_in_http() {
    let (cluster, _listener) = start_with(&Backends::embedded(), "inband-direct", |config| {
        config.max_connections = 0;
    })
    .await;
    assert_eq!(cluster.local_connections(), 0);
    let inner = service_fn(|_: Request<String>| async {
        Ok::<_, Infallible>(http::Response::new(String::new()))
    });
    let mut service = ServiceBuilder::new().layer(cluster.layer()).service(inner);
    let upgrade = Request::get("/ws")
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(String::new())
        .unwrap();
    let response = service.ready().await.unwrap().call(upgrade).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "5");
    cluster.shutdown().await.unwrap();
}

/// `GET /cluster/placement` names the node a new client should connect to (this one while it
/// has room, reserving nothing), another when this one is full, and answers 503 when none
/// has room; any origin may ask. `Cluster::placement` says the same.
#[tokio::test]
async fn the_placement_route_names_a_node_or_answers_503() {
    let backends = Backends::embedded();
    let (a, a_listener) = start_with(&backends, "advice-a", |config| {
        config.max_connections = 1;
    })
    .await;
    let a_port = a_listener.local_addr().unwrap().port();
    let a_url = serve_node(&a, a_listener);
    let here = json!({"url": a_url, "node_id": "advice-a"});
    // Asked twice: advice reserves nothing, so the one place is still free.
    for _ in 0..2 {
        let (status, head, body) = http_get_with_head(a_port, "/cluster/placement").await;
        assert_eq!(status, 200);
        assert!(head.contains("access-control-allow-origin: *"), "{head}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), here);
    }
    let advice = a.placement().unwrap();
    assert_eq!(
        (advice.url.as_str(), advice.node_id.as_str()),
        (a_url.as_str(), "advice-a")
    );
    let (mut client, _) = within("the upgrade", connect_async(&a_url)).await.unwrap();
    let welcome: Value = serde_json::from_str(&next_text(&mut client).await).unwrap();
    assert_eq!(welcome["node_id"], "advice-a");

    // Full, and alone: no node has room.
    let (status, head, body) = http_get_with_head(a_port, "/cluster/placement").await;
    assert_eq!(status, 503);
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("retry-after: 5"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"type": "unavailable", "retry_after_ms": 5000})
    );
    assert_eq!(a.placement(), None);

    // Another node with room (one place): it is named, however often anyone asks, since
    // advice charges no node.
    let (b, b_listener) = start_with(&backends, "advice-b", |config| {
        config.max_connections = 1;
    })
    .await;
    wait_for_each_other(&[&a, &b]).await;
    let b_url = serve_node(&b, b_listener);
    for _ in 0..3 {
        let (status, _, body) = http_get_with_head(a_port, "/cluster/placement").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"url": b_url, "node_id": "advice-b"})
        );
    }

    drop(client);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A client that closes while its join is still binding leaves no binding behind: the node
/// takes back the count its join got (before, the departure found nothing counted to take
/// off, and the late bind kept the group bound for good).
#[tokio::test]
async fn a_client_gone_while_its_join_binds_leaves_no_binding() {
    let broker = std::sync::Arc::new(ScriptedBroker::gated(true));
    let backends = Backends::Custom {
        registry: std::sync::Arc::new(hybrid_cluster::MemoryRegistry::new()),
        broker: broker.clone(),
        sessions: std::sync::Arc::new(hybrid_cluster::MemorySessionStore::new()),
        presence: std::sync::Arc::new(hybrid_cluster::MemoryPresenceStore::new()),
    };
    let (cluster, listener) = start(&backends, "gated").await;
    let url = ws_url(&listener);
    let app = server::router(cluster.clone(), ServerConfig::default());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut client, _) = connect_async(url.as_str()).await.unwrap();
    assert!(next_text(&mut client).await.contains("welcome"));
    let binding = broker.binding.notified();
    client
        .send(Message::text(
            json!({"op": "join", "group": "g"}).to_string(),
        ))
        .await
        .unwrap();
    within("the join's bind starts", binding).await;
    drop(client);
    within("the client is gone", async {
        while cluster.local_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    broker.gate.add_permits(1);
    let group = hybrid_cluster::RoutingKey::Group(GroupName::new("g").unwrap());
    let node = cluster.node_id().clone();
    within("the late bind is made, then taken back", async {
        while *broker.group_changes.lock() != (1, 1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!broker.inner.bindings(&node).contains(&group));
    assert_eq!(
        cluster
            .handle()
            .local_members(&GroupName::new("g").unwrap()),
        0
    );
    cluster.shutdown().await.unwrap();
}

/// Nodes that key group messages otherwise lose each other's group messages: each names the
/// others (and logs them as errors).
#[tokio::test]
async fn a_peer_keying_groups_otherwise_is_named() {
    let backends = Backends::embedded();
    let (a, _a) = start(&backends, "keys-a").await;
    let (b, _b) = start_with(&backends, "keys-b", |config| {
        config.group_keys = hybrid_cluster::GroupKeys::Buckets(8.try_into().unwrap());
    })
    .await;
    let (c, _c) = start(&backends, "keys-c").await;
    for node in [&a, &b, &c] {
        within(
            "every node sees the others",
            node.discovery().view().wait_until(|n| n.len() == 3),
        )
        .await;
    }
    let named = |node: &Cluster| {
        let mut peers: Vec<String> = node
            .peers_keying_groups_otherwise()
            .iter()
            .map(ToString::to_string)
            .collect();
        peers.sort();
        peers
    };
    assert_eq!(named(&a), ["keys-b"]);
    assert_eq!(named(&b), ["keys-a", "keys-c"]);
    assert_eq!(named(&c), ["keys-b"]);
    for node in [a, b, c] {
        node.shutdown().await.unwrap();
    }
}
