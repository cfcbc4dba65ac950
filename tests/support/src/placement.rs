//! What a client refused by a node's in-band placement sees.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::BoxError;

/// An in-band refusal as the client saw it.
#[derive(Debug)]
pub struct InBandRefusal {
    /// The one text frame, as JSON.
    pub frame: Value,
    /// The close code.
    pub code: u16,
    /// The close reason, as JSON.
    pub reason: Value,
}

/// Connects with `request` (a URL, or a request with headers of its own) and reads what a
/// client refused in-band gets: a `101`, one text frame, a close frame, then the end of the
/// connection (each within 10 s). An error says what came instead.
pub async fn refused_in_band(request: impl IntoClientRequest) -> Result<InBandRefusal, BoxError> {
    let bound = Duration::from_secs(10);
    let request = request.into_client_request()?;
    let url = request.uri().to_string();
    let (mut socket, response) = timeout(bound, connect_async(request)).await??;
    if response.status() != 101 {
        return Err(format!("{url}: answered {}", response.status()).into());
    }
    let frame = match timeout(bound, socket.next()).await? {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str())?,
        other => return Err(format!("{url}: expected a text frame, got {other:?}").into()),
    };
    let (code, reason) = match timeout(bound, socket.next()).await? {
        Some(Ok(Message::Close(Some(close)))) => (
            u16::from(close.code),
            serde_json::from_str(close.reason.as_str())?,
        ),
        other => return Err(format!("{url}: expected a close frame, got {other:?}").into()),
    };
    if let Some(after) = timeout(bound, socket.next()).await? {
        return Err(format!("{url}: the connection outlived its close: {after:?}").into());
    }
    Ok(InBandRefusal {
        frame,
        code,
        reason,
    })
}
