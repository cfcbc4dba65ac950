//! A ready-made node server on axum: `/ws` speaking the [demo protocol](crate::protocol),
//! `GET /cluster` (a status page), `GET /cluster/nodes` (every node's info as JSON),
//! `GET /cluster/placement` (where a new client should connect, see
//! [`Cluster::placement`]), `GET /cluster/client.js` (the [client for browsers](CLIENT_JS)),
//! `GET /healthz` and `POST /cluster/users/{user}/disconnect` (with an [`AdminToken`]). The node program, the demo and the end-to-end
//! tests run it; it is also a worked example of serving a [`ClusterConnection`].
//!
//! ```no_run
//! use hybrid_cluster::{Backends, Cluster, ClusterConfig, NodeId};
//! use hybrid_cluster::server::{ServerConfig, router};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClusterConfig::new(NodeId::new("node-1")?, "127.0.0.1", 5001);
//! let cluster = Cluster::start(config, Backends::embedded()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5001").await?;
//! // Small frames go out at once: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
//! // can hold a message for 40 ms.
//! use axum::serve::ListenerExt;
//! let listener = listener.tap_io(|tcp| {
//!     let _ = tcp.set_nodelay(true);
//! });
//! axum::serve(listener, router(cluster, ServerConfig::default())).await?;
//! # Ok(())
//! # }
//! ```

mod admin;
mod render;
mod requests;
mod routes;
mod tracking;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{
    CloseFrame as WsCloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade,
};
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hybrid_cluster_core::UserId;

use self::requests::{Requests, error_reply};
use crate::cluster::Cluster;
use crate::handle::{ClusterConnection, ClusterHandle};
use crate::identity::{Identify, IdentityLayer};
use crate::limit::RateDecision;
use crate::local::{Inbox, InboxItem};
use crate::protocol::ServerMessage;

/// WebSocket settings of the node server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The read buffer of each connection. Default 4 KiB: an idle connection costs little
    /// (tungstenite's own default of 128 KiB would cost that much per connection).
    pub read_buffer_size: usize,
    /// The write buffer of each connection. Default 4 KiB.
    pub write_buffer_size: usize,
    /// The largest message a client may send. Default 64 KiB.
    pub max_message_size: usize,
    /// Requests of one connection awaiting the broker's confirmation at most; past it the
    /// server stops reading that connection until some are confirmed. Default 128.
    pub max_pending_per_connection: usize,
    /// How long a write may wait for the client to read: a client that takes nothing for this
    /// long is dropped, so a stuck client never holds its task, its connection slot or a
    /// shutdown. Default 5 s.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            read_buffer_size: 4 * 1024,
            write_buffer_size: 4 * 1024,
            max_message_size: 64 * 1024,
            max_pending_per_connection: 128,
            write_timeout: Duration::from_secs(5),
        }
    }
}

pub use self::admin::AdminToken;
use self::render::render;
pub use self::routes::{CLIENT_JS, STATUS_PAGE};
use self::routes::{client_js, health, nodes, placement, status_page};

/// Who the node server lets do what: who its WebSocket clients are, and the token of its
/// admin routes.
#[derive(Clone, Debug, Default)]
pub struct ServerAuth {
    /// Identifies each WebSocket upgrade before the cluster admits it (a [`Jwt`](crate::Jwt),
    /// say); a refused one gets `401`. `None` (the default): every client is anonymous.
    pub identity: Option<IdentityLayer<Arc<dyn Identify>>>,
    /// The token `POST /cluster/users/{user}/disconnect` asks for. `None` (the default): that
    /// route answers `403`.
    pub admin_token: Option<AdminToken>,
}

#[derive(Clone)]
struct AppState {
    cluster: Cluster,
    config: ServerConfig,
    auth: ServerAuth,
}

/// The node's routes: `/ws` (behind the cluster layer), `/cluster`, `/cluster/nodes`,
/// `/cluster/placement`, `/cluster/client.js`, `/healthz`, with every client anonymous and
/// the admin routes off: see [`router_with`].
pub fn router(cluster: Cluster, config: ServerConfig) -> Router {
    router_with(cluster, config, ServerAuth::default())
}

/// [`router`], with `auth`: `/ws` behind its identity layer (then the cluster layer), and
/// `POST /cluster/users/{user}/disconnect` behind its admin token.
pub fn router_with(cluster: Cluster, config: ServerConfig, auth: ServerAuth) -> Router {
    let mut ws = Router::new()
        .route(&cluster.node.config.endpoint, get(upgrade))
        .route_layer(cluster.layer());
    if let Some(identity) = auth.identity.clone() {
        // Added last, so it runs first: a refused client never reaches admission.
        ws = ws.route_layer(identity);
    }
    Router::new()
        .merge(ws)
        .route(
            "/cluster/users/{user}/disconnect",
            axum::routing::post(admin::disconnect_user),
        )
        .route("/cluster", get(status_page))
        .route("/cluster/nodes", get(nodes))
        .route("/cluster/placement", get(placement))
        .route("/cluster/client.js", get(client_js))
        .route("/healthz", get(health))
        .with_state(AppState {
            cluster,
            config,
            auth,
        })
}

/// What a handler gets when the cluster layer did not run before it.
#[derive(Debug)]
pub struct MissingConnection;

impl IntoResponse for MissingConnection {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no cluster connection: HybridClusterLayer must wrap this route",
        )
            .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClusterConnection {
    type Rejection = MissingConnection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        ClusterConnection::take(&mut parts.extensions).ok_or(MissingConnection)
    }
}

async fn upgrade(
    State(state): State<AppState>,
    upgrade: WebSocketUpgrade,
    connection: ClusterConnection,
) -> Response {
    let config = state.config;
    upgrade
        .read_buffer_size(config.read_buffer_size)
        .write_buffer_size(config.write_buffer_size)
        .max_message_size(config.max_message_size)
        // A frame is refused from its header: never read (nor buffered) past the bound.
        .max_frame_size(config.max_message_size)
        .on_upgrade(move |socket| serve_connection(socket, connection, config))
}

/// Serves one client: the demo protocol in, the connection's inbox out.
///
/// Requests are started in the order they came, through one ordered sender, so one client's
/// messages reach every connection in the order it sent them; several may await the broker
/// at once (see [`ServerConfig::max_pending_per_connection`]). A request that needs a place
/// of the node's bound on unconfirmed messages waits for it in line with every other
/// connection's, while this connection keeps receiving, reading and answering requests
/// settled on this node.
pub fn serve_connection(
    socket: WebSocket,
    connection: ClusterConnection,
    config: ServerConfig,
) -> impl Future<Output = ()> + Send + 'static {
    if connection.handle().has_sessions() || connection.user().is_some() {
        return futures_util::future::Either::Left(serve_opened(socket, connection, config));
    }
    // Done before the future, not in it: an async fn keeps room for its arguments (the whole
    // unsplit socket) for as long as it runs, and an idle connection is mostly its task.
    let (handle, inbox) = connection.into_parts();
    let welcome = handle.connection_id().map(|id| {
        let welcome = ServerMessage::Welcome {
            connection_id: &id.to_string(),
            node_id: handle.node_id().as_str(),
            session: None,
            user: None,
        };
        vec![Message::Text(welcome.to_json().into())]
    });
    let (sink, stream) = socket.split();
    futures_util::future::Either::Right(serve_split(sink, stream, handle, inbox, welcome, config))
}

/// [`serve_connection`] for a connection with a user or a session: reachable as its user
/// first, its session opened (or resumed) next, its user and session token in the welcome,
/// then `resumed` when the client asked to resume.
async fn serve_opened(socket: WebSocket, mut connection: ClusterConnection, config: ServerConfig) {
    if let Err(error) = connection.reachable().await {
        tracing::warn!(connection = %connection.id(), error = %crate::error_chain(&error), "could not make a connection reachable as its user: closing it");
        return close_unavailable(socket, "the broker is unavailable").await;
    }
    let opened = if connection.handle().has_sessions() {
        match connection.open_session().await {
            Ok(opened) => Some(opened),
            Err(error) => {
                tracing::warn!(connection = %connection.id(), error = %crate::error_chain(&error), "could not open a session: closing the connection");
                return close_unavailable(socket, "the session store is unavailable").await;
            }
        }
    } else {
        None
    };
    let user = connection.user().cloned();
    let (handle, inbox) = connection.into_parts();
    let welcome = handle.connection_id().map(|id| {
        let welcome = ServerMessage::Welcome {
            connection_id: &id.to_string(),
            node_id: handle.node_id().as_str(),
            session: opened.as_ref().map(|opened| opened.token.as_str()),
            user: user.as_ref().map(UserId::as_str),
        };
        let mut frames = vec![Message::Text(welcome.to_json().into())];
        if let Some(resumed) = opened.and_then(|opened| opened.resumed) {
            let resumed = ServerMessage::Resumed {
                recovered: resumed.recovered,
                missed: resumed.recovered.then_some(resumed.missed),
            };
            frames.push(Message::Text(resumed.to_json().into()));
        }
        frames
    });
    let (sink, stream) = socket.split();
    serve_split(sink, stream, handle, inbox, welcome, config).await;
}

/// Closes a connection that cannot be served: 1011, internal error, saying which part failed.
async fn close_unavailable(mut socket: WebSocket, reason: &'static str) {
    let close = WsCloseFrame {
        code: 1011,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(close))).await;
}

/// [`serve_connection`] once the socket is split: the welcome (none for a handle without a
/// connection: nothing is served), then the loop.
async fn serve_split(
    mut sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    handle: ClusterHandle,
    mut inbox: Inbox,
    welcome: Option<Vec<Message>>,
    config: ServerConfig,
) {
    let Some(welcome) = welcome else {
        return;
    };
    if !Box::pin(write(&mut sink, config.write_timeout, welcome)).await {
        return;
    }
    let mut requests = Requests::new(handle);
    // A client frame read ahead, to learn whether another one was waiting.
    let mut read_ahead = None;
    while let Some(turn) = next_turn(
        &mut inbox,
        &mut requests,
        &mut stream,
        &mut read_ahead,
        &config,
    )
    .await
    {
        if turn.source == Source::Client
            && !turn.closing
            && requests.len() < config.max_pending_per_connection
        {
            read_ahead = waiting_frame_or_step_aside(&mut stream).await;
        }
        let mut frames = turn.frames;
        if turn.closing && turn.source == Source::Client {
            // The answers settled already go out before the close: the client learns what
            // was done of what it sent.
            frames = settled_replies(&mut requests).chain(frames).collect();
        }
        if !frames.is_empty() {
            if !Box::pin(write(&mut sink, config.write_timeout, frames)).await {
                break;
            }
            if turn.source == Source::Inbox {
                tracing::trace!(name: "hybrid_cluster.stage.written", "inbox frames written");
            }
        }
        if turn.closing {
            if turn.source == Source::Client {
                linger(&mut stream).await;
            }
            break;
        }
    }
    if requests.goodbye
        && let Err(error) = requests.handle().end_session().await
    {
        tracing::warn!(error = %crate::error_chain(&error), "could not end a session its client closed");
    }
}

/// What a frame from the client is, as the socket's stream yields it.
type ClientFrame = Option<Result<Message, axum::Error>>;

/// What one turn of a connection's loop writes, and where it came from.
struct Turn {
    frames: Vec<Message>,
    /// The connection closes once they are written.
    closing: bool,
    source: Source,
}

/// Where a turn's frames come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Inbox items: a delivery.
    Inbox,
    /// Replies to requests settled meanwhile.
    Replies,
    /// The answer to a frame from the client.
    Client,
}

/// The next turn of a connection: the frame read ahead if there is one, else whichever comes
/// first of an inbox item, replies to requests, and a frame from the client (while fewer than
/// `max_pending_per_connection` requests are open). `None` once the connection is done.
async fn next_turn(
    inbox: &mut Inbox,
    requests: &mut Requests,
    stream: &mut SplitStream<WebSocket>,
    read_ahead: &mut Option<ClientFrame>,
    config: &ServerConfig,
) -> Option<Turn> {
    // Nothing of the turn is built before the wait: an idle connection's task holds the room
    // of whatever lives across it.
    let frame = match read_ahead.take() {
        Some(frame) => frame,
        None => {
            let reading = requests.len() < config.max_pending_per_connection;
            tokio::select! {
                item = inbox.next() => {
                    let mut closing = false;
                    let frames = inbox_frames(item?, inbox, requests, &mut closing);
                    return Some(Turn { frames, closing, source: Source::Inbox });
                }
                replies = std::future::poll_fn(|cx| requests.poll_replies(cx)), if !requests.is_empty() => {
                    let frames = replies.into_iter().map(|reply| Message::Text(reply.into())).collect();
                    return Some(Turn { frames, closing: false, source: Source::Replies });
                }
                frame = stream.next(), if reading => frame,
            }
        }
    };
    let mut closing = false;
    let frames = answer_frame(frame, requests, config, &mut closing)?;
    Some(Turn {
        frames,
        closing,
        source: Source::Client,
    })
}

/// The replies of requests settled by now, in order, as frames.
fn settled_replies(requests: &mut Requests) -> impl Iterator<Item = Message> + use<> {
    let mut frames = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    while let std::task::Poll::Ready(replies) = requests.poll_replies(&mut cx) {
        frames.extend(replies.into_iter().map(|reply| Message::Text(reply.into())));
    }
    frames.into_iter()
}

/// After closing a client that was still sending (too big a message, past its rate limit):
/// reads and drops what it sent until its close frame comes back, for a second at most.
/// Closing the socket with its frames unread would reset the connection, and a reset can
/// make the client lose the close frame, and so the reason, before reading it.
async fn linger(stream: &mut SplitStream<WebSocket>) {
    let draining = async {
        while let Some(Ok(frame)) = stream.next().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, draining).await;
}

/// How long a client closed for what it sent is read for its close frame.
const LINGER: Duration = Duration::from_secs(1);

/// After a request started: the client's next frame if it sent one already, else `None` once
/// this task stepped aside. The request has most likely woken another task (the publisher, or
/// the socket task of a connection on this node) into this worker's next-to-run slot, which
/// no other worker takes: stepping aside lets it run before this task writes its replies.
/// Under load the next frame is read at once, with no yield.
async fn waiting_frame_or_step_aside(stream: &mut SplitStream<WebSocket>) -> Option<ClientFrame> {
    let waiting = stream.next().now_or_never();
    if waiting.is_none() {
        tokio::task::yield_now().await;
    }
    waiting
}

/// The frames that answer a frame from the client (maybe none); `None` when the client went.
/// `closing` is set when the connection closes after them.
fn answer_frame(
    frame: ClientFrame,
    requests: &mut Requests,
    config: &ServerConfig,
    closing: &mut bool,
) -> Option<Vec<Message>> {
    match client_frame(frame, requests, config) {
        Read::Answer(frames) => Some(frames),
        Read::Close(frames) => {
            *closing = true;
            Some(frames)
        }
        Read::Gone => None,
    }
}

/// What a frame from the client calls for.
enum Read {
    /// These frames back (maybe none), and keep serving.
    Answer(Vec<Message>),
    /// These frames back, then close.
    Close(Vec<Message>),
    /// The client went (or broke the protocol of WebSocket itself): stop.
    Gone,
}

/// Takes a frame from the client: a request starts, anything else is answered.
fn client_frame(
    frame: Option<Result<Message, axum::Error>>,
    requests: &mut Requests,
    config: &ServerConfig,
) -> Read {
    match frame {
        Some(Ok(Message::Text(text))) => {
            tracing::trace!(name: "hybrid_cluster.stage.frame_read", "frame read");
            // Start at once what can start, rather than on a later turn of the loop (the
            // replies branch waits, with the real waker, for the rest).
            let pushed = requests.push(text.as_str(), &mut Context::from_waker(Waker::noop()));
            answered_in_turn(pushed)
        }
        Some(Ok(Message::Binary(bytes))) => answered_in_turn(requests.push_binary(bytes.len())),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Read::Answer(Vec::new()),
        Some(Err(error)) if is_too_big(&error) => {
            let reason = format!("message too big: at most {} bytes", config.max_message_size);
            Read::Close(vec![Message::Close(Some(WsCloseFrame {
                code: CLOSE_TOO_BIG,
                reason: reason.into(),
            }))])
        }
        Some(Ok(Message::Close(frame))) => {
            requests.goodbye = frame.is_some_and(|frame| frame.code == CLOSE_NORMAL);
            Read::Gone
        }
        Some(Err(_)) | None => Read::Gone,
    }
}

/// A frame taken in as a request (answered in turn), or the close of a connection past its
/// rate limit once too often.
fn answered_in_turn(decision: RateDecision) -> Read {
    match decision {
        RateDecision::Close => Read::Close(vec![Message::Close(Some(WsCloseFrame {
            code: CLOSE_POLICY,
            reason: "over the rate limit, again and again".into(),
        }))]),
        RateDecision::Allow | RateDecision::Refuse => Read::Answer(Vec::new()),
    }
}

/// The frames for `item` and whatever else is queued in the inbox already, to go out in the
/// same write; `closing` is set when the inbox closes the connection.
fn inbox_frames(
    item: InboxItem,
    inbox: &mut Inbox,
    requests: &mut Requests,
    closing: &mut bool,
) -> Vec<Message> {
    tracing::trace!(name: "hybrid_cluster.stage.inbox_taken", "inbox item taken");
    let mut frames = Vec::new();
    let mut next = Some(item);
    while let Some(item) = next.take() {
        match item {
            InboxItem::Close(frame) => {
                *closing = true;
                let close = WsCloseFrame {
                    code: frame.code,
                    reason: Utf8Bytes::from(frame.reason),
                };
                frames.push(Message::Close(Some(close)));
            }
            item => {
                let seq = inbox.last_seq();
                frames.extend(inbox_frame(&item, seq, requests).map(|f| Message::Text(f.into())))
            }
        }
        if !*closing && frames.len() < WRITE_BATCH {
            next = inbox.next().now_or_never().flatten();
        }
    }
    frames
}

/// The close code of a client that ends its session: 1000, normal closure. Any other end of
/// the connection (1001 going away, a lost connection) keeps the session for a resume.
pub const CLOSE_NORMAL: u16 = 1000;

/// The close code of a connection that kept going past its rate limit: 1008, policy
/// violation.
pub const CLOSE_POLICY: u16 = 1008;

/// The close code for a message over the size bound: 1009, message too big.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Whether a read failed on a message or frame over the size bound.
fn is_too_big(error: &axum::Error) -> bool {
    matches!(
        std::error::Error::source(error)
            .and_then(|inner| inner.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Inbox items written to the socket in one go, at most.
const WRITE_BATCH: usize = 64;

/// The frame a client gets now for an inbox item other than a close (none for a notice held
/// until its request is answered).
fn inbox_frame(item: &InboxItem, seq: Option<u64>, requests: &mut Requests) -> Option<String> {
    match item {
        InboxItem::Message(envelope) => Some(render(envelope, seq)),
        InboxItem::Undeliverable(notice) => requests.undeliverable(notice),
        _ => Some(error_reply(None, "internal", "an unknown notice arrived")),
    }
}

/// Writes `messages`; false when the client is gone or took nothing for `limit`.
///
/// A client closed by the slow-client policy still gets its close frame (and so its close
/// code) if it reads within `limit`; one that never reads is dropped then.
async fn write(
    sink: &mut SplitSink<WebSocket, Message>,
    limit: Duration,
    messages: Vec<Message>,
) -> bool {
    let writing = async {
        for message in messages {
            sink.feed(message).await?;
        }
        sink.flush().await
    };
    matches!(tokio::time::timeout(limit, writing).await, Ok(Ok(())))
}
