//! The metrics registry: one per running app (tests run in parallel), passed
//! around as `Arc<Metrics>`; rendered as Prometheus text by the admin server.

mod defs;
pub mod names;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
};

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use defs::Def;
use names::*;

/// What a metric's constructor can only fail on.
const VALID: &str = "metric names and labels are static and valid";

pub struct Metrics {
    registry: Registry,
    pub replica_messages: IntCounterVec,
    pub replica_bytes: IntCounterVec,
    pub instance_replicas: IntGaugeVec,
    pub mqtt_rewrites: IntCounterVec,
    pub mqtt_errors: IntCounterVec,
    pub mqtt_connections: IntCounterVec,
    pub mqtt_connections_active: IntGaugeVec,
    pub replica_inflight: IntGaugeVec,
    pub dispatch_queued: IntGaugeVec,
    pub dispatch_redeliveries: IntCounterVec,
    pub dispatch_dropped: IntCounterVec,
    pub dispatch_uncorrelated: IntCounterVec,
    pub dispatch_unmatched: IntCounterVec,
    pub dispatch_in_progress: IntGaugeVec,
    pub dispatch_oldest_job: GaugeVec,
    pub dispatch_window: IntGaugeVec,
    pub dispatch_window_full: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_inflight: IntGaugeVec,
    pub http_replica_up: IntGaugeVec,
    pub http_retries: IntCounterVec,
    pub http_keyless: IntCounterVec,
    pub http_errors: IntCounterVec,
    pub http_denied: IntCounterVec,
    pub failover_seconds: HistogramVec,
    pub deploys: IntCounterVec,
    pub editor_deploys: IntCounterVec,
    pub editor_logins: IntCounterVec,
    pub editor_palette: IntCounterVec,
    pub acl_denied: IntCounterVec,
    pub flows_diverged: IntGaugeVec,
    pub replica_sessions: IntCounterVec,
    pub mqtt_auth: IntCounterVec,
    pub mqtt_refused: IntCounterVec,
    pub mqtt_throttled: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub broker_store_changes: IntCounter,
    pub broker_store_commits: IntCounter,
    pub broker_store_errors: IntCounter,
    pub broker_store_pending: IntGauge,
    pub broker_store_commit_seconds: Histogram,
    pub broker_retained_restored: IntGauge,
    pub broker_sessions_restored: IntGauge,
    pub broker_queued_restored: IntGauge,
    pub broker_session_snapshots: IntCounter,
    pub broker_queued_stored: IntGauge,
    pub broker_up: IntGauge,
    /// The last failovers, newest last, for the admin API.
    failovers: Mutex<VecDeque<Failover>>,
}

/// One active-standby failover: from the fault being observable (socket
/// closed, missed ack deadline, failed probe or refused connection) to the
/// first message or response served by the new active replica.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub instance: String,
    /// `mqtt` or `http`.
    pub side: &'static str,
    /// `disconnect`, `ack_timeout`, `health`, `refused`, `failback`...
    pub cause: &'static str,
    /// The replica that lost the role (MQTT slot or HTTP replica index).
    pub from: Option<String>,
    pub to: String,
    pub seconds: f64,
    /// When the new replica served, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl Failover {
    /// A failover whose fault was observable at `since` and whose new active
    /// replica served just now.
    pub fn now(
        instance: &str,
        side: &'static str,
        cause: &'static str,
        from: Option<String>,
        to: String,
        since: std::time::Instant,
    ) -> Self {
        Self {
            instance: instance.to_string(),
            side,
            cause,
            from,
            to,
            seconds: since.elapsed().as_secs_f64(),
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// How many failovers the admin API keeps.
const FAILOVERS_KEPT: usize = 50;

/// Counters of one replica connection, resolved once at connect so the hot
/// path increments without a label lookup.
pub struct ReplicaCounters {
    pub messages_to: IntCounter,
    pub messages_from: IntCounter,
    pub bytes_to: IntCounter,
    pub bytes_from: IntCounter,
}

/// Registers `vec` in `registry` and hands it back.
fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, vec: C) -> C {
    registry
        .register(Box::new(vec.clone()))
        .expect("each metric is registered once in a fresh registry");
    vec
}

fn counter_vec(registry: &Registry, def: &Def) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(def.opts(), def.labels).expect(VALID),
    )
}

fn float_gauge_vec(registry: &Registry, def: &Def) -> GaugeVec {
    registered(
        registry,
        GaugeVec::new(def.opts(), def.labels).expect(VALID),
    )
}

fn gauge_vec(registry: &Registry, def: &Def) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(def.opts(), def.labels).expect(VALID),
    )
}

fn histogram_vec(registry: &Registry, def: &Def, buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(def.name, def.help).buckets(buckets.to_vec());
    registered(registry, HistogramVec::new(opts, def.labels).expect(VALID))
}

fn int_counter(registry: &Registry, def: &Def) -> IntCounter {
    registered(registry, IntCounter::with_opts(def.opts()).expect(VALID))
}

fn int_gauge(registry: &Registry, def: &Def) -> IntGauge {
    registered(registry, IntGauge::with_opts(def.opts()).expect(VALID))
}

fn histogram(registry: &Registry, def: &Def, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(def.name, def.help).buckets(buckets.to_vec());
    registered(registry, Histogram::with_opts(opts).expect(VALID))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Self {
            replica_messages: counter_vec(r, &defs::REPLICA_MESSAGES),
            replica_bytes: counter_vec(r, &defs::REPLICA_BYTES),
            instance_replicas: gauge_vec(r, &defs::INSTANCE_REPLICAS),
            mqtt_rewrites: counter_vec(r, &defs::MQTT_REWRITES),
            mqtt_errors: counter_vec(r, &defs::MQTT_ERRORS),
            mqtt_connections: counter_vec(r, &defs::MQTT_CONNECTIONS),
            mqtt_connections_active: gauge_vec(r, &defs::MQTT_CONNECTIONS_ACTIVE),
            replica_inflight: gauge_vec(r, &defs::REPLICA_INFLIGHT),
            dispatch_queued: gauge_vec(r, &defs::DISPATCH_QUEUED),
            dispatch_redeliveries: counter_vec(r, &defs::DISPATCH_REDELIVERIES),
            dispatch_dropped: counter_vec(r, &defs::DISPATCH_DROPPED),
            dispatch_uncorrelated: counter_vec(r, &defs::DISPATCH_UNCORRELATED),
            dispatch_unmatched: counter_vec(r, &defs::DISPATCH_UNMATCHED),
            dispatch_in_progress: gauge_vec(r, &defs::DISPATCH_IN_PROGRESS),
            dispatch_oldest_job: float_gauge_vec(r, &defs::DISPATCH_OLDEST_JOB),
            dispatch_window: gauge_vec(r, &defs::DISPATCH_WINDOW),
            dispatch_window_full: counter_vec(r, &defs::DISPATCH_WINDOW_FULL),
            http_requests: counter_vec(r, &defs::HTTP_REQUESTS),
            http_duration: histogram_vec(r, &defs::HTTP_DURATION, defs::HTTP_DURATION_BUCKETS),
            http_inflight: gauge_vec(r, &defs::HTTP_INFLIGHT),
            http_replica_up: gauge_vec(r, &defs::HTTP_REPLICA_UP),
            http_retries: counter_vec(r, &defs::HTTP_RETRIES),
            http_errors: counter_vec(r, &defs::HTTP_ERRORS),
            http_keyless: counter_vec(r, &defs::HTTP_KEYLESS),
            http_denied: counter_vec(r, &defs::HTTP_DENIED),
            failover_seconds: histogram_vec(r, &defs::FAILOVER_SECONDS, defs::FAILOVER_BUCKETS),
            failovers: Mutex::new(VecDeque::new()),
            replica_sessions: counter_vec(r, &defs::REPLICA_SESSIONS),
            flows_diverged: gauge_vec(r, &defs::FLOWS_DIVERGED),
            acl_denied: counter_vec(r, &defs::ACL_DENIED),
            mqtt_auth: counter_vec(r, &defs::MQTT_AUTH),
            mqtt_refused: counter_vec(r, &defs::MQTT_REFUSED),
            mqtt_throttled: counter_vec(r, &defs::MQTT_THROTTLED),
            tls_reloads: counter_vec(r, &defs::TLS_RELOADS),
            deploys: counter_vec(r, &defs::DEPLOYS),
            editor_deploys: counter_vec(r, &defs::EDITOR_DEPLOYS),
            editor_palette: counter_vec(r, &defs::EDITOR_PALETTE),
            editor_logins: counter_vec(r, &defs::EDITOR_LOGINS),
            broker_store_changes: int_counter(r, &defs::BROKER_STORE_CHANGES),
            broker_store_commits: int_counter(r, &defs::BROKER_STORE_COMMITS),
            broker_store_errors: int_counter(r, &defs::BROKER_STORE_ERRORS),
            broker_store_pending: int_gauge(r, &defs::BROKER_STORE_PENDING),
            broker_store_commit_seconds: histogram(
                r,
                &defs::BROKER_STORE_COMMIT_SECONDS,
                defs::COMMIT_BUCKETS,
            ),
            broker_up: int_gauge(r, &defs::BROKER_UP),
            broker_retained_restored: int_gauge(r, &defs::BROKER_RETAINED_RESTORED),
            broker_sessions_restored: int_gauge(r, &defs::BROKER_SESSIONS_RESTORED),
            broker_queued_restored: int_gauge(r, &defs::BROKER_QUEUED_RESTORED),
            broker_queued_stored: int_gauge(r, &defs::BROKER_QUEUED_STORED),
            broker_session_snapshots: int_counter(r, &defs::BROKER_SESSION_SNAPSHOTS),
            registry,
        };
        // every kind of error at 0 from the start
        for kind in MQTT_ERROR_KINDS {
            metrics.mqtt_errors.with_label_values(&[kind]);
        }
        metrics
    }

    /// Registers an instance so its gauge reads 0 before any replica comes.
    /// An instance's series, at 0 before their first count (alerts and
    /// dashboards see them: `rate()` and `absent()`).
    pub fn declare_instance(&self, instance: &str) {
        self.instance_replicas.with_label_values(&[instance]).set(0);
        self.dispatch_redeliveries.with_label_values(&[instance]);
        for kind in REWRITE_KINDS {
            self.mqtt_rewrites.with_label_values(&[instance, kind]);
        }
        for reason in DROP_REASONS {
            self.dispatch_dropped.with_label_values(&[instance, reason]);
        }
        self.dispatch_uncorrelated.with_label_values(&[instance]);
        self.dispatch_unmatched.with_label_values(&[instance]);
    }

    pub fn replica(&self, instance: &str, slot: u16) -> ReplicaCounters {
        let slot = slot.to_string();
        let m = |d| {
            self.replica_messages
                .with_label_values(&[instance, slot.as_str(), d])
        };
        let b = |d| {
            self.replica_bytes
                .with_label_values(&[instance, slot.as_str(), d])
        };
        ReplicaCounters {
            messages_to: m(TO_REPLICA),
            messages_from: m(FROM_REPLICA),
            bytes_to: b(TO_REPLICA),
            bytes_from: b(FROM_REPLICA),
        }
    }

    /// Records a failover: histogram, log line, and the admin API's list.
    pub fn failover(&self, f: Failover) {
        self.failover_seconds
            .with_label_values(&[f.instance.as_str(), f.side, f.cause])
            .observe(f.seconds);
        tracing::info!(
            instance = %f.instance,
            side = f.side,
            cause = f.cause,
            from = ?f.from,
            to = %f.to,
            ms = format_args!("{:.1}", f.seconds * 1000.0),
            "failover: new active replica served"
        );
        let mut list = self.failovers.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() == FAILOVERS_KEPT {
            list.pop_front();
        }
        list.push_back(f);
    }

    /// The failovers of `instance` kept for the admin API, oldest first.
    pub fn failovers(&self, instance: &str) -> Vec<Failover> {
        self.failovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|f| f.instance == instance)
            .cloned()
            .collect()
    }

    pub fn error(&self, kind: &str) {
        self.mqtt_errors.with_label_values(&[kind]).inc();
    }

    /// An HTTP client connection ended by `kind` of trouble.
    pub fn http_error(&self, kind: &str) {
        self.http_errors.with_label_values(&[kind]).inc();
    }

    pub fn connection_gauge(&self, kind: &str) -> IntGauge {
        self.mqtt_connections.with_label_values(&[kind]).inc();
        self.mqtt_connections_active.with_label_values(&[kind])
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
