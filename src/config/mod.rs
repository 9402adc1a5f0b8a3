//! Configuration: the TOML file as written (`file` structs, unknown keys
//! refused) and the validated [`Config`] the rest of flowgate runs on.
//!
//! Precedence: built-in defaults, then the file. There is no environment
//! override yet. Validation reports every problem at once, each with the path
//! of the key it concerns (`instance[1].match`), so `flowgate check` can list
//! them all; the binary exits 64 on a bad config.

mod editor;
mod file;
mod http;
mod plugin;
mod tls;
mod types;

pub use editor::EditorConfig;
pub use http::{Balance, HttpConfig, RequestKey};
pub use plugin::proxy_only_keys;
pub use tls::{ClientAuth, TlsConfig, UpstreamTls};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use types::{ByteSize, Strategy, Upstream, ValueError};

use crate::topic::TopicFilter;

/// The embedded default config, used by `flowgate run` with no arguments.
pub const DEFAULT_PATH: &str = "config/flowgate.toml";

/// A validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_id: String,
    /// Where the bundled broker keeps its retained messages (`None`: it keeps
    /// nothing on disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Threads of the async runtime; `None`: one per core (or
    /// `TOKIO_WORKER_THREADS`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    pub admin: AdminConfig,
    pub mqtt: MqttConfig,
    #[serde(rename = "instance")]
    pub instances: Vec<InstanceConfig>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token the admin API asks for (from `token_file` or `token`);
    /// required when `listen` is not a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// `/metrics` answers without the token (for a Prometheus on the network).
    pub metrics_public: bool,
    /// Serve the admin API over HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `[mqtt.tls]`: an MQTT listener over TLS.
#[derive(Debug, Clone, Serialize)]
pub struct MqttTls {
    pub listen: SocketAddr,
    #[serde(flatten)]
    pub tls: TlsConfig,
}

/// `[mqtt.websocket]`: MQTT over WebSocket (`ws://`, or `wss://` with `tls`).
#[derive(Debug, Clone, Serialize)]
pub struct MqttWebSocket {
    pub listen: SocketAddr,
    /// The URL path clients connect to (`/mqtt`, as Mosquitto and EMQX).
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// Completion acknowledgement (dispatch mode): a job (QoS 1/2) is
/// acknowledged upstream once the replica that got it publishes a result
/// carrying the same key, not when it acknowledges receipt.
#[derive(Debug, Clone, Serialize)]
pub struct Complete {
    /// Where results are published (`complete.topic`, one filter or a list).
    pub topic: Vec<TopicFilter>,
    /// How a result names its job.
    pub correlate: Correlate,
    /// A job not done this long after it was delivered goes to another
    /// replica (default: the instance's `ack_timeout`).
    #[serde(with = "types::humantime_ser")]
    pub timeout: Duration,
}

/// How a job and its result carry the same key (`complete.correlate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Correlate {
    /// `topic:N`: topic level N, 0-based (`jobs/123`, `done/123`).
    TopicLevel(usize),
    /// `json:FIELD`: a top-level field of a JSON payload.
    JsonField(String),
    /// `correlation-data`: the MQTT 5 Correlation Data property.
    CorrelationData,
}

impl std::str::FromStr for Correlate {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s == "correlation-data" {
            return Ok(Self::CorrelationData);
        }
        if let Some(n) = s.strip_prefix("topic:") {
            return n
                .parse()
                .map(Self::TopicLevel)
                .map_err(|_| ValueError::NotCorrelate(s.to_owned()));
        }
        match s.strip_prefix("json:") {
            Some(field) if !field.is_empty() => Ok(Self::JsonField(field.to_owned())),
            _ => Err(ValueError::NotCorrelate(s.to_owned())),
        }
    }
}

impl fmt::Display for Correlate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TopicLevel(n) => write!(f, "topic:{n}"),
            Self::JsonField(field) => write!(f, "json:{field}"),
            Self::CorrelationData => f.write_str("correlation-data"),
        }
    }
}

impl Serialize for Correlate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Topic filters an instance's replicas may use; a list left out allows all.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Acl {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<TopicFilter>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<TopicFilter>>,
}

impl Acl {
    /// May a replica publish on `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish
            .as_ref()
            .is_none_or(|l| l.iter().any(|f| f.matches(topic)))
    }

    /// May a replica subscribe to `filter` (an allowed filter covers it)?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe
            .as_ref()
            .is_none_or(|l| l.iter().any(|f| f.covers(filter)))
    }
}

/// A secret string: never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for sending where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a client sent.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        if ours.len() != candidate.len() {
            return false;
        }
        ours.iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub mode: Mode,
    /// Time a new connection has to send its CONNECT.
    #[serde(with = "types::humantime_ser")]
    pub connect_timeout: Duration,
    /// Time to reach the upstream broker for one client.
    #[serde(with = "types::humantime_ser")]
    pub upstream_connect_timeout: Duration,
    /// Largest packet accepted from a replica (remaining length).
    pub max_packet_size: ByteSize,
    /// Dispatch mode: messages waiting for a replica, per instance, before
    /// flowgate stops reading from the broker.
    pub queue_limit: usize,
    /// Dispatch mode: subscribe upstream as `$share/{instance}/{filter}` so
    /// several flowgate nodes split one instance's stream.
    pub upstream_share: bool,
    /// Dispatch mode: keep-alive of the upstream sessions.
    #[serde(with = "types::humantime_ser")]
    pub upstream_keep_alive: Duration,
    /// Dispatch mode: MQTT 5 upstream sessions (`auto`: when the broker
    /// accepts them).
    pub upstream_protocol: UpstreamProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub websocket: Option<MqttWebSocket>,
    /// TLS to an `mqtts://` upstream.
    pub upstream_tls: UpstreamTls,
    /// Usernames and argon2 password hashes every client must log in with
    /// (an instance's own `password_file` takes over for its replicas);
    /// absent: credentials go to the broker untouched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Client connections at once on this node, all listeners together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// PUBLISH packets a second one replica may send; beyond it flowgate
    /// stops reading that connection for a while (no packet is dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_publish_rate: Option<u32>,
}

/// How an instance's replicas share their MQTT work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The broker distributes: filters become `$share/{instance}~{h}/{filter}`.
    Share,
    /// flowgate distributes each message to one replica itself.
    Dispatch,
}

/// Dispatch mode: the MQTT version of the upstream sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub enum UpstreamProtocol {
    /// MQTT 5 when the broker accepts it, else 3.1.1 (logged once).
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// How a connection is recognised as one of an instance's replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchRule {
    ClientId(String),
    ClientIdPrefix(String),
    Username(String),
}

impl MatchRule {
    pub fn matches(&self, client_id: &str, username: Option<&str>) -> bool {
        match self {
            Self::ClientId(id) => client_id == id,
            Self::ClientIdPrefix(prefix) => client_id.starts_with(prefix.as_str()),
            Self::Username(name) => username == Some(name.as_str()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub match_rule: MatchRule,
    pub broadcast: Vec<TopicFilter>,
    /// Dispatch mode: how messages are spread over the replicas.
    pub strategy: Strategy,
    /// Dispatch mode, key-hash: the topic level (0-based) used as the key;
    /// the whole topic when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_level: Option<usize>,
    /// Dispatch mode: a replica that leaves a message unacknowledged this long
    /// has its unacknowledged messages handed to another replica.
    #[serde(with = "types::humantime_ser")]
    pub ack_timeout: Duration,
    /// Dispatch mode: unacknowledged QoS 1/2 messages per replica.
    pub max_inflight: usize,
    /// Active-standby: a lower slot that comes back takes the active role
    /// back (default false: the replica that took over keeps it).
    pub failback: bool,
    /// Dispatch mode: what the replicas may publish and subscribe to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<Acl>,
    /// The replicas' web traffic, balanced by flowgate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    /// The instance's Node-RED editor, served by flowgate as one Node-RED.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub editor: Option<EditorConfig>,
    /// The replicas log in to flowgate with these credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// flowgate logs in to the broker as this user for this instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_password: Option<Secret>,
    /// Dispatch mode: the client id of the instance's upstream session
    /// (default `flowgate-{node_id}-{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_client_id: Option<String>,
    /// Replicas connected at once on this node; one more is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<usize>,
    /// Dispatch mode: completion acknowledgement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete: Option<Complete>,
}

/// One problem found in a config, with the path of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config could not be used: every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path} has {} problem(s):\n{}", .problems.len(), list(.problems))]
    Invalid {
        path: String,
        problems: Vec<ConfigProblem>,
    },
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A file the config names whose contents the runtime reads (TLS material,
/// password files); `app::check_files` reads each once so `flowgate check`
/// shows a bad one by its key.
pub enum NamedFile<'a> {
    /// A listener's certificate, key and client CA.
    ServerTls(&'a TlsConfig),
    /// The upstream broker's CA and client certificate (`mqtts://host`).
    UpstreamTls { host: &'a str, tls: &'a UpstreamTls },
    /// `username:hash` lines.
    Passwords(&'a Path),
}

impl Config {
    /// Every file the config names, with the key that names it.
    pub fn named_files(&self) -> Vec<(String, NamedFile<'_>)> {
        use NamedFile::{Passwords, ServerTls};
        let mut files: Vec<(String, Option<NamedFile<'_>>)> = vec![
            ("admin.tls".into(), self.admin.tls.as_ref().map(ServerTls)),
            (
                "mqtt.tls".into(),
                self.mqtt.tls.as_ref().map(|t| ServerTls(&t.tls)),
            ),
            (
                "mqtt.websocket.tls".into(),
                self.mqtt
                    .websocket
                    .as_ref()
                    .and_then(|w| w.tls.as_ref())
                    .map(ServerTls),
            ),
            (
                "mqtt.upstream_ca_file".into(),
                self.mqtt
                    .upstream
                    .tls_host()
                    .map(|host| NamedFile::UpstreamTls {
                        host,
                        tls: &self.mqtt.upstream_tls,
                    }),
            ),
            (
                "mqtt.password_file".into(),
                self.mqtt.password_file.as_deref().map(Passwords),
            ),
        ];
        for (i, inst) in self.instances.iter().enumerate() {
            let editor = inst.editor.as_ref();
            files.extend([
                (
                    format!("instance[{i}].http.tls"),
                    inst.http
                        .as_ref()
                        .and_then(|h| h.tls.as_ref())
                        .map(ServerTls),
                ),
                (
                    format!("instance[{i}].editor.tls"),
                    editor.and_then(|e| e.tls.as_ref()).map(ServerTls),
                ),
                (
                    format!("instance[{i}].password_file"),
                    inst.password_file.as_deref().map(Passwords),
                ),
                (
                    format!("instance[{i}].editor.password_file"),
                    editor
                        .filter(|e| e.login)
                        .and_then(|e| e.password_file.as_deref())
                        .map(Passwords),
                ),
            ]);
        }
        files
            .into_iter()
            .filter_map(|(key, f)| f.map(|f| (key, f)))
            .collect()
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Self::parse_in(&text, &path.display().to_string(), Some(base))
    }

    /// Parses and validates config text; `origin` names it in errors. The
    /// bundled broker keeps nothing on disk unless the text sets `data_dir`.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, origin, None)
    }

    /// As [`Config::parse`], for text that lives in the folder `base`: the
    /// bundled broker keeps its state in `base/flowgate-data` (or
    /// `$STATE_DIRECTORY`) unless the text says otherwise.
    pub fn parse_in(text: &str, origin: &str, base: Option<&Path>) -> Result<Self, ConfigError> {
        let raw: file::FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate(base).map_err(|problems| ConfigError::Invalid {
            path: origin.to_owned(),
            problems,
        })
    }

    /// The resolved config as TOML, as `flowgate check` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "test.toml") {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn complete_is_checked_key_by_key() {
        let inst = |complete: &str| {
            format!("[[instance]]\nname = \"a\"\nmatch = {{ client_id = \"x\" }}\nack_timeout = \"7s\"\ncomplete = {complete}\n")
        };
        let c = Config::parse(
            &inst(r#"{ topic = ["done/#", "ok/+"], correlate = "json:id" }"#),
            "t",
        )
        .expect("valid");
        let done = c.instances[0].complete.as_ref().expect("complete");
        assert_eq!(done.topic.len(), 2);
        assert_eq!(done.correlate, Correlate::JsonField("id".into()));
        assert_eq!(
            done.timeout,
            Duration::from_secs(7),
            "ack_timeout by default"
        );
        assert!(c.to_toml().contains("correlate = \"json:id\""));
        let p = problems(&inst(
            r#"{ topic = "done/#", correlate = "topic:x", timeout = "soon" }"#,
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("instance[0].complete.correlate")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("instance[0].complete.timeout")),
            "{p:?}"
        );
        let p = problems(&inst(
            r#"{ topic = "done/#/x", correlate = "correlation-data" }"#,
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("instance[0].complete.topic[0]")),
            "{p:?}"
        );
        let share = format!(
            "[mqtt]\nupstream = \"mqtt://127.0.0.1:1883\"\nmode = \"share\"\n{}",
            inst(r#"{ topic = "done/#", correlate = "topic:1" }"#)
        );
        assert!(problems(&share)
            .iter()
            .any(|m| m.contains("dispatch mode only")));
    }

    #[test]
    fn minimal_share_config_resolves_defaults() {
        let c = Config::parse(
            r#"
            node_id = "fg1"
            [mqtt]
            upstream = "mqtt://127.0.0.1:1883"
            mode = "share"
            [[instance]]
            name = "line1"
            match = { client_id = "line1-nodered" }
            broadcast = ["config/#"]
            "#,
            "test.toml",
        )
        .expect("valid config");
        assert_eq!(c.node_id, "fg1");
        assert_eq!(c.mqtt.mode, Mode::Share);
        assert_eq!(c.mqtt.listen, "0.0.0.0:1883".parse().expect("addr"));
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().expect("addr"));
        assert_eq!(
            c.instances[0].match_rule,
            MatchRule::ClientId("line1-nodered".into())
        );
        assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(10));
        assert!(c.to_toml().contains("mode = \"share\""));
    }

    #[test]
    fn empty_config_is_dispatch_on_the_embedded_broker() {
        let c = Config::parse("", "t").expect("defaults are valid");
        assert_eq!(c.mqtt.mode, Mode::Dispatch);
        assert_eq!(c.mqtt.upstream, Upstream::Embedded);
        assert!(c.instances.is_empty());
    }

    #[test]
    fn an_acl_in_share_mode_is_refused_not_ignored() {
        let found = problems(
            "[mqtt]\nupstream = \"mqtt://127.0.0.1:1883\"\nmode = \"share\"\n[[instance]]\nname = \"a\"\nmatch = { client_id = \"x\" }\nacl = { publish = [\"a/#\"] }\n",
        );
        assert!(
            found.iter().any(|p| p.starts_with("instance[0].acl:")),
            "{found:?}"
        );
    }

    #[test]
    fn worker_threads_is_optional_and_bounded() {
        assert_eq!(Config::parse("", "t").expect("valid").worker_threads, None);
        let c = Config::parse("worker_threads = 1\n", "t").expect("valid");
        assert_eq!(c.worker_threads, Some(1));
        let found = problems("worker_threads = 0\n");
        assert!(
            found.iter().any(|p| p.starts_with("worker_threads:")),
            "{found:?}"
        );
    }

    #[test]
    fn dispatch_options_parse() {
        let c = Config::parse(
            "[[instance]]\nname = \"a\"\nmatch = { client_id = \"x\" }\nstrategy = \"key-hash\"\nkey_level = 1\nack_timeout = \"2s\"\nmax_inflight = 8\n",
            "t",
        )
        .expect("valid");
        let i = &c.instances[0];
        assert_eq!(i.strategy, Strategy::KeyHash);
        assert_eq!(i.key_level, Some(1));
        assert_eq!(i.ack_timeout, Duration::from_secs(2));
        assert_eq!(i.max_inflight, 8);
        assert!(Config::parse(
            "[[instance]]\nname = \"a\"\nmatch = { client_id = \"x\" }\nstrategy = \"random\"\n",
            "t"
        )
        .is_err());
    }

    #[test]
    fn admin_off_loopback_needs_a_token_and_never_prints_it() {
        let found = problems("[admin]\nlisten = \"0.0.0.0:9090\"\n");
        assert!(
            found.iter().any(|p| p.starts_with("admin.token:")),
            "{found:?}"
        );
        let short = problems("[admin]\ntoken = \"short\"\n");
        assert!(
            short.iter().any(|p| p.contains("16 characters")),
            "{short:?}"
        );
        let c = Config::parse(
            "[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"0123456789abcdef0123\"\n",
            "t",
        )
        .expect("valid");
        let token = c.admin.token.as_ref().expect("token");
        assert!(token.matches(b"0123456789abcdef0123"));
        assert!(!token.matches(b"0123456789abcdef0124"));
        assert!(!token.matches(b"0123"));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        assert!(!c.to_toml().contains("0123456789abcdef"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[mqtt]\nlisen = \"x\"\n", "t.toml").expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("lisen"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let found = problems(
            r#"
            node_id = "bad id"
            [admin]
            listen = "nowhere"
            [mqtt]
            upstream = "http://x"
            mode = "share"
            max_packet_size = "12 parsecs"
            [[instance]]
            name = "a/b"
            match = { client_id = "x", username = "y" }
            broadcast = ["a/#/b"]
            [[instance]]
            name = "a/b"
            match = { }
            "#,
        );
        let joined = found.join("\n");
        for needle in [
            "node_id:",
            "admin.listen:",
            "mqtt.upstream:",
            "mqtt.max_packet_size:",
            "instance[0].name:",
            "instance[0].match:",
            "instance[0].broadcast[0]:",
            "instance[1].name:",
            "instance[1].match:",
        ] {
            assert!(joined.contains(needle), "missing {needle} in\n{joined}");
        }
    }

    #[test]
    fn match_rules() {
        assert!(MatchRule::ClientId("a".into()).matches("a", None));
        assert!(!MatchRule::ClientId("a".into()).matches("ab", None));
        assert!(MatchRule::ClientIdPrefix("a".into()).matches("ab", None));
        assert!(MatchRule::Username("u".into()).matches("x", Some("u")));
        assert!(!MatchRule::Username("u".into()).matches("u", None));
    }
}
