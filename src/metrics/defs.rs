//! What each metric means: its name, help text and labels, one table row
//! per metric (`Metrics::new` registers them).

use super::names::{self, *};

/// A metric's name, help text and label names.
pub(super) struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

impl Def {
    pub fn opts(&self) -> prometheus::Opts {
        prometheus::Opts::new(self.name, self.help)
    }
}

pub(super) const REPLICA_MESSAGES: Def = Def {
    name: names::REPLICA_MESSAGES,
    help: "MQTT PUBLISH packets to and from each replica",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_DIRECTION],
};

pub(super) const REPLICA_BYTES: Def = Def {
    name: names::REPLICA_BYTES,
    help: "MQTT bytes to and from each replica",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_DIRECTION],
};

pub(super) const INSTANCE_REPLICAS: Def = Def {
    name: names::INSTANCE_REPLICAS,
    help: "Replicas of each instance with an accepted MQTT session",
    labels: &[LABEL_INSTANCE],
};

pub(super) const MQTT_REWRITES: Def = Def {
    name: names::MQTT_REWRITES,
    help: "Rewrites done for replicas, by kind (client_id, subscribe, unsubscribe filters)",
    labels: &[LABEL_INSTANCE, LABEL_KIND],
};

pub(super) const MQTT_ERRORS: Def = Def {
    name: names::MQTT_ERRORS,
    help: "MQTT connections ended by an error, by kind",
    labels: &[LABEL_KIND],
};

pub(super) const MQTT_CONNECTIONS: Def = Def {
    name: names::MQTT_CONNECTIONS,
    help: "MQTT connections accepted, by kind (replica, passthrough)",
    labels: &[LABEL_KIND],
};

pub(super) const MQTT_CONNECTIONS_ACTIVE: Def = Def {
    name: names::MQTT_CONNECTIONS_ACTIVE,
    help: "MQTT connections open, by kind (replica, passthrough)",
    labels: &[LABEL_KIND],
};

pub(super) const REPLICA_INFLIGHT: Def = Def {
    name: names::REPLICA_INFLIGHT,
    help: "Messages delivered to a replica and not yet acknowledged (dispatch mode)",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA],
};

pub(super) const DISPATCH_QUEUED: Def = Def {
    name: names::DISPATCH_QUEUED,
    help: "Messages waiting for a replica (dispatch mode)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_REDELIVERIES: Def = Def {
    name: names::DISPATCH_REDELIVERIES,
    help: "Messages handed to another replica after the first left or stopped acknowledging",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_DROPPED: Def = Def {
    name: names::DISPATCH_DROPPED,
    help: "Messages dropped because a limit forced it, by reason",
    labels: &[LABEL_INSTANCE, LABEL_REASON],
};

pub(super) const DISPATCH_UNCORRELATED: Def = Def {
    name: names::DISPATCH_UNCORRELATED,
    help: "Completion acknowledgement: jobs with no key, acknowledged on receipt",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_UNMATCHED: Def = Def {
    name: names::DISPATCH_UNMATCHED,
    help: "Completion acknowledgement: results whose key no job of their replica has",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_IN_PROGRESS: Def = Def {
    name: names::DISPATCH_IN_PROGRESS,
    help: "Completion acknowledgement: jobs delivered and not yet done",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_OLDEST_JOB: Def = Def {
    name: names::DISPATCH_OLDEST_JOB,
    help: "Completion acknowledgement: age of the oldest job in progress (0 when none)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_WINDOW: Def = Def {
    name: names::DISPATCH_WINDOW,
    help: "Dispatch: the broker's in-flight window for the instance's session (its MQTT 5 Receive Maximum; 0 when unknown or unlimited)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const DISPATCH_WINDOW_FULL: Def = Def {
    name: names::DISPATCH_WINDOW_FULL,
    help: "Dispatch: times the broker's in-flight window held back messages replicas had room for",
    labels: &[LABEL_INSTANCE],
};

pub(super) const HTTP_REQUESTS: Def = Def {
    name: names::HTTP_REQUESTS,
    help: "HTTP requests answered, by replica and status class",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA, LABEL_CODE],
};

pub(super) const HTTP_INFLIGHT: Def = Def {
    name: names::HTTP_INFLIGHT,
    help: "HTTP requests (and spliced connections) in flight per replica",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA],
};

pub(super) const HTTP_REPLICA_UP: Def = Def {
    name: names::HTTP_REPLICA_UP,
    help: "1 while a replica passes its health checks",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA],
};

pub(super) const HTTP_RETRIES: Def = Def {
    name: names::HTTP_RETRIES,
    help: "HTTP requests sent to another replica after the first could not take them",
    labels: &[LABEL_INSTANCE],
};

pub(super) const HTTP_ERRORS: Def = Def {
    name: names::HTTP_ERRORS,
    help: "HTTP client connections ended by an error, by kind",
    labels: &[LABEL_KIND],
};

pub(super) const HTTP_KEYLESS: Def = Def {
    name: names::HTTP_KEYLESS,
    help: "balance = key-hash: requests without their key, sent by least-inflight",
    labels: &[LABEL_INSTANCE],
};

pub(super) const HTTP_DENIED: Def = Def {
    name: names::HTTP_DENIED,
    help: "Requests the public HTTP listener refused: not published by the flows (404) or an admin path (403)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const REPLICA_SESSIONS: Def = Def {
    name: names::REPLICA_SESSIONS,
    help: "Replica MQTT sessions accepted (a replica that reconnects counts again)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const FLOWS_DIVERGED: Def = Def {
    name: names::FLOWS_DIVERGED,
    help: "HTTP replicas whose Node-RED flow rev differs from most replicas' (0 = all alike)",
    labels: &[LABEL_INSTANCE],
};

pub(super) const ACL_DENIED: Def = Def {
    name: names::ACL_DENIED,
    help: "Replica publishes and subscriptions refused by the instance's acl, by action",
    labels: &[LABEL_INSTANCE, LABEL_KIND],
};

pub(super) const MQTT_AUTH: Def = Def {
    name: names::MQTT_AUTH,
    help: "MQTT logins checked by flowgate, by instance (empty: no instance) and result (ok, bad_password, unknown_user, no_credentials)",
    labels: &[LABEL_INSTANCE, LABEL_RESULT],
};

pub(super) const MQTT_REFUSED: Def = Def {
    name: names::MQTT_REFUSED,
    help: "CONNECTs flowgate answered with a refusal, by reason (bad_credentials, not_authorized, max_connections, max_replicas)",
    labels: &[LABEL_REASON],
};

pub(super) const MQTT_THROTTLED: Def = Def {
    name: names::MQTT_THROTTLED,
    help: "Times a replica went over mqtt.max_publish_rate and flowgate paused reading it",
    labels: &[LABEL_INSTANCE],
};

pub(super) const TLS_RELOADS: Def = Def {
    name: names::TLS_RELOADS,
    help: "Certificate and password file reloads (SIGHUP), by result (ok, failed)",
    labels: &[LABEL_RESULT],
};

pub(super) const DEPLOYS: Def = Def {
    name: names::DEPLOYS,
    help: "Rolling flow deploys, by result (done, failed)",
    labels: &[LABEL_INSTANCE, LABEL_RESULT],
};

pub(super) const EDITOR_DEPLOYS: Def = Def {
    name: names::EDITOR_DEPLOYS,
    help: "Deploys clicked in the editor, by result (done, conflict, refused, failed, busy)",
    labels: &[LABEL_INSTANCE, LABEL_RESULT],
};

pub(super) const EDITOR_PALETTE: Def = Def {
    name: names::EDITOR_PALETTE,
    help: "Palette changes from the editor (install, enable, disable, upgrade, remove) on every replica, by result (done, failed, refused)",
    labels: &[LABEL_INSTANCE, LABEL_RESULT],
};

pub(super) const EDITOR_LOGINS: Def = Def {
    name: names::EDITOR_LOGINS,
    help: "Editor logins, by result (ok, unknown_user, bad_password, no_credentials)",
    labels: &[LABEL_INSTANCE, LABEL_RESULT],
};

pub(super) const BROKER_STORE_CHANGES: Def = Def {
    name: names::BROKER_STORE_CHANGES,
    help: "Changes of the bundled broker's retained messages written to its store",
    labels: &[],
};

pub(super) const BROKER_STORE_COMMITS: Def = Def {
    name: names::BROKER_STORE_COMMITS,
    help: "Commits (one fsync each) of the bundled broker's store",
    labels: &[],
};

pub(super) const BROKER_STORE_ERRORS: Def = Def {
    name: names::BROKER_STORE_ERRORS,
    help: "Failed commits of the bundled broker's store (retried)",
    labels: &[],
};

pub(super) const BROKER_STORE_PENDING: Def = Def {
    name: names::BROKER_STORE_PENDING,
    help: "Changes of the bundled broker's retained messages not yet on disk",
    labels: &[],
};

pub(super) const BROKER_UP: Def = Def {
    name: names::BROKER_UP,
    help: "1 while the bundled broker answers its watchdog's CONNECT (0 also with a broker of your own)",
    labels: &[],
};

pub(super) const BROKER_RETAINED_RESTORED: Def = Def {
    name: names::BROKER_RETAINED_RESTORED,
    help: "Retained messages the bundled broker restored from its store at start",
    labels: &[],
};

pub(super) const BROKER_SESSIONS_RESTORED: Def = Def {
    name: names::BROKER_SESSIONS_RESTORED,
    help: "Persistent sessions the bundled broker restored from its store at start",
    labels: &[],
};

pub(super) const BROKER_QUEUED_RESTORED: Def = Def {
    name: names::BROKER_QUEUED_RESTORED,
    help: "Messages queued for persistent sessions the bundled broker restored at start",
    labels: &[],
};

pub(super) const BROKER_QUEUED_STORED: Def = Def {
    name: names::BROKER_QUEUED_STORED,
    help:
        "Messages queued for the bundled broker's persistent sessions in the last snapshot on disk",
    labels: &[],
};

pub(super) const BROKER_SESSION_SNAPSHOTS: Def = Def {
    name: names::BROKER_SESSION_SNAPSHOTS,
    help: "Snapshots of the bundled broker's persistent sessions written to its store",
    labels: &[],
};

pub(super) const HTTP_DURATION: Def = Def {
    name: names::HTTP_DURATION,
    help: "Time to the replica's response headers",
    labels: &[LABEL_INSTANCE, LABEL_REPLICA],
};

pub(super) const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub(super) const FAILOVER_SECONDS: Def = Def {
    name: names::FAILOVER_SECONDS,
    help: "Active-standby failovers: from the fault being observable to the first \
     message or response served by the new active replica",
    labels: &[LABEL_INSTANCE, LABEL_SIDE, LABEL_CAUSE],
};

pub(super) const FAILOVER_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(super) const BROKER_STORE_COMMIT_SECONDS: Def = Def {
    name: names::BROKER_STORE_COMMIT_SECONDS,
    help: "Time of one commit of the bundled broker's store: how long a change \
     may wait to be on disk",
    labels: &[],
};

pub(super) const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
