//! Per-connection publish rate: a token bucket holding one second's worth.
//! A replica over its rate is not cut off and loses nothing: flowgate stops
//! reading its connection until the bucket has refilled (TCP pushes back).

use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec.max(1));
        Self {
            per_sec,
            tokens: per_sec,
            last: Instant::now(),
        }
    }

    /// Takes `n` publishes; returns how long to stop reading when the bucket
    /// went below empty.
    pub fn take(&mut self, n: u32) -> Option<Duration> {
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.per_sec) - f64::from(n);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_beyond_one_second_of_rate_waits_for_the_refill() {
        let mut limit = RateLimit::new(10);
        assert_eq!(limit.take(10), None);
        let wait = limit.take(5).expect("over the rate");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        tokio::time::advance(wait).await;
        assert_eq!(limit.take(0), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limit.take(10), None);
    }
}
