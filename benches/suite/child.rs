//! Child processes: the servers whose resources must not be shared with the clients (their
//! own open-file limit, their own memory to measure).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use hybrid_cluster::ClusterPrefix;
use hybrid_cluster_test_support::BoxError;
use tokio::time::{Instant, timeout};

use crate::serve::WAIT;

/// The example target of `benches/suite/child/main.rs`.
const CHILD_PROGRAM: &str = "suite-child";

/// A child server: the `suite-child` program (see [`child_binary`]). It prints `PORTS p1 p2 …`
/// when serving, and stops (nodes shut down gracefully) when its stdin closes.
pub(crate) struct ChildServer {
    child: Child,
    /// Its answers (taken while a question is asked).
    answers: Option<BufReader<ChildStdout>>,
    ports: Vec<u16>,
}

impl ChildServer {
    /// `count` nodes of the cluster `prefix`.
    pub(crate) async fn nodes(prefix: &ClusterPrefix, count: usize) -> Result<Self, BoxError> {
        Self::spawn(vec![
            "nodes".to_owned(),
            prefix.to_string(),
            count.to_string(),
        ])
        .await
    }

    /// `count` nodes of the cluster `prefix`, with sessions.
    pub(crate) async fn nodes_with_sessions(
        prefix: &ClusterPrefix,
        count: usize,
    ) -> Result<Self, BoxError> {
        Self::spawn(vec![
            "nodes".to_owned(),
            prefix.to_string(),
            count.to_string(),
            "--sessions".to_owned(),
        ])
        .await
    }

    /// A raw tokio-tungstenite echo server with `buffers` (`4k` or `default`).
    pub(crate) async fn raw(buffers: &str) -> Result<Self, BoxError> {
        Self::spawn(vec!["raw".to_owned(), buffers.to_owned()]).await
    }

    async fn spawn(args: Vec<String>) -> Result<Self, BoxError> {
        let mode = args.join(" ");
        let mut child = Command::new(child_binary()?)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let reading = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let mut answers = BufReader::new(stdout);
            answers.read_line(&mut line).map(|_| (line, answers))
        });
        let (line, answers) = match timeout(Duration::from_secs(60), reading).await {
            Ok(Ok(Ok(read))) => read,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the child server `{mode}` did not start: {other:?}").into());
            }
        };
        let ports: Vec<u16> = line
            .strip_prefix("PORTS ")
            .map(|ports| {
                ports
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ports.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the child server `{mode}` said {line:?}").into());
        }
        Ok(Self {
            child,
            answers: Some(answers),
            ports,
        })
    }

    /// Asks the child `question` (a line on its stdin) and returns its answer line.
    pub(crate) async fn ask(&mut self, question: &str) -> Result<String, BoxError> {
        let (mut stdin, mut answers) = match (self.child.stdin.take(), self.answers.take()) {
            (Some(stdin), Some(answers)) => (stdin, answers),
            _ => {
                return Err(
                    "the child cannot be asked: an earlier question went unanswered".into(),
                );
            }
        };
        let question = question.to_owned();
        let asking = tokio::task::spawn_blocking(move || {
            writeln!(stdin, "{question}")?;
            stdin.flush()?;
            let mut answer = String::new();
            answers.read_line(&mut answer)?;
            Ok::<_, std::io::Error>((stdin, answers, answer))
        });
        let (stdin, answers, answer) = timeout(WAIT, asking)
            .await
            .map_err(|_| "the child did not answer")???;
        self.child.stdin = Some(stdin);
        self.answers = Some(answers);
        Ok(answer.trim().to_owned())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/ws"))
            .collect()
    }

    /// Closes its stdin and waits for it to exit (killing it after `WAIT`).
    pub(crate) async fn stop(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("the child server did not exit: killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the child program is: `HC_SUITE_CHILD_BINARY`, or the `suite-child` example next to
/// this binary (`target/<profile>/examples/`), built once per run with this binary's profile so
/// that `cargo bench --bench suite` alone is enough.
fn child_binary() -> Result<PathBuf, BoxError> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("HC_SUITE_CHILD_BINARY") {
        return Ok(path.into());
    }
    BUILT
        .get_or_init(|| build_child().map_err(|error| error.to_string()))
        .clone()
        .map_err(Into::into)
}

fn build_child() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<this binary>
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the running binary is not in a cargo target directory")?;
    let target = profile
        .parent()
        .ok_or("the running binary is not in a cargo target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "--example",
            CHILD_PROGRAM,
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target);
    if profile.file_name().is_some_and(|name| name == "release") {
        build.arg("--release");
    }
    if !build.status()?.success() {
        return Err(format!("`cargo build --example {CHILD_PROGRAM}` failed").into());
    }
    Ok(profile.join("examples").join(CHILD_PROGRAM))
}
