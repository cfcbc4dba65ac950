//! WebSocket clients of the demo protocol, and the payloads they send.

use futures_util::StreamExt;
use futures_util::stream;
use hybrid_cluster_test_support::BoxError;
use tokio::time::timeout;
use tokio_tungstenite::connect_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::serve::{WAIT, small_buffers};
use crate::{PAYLOAD, Ws};

/// Clients connecting at once.
pub(crate) const CONNECT_CONCURRENCY: usize = 64;

pub(crate) async fn connect(url: &str, config: Option<WebSocketConfig>) -> Result<Ws, BoxError> {
    // `true`: TCP_NODELAY on the client socket.
    let (ws, _) = timeout(WAIT, connect_async_with_config(url, config, true)).await??;
    Ok(ws)
}

/// The next text frame (pings and pongs skipped), within `WAIT`.
pub(crate) async fn next_text(ws: &mut Ws) -> Result<String, BoxError> {
    for _ in 0..1000 {
        match timeout(WAIT, ws.next()).await {
            Err(_) => return Err("no frame arrived".into()),
            Ok(None) => return Err("the connection ended".into()),
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(close)))) => return Err(format!("closed: {close:?}").into()),
            Ok(Some(Ok(_))) => {}
        }
    }
    Err("only control frames arrived".into())
}

/// Connects a demo-protocol client and reads its welcome: the socket and its connection id.
pub(crate) async fn client(
    url: &str,
    config: Option<WebSocketConfig>,
) -> Result<(Ws, String), BoxError> {
    let mut ws = connect(url, config).await?;
    let welcome: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await?)?;
    let id = welcome["connection_id"]
        .as_str()
        .ok_or_else(|| format!("not a welcome: {welcome}"))?
        .to_owned();
    Ok((ws, id))
}

/// A `data` value of exactly `PAYLOAD` bytes: a JSON string starting with an 8-digit sequence.
pub(crate) fn data(seq: usize) -> String {
    let mut s = format!("\"{seq:08}");
    while s.len() < PAYLOAD - 1 {
        s.push('x');
    }
    s.push('"');
    s
}

pub(crate) fn send_frame(to: &str, seq: usize) -> String {
    format!(r#"{{"op":"send","to":"{to}","data":{}}}"#, data(seq))
}

/// A `send_user` to `user`, without an id.
pub(crate) fn send_user_frame(user: &str, seq: usize) -> String {
    format!(
        r#"{{"op":"send_user","user":"{user}","data":{}}}"#,
        data(seq)
    )
}

/// A send the server acknowledges (once the broker confirmed it, or at once on one node).
pub(crate) fn acked_send_frame(to: &str, seq: usize) -> String {
    format!(
        r#"{{"op":"send","to":"{to}","data":{},"id":{seq}}}"#,
        data(seq)
    )
}

/// A `send_user` the server acknowledges.
pub(crate) fn acked_send_user_frame(user: &str, seq: usize) -> String {
    format!(
        r#"{{"op":"send_user","user":"{user}","data":{},"id":{seq}}}"#,
        data(seq)
    )
}

/// The sequence number of a delivered message or broadcast.
pub(crate) fn seq_of(frame: &str) -> Option<usize> {
    let start = frame.find("\"data\":\"")? + 8;
    frame.get(start..start + 8)?.parse().ok()
}

/// Connects `n` clients round robin over `urls`, `CONNECT_CONCURRENCY` at a time; reads the
/// welcome of each when `welcome`. Returns the clients and the failures.
pub(crate) async fn connect_many(urls: &[String], n: usize, welcome: bool) -> (Vec<Ws>, usize) {
    let results: Vec<Result<Ws, BoxError>> = stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            async move {
                if welcome {
                    client(&url, Some(small_buffers())).await.map(|(ws, _)| ws)
                } else {
                    connect(&url, Some(small_buffers())).await
                }
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut clients = Vec::with_capacity(n);
    let mut failures = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(ws) => clients.push(ws),
            Err(error) => {
                failures += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    if let Some(error) = first_error {
        eprintln!("{failures} of {n} clients could not connect; the first: {error}");
    }
    (clients, failures)
}
