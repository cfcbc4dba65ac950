//! A TCP proxy on loopback that a test can cut: every connection through it is dropped at
//! once, and new ones are refused until the cut ends. It stands for a network that fails
//! between a node and a server, for as long as the test says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::BoxError;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The end of the current cut (connections are refused until then); bumping it drops
    /// the open connections.
    cut_until: Arc<watch::Sender<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut_until = Arc::new(watch::Sender::new(None::<Instant>));
        let cuts = Arc::clone(&cut_until);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let cut = *cuts.borrow();
                if cut.is_some_and(|until| Instant::now() < until) {
                    // Refused: closed at once.
                    drop(client);
                    continue;
                }
                let mut cuts = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            cut_until,
            task,
        })
    }

    /// Drops every connection through the proxy now, and refuses new ones for `duration`.
    pub fn cut(&self, duration: Duration) {
        self.cut_until.send_replace(Some(Instant::now() + duration));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
