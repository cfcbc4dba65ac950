//! Section 9: users. `send_user` next to plain unicast on the same two nodes (cross-node
//! throughput and lone-message latency, durable), and what a user costs Redis: commands per
//! connection that opens, joins a group and closes (presence), and per `send_user`.

use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster::server::ServerAuth;
use hybrid_cluster::{ClusterPrefix, Durability, Identify, IdentityLayer, Jwt};
use hybrid_cluster_test_support::BoxError;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::time::timeout;

use crate::clients::{client, next_text};
use crate::probes::{Probe, measure};
use crate::redis_info::{info_number, redis_info};
use crate::report::{Verdict, median, rate, ratio, us};
use crate::serve::{NODE_NAMES, RunningNode, WAIT, start_node_with, stop_nodes};
use crate::throughput::{Unicast, pairs_run};
use crate::{Ctx, cleanup};

const SECRET: &str = "hc-suite-users-secret";

/// A token for `user`, valid for an hour.
fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|now| now.as_secs() + 3600)
        .unwrap_or(u64::MAX);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).expect("a secret"),
    )
    .expect("a token")
}

async fn start_nodes(prefix: &ClusterPrefix) -> Result<Vec<RunningNode>, BoxError> {
    let jwt: Arc<dyn Identify> = Arc::new(Jwt::hs256(SECRET.as_bytes())?);
    let mut nodes = Vec::new();
    for name in NODE_NAMES.iter().take(2) {
        let auth = ServerAuth {
            identity: Some(IdentityLayer::new(Arc::clone(&jwt))),
            admin_token: None,
        };
        nodes.push(start_node_with(prefix, name, Durability::Durable, false, auth).await?);
    }
    for node in &nodes {
        let view = node.cluster.discovery().view();
        timeout(WAIT, view.wait_until(|members| members.len() == 2))
            .await
            .map_err(|_| "the nodes did not see each other")?;
    }
    Ok(nodes)
}

/// Redis's counts so far: commands processed (those scripts run included), and scripts run
/// (`EVAL` and `EVALSHA` calls: one round trip each).
async fn redis_counts() -> Result<(u64, u64), BoxError> {
    let info = redis_info("all").await?;
    let commands = info_number(&info, "total_commands_processed")
        .ok_or("no total_commands_processed in INFO")?;
    let calls = |name| info_number(&info, name).unwrap_or(0);
    Ok((commands, calls("cmdstat_evalsha") + calls("cmdstat_eval")))
}

async fn redis_commands() -> Result<u64, BoxError> {
    Ok(redis_counts().await?.0)
}

/// Redis commands and scripts per connection of a user that opens on `url`, joins a group
/// (its answer awaited) and closes, over `n` of them one after another, less what the cluster
/// asks of Redis meanwhile anyway (its heartbeats, the INFO itself), measured over the same
/// time idle.
async fn redis_per_user_connection(url: &str, n: usize) -> Result<(f64, f64), BoxError> {
    use futures_util::SinkExt;
    let before = redis_counts().await?;
    let started = tokio::time::Instant::now();
    for k in 0..n {
        let (mut ws, _) = client(&format!("{url}?token={}", token(&format!("p{k}"))), None).await?;
        ws.send(r#"{"op":"join","group":"bench-room","id":1}"#.into())
            .await?;
        while !next_text(&mut ws).await?.contains(r#""type":"ack""#) {}
        ws.close(None).await?;
    }
    // The last close's leaves are applied after it: a moment for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = started.elapsed();
    let after = redis_counts().await?;
    // The same time again, idle: the background the run's counts hold too.
    let idle_before = redis_counts().await?;
    tokio::time::sleep(took).await;
    let idle_after = redis_counts().await?;
    let per = |run: u64, idle: u64| run.saturating_sub(idle) as f64 / n as f64;
    Ok((
        per(after.0 - before.0, idle_after.0 - idle_before.0),
        per(after.1 - before.1, idle_after.1 - idle_before.1),
    ))
}

struct Rates {
    unicast: Vec<f64>,
    user: Vec<f64>,
    lost: usize,
    late: usize,
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let (n, rounds, samples) = (ctx.sizes.messages, ctx.sizes.rounds, ctx.sizes.samples);
    let prefix = ctx.prefix("users");
    let nodes = start_nodes(&prefix).await?;
    let (a, b) = (nodes[0].url(), nodes[1].url());
    let measured = async {
        let mut rates = Rates {
            unicast: Vec::new(),
            user: Vec::new(),
            lost: 0,
            late: 0,
        };
        let make_token: &dyn Fn(&str) -> String = &token;
        let mut per_message = Vec::new();
        for round in 1..=rounds {
            let plain: Unicast = pairs_run(&a, &b, 4, n, None).await?;
            let before = redis_commands().await?;
            let started = tokio::time::Instant::now();
            let users: Unicast = pairs_run(&a, &b, 4, n, Some(make_token)).await?;
            let used = redis_commands().await?.saturating_sub(before);
            per_message.push((used as f64, started.elapsed(), n));
            rates.lost += plain.lost + users.lost;
            rates.late += plain.out_of_order + users.out_of_order;
            rates.unicast.push(plain.rate);
            rates.user.push(users.rate);
            println!(
                "  round {round}: unicast {:.0}, send_user {:.0} msg/s (4 pairs)",
                plain.rate, users.rate
            );
        }
        let probes = vec![
            Probe::one_way(&a, &b).await?,
            Probe::one_way_to_user(&a, &format!("{b}?token={}", token("probe")), "probe").await?,
        ];
        let latencies = measure(probes, samples).await?;
        let joins = redis_per_user_connection(&b, 200).await?;
        Ok::<_, BoxError>((rates, latencies, per_message, joins))
    }
    .await;
    stop_nodes(nodes).await;
    cleanup(&prefix).await;
    let (rates, latencies, per_message, joins) = measured?;
    let [unicast_lat, user_lat] = latencies[..] else {
        return Err("two latency measures expected".into());
    };
    let r = &mut ctx.report;
    let (user_rate, unicast_rate) = (median(rates.user.clone()), median(rates.unicast.clone()));
    r.row(
        "9. cross-node send_user throughput, 4 pairs, durable",
        rate(user_rate),
        format!("{} unicast", rate(unicast_rate)),
        ratio(user_rate, unicast_rate),
        "—",
        Verdict::Info,
    );
    r.row(
        "9. … lost / out of order (send_user and unicast)",
        format!("{} / {}", rates.lost, rates.late),
        "—",
        "—",
        "0 / 0",
        Verdict::of(rates.lost + rates.late == 0),
    );
    r.row(
        "9. cross-node send_user latency, p50 / p99",
        format!("{} / {}", us(user_lat.p50), us(user_lat.p99)),
        format!("{} / {} unicast", us(unicast_lat.p50), us(unicast_lat.p99)),
        ratio(user_lat.p50, unicast_lat.p50),
        "—",
        Verdict::Info,
    );
    // Commands during a send_user run, per message: the run's connections (each a user's,
    // with its presence) and the nodes' heartbeats included.
    let (commands, took, messages) =
        per_message
            .last()
            .copied()
            .unwrap_or((0.0, Duration::ZERO, 1));
    r.row(
        "9. Redis commands per send_user message (whole run)",
        format!("{:.4}", commands / messages as f64),
        format!("{commands:.0} commands over {:.1} s", took.as_secs_f64()),
        "—",
        "0 on the message path",
        Verdict::Info,
    );
    r.row(
        "9. Redis round trips (scripts) per user connection (open, join a group, close)",
        format!("{:.2}", joins.1),
        format!(
            "{:.1} commands, those in the scripts included; anonymous: 0",
            joins.0
        ),
        "—",
        "—",
        Verdict::Info,
    );
    r.note("9: send_user is a group message to the user's own group: the broker routes it to the nodes where the user has a connection, no Redis lookup; each connection of a user costs one presence script when it joins its user's group and one per group it joins, and as many when it goes");
    Ok(())
}
