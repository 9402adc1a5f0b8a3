//! The metrics registry: one per running app (tests run in parallel), passed
//! around as `Arc<Metrics>`; rendered as Prometheus text by the admin server.

pub mod names;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use names::*;

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

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registered(registry, vec)
}

fn float_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let vec = GaugeVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registered(registry, vec)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registered(registry, vec)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Self {
            replica_messages: counter_vec(
                r,
                REPLICA_MESSAGES,
                "MQTT PUBLISH packets to and from each replica",
                &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_DIRECTION],
            ),
            replica_bytes: counter_vec(
                r,
                REPLICA_BYTES,
                "MQTT bytes to and from each replica",
                &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_DIRECTION],
            ),
            instance_replicas: gauge_vec(
                r,
                INSTANCE_REPLICAS,
                "Replicas of each instance with an accepted MQTT session",
                &[LABEL_INSTANCE],
            ),
            mqtt_rewrites: counter_vec(
                r,
                MQTT_REWRITES,
                "Rewrites done for replicas, by kind (client_id, subscribe, unsubscribe filters)",
                &[LABEL_INSTANCE, LABEL_KIND],
            ),
            mqtt_errors: counter_vec(
                r,
                MQTT_ERRORS,
                "MQTT connections ended by an error, by kind",
                &[LABEL_KIND],
            ),
            mqtt_connections: counter_vec(
                r,
                MQTT_CONNECTIONS,
                "MQTT connections accepted, by kind (replica, passthrough)",
                &[LABEL_KIND],
            ),
            mqtt_connections_active: gauge_vec(
                r,
                MQTT_CONNECTIONS_ACTIVE,
                "MQTT connections open, by kind (replica, passthrough)",
                &[LABEL_KIND],
            ),
            replica_inflight: gauge_vec(
                r,
                REPLICA_INFLIGHT,
                "Messages delivered to a replica and not yet acknowledged (dispatch mode)",
                &[LABEL_INSTANCE, LABEL_REPLICA],
            ),
            dispatch_queued: gauge_vec(
                r,
                DISPATCH_QUEUED,
                "Messages waiting for a replica (dispatch mode)",
                &[LABEL_INSTANCE],
            ),
            dispatch_redeliveries: counter_vec(
                r,
                DISPATCH_REDELIVERIES,
                "Messages handed to another replica after the first left or stopped acknowledging",
                &[LABEL_INSTANCE],
            ),
            dispatch_dropped: counter_vec(
                r,
                DISPATCH_DROPPED,
                "Messages dropped because a limit forced it, by reason",
                &[LABEL_INSTANCE, LABEL_REASON],
            ),
            dispatch_uncorrelated: counter_vec(
                r,
                DISPATCH_UNCORRELATED,
                "Completion acknowledgement: jobs with no key, acknowledged on receipt",
                &[LABEL_INSTANCE],
            ),
            dispatch_unmatched: counter_vec(
                r,
                DISPATCH_UNMATCHED,
                "Completion acknowledgement: results whose key no job of their replica has",
                &[LABEL_INSTANCE],
            ),
            dispatch_in_progress: gauge_vec(
                r,
                DISPATCH_IN_PROGRESS,
                "Completion acknowledgement: jobs delivered and not yet done",
                &[LABEL_INSTANCE],
            ),
            dispatch_oldest_job: float_gauge_vec(
                r,
                DISPATCH_OLDEST_JOB,
                "Completion acknowledgement: age of the oldest job in progress (0 when none)",
                &[LABEL_INSTANCE],
            ),
            dispatch_window: gauge_vec(
                r,
                DISPATCH_WINDOW,
                "Dispatch: the broker's in-flight window for the instance's session (its MQTT 5 Receive Maximum; 0 when unknown or unlimited)",
                &[LABEL_INSTANCE],
            ),
            dispatch_window_full: counter_vec(
                r,
                DISPATCH_WINDOW_FULL,
                "Dispatch: times the broker's in-flight window held back messages replicas had room for",
                &[LABEL_INSTANCE],
            ),
            http_requests: counter_vec(
                r,
                HTTP_REQUESTS,
                "HTTP requests answered, by replica and status class",
                &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_CODE],
            ),
            http_duration: {
                let opts =
                    HistogramOpts::new(HTTP_DURATION, "Time to the replica's response headers")
                        .buckets(vec![
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0,
                        ]);
                let vec = HistogramVec::new(opts, &[LABEL_INSTANCE, LABEL_REPLICA])
                    .expect("metric names and labels are static and valid");
                r.register(Box::new(vec.clone()))
                    .expect("each metric is registered once in a fresh registry");
                vec
            },
            http_inflight: gauge_vec(
                r,
                HTTP_INFLIGHT,
                "HTTP requests (and spliced connections) in flight per replica",
                &[LABEL_INSTANCE, LABEL_REPLICA],
            ),
            http_replica_up: gauge_vec(
                r,
                HTTP_REPLICA_UP,
                "1 while a replica passes its health checks",
                &[LABEL_INSTANCE, LABEL_REPLICA],
            ),
            http_retries: counter_vec(
                r,
                HTTP_RETRIES,
                "HTTP requests sent to another replica after the first could not take them",
                &[LABEL_INSTANCE],
            ),
            http_errors: counter_vec(
                r,
                HTTP_ERRORS,
                "HTTP client connections ended by an error, by kind",
                &[LABEL_KIND],
            ),
            http_keyless: counter_vec(
                r,
                HTTP_KEYLESS,
                "balance = key-hash: requests without their key, sent by least-inflight",
                &[LABEL_INSTANCE],
            ),
            http_denied: counter_vec(
                r,
                HTTP_DENIED,
                "Requests the public HTTP listener refused: not published by the flows (404) or an admin path (403)",
                &[LABEL_INSTANCE],
            ),
            failover_seconds: {
                let opts = HistogramOpts::new(
                    FAILOVER_SECONDS,
                    "Active-standby failovers: from the fault being observable to the first \
                     message or response served by the new active replica",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ]);
                let vec = HistogramVec::new(opts, &[LABEL_INSTANCE, LABEL_SIDE, LABEL_CAUSE])
                    .expect("metric names and labels are static and valid");
                r.register(Box::new(vec.clone()))
                    .expect("each metric is registered once in a fresh registry");
                vec
            },
            failovers: Mutex::new(VecDeque::new()),
            replica_sessions: counter_vec(
                r,
                REPLICA_SESSIONS,
                "Replica MQTT sessions accepted (a replica that reconnects counts again)",
                &[LABEL_INSTANCE],
            ),
            flows_diverged: gauge_vec(
                r,
                FLOWS_DIVERGED,
                "HTTP replicas whose Node-RED flow rev differs from most replicas' (0 = all alike)",
                &[LABEL_INSTANCE],
            ),
            acl_denied: counter_vec(
                r,
                ACL_DENIED,
                "Replica publishes and subscriptions refused by the instance's acl, by action",
                &[LABEL_INSTANCE, LABEL_KIND],
            ),
            mqtt_auth: counter_vec(
                r,
                MQTT_AUTH,
                "MQTT logins checked by flowgate, by instance (empty: no instance) and result (ok, bad_password, unknown_user, no_credentials)",
                &[LABEL_INSTANCE, LABEL_RESULT],
            ),
            mqtt_refused: counter_vec(
                r,
                MQTT_REFUSED,
                "CONNECTs flowgate answered with a refusal, by reason (bad_credentials, not_authorized, max_connections, max_replicas)",
                &[LABEL_REASON],
            ),
            mqtt_throttled: counter_vec(
                r,
                MQTT_THROTTLED,
                "Times a replica went over mqtt.max_publish_rate and flowgate paused reading it",
                &[LABEL_INSTANCE],
            ),
            tls_reloads: counter_vec(
                r,
                TLS_RELOADS,
                "Certificate and password file reloads (SIGHUP), by result (ok, failed)",
                &[LABEL_RESULT],
            ),
            deploys: counter_vec(
                r,
                DEPLOYS,
                "Rolling flow deploys, by result (done, failed)",
                &[LABEL_INSTANCE, LABEL_RESULT],
            ),
            editor_deploys: counter_vec(
                r,
                EDITOR_DEPLOYS,
                "Deploys clicked in the editor, by result (done, conflict, refused, failed, busy)",
                &[LABEL_INSTANCE, LABEL_RESULT],
            ),
            editor_palette: counter_vec(
                r,
                EDITOR_PALETTE,
                "Palette changes from the editor (install, enable, disable, upgrade, remove) on every replica, by result (done, failed, refused)",
                &[LABEL_INSTANCE, LABEL_RESULT],
            ),
            editor_logins: counter_vec(
                r,
                EDITOR_LOGINS,
                "Editor logins, by result (ok, unknown_user, bad_password, no_credentials)",
                &[LABEL_INSTANCE, LABEL_RESULT],
            ),
            broker_store_changes: registered(
                r,
                IntCounter::new(
                    BROKER_STORE_CHANGES,
                    "Changes of the bundled broker's retained messages written to its store",
                )
                .expect("metric names are static and valid"),
            ),
            broker_store_commits: registered(
                r,
                IntCounter::new(
                    BROKER_STORE_COMMITS,
                    "Commits (one fsync each) of the bundled broker's store",
                )
                .expect("metric names are static and valid"),
            ),
            broker_store_errors: registered(
                r,
                IntCounter::new(
                    BROKER_STORE_ERRORS,
                    "Failed commits of the bundled broker's store (retried)",
                )
                .expect("metric names are static and valid"),
            ),
            broker_store_pending: registered(
                r,
                IntGauge::new(
                    BROKER_STORE_PENDING,
                    "Changes of the bundled broker's retained messages not yet on disk",
                )
                .expect("metric names are static and valid"),
            ),
            broker_store_commit_seconds: registered(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        BROKER_STORE_COMMIT_SECONDS,
                        "Time of one commit of the bundled broker's store: how long a change \
                         may wait to be on disk",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ]),
                )
                .expect("metric names are static and valid"),
            ),
            broker_up: registered(
                r,
                IntGauge::new(
                    BROKER_UP,
                    "1 while the bundled broker answers its watchdog's CONNECT (0 also with a broker of your own)",
                )
                .expect("metric names are static and valid"),
            ),
            broker_retained_restored: registered(
                r,
                IntGauge::new(
                    BROKER_RETAINED_RESTORED,
                    "Retained messages the bundled broker restored from its store at start",
                )
                .expect("metric names are static and valid"),
            ),
            broker_sessions_restored: registered(
                r,
                IntGauge::new(
                    BROKER_SESSIONS_RESTORED,
                    "Persistent sessions the bundled broker restored from its store at start",
                )
                .expect("metric names are static and valid"),
            ),
            broker_queued_restored: registered(
                r,
                IntGauge::new(
                    BROKER_QUEUED_RESTORED,
                    "Messages queued for persistent sessions the bundled broker restored at start",
                )
                .expect("metric names are static and valid"),
            ),
            broker_queued_stored: registered(
                r,
                IntGauge::new(
                    BROKER_QUEUED_STORED,
                    "Messages queued for the bundled broker's persistent sessions in the last snapshot on disk",
                )
                .expect("metric names are static and valid"),
            ),
            broker_session_snapshots: registered(
                r,
                IntCounter::new(
                    BROKER_SESSION_SNAPSHOTS,
                    "Snapshots of the bundled broker's persistent sessions written to its store",
                )
                .expect("metric names are static and valid"),
            ),
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
