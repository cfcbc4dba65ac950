//! Exponential backoff between reconnection attempts.

use std::time::Duration;

/// Delays that double from `min` up to `max`, with up to 25 % jitter so that nodes cut off
/// together do not all come back at the same instant.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(rand::random::<f64>() * 0.25);
        base + jitter
    }

    /// Starts again from `min` after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<Duration> = (0..4).map(|_| backoff.next_delay()).collect();
        let bases = [100, 200, 350, 350];
        for (delay, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base && *delay <= base.mul_f64(1.25),
                "{delay:?} vs {base:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }
}
