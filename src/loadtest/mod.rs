//! `flowgate loadtest`: drive a ramp of target rates at replicas, open loop,
//! and report what they achieved, per step and per replica.
//!
//! Open loop means the schedule never waits for the target: operation `k` of a
//! step at rate `r` is due at `step_start + k / r` whether or not earlier ones
//! finished, and its latency is measured from that due time (so a queue in
//! front of a slow replica shows as latency, not as a slower test). This
//! module owns the schedule ([`drive`]); [`http`] and [`mqtt`] own the
//! operations, [`record`] collects their outcomes, [`report`] turns them into
//! steps, a timeline and a table, and [`chart`] draws the timeline as SVG.
//! Nothing here prints: progress goes to a callback, the report is returned.

pub mod chart;
pub mod http;
pub mod mqtt;
pub mod record;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use record::Recorder;
pub use report::Report;

/// A `--ramp` or `--step` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RampError {
    #[error("--step must be longer than 0")]
    ZeroStep,
    #[error("--ramp: {0:?} is not a number")]
    NotNumber(String),
    #[error("--ramp: {0} is not a rate in (0, 1000000]")]
    OutOfRange(String),
}

/// Target rates (operations per second), one per step, each held for `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    pub rates: Vec<f64>,
    pub step: Duration,
}

impl Ramp {
    /// Parses `5,10,20,40`: positive rates, at most 1,000,000/s each.
    pub fn parse(rates: &str, step: Duration) -> Result<Self, RampError> {
        if step.is_zero() {
            return Err(RampError::ZeroStep);
        }
        let mut out = Vec::new();
        for part in rates.split(',').map(str::trim) {
            let r: f64 = part
                .parse()
                .map_err(|_| RampError::NotNumber(part.to_owned()))?;
            if !(r > 0.0 && r <= 1_000_000.0) {
                return Err(RampError::OutOfRange(part.to_owned()));
            }
            out.push(r);
        }
        Ok(Self { rates: out, step })
    }

    pub fn total(&self) -> Duration {
        self.step * self.rates.len() as u32
    }

    /// Operations due in step `i`.
    pub fn ops_in_step(&self, i: usize) -> u64 {
        (self.rates[i] * self.step.as_secs_f64()).round() as u64
    }

    /// The target rate at `t` seconds from the start.
    pub fn rate_at(&self, t: f64) -> f64 {
        let i = (t / self.step.as_secs_f64()) as usize;
        self.rates.get(i).copied().unwrap_or(0.0)
    }
}

/// What the progress callback sees, a few times a second.
#[derive(Debug, Clone)]
pub struct Progress {
    /// 0-based step.
    pub step: usize,
    pub steps: usize,
    pub target_rate: f64,
    /// Successful operations per second over the last update interval.
    pub achieved_rate: f64,
    pub errors: u64,
    pub elapsed: Duration,
    pub total: Duration,
}

/// How often the progress callback runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Runs the schedule: calls `fire(seq, due)` for every operation at its due
/// time (`fire` must not block: it starts the operation and returns), and
/// `progress` a few times a second. Returns when the last operation was fired.
pub async fn drive(
    ramp: &Ramp,
    recorder: &Arc<Recorder>,
    progress: &(dyn Fn(&Progress) + Sync),
    mut fire: impl FnMut(u64, Instant),
) {
    let start = recorder.start();
    let mut seq = 0u64;
    let mut last_ok = 0u64;
    let mut last_tick = start;
    let mut next_tick = start + PROGRESS_EVERY;
    for (i, &rate) in ramp.rates.iter().enumerate() {
        let step_start = start + ramp.step * i as u32;
        let n = ramp.ops_in_step(i);
        let mut k = 0u64;
        loop {
            let due = (k < n).then(|| step_start + Duration::from_secs_f64(k as f64 / rate));
            let now = Instant::now();
            if let Some(due) = due.filter(|d| *d <= now) {
                fire(seq, due);
                seq += 1;
                k += 1;
                continue;
            }
            if now >= next_tick {
                let ok = recorder.ok_count();
                let dt = now.duration_since(last_tick).as_secs_f64().max(1e-6);
                progress(&Progress {
                    step: i,
                    steps: ramp.rates.len(),
                    target_rate: rate,
                    achieved_rate: ok.saturating_sub(last_ok) as f64 / dt,
                    errors: recorder.error_count(),
                    elapsed: now.duration_since(start),
                    total: ramp.total(),
                });
                last_ok = ok;
                last_tick = now;
                next_tick = now + PROGRESS_EVERY;
            }
            let step_end = step_start + ramp.step;
            let wake = match due {
                Some(d) => d.min(next_tick),
                None if now >= step_end => break,
                None => step_end.min(next_tick),
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Waits until every fired operation finished or `deadline` passed.
pub async fn drain(recorder: &Recorder, deadline: Instant) {
    while recorder.outstanding() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_parses_and_rejects() {
        let r = Ramp::parse("5, 10,20.5", Duration::from_secs(2)).expect("valid");
        assert_eq!(r.rates, vec![5.0, 10.0, 20.5]);
        assert_eq!(r.ops_in_step(2), 41);
        assert_eq!(r.total(), Duration::from_secs(6));
        assert_eq!(r.rate_at(2.5), 10.0);
        assert_eq!(r.rate_at(6.0), 0.0);
        assert!(Ramp::parse("5,x", Duration::from_secs(1)).is_err());
        assert!(Ramp::parse("0", Duration::from_secs(1)).is_err());
        assert!(Ramp::parse("-3", Duration::from_secs(1)).is_err());
        assert!(Ramp::parse("", Duration::from_secs(1)).is_err());
        assert!(Ramp::parse("5", Duration::ZERO).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn drive_fires_on_schedule_without_waiting_for_completions() {
        let ramp = Ramp::parse("10,20", Duration::from_secs(1)).expect("valid");
        let rec = Arc::new(Recorder::new(&ramp));
        let start = rec.start();
        let mut fired = Vec::new();
        drive(&ramp, &rec, &|_| {}, |seq, due| {
            fired.push((seq, due.duration_since(start)))
        })
        .await;
        assert_eq!(fired.len(), 30);
        assert_eq!(fired[0], (0, Duration::ZERO));
        assert_eq!(fired[9].1, Duration::from_millis(900));
        assert_eq!(fired[10].1, Duration::from_secs(1));
        assert_eq!(fired[11].1, Duration::from_millis(1050));
        assert_eq!(fired[29].0, 29);
    }
}
