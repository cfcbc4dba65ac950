//! In-band placement ([`PlacementMode::InBand`](crate::PlacementMode::InBand)): a client that
//! is not kept here is accepted only to be told, in a WebSocket frame and a close, where to go.
//!
//! A browser's `WebSocket` fails on any answer to its upgrade but `101` (close 1006, nothing
//! else), so a `307` cannot reach a page. Here the layer itself answers `101`, and once hyper
//! hands over the connection, a task of its own sends one text frame and a close frame, waits
//! a moment for the client's close, and drops the socket. The connection is never registered:
//! it holds no place of the node's limit, and nothing is left of it after the close.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::RETRY_AFTER_SECS;
use crate::MAX_CLOSE_REASON;

/// The close code of an in-band redirect: the frame before it, and its reason, name the node
/// to connect to.
pub const CLOSE_REDIRECT: u16 = 4000;

/// The close code of an in-band refusal: no node has room; the frame before it, and its
/// reason, say how long to wait.
pub const CLOSE_UNAVAILABLE: u16 = 4001;

/// Milliseconds a client refused in-band is told to wait before it tries again (the `503`'s
/// `Retry-After`, in the unit JavaScript timers take).
pub const RETRY_AFTER_MS: u64 = RETRY_AFTER_SECS as u64 * 1000;

/// How long the client has to answer the close before its socket is dropped anyway.
const CLOSE_HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);

/// The little a refused client may send before its close: its close frame, a ping.
const MAX_CLIENT_FRAME: usize = 1024;

/// Why a client is sent to another node, as its in-band redirect frame says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectReason {
    /// This node is at its connection limit.
    Full,
    /// This node is draining: it takes no new clients.
    Draining,
    /// This node has room, but the balancer placed the client on another node.
    Balance,
}

/// What a client not kept here is told: the one frame it gets before the close.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Refusal<'a> {
    /// Connect to `url` instead.
    Redirect {
        url: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<RedirectReason>,
    },
    /// No node has room: try again later.
    Unavailable { retry_after_ms: u64 },
}

impl Refusal<'_> {
    /// The unavailable answer, with the wait every refusal of this crate gives.
    pub(crate) const UNAVAILABLE: Refusal<'static> = Refusal::Unavailable {
        retry_after_ms: RETRY_AFTER_MS,
    };

    /// The close code that goes with this answer.
    fn close_code(&self) -> u16 {
        match self {
            Self::Redirect { .. } => CLOSE_REDIRECT,
            Self::Unavailable { .. } => CLOSE_UNAVAILABLE,
        }
    }

    /// The frame's JSON.
    pub(crate) fn to_json(self) -> String {
        // Strings and integers only: serialising cannot fail.
        serde_json::to_string(&self).unwrap_or_default()
    }

    /// The close frame's reason: the frame's JSON when it fits the 123 bytes of a close
    /// frame; else without the reason; else without the URL's query string (a token in it
    /// must not cost the client the node's address: it keeps its own query); else without
    /// the URL. Always valid JSON.
    pub(crate) fn close_reason(self) -> String {
        let full = self.to_json();
        if full.len() <= MAX_CLOSE_REASON {
            return full;
        }
        let Self::Redirect { url, .. } = self else {
            return full;
        };
        let without_query = url.split_once('?').map_or(url, |(address, _)| address);
        [url, without_query]
            .into_iter()
            .map(|url| Self::Redirect { url, reason: None }.to_json())
            .find(|reason| reason.len() <= MAX_CLOSE_REASON)
            .unwrap_or_else(|| r#"{"type":"redirect"}"#.to_owned())
    }
}

/// Answers `request`, a WebSocket upgrade, with `101 Switching Protocols`, and tells the
/// client `refusal` on the socket once hyper hands it over. `None`, leaving the request as
/// it was, when it cannot be done: no valid `Sec-WebSocket-Key` or version 13, no hyper
/// upgrade in the request's extensions (a server without upgrade support, or a test calling
/// the service directly), or no tokio runtime to run the socket's task.
pub(crate) fn answer<ReqBody, ResBody: Default>(
    request: &mut Request<ReqBody>,
    refusal: Refusal<'_>,
) -> Option<Response<ResBody>> {
    let headers = request.headers();
    if headers.get(SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13" {
        return None;
    }
    let key = headers.get(SEC_WEBSOCKET_KEY)?;
    // The key is 16 bytes, base64: 24 characters.
    if key.len() != 24 {
        return None;
    }
    let accept = HeaderValue::try_from(derive_accept_key(key.as_bytes())).ok()?;
    let protocol = first_protocol(request);
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let on_upgrade = request.extensions_mut().remove::<OnUpgrade>()?;
    let frame = refusal.to_json();
    let close = CloseFrame {
        code: refusal.close_code().into(),
        reason: refusal.close_reason().into(),
    };
    runtime.spawn(tell_and_close(on_upgrade, frame, close));
    let mut response = Response::new(ResBody::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(protocol) = protocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Some(response)
}

/// The first subprotocol the client offers, if any: a browser that offered some fails a
/// handshake that selects none, and this socket speaks no protocol anyway but its one frame.
fn first_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    let offered = request
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)?
        .to_str()
        .ok()?;
    let first = offered.split(',').map(str::trim).find(|p| !p.is_empty())?;
    HeaderValue::from_str(first).ok()
}

/// Sends `frame` then `close` on the upgraded connection, and waits a moment for the client's
/// close so that the socket ends cleanly. An upgrade that fails, or a client that goes
/// meanwhile, ends it quietly.
async fn tell_and_close(on_upgrade: OnUpgrade, frame: String, close: CloseFrame) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "an in-band placement's upgrade did not complete");
            return;
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(MAX_CLIENT_FRAME)
        .max_message_size(Some(MAX_CLIENT_FRAME))
        .max_frame_size(Some(MAX_CLIENT_FRAME));
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let telling = async {
        socket.send(Message::text(frame)).await?;
        socket.close(Some(close)).await?;
        // Read until the client's close: dropping the socket before it arrives could reset
        // the connection, and with it the frames the client has not read yet.
        while let Some(read) = socket.next().await {
            read?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    match tokio::time::timeout(CLOSE_HANDSHAKE_LIMIT, telling).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "an in-band placement's client went early"),
        Err(_) => tracing::debug!("an in-band placement's client did not close in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_the_documented_json() {
        let redirect = Refusal::Redirect {
            url: "ws://10.0.0.2:5001/ws?room=1",
            reason: Some(RedirectReason::Full),
        };
        assert_eq!(
            redirect.to_json(),
            r#"{"type":"redirect","url":"ws://10.0.0.2:5001/ws?room=1","reason":"full"}"#
        );
        assert_eq!(redirect.close_reason(), redirect.to_json());
        assert_eq!(redirect.close_code(), 4000);
        assert_eq!(
            Refusal::UNAVAILABLE.to_json(),
            r#"{"type":"unavailable","retry_after_ms":5000}"#
        );
        assert_eq!(
            Refusal::UNAVAILABLE.close_reason(),
            Refusal::UNAVAILABLE.to_json()
        );
        assert_eq!(Refusal::UNAVAILABLE.close_code(), 4001);
    }

    #[test]
    fn the_first_offered_subprotocol_is_selected() {
        let offering = |protocols: Option<&str>| {
            let mut request = Request::get("/ws");
            if let Some(protocols) = protocols {
                request = request.header(SEC_WEBSOCKET_PROTOCOL, protocols);
            }
            first_protocol(&request.body(()).unwrap())
        };
        assert_eq!(offering(Some(" chat.v2 , chat.v1")).unwrap(), "chat.v2");
        assert_eq!(offering(Some("chat")).unwrap(), "chat");
        assert!(offering(Some(" , ")).is_none());
        assert!(offering(None).is_none());
    }

    #[test]
    fn the_close_reason_fits_123_bytes_as_valid_json() {
        // Just fits with the reason; fits only without it; fits not even without it.
        let fits = format!("wss://{}/ws", "a".repeat(65));
        let without_reason = format!("wss://{}/ws", "a".repeat(80));
        let long = format!("wss://{}/ws", "a".repeat(1000));
        let with_token = format!("wss://node-2.example/ws?token={}", "t".repeat(200));
        for (url, expected) in [
            (
                with_token.as_str(),
                serde_json::json!({"type": "redirect", "url": "wss://node-2.example/ws"}),
            ),
            (
                fits.as_str(),
                serde_json::json!({"type": "redirect", "url": fits, "reason": "draining"}),
            ),
            (
                without_reason.as_str(),
                serde_json::json!({"type": "redirect", "url": without_reason}),
            ),
            (long.as_str(), serde_json::json!({"type": "redirect"})),
        ] {
            let refusal = Refusal::Redirect {
                url,
                reason: Some(RedirectReason::Draining),
            };
            let reason = refusal.close_reason();
            assert!(reason.len() <= MAX_CLOSE_REASON, "{} bytes", reason.len());
            let json: serde_json::Value = serde_json::from_str(&reason).unwrap();
            assert_eq!(json, expected);
        }
    }
}
