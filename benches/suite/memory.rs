//! Section 5: the memory of an idle connection, one node in a child process next to a raw
//! tokio-tungstenite server.

use std::time::Duration;

use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::process::rss_kib;

use crate::child::ChildServer;
use crate::clients::connect_many;
use crate::machine::client_budget;
use crate::report::{Verdict, ratio};
use crate::{Ctx, cleanup};

/// RSS growth of a child server per idle connection: (KiB per connection, connections).
pub(crate) async fn idle_memory(
    child: Result<ChildServer, BoxError>,
    wanted: usize,
    welcome: bool,
) -> Result<(f64, usize), BoxError> {
    let child = child?;
    let result = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(child.pid()).ok_or("no VmRSS")?;
        let (clients, _) = connect_many(&child.urls(), wanted, welcome).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(child.pid()).ok_or("no VmRSS")?;
        let n = clients.len();
        drop(clients);
        if n == 0 {
            return Err::<_, BoxError>("no client connected".into());
        }
        Ok((after.saturating_sub(before) as f64 / n as f64, n))
    }
    .await;
    child.stop().await;
    result
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let (budget, why) = client_budget(ctx.sizes.idle);
    if let Some(why) = &why {
        ctx.report.note(format!("5: {why}"));
    }
    let prefix = ctx.prefix("memory");
    let node = idle_memory(ChildServer::nodes(&prefix, 1).await, budget, true).await;
    cleanup(&prefix).await;
    let (node, n) = node?;
    let (raw_4k, n_4k) = idle_memory(ChildServer::raw("4k").await, budget, false).await?;
    let (raw_default, n_default) =
        idle_memory(ChildServer::raw("default").await, budget, false).await?;
    let r = &mut ctx.report;
    r.row(
        format!("5. memory per idle connection, one node ({n} connections)"),
        format!("{node:.1} KiB"),
        format!("{raw_4k:.1} KiB raw tokio-tungstenite, 4 KiB buffers ({n_4k})"),
        ratio(node, raw_4k),
        format!("≤ 1.1 × raw = {:.1} KiB", 1.1 * raw_4k),
        Verdict::of(node <= 1.1 * raw_4k),
    );
    r.row(
        format!("5. raw tokio-tungstenite, default buffers ({n_default} connections)"),
        "—",
        format!("{raw_default:.1} KiB"),
        ratio(node, raw_default),
        "—",
        Verdict::Info,
    );
    r.note("5: VmRSS of the server's child process after the clients connected (and were welcomed) minus before, divided by the connections");
    Ok(())
}
