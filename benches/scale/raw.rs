//! The raw baseline: binding changes a second this RabbitMQ takes from raw lapin.

use std::fmt::Write as _;

use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::servers::amqp_url;
use tokio::time::Instant;

use crate::Args;

/// Section 1: binding changes a second from raw lapin, one channel then eight at once.
pub(crate) async fn raw_bindings(args: &Args, report: &mut String) -> Result<(), BoxError> {
    use lapin::options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties, ExchangeKind};

    let tag = format!("hc-scale-raw-{:08x}", rand::random::<u32>());
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let setup = connection.create_channel().await?;
    setup
        .exchange_declare(
            tag.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    setup
        .queue_declare(
            tag.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let total = args.raw_bindings.max(8);
    let mut rows = Vec::new();
    for channels in [1usize, 8] {
        let mut open = Vec::new();
        for _ in 0..channels {
            open.push(connection.create_channel().await?);
        }
        for bind in [true, false] {
            let started = Instant::now();
            let work = open.iter().enumerate().map(|(c, channel)| {
                let tag = tag.clone();
                async move {
                    for k in (c..total).step_by(channels) {
                        let key = format!("group.raw-{k}");
                        if bind {
                            channel
                                .queue_bind(
                                    tag.as_str().into(),
                                    tag.as_str().into(),
                                    key.as_str().into(),
                                    QueueBindOptions::default(),
                                    FieldTable::default(),
                                )
                                .await?;
                        } else {
                            channel
                                .queue_unbind(
                                    tag.as_str().into(),
                                    tag.as_str().into(),
                                    key.as_str().into(),
                                    FieldTable::default(),
                                )
                                .await?;
                        }
                    }
                    Ok::<_, lapin::Error>(())
                }
            });
            for done in futures_util::future::join_all(work).await {
                done?;
            }
            let rate = total as f64 / started.elapsed().as_secs_f64();
            rows.push((channels, if bind { "bind" } else { "unbind" }, rate));
        }
        for channel in open {
            let _ = channel.close(200, "done".into()).await;
        }
    }
    setup
        .queue_delete(tag.as_str().into(), QueueDeleteOptions::default())
        .await?;
    setup
        .exchange_delete(tag.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "done".into()).await;
    writeln!(
        report,
        "## Raw RabbitMQ binding changes\n\n{total} keys bound then unbound on one durable queue of a topic exchange, by raw lapin.\n\n| channels | change | per second |\n|---|---|---|"
    )?;
    for (channels, change, rate) in rows {
        writeln!(report, "| {channels} | {change} | {rate:.0} |")?;
        println!("raw: {channels} channel(s), {change}: {rate:.0}/s");
    }
    writeln!(report)?;
    Ok(())
}
