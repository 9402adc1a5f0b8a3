//! Outcomes of a load test's operations, as they finish: when each was due,
//! when it finished, which replica served it, or which error ended it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

use super::Ramp;

/// How one operation ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Served, by the named replica when known; `timed` is false when the
    /// finish says nothing about latency (a QoS 0 publish written out).
    Ok { replica: Option<u16>, timed: bool },
    /// Failed; the kind is a short label (`connect`, `timeout`, `http_5xx`...).
    Err(&'static str),
}

/// One finished operation; times in seconds from the start of the test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub due: f64,
    pub done: f64,
    pub outcome: Outcome,
}

#[derive(Default)]
struct Inner {
    samples: Vec<Sample>,
    replicas: Vec<String>,
    index: HashMap<String, u16>,
}

/// Shared by the schedule and every operation of one test.
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
    outstanding: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new(ramp: &Ramp) -> Self {
        let expected: u64 = (0..ramp.rates.len()).map(|i| ramp.ops_in_step(i)).sum();
        Self {
            start: Instant::now(),
            inner: Mutex::new(Inner {
                samples: Vec::with_capacity(expected.min(1 << 22) as usize),
                ..Inner::default()
            }),
            outstanding: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // every critical section is one push: a poisoned lock is consistent
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Seconds from the start to `t`.
    pub fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }

    /// An operation was started; [`Recorder::finish`] must follow.
    pub fn begin(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// The number used for a replica name in [`Outcome::Ok`].
    pub fn replica(&self, name: &str) -> u16 {
        let mut inner = self.lock();
        if let Some(&i) = inner.index.get(name) {
            return i;
        }
        let i = u16::try_from(inner.replicas.len()).unwrap_or(u16::MAX);
        inner.replicas.push(name.to_string());
        inner.index.insert(name.to_string(), i);
        i
    }

    /// An operation due at `due` ended now.
    pub fn finish(&self, due: Instant, outcome: Outcome) {
        let sample = Sample {
            due: self.secs(due),
            done: self.secs(Instant::now()),
            outcome,
        };
        match outcome {
            Outcome::Ok { .. } => self.ok.fetch_add(1, Ordering::Relaxed),
            Outcome::Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
        };
        self.lock().samples.push(sample);
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn ok_count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Every sample so far and the replica names their numbers stand for.
    pub fn take(&self) -> (Vec<Sample>, Vec<String>) {
        let mut inner = self.lock();
        (std::mem::take(&mut inner.samples), inner.replicas.clone())
    }
}
