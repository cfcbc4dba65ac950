use futures_util::{FutureExt, StreamExt};
use hybrid_cluster_core::{Incarnation, MessageId, NodeId, Target};

use super::*;

fn id(n: u64) -> ConnectionId {
    ConnectionId::new(NodeId::new("a").unwrap(), Incarnation::from_u64(1), n)
}

fn message(text: &str) -> Arc<Envelope> {
    Arc::new(Envelope::text(
        NodeId::new("a").unwrap(),
        Target::Broadcast,
        text,
    ))
}

fn next_text(inbox: &mut Inbox) -> Option<String> {
    match inbox.next().now_or_never()?? {
        InboxItem::Message(envelope) => envelope.payload_text().map(str::to_owned),
        InboxItem::Close(frame) => Some(format!("close {}", frame.code)),
        InboxItem::Undeliverable(notice) => Some(format!("undeliverable {}", notice.to)),
    }
}

#[test]
fn registration_counts_and_dropping_the_inbox_deregisters() {
    let counter = ConnectionCounter::new();
    let table = Arc::new(LocalConnections::new(
        counter.clone(),
        8,
        SlowClientPolicy::DropOldest,
        Metrics::new("a"),
    ));
    let inbox = table.register(id(1), None);
    let _other = table.register(id(2), None);
    assert_eq!((table.len(), counter.get()), (2, 2));
    let group = GroupName::new("g").unwrap();
    assert_eq!(table.join(&id(1), &group), Ok(Some(1)));
    assert_eq!(table.join(&id(1), &group), Ok(None));
    assert!(table.counted(&id(1), &group, 1), "its bind is done");
    drop(inbox);
    assert_eq!((table.len(), counter.get()), (1, 1));
    assert_eq!(table.members(&group), 0);
    assert_eq!(std::mem::take(&mut *table.departed.lock()), vec![group]);
    assert_eq!(
        table
            .deliver_to(&id(1), InboxItem::Message(message("x")))
            .err(),
        Some(Refused::NotFound)
    );
}

#[test]
fn drop_oldest_keeps_the_newest_within_the_bound() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        2,
        SlowClientPolicy::DropOldest,
        Metrics::new("a"),
    ));
    let mut inbox = table.register(id(1), None);
    for text in ["1", "2", "3", "4"] {
        table
            .deliver_to(&id(1), InboxItem::Message(message(text)))
            .unwrap();
    }
    assert_eq!(next_text(&mut inbox).as_deref(), Some("3"));
    assert_eq!(next_text(&mut inbox).as_deref(), Some("4"));
    assert_eq!(next_text(&mut inbox), None);
    assert_eq!(inbox.dropped(), 2);
}

#[test]
fn inboxes_are_bounded_in_bytes_too() {
    let table = Arc::new(
        LocalConnections::new(
            ConnectionCounter::new(),
            100,
            SlowClientPolicy::DropOldest,
            Metrics::new("a"),
        )
        .with_byte_bound(10),
    );
    let mut inbox = table.register(id(1), None);
    for text in ["aaaa", "bbbb", "cccc"] {
        table
            .deliver_to(&id(1), InboxItem::Message(message(text)))
            .unwrap();
    }
    // 12 bytes do not fit in 10: the oldest went.
    assert_eq!(inbox.dropped(), 1);
    assert_eq!(next_text(&mut inbox).as_deref(), Some("bbbb"));
    assert_eq!(next_text(&mut inbox).as_deref(), Some("cccc"));
    // A message larger than the bound, alone, is still taken.
    let big = "x".repeat(64);
    table
        .deliver_to(&id(1), InboxItem::Message(message(&big)))
        .unwrap();
    assert_eq!(next_text(&mut inbox).as_deref(), Some(big.as_str()));

    let closing = Arc::new(
        LocalConnections::new(
            ConnectionCounter::new(),
            100,
            SlowClientPolicy::CLOSE_TRY_AGAIN_LATER,
            Metrics::new("a"),
        )
        .with_byte_bound(10),
    );
    let mut inbox = closing.register(id(2), None);
    for text in ["aaaa", "bbbb"] {
        closing
            .deliver_to(&id(2), InboxItem::Message(message(text)))
            .unwrap();
    }
    assert_eq!(
        closing
            .deliver_to(&id(2), InboxItem::Message(message("cccc")))
            .err(),
        Some(Refused::Closing)
    );
    assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1013"));
}

#[test]
fn close_policy_closes_the_slow_connection_at_once() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        2,
        SlowClientPolicy::Close { code: 1013 },
        Metrics::new("a"),
    ));
    let mut inbox = table.register(id(1), None);
    for text in ["1", "2"] {
        table
            .deliver_to(&id(1), InboxItem::Message(message(text)))
            .unwrap();
    }
    // The one over the bound closes the connection and is refused, as is every one after
    // it: their callers tell their senders.
    for text in ["3", "4"] {
        assert_eq!(
            table
                .deliver_to(&id(1), InboxItem::Message(message(text)))
                .err(),
            Some(Refused::Closing)
        );
    }
    assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1013"));
    assert!(
        matches!(inbox.next().now_or_never(), Some(None)),
        "the stream ends after the close"
    );
}

/// A unicast from a connection, as received from anywhere, and its id.
fn unicast(to: u64, from: u64) -> (InboxItem, MessageId) {
    let mut envelope = Envelope::text(NodeId::new("a").unwrap(), Target::Connection(id(to)), "x");
    envelope.sender = Some(id(from));
    let message_id = envelope.id;
    (InboxItem::Message(Arc::new(envelope)), message_id)
}

fn bounced_ids(table: &LocalConnections) -> Vec<MessageId> {
    table.bounced.waiting_ids()
}

#[test]
fn unicasts_that_will_not_reach_their_client_are_bounced_for_a_notice() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        2,
        SlowClientPolicy::Close { code: 1013 },
        Metrics::new("a"),
    ));
    let inbox = table.register(id(1), None);
    let (kept, kept_id) = unicast(1, 9);
    table.deliver_to(&id(1), kept).unwrap();
    table.deliver_all(&message("broadcast"));
    // Over capacity: the close drops what was queued, unicasts bounced (not broadcasts);
    // the one over the bound is refused, for its caller to tell.
    let (over, _) = unicast(1, 9);
    assert_eq!(table.deliver_to(&id(1), over).err(), Some(Refused::Closing));
    assert_eq!(bounced_ids(&table), [kept_id]);

    // A connection that goes with messages still queued: they are bounced too.
    let other = table.register(id(2), None);
    let (never_read, never_read_id) = unicast(2, 9);
    table.deliver_to(&id(2), never_read).unwrap();
    drop(other);
    assert_eq!(bounced_ids(&table), [kept_id, never_read_id]);
    drop(inbox);
}

#[test]
fn shutdown_close_comes_after_the_queued_messages() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        8,
        SlowClientPolicy::DropOldest,
        Metrics::new("a"),
    ));
    let mut inbox = table.register(id(1), None);
    table.deliver_all(&message("last words"));
    table.close_all(|| CloseFrame {
        code: 1012,
        reason: "{}".to_owned(),
    });
    assert_eq!(next_text(&mut inbox).as_deref(), Some("last words"));
    assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1012"));
}

#[test]
fn groups_reach_only_their_members() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        8,
        SlowClientPolicy::DropOldest,
        Metrics::new("a"),
    ));
    let mut a = table.register(id(1), None);
    let mut b = table.register(id(2), None);
    let group = GroupName::new("g").unwrap();
    let join = table.join(&id(2), &group).unwrap().unwrap();
    assert_eq!(table.deliver_group(&group, &message("members")).count, 1);
    assert_eq!(next_text(&mut a), None);
    assert_eq!(next_text(&mut b).as_deref(), Some("members"));
    assert!(table.counted(&id(2), &group, join));
    assert_eq!(table.leave(&id(2), &group), Ok(true));
    assert_eq!(table.deliver_group(&group, &message("nobody")).count, 0);
}

/// A join's count is the connection's once its bind is done; a leave or a departure takes
/// back only counts the connection has, a join whose member left or went meanwhile is told to
/// take its own back, and a failed join undoes only its own membership.
#[tokio::test]
async fn only_counted_memberships_are_taken_back() {
    let table = Arc::new(LocalConnections::new(
        ConnectionCounter::new(),
        8,
        SlowClientPolicy::DropOldest,
        Metrics::new("a"),
    ));
    let group = |name: &str| GroupName::new(name).unwrap();
    let (red, blue, green, gold) = (group("red"), group("blue"), group("green"), group("gold"));
    let a = table.register(id(1), None);

    // Left while binding: the leave takes nothing, the join takes its count back.
    assert_eq!(table.join(&id(1), &red), Ok(Some(1)));
    assert_eq!(table.leave(&id(1), &red), Ok(false));
    assert!(!table.counted(&id(1), &red, 1));

    // Left and joined again while the first join was binding: the membership is the second
    // join's, which keeps its count; the first gives its own back.
    assert_eq!(table.join(&id(1), &blue), Ok(Some(2)));
    assert_eq!(table.leave(&id(1), &blue), Ok(false));
    assert_eq!(table.join(&id(1), &blue), Ok(Some(3)));
    assert!(!table.counted(&id(1), &blue, 2));
    assert!(table.counted(&id(1), &blue, 3));

    // A failed join undoes its own membership only, never a later join's.
    assert_eq!(table.join(&id(1), &gold), Ok(Some(4)));
    assert_eq!(table.leave(&id(1), &gold), Ok(false));
    assert_eq!(table.join(&id(1), &gold), Ok(Some(5)));
    table.abandon(&id(1), &gold, 4);
    assert_eq!(table.members(&gold), 1, "join 5's membership stays");
    table.abandon(&id(1), &gold, 5);
    assert_eq!(table.members(&gold), 0);

    // Gone while binding: the departure reports only what was counted.
    assert_eq!(table.join(&id(1), &green), Ok(Some(6)));
    drop(a);
    assert!(!table.counted(&id(1), &green, 6));
    assert_eq!(table.departed_groups().await, vec![blue]);
}

/// A session drops a message id it saw lately, and forgets the oldest past its bound.
#[test]
fn a_session_drops_a_message_it_numbered_lately_and_forgets_the_oldest() {
    use hybrid_cluster_core::{MessageId, SessionId};

    use super::{Phase, SlotSession};
    let mut session = SlotSession::new(SessionId::random(), 0, Phase::Live);
    let first = MessageId::from_u128(1);
    assert!(session.first_time(first));
    assert!(!session.first_time(first), "seen lately");
    for n in 2..=4097 {
        assert!(session.first_time(MessageId::from_u128(n)));
    }
    assert!(session.first_time(first), "forgotten past 4,096 ids");
    assert!(!session.first_time(MessageId::from_u128(4097)));
}
