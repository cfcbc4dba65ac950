//! A real headless Chromium: `CHROMIUM` if set, else `chromium` on the path
//! (`./scripts/test.sh` installs Debian's package when it is missing).
//!
//! Two ways to drive it:
//! - [`dump_dom`]: load a page, let its scripts run for a virtual time budget, and take the
//!   DOM as HTML (one shot: for a page that renders and is done);
//! - [`Browser`]: a browser kept running, driven through the DevTools protocol, whose pages a
//!   test evaluates JavaScript in, awaiting the promises a page returns (for a page that
//!   lives through what the test does meanwhile: a node drained under it, say).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::BoxError;

/// The Chromium binary: `CHROMIUM` if set, else `chromium` on the path.
pub fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned())
}

/// The flags of every run: headless, nothing a test does not ask for (no sync, no updates, no
/// QUIC), and no sandbox (tests run as root in containers).
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// A profile directory of its own for one run, removed when dropped.
#[derive(Debug)]
struct Profile(PathBuf);

impl Profile {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        Self(std::env::temp_dir().join(format!("hc-chromium-{}-{nanos:08x}", std::process::id())))
    }

    fn flag(&self) -> String {
        format!("--user-data-dir={}", self.0.display())
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cannot_run(error: std::io::Error) -> BoxError {
    format!(
        "cannot run {} ({error}): run ./scripts/test.sh, which installs it, or set CHROMIUM",
        chromium()
    )
    .into()
}

/// Loads `url`, lets its scripts run for `budget` of virtual time, and returns the DOM as
/// HTML (Chromium's `--dump-dom`).
pub async fn dump_dom(url: &str, budget: Duration) -> Result<String, BoxError> {
    let profile = Profile::new();
    let output = Command::new(chromium())
        .args(FLAGS)
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(profile.flag())
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(cannot_run)?;
    if !output.status.success() {
        return Err(format!(
            "chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running headless Chromium, driven through the DevTools protocol; killed when dropped.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    devtools: Socket,
    next_id: u64,
    /// Events read while awaiting an answer, for a later [`Browser::event`].
    events: VecDeque<Value>,
    /// What Chromium wrote to stderr, for failure messages.
    stderr: Arc<StderrLog>,
    _profile: Profile,
}

/// A page open in a [`Browser`]: the DevTools session attached to it.
#[derive(Clone, Debug)]
pub struct Page {
    session: String,
}

impl Browser {
    /// Starts Chromium with a DevTools port of its own, and connects to it.
    pub async fn launch() -> Result<Self, BoxError> {
        let profile = Profile::new();
        let mut child = Command::new(chromium())
            .args(FLAGS)
            .arg("--remote-debugging-port=0")
            .arg(profile.flag())
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(cannot_run)?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Arc::new(StderrLog::default());
        let (url_tx, url_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(read_stderr(stderr, Arc::clone(&log), url_tx));
        let url = match timeout(Duration::from_secs(20), url_rx).await {
            Ok(Ok(url)) => url,
            _ => {
                return Err(
                    format!("chromium did not open its DevTools port:\n{}", log.text()).into(),
                );
            }
        };
        let (devtools, _) = connect_async(url.as_str()).await?;
        Ok(Self {
            child,
            devtools,
            next_id: 1,
            events: VecDeque::new(),
            stderr: log,
            _profile: profile,
        })
    }

    /// Opens a new tab on `url` and waits until it has loaded (its `load` event).
    pub async fn open(&mut self, url: &str) -> Result<Page, BoxError> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target_id = target["targetId"].as_str().ok_or("no targetId")?.to_owned();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await?;
        let page = Page {
            session: attached["sessionId"]
                .as_str()
                .ok_or("no sessionId")?
                .to_owned(),
        };
        self.call(Some(&page), "Page.enable", json!({})).await?;
        self.call(Some(&page), "Runtime.enable", json!({})).await?;
        self.call(Some(&page), "Page.navigate", json!({"url": url}))
            .await?;
        self.event(&page, "Page.loadEventFired").await?;
        Ok(page)
    }

    /// Evaluates `expression` in `page`, awaits the promise it returns (if it does), and
    /// returns its value as JSON; a thrown exception or a rejected promise is an error.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Result<Value, BoxError> {
        let result = self
            .call(
                Some(page),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("the page threw: {exception}").into());
        }
        Ok(result["result"]["value"].clone())
    }

    /// What Chromium wrote to stderr so far, and whether it is still running.
    pub fn diagnostics(&mut self) -> String {
        let running = matches!(self.child.try_wait(), Ok(None));
        format!(
            "chromium {}; its stderr:\n{}",
            if running { "runs" } else { "exited" },
            self.stderr.text()
        )
    }

    /// Sends one DevTools command and returns its result; events read meanwhile are kept.
    async fn call(
        &mut self,
        page: Option<&Page>,
        method: &str,
        params: Value,
    ) -> Result<Value, BoxError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(page) = page {
            command["sessionId"] = json!(page.session);
        }
        self.devtools
            .send(Message::text(command.to_string()))
            .await?;
        loop {
            let message = self.read().await?;
            if message["id"] == json!(id) {
                if let Some(error) = message.get("error") {
                    return Err(format!("{method} failed: {error}").into());
                }
                return Ok(message["result"].clone());
            }
            if message.get("method").is_some() {
                self.events.push_back(message);
            }
            // Answers to commands whose caller stopped waiting (a test's timeout) are dropped.
        }
    }

    /// Waits for the event `method` of `page`.
    async fn event(&mut self, page: &Page, method: &str) -> Result<Value, BoxError> {
        let of_page = |event: &Value| {
            event["method"] == json!(method) && event["sessionId"] == json!(page.session)
        };
        if let Some(at) = self.events.iter().position(of_page) {
            return Ok(self.events.remove(at).unwrap_or_default());
        }
        loop {
            let message = self.read().await?;
            if of_page(&message) {
                return Ok(message);
            }
        }
    }

    async fn read(&mut self) -> Result<Value, BoxError> {
        loop {
            match self.devtools.next().await {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(_))) | None => {
                    return Err("chromium closed its DevTools connection".into());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
            }
        }
    }
}

/// Reads Chromium's stderr into `log` until it ends, sending the DevTools URL once seen.
async fn read_stderr(
    stderr: tokio::process::ChildStderr,
    log: Arc<StderrLog>,
    url: tokio::sync::oneshot::Sender<String>,
) {
    let mut url = Some(url);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(found) = line.strip_prefix("DevTools listening on ")
            && let Some(url) = url.take()
        {
            let _ = url.send(found.trim().to_owned());
        }
        log.push(line);
    }
}

/// Chromium's stderr, its latest 200 lines, shared between the task that reads it and the
/// test (the lock is never held across an await).
#[derive(Debug, Default)]
struct StderrLog(parking_lot::Mutex<VecDeque<String>>);

impl StderrLog {
    fn push(&self, line: String) {
        let mut lines = self.0.lock();
        if lines.len() >= 200 {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn text(&self) -> String {
        let lines = self.0.lock();
        lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}
