//! Per-connection rate limits: token buckets of messages and of bytes, and the rule that
//! closes a connection that keeps going past them.

use std::time::Duration;

use tokio::time::Instant;

/// How much one connection may send: messages per second and payload bytes per second, each
/// with a burst (token buckets), set on the cluster
/// ([`ClusterConfig::rate_limit`](crate::ClusterConfig)) and applied by the node server to
/// each client's requests. A request over the limit is refused, the connection stays; a
/// connection with [`max_refusals`](RateLimit::max_refusals) requests refused within
/// [`refusal_window`](RateLimit::refusal_window) is closed (1008, policy violation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Messages a connection may send per second, on average.
    pub messages_per_second: f64,
    /// Messages it may send at once after a quiet spell.
    pub message_burst: f64,
    /// Bytes of requests per second, on average; `None`: no limit on bytes.
    pub bytes_per_second: Option<f64>,
    /// Bytes it may send at once after a quiet spell (at least one request of the largest
    /// size the server takes, or that request never passes).
    pub byte_burst: f64,
    /// Refused requests within `refusal_window` that close the connection. Default 100.
    pub max_refusals: u32,
    /// The window refusals are counted in. Default 10 s.
    pub refusal_window: Duration,
}

impl RateLimit {
    /// `n` messages per second with a burst of `n`, no limit on bytes.
    pub fn messages_per_second(n: u32) -> Self {
        let n = f64::from(n.max(1));
        Self {
            messages_per_second: n,
            message_burst: n,
            bytes_per_second: None,
            byte_burst: 0.0,
            max_refusals: 100,
            refusal_window: Duration::from_secs(10),
        }
    }

    /// Adds a limit of `per_second` bytes, with a burst of `burst` bytes.
    pub fn with_bytes(mut self, per_second: u64, burst: u64) -> Self {
        self.bytes_per_second = Some(per_second.max(1) as f64);
        self.byte_burst = burst.max(1) as f64;
        self
    }
}

/// What [`RateLimiter::check`] decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// Within the limit: serve it.
    Allow,
    /// Over the limit: refuse it (`rate_limited`), keep the connection.
    Refuse,
    /// Over the limit once too often: close the connection (1008).
    Close,
}

/// One connection's buckets, for [`RateLimit`]: call [`check`](RateLimiter::check) for each
/// request the client sends.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    messages: f64,
    bytes: f64,
    refilled: Instant,
    refusals: u32,
    window_start: Instant,
}

impl RateLimiter {
    /// Full buckets for a new connection.
    pub fn new(limit: RateLimit) -> Self {
        let now = Instant::now();
        Self {
            limit,
            messages: limit.message_burst,
            bytes: limit.byte_burst,
            refilled: now,
            refusals: 0,
            window_start: now,
        }
    }

    /// Takes one message of `bytes` from the buckets, if both have enough.
    pub fn check(&mut self, bytes: usize) -> RateDecision {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let limit = &self.limit;
        self.messages =
            (self.messages + elapsed * limit.messages_per_second).min(limit.message_burst);
        if let Some(per_second) = limit.bytes_per_second {
            self.bytes = (self.bytes + elapsed * per_second).min(limit.byte_burst);
        }
        let bytes = bytes as f64;
        let bytes_ok = limit.bytes_per_second.is_none() || self.bytes >= bytes;
        if self.messages >= 1.0 && bytes_ok {
            self.messages -= 1.0;
            if limit.bytes_per_second.is_some() {
                self.bytes -= bytes;
            }
            return RateDecision::Allow;
        }
        if now.duration_since(self.window_start) >= limit.refusal_window {
            self.window_start = now;
            self.refusals = 0;
        }
        self.refusals += 1;
        if self.refusals >= limit.max_refusals {
            RateDecision::Close
        } else {
            RateDecision::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_refills_and_abuse_closes() {
        let mut limiter = RateLimiter::new(RateLimit::messages_per_second(10));
        for _ in 0..10 {
            assert_eq!(limiter.check(100), RateDecision::Allow);
        }
        assert_eq!(limiter.check(100), RateDecision::Refuse);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(limiter.check(100), RateDecision::Allow, "one token back");
        assert_eq!(limiter.check(100), RateDecision::Refuse);
        // 100 refusals within the window close it; the second refusal above counts too.
        for _ in 0..97 {
            assert_eq!(limiter.check(1), RateDecision::Refuse);
        }
        assert_eq!(limiter.check(1), RateDecision::Close);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_counted_per_window_and_bytes_have_their_own_bucket() {
        let mut limiter = RateLimiter::new(RateLimit::messages_per_second(1));
        assert_eq!(limiter.check(1), RateDecision::Allow);
        for _ in 0..99 {
            assert_eq!(limiter.check(1), RateDecision::Refuse);
        }
        // A new window: the count starts again (the refill is spent at once).
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limiter.check(1), RateDecision::Allow);
        for _ in 0..99 {
            assert_eq!(limiter.check(1), RateDecision::Refuse);
        }
        assert_eq!(limiter.check(1), RateDecision::Close);
        let mut bytes =
            RateLimiter::new(RateLimit::messages_per_second(1000).with_bytes(1000, 1500));
        assert_eq!(bytes.check(1000), RateDecision::Allow);
        assert_eq!(bytes.check(1000), RateDecision::Refuse, "500 bytes left");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(bytes.check(1000), RateDecision::Allow);
    }
}
