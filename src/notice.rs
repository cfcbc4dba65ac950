//! Undeliverable notices: a unicast that reached its node but not its connection is answered
//! to its sender, with the message's id, so that no message is lost without a word.
//!
//! A notice to a connection of this node goes straight to its inbox; to another node, it
//! travels as an envelope to the sender's connection, with two extension headers naming the
//! message and the connection that was gone, and no payload.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hybrid_cluster_core::{Broker, ConnectionId, Envelope, NodeId, PayloadKind, Target};
use hybrid_cluster_routing::{Forward, ForwardError};
use tower_service::Service;

use crate::local::{Bounce, InboxItem, LocalConnections, Undeliverable};

/// The extension header of a notice: the id of the message not delivered.
const HEADER_UNDELIVERABLE: &str = "undeliverable";
/// The extension header of a notice: the connection that was gone.
const HEADER_UNDELIVERABLE_TO: &str = "undeliverable-to";

/// Notices on their way through the broker at once, at most.
const IN_FLIGHT: usize = 64;

/// Reads a notice, if `envelope` is one.
pub(crate) fn read(envelope: &Envelope) -> Option<Undeliverable> {
    let message_id = envelope.headers.get(HEADER_UNDELIVERABLE)?.parse().ok()?;
    let to = envelope
        .headers
        .get(HEADER_UNDELIVERABLE_TO)?
        .parse()
        .ok()?;
    Some(Undeliverable { message_id, to })
}

/// The envelope telling `sender` (on another node) that its message was not delivered.
fn envelope(from: &NodeId, sender: &ConnectionId, notice: &Undeliverable) -> Envelope {
    let mut envelope = Envelope::new(
        from.clone(),
        Target::Connection(sender.clone()),
        PayloadKind::Binary,
        bytes::Bytes::new(),
    );
    envelope.headers.insert(
        HEADER_UNDELIVERABLE.to_owned(),
        notice.message_id.to_string(),
    );
    envelope
        .headers
        .insert(HEADER_UNDELIVERABLE_TO.to_owned(), notice.to.to_string());
    envelope
}

/// Tells the sender of each of `bounced` (unicasts from a connection that did not reach
/// theirs) that it was not delivered: in its inbox when it is on this node (`node`), through
/// `forward` otherwise, several in flight. The notices' confirmations are taken while a place
/// is awaited, so they never hold places this waits for.
pub(crate) async fn send(
    node: &NodeId,
    local: &LocalConnections,
    forward: &Forward<dyn Broker>,
    bounced: Vec<Bounce>,
) {
    let mut confirming = FuturesUnordered::new();
    for Bounce {
        message_id,
        to,
        sender,
    } in bounced
    {
        let notice = Undeliverable { message_id, to };
        if sender.node() == node {
            // Best effort: the sender may have closed meanwhile too.
            let _ = local.deliver_to(&sender, InboxItem::Undeliverable(notice));
            continue;
        }
        tracing::debug!(connection = %notice.to, message = %message_id, %sender, "telling the sender its message found the connection gone");
        let mut forward = forward.clone();
        let ready = loop {
            tokio::select! {
                biased;
                Some(sent) = confirming.next(), if !confirming.is_empty() => report(sent),
                ready = std::future::poll_fn(|cx| forward.poll_ready(cx)) => break ready,
            }
        };
        if ready.is_err() {
            tracing::debug!("could not send an undeliverable notice: the broker is unavailable");
            continue;
        }
        confirming.push(forward.call(envelope(node, &sender, &notice)));
        while confirming.len() >= IN_FLIGHT {
            if let Some(sent) = confirming.next().await {
                report(sent);
            }
        }
    }
    while let Some(sent) = confirming.next().await {
        report(sent);
    }
}

fn report(sent: Result<(), ForwardError>) {
    if let Err(error) = sent {
        tracing::debug!(%error, "could not send an undeliverable notice");
    }
}
