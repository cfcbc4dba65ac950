//! What is read from the nodes (their `/metrics`, their processes) and from the servers.

use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::node::NodeProgram;
use hybrid_cluster_test_support::process::cpu_ticks;
use hybrid_cluster_test_support::servers::redis_url;

/// One node's counters at one moment.
#[derive(Clone, Default)]
pub(crate) struct NodeSample {
    pub(crate) id: String,
    pub(crate) connections: f64,
    pub(crate) registry_ops: f64,
    /// The Redis commands those round trips cost (see [`REDIS_COMMANDS`]).
    pub(crate) redis_commands: f64,
    pub(crate) registry_events: f64,
    pub(crate) publishes: [f64; 3],
    pub(crate) binds: f64,
    pub(crate) unbinds: f64,
    pub(crate) group_bindings: f64,
    pub(crate) received: f64,
    pub(crate) cpu_ticks: u64,
    pub(crate) rss_mib: f64,
}

/// The Redis commands each registry operation of `RedisRegistry` sends: `put_node` (the
/// heartbeat) is `MULTI`, `SET`, `SADD`, two `PEXPIRE`, `PUBLISH`, `EXEC`; `remove_node`
/// `MULTI`, `DEL`, `SREM`, `PUBLISH`, `EXEC`; `node` `GET` and `PTTL`; the rest one each.
pub(crate) const REDIS_COMMANDS: [(&str, f64); 8] = [
    ("put_node", 7.0),
    ("remove_node", 5.0),
    ("node", 2.0),
    ("nodes", 1.0),
    ("watch", 1.0),
    ("put_route", 1.0),
    ("route", 1.0),
    ("remove_route", 1.0),
];

/// Every node's counters at one moment.
pub(crate) struct Snapshot {
    pub(crate) nodes: Vec<NodeSample>,
}

impl Snapshot {
    pub(crate) async fn take(nodes: &[NodeProgram]) -> Self {
        let mut samples = Vec::new();
        for node in nodes {
            let body = node
                .get("/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            let m = |name: &str, label: Option<&str>| metric(&body, name, label);
            samples.push(NodeSample {
                id: node.id.clone(),
                connections: m("hybrid_cluster_connections", None),
                registry_ops: m("hybrid_cluster_registry_operations_total", None),
                redis_commands: REDIS_COMMANDS
                    .iter()
                    .map(|(op, commands)| {
                        let label = format!("op=\"{op}\"");
                        commands * m("hybrid_cluster_registry_operations_total", Some(&label))
                    })
                    .sum(),
                registry_events: m("hybrid_cluster_registry_events_total", None),
                publishes: [
                    m(
                        "hybrid_cluster_broker_publishes_total",
                        Some("route=\"node\""),
                    ),
                    m(
                        "hybrid_cluster_broker_publishes_total",
                        Some("route=\"group\""),
                    ),
                    m(
                        "hybrid_cluster_broker_publishes_total",
                        Some("route=\"broadcast\""),
                    ),
                ],
                binds: m(
                    "hybrid_cluster_broker_binding_changes_total",
                    Some("change=\"bind\""),
                ),
                unbinds: m(
                    "hybrid_cluster_broker_binding_changes_total",
                    Some("change=\"unbind\""),
                ),
                group_bindings: m("hybrid_cluster_broker_group_bindings", None),
                received: m("hybrid_cluster_messages_received_total", None),
                cpu_ticks: node.pid().and_then(cpu_ticks).unwrap_or(0),
                rss_mib: node.rss_kib().unwrap_or(0) as f64 / 1024.0,
            });
        }
        Self { nodes: samples }
    }

    pub(crate) fn sum(&self, what: &str) -> f64 {
        self.nodes
            .iter()
            .map(|n| match what {
                "bind" => n.binds,
                "group_bindings" => n.group_bindings,
                _ => 0.0,
            })
            .sum()
    }
}

/// The sum of the series of `name` (whose labels contain `label`, when given) in a
/// Prometheus text body.
pub(crate) fn metric(body: &str, name: &str, label: Option<&str>) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| label.is_none_or(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// The bindings of the cluster's exchanges, as RabbitMQ counts them.
pub(crate) fn count_bindings(prefix: &str) -> Option<usize> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_bindings", "-q", "--no-table-headers", "source_name"])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count(),
    )
}

pub(crate) struct RedisInfo {
    pub(crate) commands: u64,
    pub(crate) cpu_seconds: f64,
    pub(crate) used_memory: u64,
}

impl RedisInfo {
    pub(crate) async fn take() -> Result<Self, BoxError> {
        let client = redis::Client::open(redis_url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(&mut connection)
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or("0")
                .trim()
                .to_owned()
        };
        Ok(Self {
            commands: field("total_commands_processed").parse().unwrap_or(0),
            cpu_seconds: field("used_cpu_sys").parse::<f64>().unwrap_or(0.0)
                + field("used_cpu_user").parse::<f64>().unwrap_or(0.0),
            used_memory: field("used_memory").parse().unwrap_or(0),
        })
    }
}
