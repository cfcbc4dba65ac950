//! Disturbing the shared RabbitMQ, the way its operators (or its failures) do, and putting it
//! back as it was. Tests that use these run alone (see `.config/nextest.toml`).

use std::time::Duration;

use crate::BoxError;

/// Runs `rabbitmqctl` with `args`: its standard output, or an error with its standard error.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, BoxError> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("rabbitmqctl")
            .args(&args)
            .output()
            .map_err(|e| format!("rabbitmqctl cannot run: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    })
    .await?
}

/// The operating-system pid of the RabbitMQ node `rabbitmqctl` talks to, to read its CPU
/// and memory; `None` when it cannot be asked.
pub async fn broker_pid() -> Option<u32> {
    rabbitmqctl(&["eval", "os:getpid()."])
        .await
        .ok()?
        .trim()
        .trim_matches('"')
        .parse()
        .ok()
}

/// Stops the RabbitMQ application and starts it again (every connection drops; durable
/// queues and persistent messages survive, transient ones do not), then waits until it
/// serves again.
pub async fn restart() -> Result<(), BoxError> {
    rabbitmqctl(&["stop_app"]).await?;
    rabbitmqctl(&["start_app"]).await?;
    rabbitmqctl(&["await_startup", "--timeout", "60"]).await?;
    Ok(())
}

/// Makes sure the RabbitMQ application runs (after a test that stopped it failed midway).
pub async fn ensure_running() {
    if rabbitmqctl(&["await_startup", "--timeout", "1"])
        .await
        .is_err()
    {
        let _ = rabbitmqctl(&["start_app"]).await;
        let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]).await;
    }
}

/// Deletes a queue from outside, as an operator (or the loss of the broker node holding it)
/// would.
pub async fn delete_queue(name: &str) -> Result<(), BoxError> {
    rabbitmqctl(&["delete_queue", name]).await.map(drop)
}

/// A binding, as `rabbitmqctl list_bindings` reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    /// The exchange.
    pub source: String,
    /// The queue (or exchange) bound.
    pub destination: String,
    /// The binding's routing key.
    pub routing_key: String,
}

/// Every binding of the default virtual host, from RabbitMQ itself.
pub async fn bindings() -> Result<Vec<Binding>, BoxError> {
    let listing = rabbitmqctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .await?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            Some(Binding {
                source: fields.next()?.to_owned(),
                destination: fields.next()?.to_owned(),
                routing_key: fields.next()?.to_owned(),
            })
        })
        .collect())
}

/// A memory alarm raised on RabbitMQ (its memory high watermark set far below its use): it
/// blocks every connection that publishes. Dropping it puts the watermark back as it was.
#[derive(Debug)]
pub struct MemoryAlarm {
    previous: String,
}

impl MemoryAlarm {
    /// Raises the alarm and waits until RabbitMQ reports it.
    pub async fn raise() -> Result<Self, BoxError> {
        let previous = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .await?
            .trim()
            .to_owned();
        let alarm = Self { previous };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]).await?;
        for _ in 0..100 {
            let alarms = rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).await?;
            if alarms.contains("memory") {
                return Ok(alarm);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("RabbitMQ did not raise its memory alarm".into())
    }

    fn restore(&self) -> Result<(), BoxError> {
        // A relative watermark reads back as a float, an absolute one as
        // `{absolute,Bytes}`: set it back the same way.
        let previous = self.previous.as_str();
        let args: Vec<&str> = match previous
            .strip_prefix("{absolute,")
            .and_then(|rest| rest.strip_suffix('}'))
        {
            Some(bytes) => vec!["set_vm_memory_high_watermark", "absolute", bytes],
            None => vec!["set_vm_memory_high_watermark", previous],
        };
        let output = std::process::Command::new("rabbitmqctl")
            .args(&args)
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "putting the memory watermark back to {previous} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into());
        }
        Ok(())
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if let Err(error) = self.restore() {
            eprintln!("{error}");
        }
    }
}
