//! The node program (`examples/node.rs`) as a real process: started on a free loopback port
//! with its log in a file, waited for until it answers, signalled, and killed when dropped.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::BoxError;
use crate::servers::{amqp_url, redis_url};

/// How a node program is started.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The cluster prefix (`--prefix`).
    pub prefix: String,
    /// Whether it runs on the real Redis and RabbitMQ (`--redis`, `--amqp`) rather than the
    /// embedded backends.
    pub servers: bool,
    /// `--heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// Further arguments, as given.
    pub args: Vec<String>,
    /// `RUST_LOG` of the process.
    pub log_filter: String,
    /// Further environment variables of the process (`HYBRID_CLUSTER_SECRET`, say).
    pub env: Vec<(String, String)>,
}

impl NodeOptions {
    /// On the real servers, under `prefix`, with a 200 ms heartbeat and `info` logs.
    pub fn servers(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            servers: true,
            heartbeat_ms: 200,
            args: Vec::new(),
            log_filter: "info".to_owned(),
            env: Vec::new(),
        }
    }

    /// Adds `--flag value`.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }
}

/// A running node program; killed (SIGKILL) when dropped if it is still running.
#[derive(Debug)]
pub struct NodeProgram {
    /// Its `--node-id`.
    pub id: String,
    /// The port it serves on.
    pub port: u16,
    child: Child,
    log: PathBuf,
}

/// Where the node program was built: next to the running test or benchmark binary
/// (`target/<profile>/examples/node`), unless `HC_NODE_BINARY` names it.
pub fn node_binary() -> Result<PathBuf, BoxError> {
    if let Ok(path) = std::env::var("HC_NODE_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<binary>
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("the running binary is not in a cargo target directory")?;
    let node = profile.join("examples").join("node");
    if !node.exists() {
        return Err(format!(
            "{} is not built: `cargo build --example node` (add --release for benchmarks), or set HC_NODE_BINARY",
            node.display()
        )
        .into());
    }
    Ok(node)
}

/// Builds the node program in release (`cargo build --release --example node` in
/// `workspace`, with `cargo`), for benchmarks; nothing when `HC_NODE_BINARY` names one.
pub fn build_release_node_program(cargo: &str, workspace: &str) -> Result<(), BoxError> {
    if std::env::var_os("HC_NODE_BINARY").is_some() {
        return Ok(());
    }
    eprintln!("building the node program (cargo build --release --example node)");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--example", "node", "--quiet"])
        .current_dir(workspace)
        .status()?;
    if !status.success() {
        return Err(format!("building the node program failed: {status}").into());
    }
    Ok(())
}

impl NodeProgram {
    /// Starts a node `id` and waits until it answers `/healthz` (at most 30 s).
    pub async fn start(id: &str, options: &NodeOptions) -> Result<Self, BoxError> {
        let binary = node_binary()?;
        let mut last_error = None;
        // A free port is found by binding and letting go; another process may take it
        // meanwhile, so a node that cannot bind is started again on another one.
        for _ in 0..3 {
            let port = free_port()?;
            let log = std::env::temp_dir().join(format!("{}-{id}-{port}.log", options.prefix));
            let log_file = std::fs::File::create(&log)?;
            let mut command = Command::new(&binary);
            command
                .args(["--node-id", id, "--port", &port.to_string()])
                .args(["--prefix", &options.prefix])
                .args(["--heartbeat-ms", &options.heartbeat_ms.to_string()])
                .args(&options.args)
                .env("RUST_LOG", &options.log_filter)
                .envs(options.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .kill_on_drop(true);
            if options.servers {
                command.args(["--redis", &redis_url(), "--amqp", &amqp_url()]);
            }
            let child = command.spawn()?;
            let mut node = Self {
                id: id.to_owned(),
                port,
                child,
                log,
            };
            match node.wait_healthy(Duration::from_secs(30)).await {
                Ok(()) => return Ok(node),
                Err(error) => last_error = Some(format!("{error}\n{}", node.log_tail(20))),
            }
        }
        Err(format!(
            "node {id} did not start: {}",
            last_error.unwrap_or_default()
        )
        .into())
    }

    /// Its WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait_healthy(&mut self, bound: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("it exited with {status}").into());
            }
            if let Ok((200, _)) = self.get("/healthz").await {
                return Ok(());
            }
            sleep(Duration::from_millis(50)).await;
        }
        Err("it did not answer /healthz in time".into())
    }

    /// A plain HTTP/1.1 GET of `path`: the status and the body.
    pub async fn get(&self, path: &str) -> Result<(u16, String), BoxError> {
        http_get(self.port, path).await
    }

    /// Waits until the node sees `count` nodes (its `/cluster/nodes`).
    pub async fn wait_for_nodes(&self, count: usize, bound: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + bound;
        loop {
            let (_, body) = self.get("/cluster/nodes").await?;
            let nodes: serde_json::Value = serde_json::from_str(&body)?;
            let seen = nodes.as_array().map(Vec::len).unwrap_or(0);
            if seen == count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} sees {seen} nodes, not {count}", self.id).into());
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends the process `signal` (`TERM`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, signal: &str) -> Result<(), BoxError> {
        let pid = self.pid().ok_or("the node has exited")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            return Err(format!("kill -{signal} {pid} failed: {status}").into());
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `bound`.
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        timeout(bound, self.child.wait()).await.ok()?.ok()
    }

    /// Its log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its resident memory, in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        crate::process::rss_kib(self.pid()?)
    }

    /// Its open file descriptors (Linux).
    pub fn open_fds(&self) -> Option<usize> {
        crate::process::open_fds(self.pid()?)
    }
}

impl Drop for NodeProgram {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // A failed test's node logs stay, for reading.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn free_port() -> Result<u16, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain HTTP/1.1 GET on a loopback port: the status and the body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), BoxError> {
    http_request(port, "GET", path, &[], "").await
}

/// A plain HTTP/1.1 request on a loopback port, with `headers` and `body`: the status and the
/// body of the answer.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), BoxError> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, BoxError>(response)
    };
    let response = timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{method} {path} on port {port} took over 10 s"))??;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("an HTTP response without a head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("an HTTP response without a status")?;
    Ok((status, body.to_owned()))
}

/// Starts `count` node programs `{name}-0`, `{name}-1`… with `options`, and waits until each
/// sees them all (each within `bound`), for benchmarks.
pub async fn start_programs(
    name: &str,
    count: usize,
    options: &NodeOptions,
    bound: Duration,
) -> Result<Vec<NodeProgram>, BoxError> {
    let mut nodes = Vec::with_capacity(count);
    for i in 0..count {
        nodes.push(NodeProgram::start(&format!("{name}-{i}"), options).await?);
    }
    for node in &nodes {
        node.wait_for_nodes(count, bound).await?;
    }
    Ok(nodes)
}

/// Stops node programs as a deployment would (SIGTERM, each given `bound` to exit, killed
/// past it), then removes whatever their cluster `prefix` left in Redis and RabbitMQ.
pub async fn stop_programs(mut nodes: Vec<NodeProgram>, prefix: &str, bound: Duration) {
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    for node in &nodes {
        let _ = node.signal("TERM");
    }
    for node in &mut nodes {
        let _ = node.wait_exit(bound).await;
    }
    drop(nodes);
    crate::servers::remove_cluster(prefix, &ids).await;
}

/// Node programs started by one test under a cluster prefix of its own. On drop, paused
/// nodes are resumed and every node is killed, RabbitMQ is started again if a test left it
/// stopped, and whatever the cluster left in Redis and RabbitMQ is removed.
#[derive(Debug)]
pub struct NodeCluster {
    /// The cluster prefix.
    pub prefix: String,
    /// The nodes, in the order started.
    pub nodes: Vec<NodeProgram>,
    /// Every node id ever started (for cleanup, killed ones included).
    ids: Vec<String>,
}

impl NodeCluster {
    /// An empty cluster under a prefix of its own, `{what}-{random}`.
    pub fn new(what: &str) -> Self {
        Self {
            prefix: crate::servers::unique_prefix(what),
            nodes: Vec::new(),
            ids: Vec::new(),
        }
    }

    /// The options of a node of this cluster on the real servers, for `configure` to adjust.
    pub fn options(&self) -> NodeOptions {
        NodeOptions::servers(&self.prefix)
    }

    /// Starts node `id` with `options`; returns its index. Panics (with its log) when it does
    /// not start.
    pub async fn start(&mut self, id: &str, options: &NodeOptions) -> usize {
        let node = NodeProgram::start(id, options)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.ids.push(node.id.clone());
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until every node sees `count` nodes.
    pub async fn wait_for_nodes(&self, count: usize, bound: Duration) {
        for node in &self.nodes {
            node.wait_for_nodes(count, bound)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", self.logs(25)));
        }
    }

    /// The name of node `index`'s queue in RabbitMQ.
    pub fn queue(&self, index: usize) -> String {
        format!("{}:node:{}", self.prefix, self.nodes[index].id)
    }

    /// The last `lines` lines of every node's log, for a failure message.
    pub fn logs(&self, lines: usize) -> String {
        let mut logs = String::new();
        for node in &self.nodes {
            logs.push_str(&format!("--- {} ---\n{}\n", node.id, node.log_tail(lines)));
        }
        logs
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = node.signal("CONT");
        }
        self.nodes.clear();
        let prefix = self.prefix.clone();
        let ids = std::mem::take(&mut self.ids);
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                crate::rabbitmq::ensure_running().await;
                crate::servers::remove_cluster(&prefix, &ids).await;
            });
        });
        let _ = cleaning.join();
    }
}
