//! Every metric name and label, in one place. Names follow
//! `flowgate_<area>_<noun>_<unit>`; labels stay bounded (instance, replica slot,
//! direction, kind), never topics or client ids.

pub const REPLICA_MESSAGES: &str = "flowgate_replica_messages_total";
pub const REPLICA_BYTES: &str = "flowgate_replica_bytes_total";
pub const INSTANCE_REPLICAS: &str = "flowgate_instance_replicas_connected";
pub const MQTT_REWRITES: &str = "flowgate_mqtt_rewrites_total";
pub const MQTT_ERRORS: &str = "flowgate_mqtt_errors_total";
pub const MQTT_CONNECTIONS: &str = "flowgate_mqtt_connections_total";
pub const MQTT_CONNECTIONS_ACTIVE: &str = "flowgate_mqtt_connections_active";
pub const REPLICA_INFLIGHT: &str = "flowgate_replica_inflight_messages";
pub const DISPATCH_QUEUED: &str = "flowgate_dispatch_queued_messages";
pub const BROKER_STORE_CHANGES: &str = "flowgate_broker_store_changes_total";
pub const BROKER_STORE_COMMITS: &str = "flowgate_broker_store_commits_total";
pub const BROKER_STORE_ERRORS: &str = "flowgate_broker_store_errors_total";
pub const BROKER_STORE_PENDING: &str = "flowgate_broker_store_pending";
pub const BROKER_STORE_COMMIT_SECONDS: &str = "flowgate_broker_store_commit_seconds";
pub const BROKER_UP: &str = "flowgate_broker_up";
pub const BROKER_RETAINED_RESTORED: &str = "flowgate_broker_retained_restored";
pub const BROKER_SESSIONS_RESTORED: &str = "flowgate_broker_sessions_restored";
pub const BROKER_QUEUED_RESTORED: &str = "flowgate_broker_queued_restored";
pub const BROKER_SESSION_SNAPSHOTS: &str = "flowgate_broker_session_snapshots_total";
pub const BROKER_QUEUED_STORED: &str = "flowgate_broker_queued_stored";
pub const HTTP_KEYLESS: &str = "flowgate_http_keyless_requests_total";
pub const DISPATCH_REDELIVERIES: &str = "flowgate_dispatch_redeliveries_total";
pub const DISPATCH_DROPPED: &str = "flowgate_dispatch_dropped_total";
pub const DISPATCH_UNCORRELATED: &str = "flowgate_dispatch_uncorrelated_total";
pub const DISPATCH_UNMATCHED: &str = "flowgate_dispatch_unmatched_results_total";
pub const DISPATCH_IN_PROGRESS: &str = "flowgate_dispatch_jobs_in_progress";
pub const DISPATCH_OLDEST_JOB: &str = "flowgate_dispatch_oldest_job_seconds";
pub const DISPATCH_WINDOW: &str = "flowgate_dispatch_upstream_window";
pub const DISPATCH_WINDOW_FULL: &str = "flowgate_dispatch_upstream_window_full_total";
pub const HTTP_REQUESTS: &str = "flowgate_http_requests_total";
pub const HTTP_DURATION: &str = "flowgate_http_request_duration_seconds";
pub const HTTP_INFLIGHT: &str = "flowgate_http_inflight_requests";
pub const HTTP_REPLICA_UP: &str = "flowgate_http_replica_up";
pub const HTTP_RETRIES: &str = "flowgate_http_retries_total";
pub const HTTP_ERRORS: &str = "flowgate_http_errors_total";
pub const HTTP_DENIED: &str = "flowgate_http_denied_total";
pub const FAILOVER_SECONDS: &str = "flowgate_failover_seconds";
pub const DEPLOYS: &str = "flowgate_deploys_total";
pub const EDITOR_DEPLOYS: &str = "flowgate_editor_deploys_total";
pub const EDITOR_LOGINS: &str = "flowgate_editor_logins_total";
pub const EDITOR_PALETTE: &str = "flowgate_editor_palette_total";
pub const ACL_DENIED: &str = "flowgate_acl_denied_total";
pub const FLOWS_DIVERGED: &str = "flowgate_http_flows_diverged_replicas";
pub const REPLICA_SESSIONS: &str = "flowgate_replica_sessions_total";
pub const MQTT_AUTH: &str = "flowgate_mqtt_auth_total";
pub const MQTT_REFUSED: &str = "flowgate_mqtt_connect_refused_total";
pub const MQTT_THROTTLED: &str = "flowgate_mqtt_throttled_total";
pub const TLS_RELOADS: &str = "flowgate_tls_reloads_total";

pub const LABEL_INSTANCE: &str = "instance";
pub const LABEL_REPLICA: &str = "replica";
pub const LABEL_DIRECTION: &str = "direction";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_CODE: &str = "code";
pub const LABEL_SIDE: &str = "side";
pub const LABEL_CAUSE: &str = "cause";
pub const LABEL_RESULT: &str = "result";

/// `side` values of the failover histogram.
pub const SIDE_MQTT: &str = "mqtt";
pub const SIDE_HTTP: &str = "http";

/// `direction` values.
pub const TO_REPLICA: &str = "to_replica";
pub const FROM_REPLICA: &str = "from_replica";

/// `kind` values of the connection metrics.
pub const CONN_REPLICA: &str = "replica";
pub const CONN_PASSTHROUGH: &str = "passthrough";

/// `kind` values of `flowgate_mqtt_errors_total` (see `ConnError::kind`,
/// `CodecError::kind` and the CONNECT refusals), exported at 0 from the start.
pub const MQTT_ERROR_KINDS: &[&str] = &[
    "accept",
    "connect_timeout",
    "closed_before_connect",
    "protocol_violation",
    "unsupported_protocol",
    "unexpected_packet",
    "malformed_packet",
    "packet_too_large",
    "client_id_too_long",
    "client_io",
    "upstream_io",
    "upstream_unreachable",
    "upstream_malformed_packet",
    "keep_alive_timeout",
    "handshake",
    "bad_credentials",
    "not_authorized",
    "max_connections",
    "max_replicas",
    "internal",
];

/// `kind` values of `flowgate_mqtt_rewrites_total`.
pub const REWRITE_KINDS: &[&str] = &["client_id", "subscribe", "unsubscribe"];

/// `reason` values of `flowgate_dispatch_dropped_total`.
pub const DROP_REASONS: &[&str] = &["replica_backlog", "expired", "too_large"];
