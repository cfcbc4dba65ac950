//! How a receiver behaves.

use std::time::Duration;

use hybrid_cluster_core::{ClusterSecret, DEFAULT_REPLAY_WINDOW};

/// How a [`Receiver`](super::Receiver) behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// How long the id of a handled message is remembered, to drop its duplicates. It should
    /// exceed the longest time between a message and its duplicate: a publisher's outage
    /// bound (its resends come at most that long after), a consumer's reconnection (its
    /// redeliveries). Zero turns duplicate suppression off. Not used with a
    /// [`secret`](ReceiveConfig::secret), where the replay window takes its place.
    pub dedupe_window: Duration,
    /// The memory, in bytes, the remembered ids (for dedupe, or replays with a secret) may
    /// take, about: each costs about 64 bytes. Past it the oldest go early (see the
    /// [module docs](super)).
    pub dedupe_memory: usize,
    /// The cluster secret: when set, only messages signed with it are handed over (see the
    /// [module docs](super)).
    pub secret: Option<ClusterSecret>,
    /// With a secret, how far a message's send time may be from this node's clock, either
    /// way. Default 60 s.
    pub replay_window: Duration,
}

impl Default for ReceiveConfig {
    /// A dedupe window of 60 s within 64 MiB; no secret; with one, a replay window of 60 s.
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(60),
            dedupe_memory: 64 * 1024 * 1024,
            secret: None,
            replay_window: DEFAULT_REPLAY_WINDOW,
        }
    }
}

impl ReceiveConfig {
    /// Hands over only messages signed with `secret`.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }
}
