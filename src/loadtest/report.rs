//! From samples to a report: per step (target vs achieved rate, latency
//! percentiles, errors, each replica's share), a per-second timeline for the
//! chart, and the table printed at the end. The JSON form (`report.json`) is
//! documented in README.md; `schema` changes when a field changes meaning.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::record::{Outcome, Sample};
use super::Ramp;

/// Version of the `report.json` layout.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    /// `http` or `mqtt`.
    pub kind: String,
    /// The URL, or `broker/topic`.
    pub target: String,
    /// Where replica names come from: `header:<name>`, `reply:<topic>`,
    /// `admin:<url>`, or `none`.
    pub replica_source: String,
    pub step_secs: f64,
    pub steps: Vec<StepReport>,
    /// One point per second of the test.
    pub timeline: Vec<Point>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based, as printed.
    pub step: usize,
    pub target_rate: f64,
    /// Successful operations that finished within the step, per second.
    pub achieved_rate: f64,
    /// Operations due within the step.
    pub sent: u64,
    /// Of those, how many succeeded / failed (whenever they finished).
    pub ok: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// From due time to finish, of the timed successes due within the step.
    pub latency_ms: Option<Latency>,
    /// Successes that finished within the step, by replica.
    pub replicas: BTreeMap<String, Share>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Share {
    pub count: u64,
    /// Per second.
    pub rate: f64,
    /// Fraction of the step's successes, 0..1.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Seconds from the start: the point covers `[t - 1, t)`.
    pub t: f64,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub replicas: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Answers for an operation that was already answered (MQTT replies: a job
    /// processed twice).
    #[serde(default)]
    pub duplicates: u64,
}

/// Cumulative per-replica counts read at a moment (seconds from the start),
/// from a source other than the operations themselves (flowgate's admin API).
pub type Snapshot = (f64, BTreeMap<String, u64>);

/// Where per-replica figures come from.
pub enum Replicas<'a> {
    /// Each successful sample names its replica (by index into the names).
    Samples(&'a [String]),
    /// Counter snapshots over time; the samples name no replica.
    Snapshots(&'a [Snapshot]),
}

pub struct Input<'a> {
    pub kind: &'a str,
    pub target: String,
    pub replica_source: String,
    pub ramp: &'a Ramp,
    pub samples: &'a [Sample],
    pub replicas: Replicas<'a>,
    pub duplicates: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency(mut ms: Vec<f64>) -> Option<Latency> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    Some(Latency {
        p50: percentile(&ms, 50.0),
        p95: percentile(&ms, 95.0),
        p99: percentile(&ms, 99.0),
        max: ms[ms.len() - 1],
    })
}

/// A counter's value at `t`, linear between the snapshots around it.
fn counter_at(snaps: &[Snapshot], name: &str, t: f64) -> f64 {
    let value = |s: &Snapshot| s.1.get(name).copied().unwrap_or(0) as f64;
    let Some(first) = snaps.first() else {
        return 0.0;
    };
    if t <= first.0 {
        return value(first);
    }
    for w in snaps.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if t <= b.0 {
            let span = (b.0 - a.0).max(1e-9);
            return value(a) + (value(b) - value(a)) * (t - a.0) / span;
        }
    }
    snaps.last().map(value).unwrap_or(0.0)
}

impl Input<'_> {
    /// Successes per replica that finished within `[from, to)`.
    fn replica_counts(&self, from: f64, to: f64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        match self.replicas {
            Replicas::Samples(names) => {
                for s in self.samples {
                    if let Outcome::Ok {
                        replica: Some(r), ..
                    } = s.outcome
                    {
                        if s.done >= from && s.done < to {
                            let name = names.get(r as usize).map_or("?", String::as_str);
                            *out.entry(name.to_string()).or_insert(0.0) += 1.0;
                        }
                    }
                }
            }
            Replicas::Snapshots(snaps) => {
                let names: std::collections::BTreeSet<&String> =
                    snaps.iter().flat_map(|s| s.1.keys()).collect();
                for name in names {
                    let n = counter_at(snaps, name, to) - counter_at(snaps, name, from);
                    out.insert(name.clone(), n.max(0.0));
                }
            }
        }
        out
    }

    pub fn build(&self) -> Report {
        let step = self.ramp.step.as_secs_f64();
        let mut totals = Totals::default();
        let mut steps = Vec::new();
        for (i, &target_rate) in self.ramp.rates.iter().enumerate() {
            let (from, to) = (i as f64 * step, (i + 1) as f64 * step);
            let mut st = StepReport {
                step: i + 1,
                target_rate,
                achieved_rate: 0.0,
                sent: 0,
                ok: 0,
                errors: 0,
                error_kinds: BTreeMap::new(),
                latency_ms: None,
                replicas: BTreeMap::new(),
            };
            let mut ms = Vec::new();
            let mut finished_ok = 0u64;
            for s in self.samples {
                let ok = matches!(s.outcome, Outcome::Ok { .. });
                if ok && s.done >= from && s.done < to {
                    finished_ok += 1;
                }
                if s.due < from || s.due >= to {
                    continue;
                }
                st.sent += 1;
                match s.outcome {
                    Outcome::Ok { timed, .. } => {
                        st.ok += 1;
                        if timed {
                            ms.push((s.done - s.due) * 1000.0);
                        }
                    }
                    Outcome::Err(kind) => {
                        st.errors += 1;
                        *st.error_kinds.entry(kind.to_string()).or_insert(0) += 1;
                    }
                }
            }
            st.achieved_rate = finished_ok as f64 / step;
            st.latency_ms = latency(ms);
            let counts = self.replica_counts(from, to);
            let all: f64 = counts.values().sum();
            st.replicas = counts
                .into_iter()
                .map(|(name, n)| {
                    let share = Share {
                        count: n.round() as u64,
                        rate: n / step,
                        share: if all > 0.0 { n / all } else { 0.0 },
                    };
                    (name, share)
                })
                .collect();
            totals.sent += st.sent;
            totals.ok += st.ok;
            totals.errors += st.errors;
            for (k, v) in &st.error_kinds {
                *totals.error_kinds.entry(k.clone()).or_insert(0) += v;
            }
            steps.push(st);
        }
        totals.duplicates = self.duplicates;
        let seconds = self.ramp.total().as_secs_f64().ceil() as usize;
        let timeline = (0..seconds)
            .map(|s| {
                let (from, to) = (s as f64, s as f64 + 1.0);
                let achieved = self
                    .samples
                    .iter()
                    .filter(|x| matches!(x.outcome, Outcome::Ok { .. }))
                    .filter(|x| x.done >= from && x.done < to)
                    .count();
                Point {
                    t: to,
                    target_rate: self.ramp.rate_at(from + 0.5),
                    achieved_rate: achieved as f64,
                    replicas: self.replica_counts(from, to),
                }
            })
            .collect();
        Report {
            schema: SCHEMA,
            kind: self.kind.to_string(),
            target: self.target.clone(),
            replica_source: self.replica_source.clone(),
            step_secs: step,
            steps,
            timeline,
            totals,
        }
    }
}

impl Report {
    /// Every replica named anywhere in the report, sorted.
    pub fn replica_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .steps
            .iter()
            .flat_map(|s| s.replicas.keys().cloned())
            .chain(
                self.timeline
                    .iter()
                    .flat_map(|p| p.replicas.keys().cloned()),
            )
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>4}  {:>9}  {:>10}  {:>7}  {:>7}  {:>6}  {:>8}  {:>8}  {:>8}  replicas (share)",
            "step", "target/s", "achieved/s", "sent", "ok", "errors", "p50 ms", "p95 ms", "p99 ms"
        );
        for s in &self.steps {
            let (p50, p95, p99) =
                s.latency_ms
                    .map_or(("-".to_string(), "-".to_string(), "-".to_string()), |l| {
                        (
                            format!("{:.1}", l.p50),
                            format!("{:.1}", l.p95),
                            format!("{:.1}", l.p99),
                        )
                    });
            let shares: Vec<String> = s
                .replicas
                .iter()
                .map(|(name, sh)| format!("{name}: {:.0}%", sh.share * 100.0))
                .collect();
            let _ = writeln!(
                out,
                "{:>4}  {:>9.1}  {:>10.1}  {:>7}  {:>7}  {:>6}  {:>8}  {:>8}  {:>8}  {}",
                s.step,
                s.target_rate,
                s.achieved_rate,
                s.sent,
                s.ok,
                s.errors,
                p50,
                p95,
                p99,
                if shares.is_empty() {
                    "-".to_string()
                } else {
                    shares.join("  ")
                }
            );
        }
        let kinds: Vec<String> = self
            .totals
            .error_kinds
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            out,
            "total: {} sent, {} ok, {} errors{}, {} duplicates; replicas from {}",
            self.totals.sent,
            self.totals.ok,
            self.totals.errors,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            },
            self.totals.duplicates,
            self.replica_source
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ok(due: f64, done: f64, replica: u16) -> Sample {
        Sample {
            due,
            done,
            outcome: Outcome::Ok {
                replica: Some(replica),
                timed: true,
            },
        }
    }

    #[test]
    fn steps_count_achieved_by_finish_and_latency_by_due() {
        let ramp = Ramp::parse("4,4", Duration::from_secs(1)).expect("valid");
        let samples = vec![
            ok(0.0, 0.01, 0),
            ok(0.25, 0.26, 1),
            ok(0.5, 0.52, 0),
            // due in step 1, finished in step 2: late
            ok(0.75, 1.5, 1),
            ok(1.0, 1.1, 0),
            Sample {
                due: 1.25,
                done: 1.3,
                outcome: Outcome::Err("http_5xx"),
            },
        ];
        let names = vec!["a".to_string(), "b".to_string()];
        let report = Input {
            kind: "http",
            target: "t".into(),
            replica_source: "header:x".into(),
            ramp: &ramp,
            samples: &samples,
            replicas: Replicas::Samples(&names),
            duplicates: 0,
        }
        .build();
        let s1 = &report.steps[0];
        assert_eq!((s1.sent, s1.ok, s1.errors), (4, 4, 0));
        assert_eq!(s1.achieved_rate, 3.0);
        assert_eq!(s1.replicas["a"].count, 2);
        assert_eq!(s1.replicas["b"].count, 1);
        let l = s1.latency_ms.expect("timed samples");
        assert!((l.max - 750.0).abs() < 1e-6, "{l:?}");
        assert!((l.p50 - 10.0).abs() < 1e-6, "{l:?}");
        let s2 = &report.steps[1];
        assert_eq!((s2.sent, s2.ok, s2.errors), (2, 1, 1));
        assert_eq!(s2.error_kinds["http_5xx"], 1);
        assert_eq!(s2.achieved_rate, 2.0);
        assert_eq!(report.totals.errors, 1);
        assert_eq!(report.timeline.len(), 2);
        assert_eq!(report.timeline[1].replicas["b"], 1.0);
        assert!(report.table().contains("http_5xx 1"));
    }

    #[test]
    fn snapshots_give_replica_rates_by_difference() {
        let ramp = Ramp::parse("10,10", Duration::from_secs(2)).expect("valid");
        let snap = |t: f64, a: u64, b: u64| {
            (
                t,
                BTreeMap::from([("0".to_string(), a), ("1".to_string(), b)]),
            )
        };
        let snaps = vec![snap(0.0, 100, 0), snap(2.0, 110, 10), snap(4.0, 130, 20)];
        let report = Input {
            kind: "mqtt",
            target: "t".into(),
            replica_source: "admin:x".into(),
            ramp: &ramp,
            samples: &[],
            replicas: Replicas::Snapshots(&snaps),
            duplicates: 0,
        }
        .build();
        assert_eq!(report.steps[0].replicas["0"].count, 10);
        assert_eq!(report.steps[0].replicas["0"].share, 0.5);
        assert_eq!(report.steps[1].replicas["0"].rate, 10.0);
        assert_eq!(report.timeline[0].replicas["1"], 5.0);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
