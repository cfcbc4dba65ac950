//! A WebSocket client of the node program's JSON protocol.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::BoxError;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One client: its socket, and the connection id and node its welcome named.
#[derive(Debug)]
pub struct Client {
    socket: Socket,
    /// Its connection id.
    pub id: String,
    /// The node it is connected to.
    pub node: String,
    /// The token of its session, when the node gives sessions.
    pub session: Option<String>,
    /// The user its welcome named, when its upgrade carried a token.
    pub user: Option<String>,
}

/// What came instead of a text frame.
#[derive(Debug)]
pub enum Ended {
    /// The server closed the connection with this frame.
    Closed(Option<CloseFrame>),
    /// The stream ended or failed without a close frame.
    Dropped,
}

impl Client {
    /// Connects to `url` and reads its welcome (bounded by 30 s).
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let (socket, _) = timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .map_err(|_| format!("connecting to {url} took over 30 s"))??;
        Self::welcomed(socket).await
    }

    /// Connects with a small receive buffer (`recv_buffer` bytes), so that not reading
    /// stalls the server's writes soon.
    pub async fn connect_small(url: &str, port: u16, recv_buffer: u32) -> Result<Self, BoxError> {
        let tcp = TcpSocket::new_v4()?;
        tcp.set_recv_buffer_size(recv_buffer)?;
        let stream = tcp.connect(([127, 0, 0, 1], port).into()).await?;
        let (socket, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
        Self::welcomed(socket).await
    }

    async fn welcomed(socket: Socket) -> Result<Self, BoxError> {
        let mut client = Self {
            socket,
            id: String::new(),
            node: String::new(),
            session: None,
            user: None,
        };
        let welcome = client
            .next_json(Duration::from_secs(30))
            .await?
            .map_err(|ended| format!("no welcome: {ended:?}"))?;
        if welcome["type"] != "welcome" {
            return Err(format!("expected a welcome, got {welcome}").into());
        }
        client.id = welcome["connection_id"]
            .as_str()
            .ok_or("a welcome without connection_id")?
            .to_owned();
        client.node = welcome["node_id"]
            .as_str()
            .ok_or("a welcome without node_id")?
            .to_owned();
        client.session = welcome["session"].as_str().map(str::to_owned);
        client.user = welcome["user"].as_str().map(str::to_owned);
        Ok(client)
    }

    /// Sends `ops`, one frame each, in one flush.
    pub async fn send_all(&mut self, ops: &[Value]) -> Result<(), BoxError> {
        for op in ops {
            self.socket.feed(Message::text(op.to_string())).await?;
        }
        self.socket.flush().await?;
        Ok(())
    }

    /// Sends `count` binary frames of `bytes`, in one flush.
    pub async fn send_binary(&mut self, bytes: &[u8], count: usize) -> Result<(), BoxError> {
        for _ in 0..count {
            self.socket.feed(Message::binary(bytes.to_vec())).await?;
        }
        self.socket.flush().await?;
        Ok(())
    }

    /// Sends one op.
    pub async fn send(&mut self, op: &Value) -> Result<(), BoxError> {
        self.send_all(std::slice::from_ref(op)).await
    }

    /// The next text frame as JSON, skipping pings and pongs, or how the stream ended;
    /// an error when nothing came within `bound` or the frame is not JSON.
    pub async fn next_json(&mut self, bound: Duration) -> Result<Result<Value, Ended>, BoxError> {
        loop {
            let frame = timeout(bound, self.socket.next())
                .await
                .map_err(|_| format!("{}: nothing arrived within {bound:?}", self.id))?;
            return Ok(match frame {
                Some(Ok(Message::Text(text))) => Ok(serde_json::from_str(text.as_str())
                    .map_err(|e| format!("{}: not JSON ({e}): {text}", self.id))?),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(format!("{}: a binary frame", self.id).into());
                }
                Some(Ok(Message::Close(frame))) => Err(Ended::Closed(frame)),
                Some(Err(_)) | None => Err(Ended::Dropped),
            });
        }
    }

    /// Closes the connection (a close frame, then the socket).
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(5), self.socket.close(None)).await;
    }

    /// Closes the connection with `code` (1000 ends a session, 1001 keeps it).
    pub async fn close_with(mut self, code: u16) {
        let frame = CloseFrame {
            code: code.into(),
            reason: "".into(),
        };
        let _ = timeout(Duration::from_secs(5), self.socket.close(Some(frame))).await;
    }

    /// Drops the connection without a close frame, as a lost network does.
    pub fn abort(self) {
        drop(self.socket);
    }
}
