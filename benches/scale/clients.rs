//! The clients, in child processes of their own (`scale --child …`: one process holds at
//! most `CLIENTS_PER_PROCESS` sockets, under the machine's open-file limit), each driving its
//! share of the traffic among its own clients (spread evenly over every node, so that a
//! node sees the same mix as from one process) and answering the parent's commands on
//! stdin, one JSON line on stdout each:
//!
//! - at start it connects its clients and says `{"connected":SECONDS}`;
//! - `join`: each client joins its groups; `{"joined":SECONDS}` once every join is answered;
//! - `go`: the traffic starts; `reset`: the tally starts anew; `report`: the tally;
//! - `stop`: the traffic stops, the answers still due are awaited; `{"unanswered":N}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{self, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::limits::raise_open_files;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Args, WAIT};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The most sockets one client process holds.
pub(crate) const CLIENTS_PER_PROCESS: usize = 15_000;

/// The `data` of every message: 64 bytes.
const DATA: &str = "scale-0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

/// Clients connecting at once.
const CONNECT_CONCURRENCY: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Unicast,
    Group,
    Broadcast,
    Join,
    Leave,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::Unicast,
        Kind::Group,
        Kind::Broadcast,
        Kind::Join,
        Kind::Leave,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Unicast => "unicast",
            Kind::Group => "group message",
            Kind::Broadcast => "broadcast",
            Kind::Join => "join",
            Kind::Leave => "leave",
        }
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

pub(crate) struct KindTally {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Answer latencies, µs.
    pub(crate) latency: Histogram<u64>,
}

impl Default for KindTally {
    fn default() -> Self {
        Self {
            sent: 0,
            acked: 0,
            errors: BTreeMap::new(),
            latency: histogram(),
        }
    }
}

/// What clients saw.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) kinds: HashMap<Kind, KindTally>,
    /// Frames delivered to clients, by `type`.
    pub(crate) received: BTreeMap<String, u64>,
    /// Connections that ended before the run did.
    pub(crate) ended: u64,
}

impl Tally {
    /// As one JSON line for the parent.
    fn to_json(&self) -> Value {
        let kinds: serde_json::Map<String, Value> = self
            .kinds
            .iter()
            .map(|(kind, k)| {
                let latency: Vec<[u64; 2]> = k
                    .latency
                    .iter_recorded()
                    .map(|v| [v.value_iterated_to(), v.count_at_value()])
                    .collect();
                (
                    kind.name().to_owned(),
                    json!({"sent":k.sent,"acked":k.acked,"errors":k.errors,"latency":latency}),
                )
            })
            .collect();
        json!({"kinds":kinds,"received":self.received,"ended":self.ended})
    }

    /// Adds a child's tally (as [`to_json`](Tally::to_json) wrote it).
    pub(crate) fn merge(&mut self, child: &Value) {
        for kind in Kind::ALL {
            let Some(k) = child["kinds"].get(kind.name()) else {
                continue;
            };
            let entry = self.kinds.entry(kind).or_default();
            entry.sent += k["sent"].as_u64().unwrap_or(0);
            entry.acked += k["acked"].as_u64().unwrap_or(0);
            for (code, n) in k["errors"].as_object().into_iter().flatten() {
                *entry.errors.entry(code.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
            for pair in k["latency"].as_array().into_iter().flatten() {
                let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                    continue;
                };
                let _ = entry.latency.record_n(value, count);
            }
        }
        for (kind, n) in child["received"].as_object().into_iter().flatten() {
            *self.received.entry(kind.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        self.ended += child["ended"].as_u64().unwrap_or(0);
    }
}

/// One client connection, as the driver sees it.
struct Conn {
    id: String,
    requests: mpsc::UnboundedSender<(Kind, Value)>,
}

/// The shared counters of every client task.
struct Shared {
    tally: Mutex<Tally>,
    next_id: AtomicU64,
    /// Requests sent and not yet answered, over all clients.
    pending: AtomicU64,
}

fn say(line: &Value) {
    println!("{line}");
}

/// A child process: `args` are its share (its connections and rates).
pub(crate) async fn child(args: Args) -> Result<(), BoxError> {
    raise_open_files(args.connections as u64 + 1_024);
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        next_id: AtomicU64::new(1),
        pending: AtomicU64::new(0),
    });
    let started = Instant::now();
    let conns = connect_all(&args.urls, args.connections, &shared).await?;
    say(&json!({"connected": started.elapsed().as_secs_f64()}));
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut memberships = Vec::new();
    let mut traffic = None;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(command) = commands.next_line().await? {
        match command.trim() {
            "join" => {
                let joining = Instant::now();
                memberships = join_all(&args, &conns, &mut rng);
                settle(&shared, WAIT).await?;
                say(&json!({"joined": joining.elapsed().as_secs_f64()}));
            }
            "go" => {
                let targets = conns
                    .iter()
                    .map(|c| (c.id.clone(), c.requests.clone()))
                    .collect();
                let memberships = std::mem::take(&mut memberships);
                let rng = StdRng::seed_from_u64(rng.random());
                traffic = Some(tokio::spawn(drive(args.clone(), targets, memberships, rng)));
                say(&json!({"driving": true}));
            }
            "reset" => {
                *shared.tally.lock() = Tally::default();
                say(&json!({"reset": true}));
            }
            "report" => say(&shared.tally.lock().to_json()),
            _ => {
                if let Some(traffic) = traffic.take() {
                    traffic.abort();
                }
                let _ = settle(&shared, Duration::from_secs(30)).await;
                say(&json!({"unanswered": shared.pending.load(Ordering::Relaxed)}));
                break;
            }
        }
    }
    Ok(())
}

fn group_name(group: u32) -> String {
    format!("g-{group}")
}

/// Every client joins `memberships` groups drawn at random; what each joined.
fn join_all(args: &Args, conns: &[Conn], rng: &mut StdRng) -> Vec<Vec<u32>> {
    let mut memberships = Vec::with_capacity(conns.len());
    for conn in conns {
        let mut mine = Vec::with_capacity(args.memberships);
        while mine.len() < args.memberships.min(args.groups) {
            let group = rng.random_range(0..args.groups as u32);
            if !mine.contains(&group) {
                mine.push(group);
                let _ = conn
                    .requests
                    .send((Kind::Join, json!({"op":"join","group":group_name(group)})));
            }
        }
        memberships.push(mine);
    }
    memberships
}

/// Connects `count` clients, evenly over `urls`, and starts a task for each.
async fn connect_all(
    urls: &[String],
    count: usize,
    shared: &Arc<Shared>,
) -> Result<Vec<Conn>, BoxError> {
    let opened: Vec<Result<(Ws, String), BoxError>> = stream::iter(0..count)
        .map(|i| connect(urls[i % urls.len()].clone()))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut conns = Vec::with_capacity(opened.len());
    for opened in opened {
        let (ws, id) = opened?;
        let (requests, inbox) = mpsc::unbounded_channel();
        let (sink, frames) = ws.split();
        tokio::spawn(client(sink, frames, inbox, Arc::clone(shared)));
        conns.push(Conn { id, requests });
    }
    Ok(conns)
}

/// Connects to `url` and reads the welcome, following an in-band redirect (a few at most).
async fn connect(mut url: String) -> Result<(Ws, String), BoxError> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    for _ in 0..4 {
        let (mut ws, _) = timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(&url, Some(config), true),
        )
        .await??;
        let first = loop {
            match timeout(WAIT, ws.next()).await? {
                Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text)?,
                Some(Ok(Message::Close(close))) => return Err(format!("closed: {close:?}").into()),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Err("the connection ended before its welcome".into()),
            }
        };
        match first["type"].as_str() {
            Some("welcome") => {
                let id = first["connection_id"]
                    .as_str()
                    .ok_or("a welcome without a connection id")?;
                return Ok((ws, id.to_owned()));
            }
            Some("redirect") => {
                url = first["url"]
                    .as_str()
                    .ok_or("a redirect without a url")?
                    .to_owned();
                let _ = ws.close(None).await;
            }
            _ => return Err(format!("unexpected first frame: {first}").into()),
        }
    }
    Err("redirected too many times".into())
}

/// One client: sends what the driver asks, with a fresh `id`, and takes every frame.
async fn client(
    mut sink: SplitSink<Ws, Message>,
    mut frames: SplitStream<Ws>,
    mut requests: mpsc::UnboundedReceiver<(Kind, Value)>,
    shared: Arc<Shared>,
) {
    let mut pending: HashMap<u64, (Kind, Instant)> = HashMap::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((kind, mut op)) = request else { break };
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                op["id"] = json!(id);
                pending.insert(id, (kind, Instant::now()));
                shared.pending.fetch_add(1, Ordering::Relaxed);
                shared.tally.lock().kinds.entry(kind).or_default().sent += 1;
                if sink.send(Message::text(op.to_string())).await.is_err() {
                    break;
                }
            }
            frame = frames.next() => match frame {
                Some(Ok(Message::Text(text))) => take(&text, &mut pending, &shared),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    shared
        .pending
        .fetch_sub(pending.len() as u64, Ordering::Relaxed);
    shared.tally.lock().ended += 1;
}

/// Takes one frame from the server: an answer to a request, or a delivery.
fn take(text: &str, pending: &mut HashMap<u64, (Kind, Instant)>, shared: &Shared) {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        *shared
            .tally
            .lock()
            .received
            .entry("not JSON".to_owned())
            .or_default() += 1;
        return;
    };
    let kind = frame["type"].as_str().unwrap_or("?");
    match kind {
        "ack" | "error" => {
            let Some((request, sent)) = frame["id"].as_u64().and_then(|id| pending.remove(&id))
            else {
                return;
            };
            shared.pending.fetch_sub(1, Ordering::Relaxed);
            let mut tally = shared.tally.lock();
            let entry = tally.kinds.entry(request).or_default();
            match frame["code"].as_str().filter(|_| kind == "error") {
                None => entry.acked += 1,
                Some(code) => *entry.errors.entry(code.to_owned()).or_default() += 1,
            }
            let micros = (sent.elapsed().as_micros() as u64).clamp(1, 120_000_000);
            let _ = entry.latency.record(micros);
        }
        "joined" | "left" => {}
        other => {
            *shared
                .tally
                .lock()
                .received
                .entry(other.to_owned())
                .or_default() += 1;
        }
    }
}

/// Waits until every request sent is answered.
async fn settle(shared: &Shared, bound: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + bound;
    while shared.pending.load(Ordering::Relaxed) > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} requests still unanswered after {bound:?}",
                shared.pending.load(Ordering::Relaxed)
            )
            .into());
        }
        sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The traffic: every 10 ms, the requests of each kind its rate owes by then.
async fn drive(
    args: Args,
    conns: Vec<(String, mpsc::UnboundedSender<(Kind, Value)>)>,
    mut memberships: Vec<Vec<u32>>,
    mut rng: StdRng,
) {
    let mut ticks = interval(Duration::from_millis(10));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let rates = [
        (Kind::Unicast, args.unicast),
        (Kind::Group, args.group),
        (Kind::Broadcast, args.broadcasts),
        (Kind::Join, args.churn),
    ];
    let mut owed = [0.0f64; 4];
    let mut last = Instant::now();
    let n = conns.len();
    if n < 2 || memberships.len() != n {
        return;
    }
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let elapsed = now.duration_since(last).as_secs_f64();
        last = now;
        for (i, (kind, rate)) in rates.iter().enumerate() {
            owed[i] += rate * elapsed;
            while owed[i] >= 1.0 {
                owed[i] -= 1.0;
                let from = rng.random_range(0..n);
                let op = match kind {
                    Kind::Unicast => {
                        let to = (from + rng.random_range(1..n)) % n;
                        json!({"op":"send","to":conns[to].0,"data":DATA})
                    }
                    Kind::Group => {
                        let mine = &memberships[from];
                        let group = mine[rng.random_range(0..mine.len())];
                        json!({"op":"group","group":group_name(group),"data":DATA})
                    }
                    Kind::Broadcast => json!({"op":"broadcast","data":DATA}),
                    _ => {
                        let mine = &mut memberships[from];
                        let slot = rng.random_range(0..mine.len());
                        let old = mine[slot];
                        let new = loop {
                            let g = rng.random_range(0..args.groups as u32);
                            if !mine.contains(&g) {
                                break g;
                            }
                        };
                        mine[slot] = new;
                        let leave = json!({"op":"leave","group":group_name(old)});
                        let _ = conns[from].1.send((Kind::Leave, leave));
                        json!({"op":"join","group":group_name(new)})
                    }
                };
                let _ = conns[from].1.send((*kind, op));
            }
        }
    }
}
