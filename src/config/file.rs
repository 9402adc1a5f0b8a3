//! The config file as written: every key optional, unknown keys refused.
//! [`FileConfig::validate`] turns it into a [`Config`], collecting every
//! problem with its path instead of stopping at the first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::types::{addr, duration, ByteSize, Upstream, ValueError};
use super::Strategy;
use super::{AdminConfig, Config, ConfigProblem, InstanceConfig, MatchRule, Mode, MqttConfig};
use crate::topic::TopicFilter;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    node_id: Option<String>,
    data_dir: Option<String>,
    worker_threads: Option<usize>,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    mqtt: FileMqtt,
    #[serde(default)]
    instance: Vec<FileInstance>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
    metrics_public: Option<bool>,
    tls: Option<super::tls::FileTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMqtt {
    listen: Option<String>,
    upstream: Option<String>,
    mode: Option<Mode>,
    connect_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    max_packet_size: Option<String>,
    queue_limit: Option<usize>,
    upstream_share: Option<bool>,
    upstream_keep_alive: Option<String>,
    upstream_protocol: Option<super::UpstreamProtocol>,
    tls: Option<super::tls::FileMqttTls>,
    websocket: Option<FileWebSocket>,
    upstream_ca_file: Option<String>,
    upstream_cert_file: Option<String>,
    upstream_key_file: Option<String>,
    upstream_server_name: Option<String>,
    password_file: Option<String>,
    max_connections: Option<usize>,
    max_publish_rate: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebSocket {
    listen: Option<String>,
    path: Option<String>,
    tls: Option<super::tls::FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInstance {
    name: String,
    #[serde(rename = "match")]
    match_rule: FileMatch,
    #[serde(default)]
    broadcast: Vec<String>,
    strategy: Option<Strategy>,
    key_level: Option<usize>,
    ack_timeout: Option<String>,
    max_inflight: Option<usize>,
    failback: Option<bool>,
    acl: Option<FileAcl>,
    http: Option<super::http::FileHttp>,
    editor: Option<super::editor::FileEditor>,
    password_file: Option<String>,
    upstream_username: Option<String>,
    upstream_password: Option<String>,
    upstream_password_file: Option<String>,
    upstream_client_id: Option<String>,
    max_replicas: Option<usize>,
    complete: Option<FileComplete>,
}

/// `complete = { topic = "done/#", correlate = "topic:1", timeout = "30s" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileComplete {
    topic: OneOrMany,
    correlate: String,
    timeout: Option<String>,
}

/// A string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Checks an instance's `complete` table.
fn complete(
    p: &mut Problems,
    path: &str,
    file: FileComplete,
    mode: Mode,
    ack_timeout: Duration,
) -> Option<super::Complete> {
    if mode == Mode::Share {
        p.add(
            path,
            "completion acknowledgement works in dispatch mode only (mqtt.mode = \"dispatch\")",
        );
        return None;
    }
    let mut topic = Vec::new();
    let filters = file.topic.into_vec();
    if filters.is_empty() {
        p.add(format!("{path}.topic"), "needs at least one topic filter");
    }
    for (j, f) in filters.iter().enumerate() {
        match TopicFilter::new(f) {
            Ok(filter) => topic.push(filter),
            Err(e) => p.add(format!("{path}.topic[{j}]"), format!("{f:?}: {e}")),
        }
    }
    let correlate = p.check(
        &format!("{path}.correlate"),
        file.correlate.parse().map(Some),
        None,
    );
    let timeout = p.check(
        &format!("{path}.timeout"),
        duration(file.timeout.as_deref(), ack_timeout),
        ack_timeout,
    );
    if timeout.is_zero() {
        p.add(format!("{path}.timeout"), "must be above 0");
    }
    Some(super::Complete {
        topic,
        correlate: correlate?,
        timeout,
    })
}

/// Topic filters a replica may publish to and subscribe to (dispatch mode).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAcl {
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMatch {
    client_id: Option<String>,
    client_id_prefix: Option<String>,
    username: Option<String>,
}

/// Collects problems while values are checked one by one.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The parsed value, or the default after noting the problem.
    fn check<T>(&mut self, path: &str, result: Result<T, ValueError>, default: T) -> T {
        result.unwrap_or_else(|e| {
            self.add(path, e.to_string());
            default
        })
    }
}

/// A password file's path (`app::check_files` reads it).
fn password_file(file: Option<String>) -> Option<PathBuf> {
    file.map(PathBuf::from)
}

/// Runs a sub-table's validation that reports (path, message) pairs.
fn collect<T>(p: &mut Problems, f: impl FnOnce(&mut Vec<(String, String)>) -> T) -> T {
    let mut found = Vec::new();
    let out = f(&mut found);
    for (path, message) in found {
        p.add(path, message);
    }
    out
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| valid_node_id(h))
        .unwrap_or_else(|| "flowgate".to_owned())
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A share name may not contain `/`, `+` or `#`; flowgate also keeps it to
/// characters safe in client ids and metric labels.
fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where the bundled broker keeps its state: `data_dir` as written (`""`:
/// nowhere), else `$STATE_DIRECTORY` (systemd),
/// else `flowgate-data` beside the config; nowhere for config text of no file
/// or for a broker of the user's own.
fn data_dir(
    written: Option<&str>,
    base: Option<&Path>,
    state_dir: Option<&str>,
    embedded: bool,
) -> Result<Option<PathBuf>, ValueError> {
    let path = match written {
        Some("") => return Ok(None),
        Some(_) if !embedded => return Err(ValueError::DataDirWithoutBundledBroker),
        // as every other path in the file: relative to the working directory
        Some(p) => PathBuf::from(p),
        None if !embedded => return Ok(None),
        // config text of no file (the library, tests): nothing on disk
        None => match (base, state_dir.and_then(|s| s.split(':').next())) {
            (None, _) => return Ok(None),
            (Some(_), Some(s)) if !s.is_empty() => PathBuf::from(s),
            (Some(b), _) => b.join("flowgate-data"),
        },
    };
    if path.exists() && !path.is_dir() {
        return Err(ValueError::NotDirectory(path.display().to_string()));
    }
    Ok(Some(path))
}

impl FileConfig {
    /// `base`: the folder of the config file (relative paths start there);
    /// `None` for config text of no file.
    pub(super) fn validate(self, base: Option<&Path>) -> Result<Config, Vec<ConfigProblem>> {
        let mut p = Problems::default();
        let node_id = node_id(&mut p, self.node_id);
        if self
            .worker_threads
            .is_some_and(|n| !(1..=1024).contains(&n))
        {
            p.add(
                "worker_threads",
                "must be 1-1024 (leave it out for one per core)",
            );
        }
        let admin = self.admin.validate(&mut p);
        let mqtt = self.mqtt.validate(&mut p);
        let state_dir = std::env::var("STATE_DIRECTORY").ok();
        let data_dir = p.check(
            "data_dir",
            data_dir(
                self.data_dir.as_deref(),
                base,
                state_dir.as_deref(),
                mqtt.upstream == Upstream::Embedded,
            ),
            None,
        );
        let mut instances: Vec<InstanceConfig> = Vec::new();
        for (i, inst) in self.instance.into_iter().enumerate() {
            let path = format!("instance[{i}]");
            if !valid_instance_name(&inst.name) {
                p.add(
                    format!("{path}.name"),
                    format!(
                        "{:?} must be 1-64 characters of A-Z a-z 0-9 - _ .",
                        inst.name
                    ),
                );
            } else if instances.iter().any(|o| o.name == inst.name) {
                p.add(
                    format!("{path}.name"),
                    format!("{:?} is used by an earlier instance", inst.name),
                );
            }
            instances.push(inst.validate(&mut p, &path, mqtt.mode));
        }
        http_listeners_agree(&mut p, &instances);
        if p.0.is_empty() {
            Ok(Config {
                node_id,
                data_dir,
                worker_threads: self.worker_threads,
                admin,
                mqtt,
                instances,
            })
        } else {
            Err(p.0)
        }
    }
}

fn node_id(p: &mut Problems, id: Option<String>) -> String {
    match id {
        Some(id) if !valid_node_id(&id) => {
            p.add(
                "node_id",
                format!("{id:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."),
            );
            id
        }
        Some(id) => id,
        None => default_node_id(),
    }
}

/// Instances that share an HTTP listener share its TLS table too.
fn http_listeners_agree(p: &mut Problems, instances: &[InstanceConfig]) {
    for (i, a) in instances.iter().enumerate() {
        let Some(ha) = &a.http else { continue };
        let clash = instances[..i].iter().any(|b| {
            b.http
                .as_ref()
                .is_some_and(|hb| hb.listen == ha.listen && hb.tls != ha.tls)
        });
        if clash {
            p.add(
                format!("instance[{i}].http.tls"),
                format!(
                    "instances on one listener ({}) need the same tls table",
                    ha.listen
                ),
            );
        }
    }
}

/// Each of `filters` (at `path[j]`) as a topic filter; the bad ones noted.
fn filters(p: &mut Problems, path: &str, filters: &[String]) -> Vec<TopicFilter> {
    let mut out = Vec::new();
    for (j, f) in filters.iter().enumerate() {
        match TopicFilter::new(f) {
            Ok(filter) => out.push(filter),
            Err(e) => p.add(format!("{path}[{j}]"), format!("{f:?}: {e}")),
        }
    }
    out
}

impl FileAdmin {
    fn validate(self, p: &mut Problems) -> AdminConfig {
        let listen = p.check(
            "admin.listen",
            addr(self.listen.as_deref(), "127.0.0.1:9090"),
            ([127, 0, 0, 1], 9090).into(),
        );
        let token = match (self.token, self.token_file) {
            (Some(_), Some(_)) => {
                p.add("admin.token", "set token or token_file, not both");
                None
            }
            (Some(t), None) => Some(t),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    p.add("admin.token_file", format!("cannot read {path:?}: {e}"));
                    None
                }
            },
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            p.add("admin.token", "must be at least 16 characters");
        }
        if token.is_none() && !listen.ip().is_loopback() {
            p.add(
                "admin.token",
                format!(
                    "admin.listen {listen} is not a loopback address: set token_file (or token) so the admin API asks for it"
                ),
            );
        }
        AdminConfig {
            listen,
            token: token.map(super::Secret::new),
            metrics_public: self.metrics_public.unwrap_or(false),
            tls: self
                .tls
                .and_then(|t| collect(p, |f| t.validate("admin.tls", f))),
        }
    }
}

impl FileMqtt {
    fn validate(self, p: &mut Problems) -> MqttConfig {
        let m = self;
        let upstream = p.check(
            "mqtt.upstream",
            Upstream::parse(m.upstream.as_deref().unwrap_or("embedded")),
            Upstream::Embedded,
        );
        let mode = m.mode.unwrap_or(Mode::Dispatch);
        if mode == Mode::Share && upstream == Upstream::Embedded {
            p.add(
                "mqtt.mode",
                "share mode needs an external broker (the embedded rumqttd loses messages in shared groups); use mode = \"dispatch\" or set upstream = \"mqtt://host:port\"",
            );
        }
        let mqtt = MqttConfig {
            listen: p.check(
                "mqtt.listen",
                addr(m.listen.as_deref(), "0.0.0.0:1883"),
                ([0, 0, 0, 0], 1883).into(),
            ),
            upstream,
            mode,
            connect_timeout: p.check(
                "mqtt.connect_timeout",
                duration(m.connect_timeout.as_deref(), Duration::from_secs(10)),
                Duration::from_secs(10),
            ),
            upstream_connect_timeout: p.check(
                "mqtt.upstream_connect_timeout",
                duration(
                    m.upstream_connect_timeout.as_deref(),
                    Duration::from_secs(5),
                ),
                Duration::from_secs(5),
            ),
            max_packet_size: p.check(
                "mqtt.max_packet_size",
                ByteSize::parse(m.max_packet_size.as_deref().unwrap_or("1MiB")),
                ByteSize(1 << 20),
            ),
            queue_limit: m.queue_limit.unwrap_or(10_000),
            upstream_share: m.upstream_share.unwrap_or(false),
            upstream_keep_alive: p.check(
                "mqtt.upstream_keep_alive",
                duration(m.upstream_keep_alive.as_deref(), Duration::from_secs(30)),
                Duration::from_secs(30),
            ),
            upstream_protocol: m.upstream_protocol.unwrap_or_default(),
            tls: m.tls.and_then(|t| t.validate(p)),
            websocket: m.websocket.map(|w| w.validate(p)),
            upstream_tls: super::UpstreamTls {
                ca_file: m.upstream_ca_file.map(PathBuf::from),
                cert_file: m.upstream_cert_file.map(PathBuf::from),
                key_file: m.upstream_key_file.map(PathBuf::from),
                server_name: m.upstream_server_name,
            },
            password_file: password_file(m.password_file),
            max_connections: m.max_connections,
            max_publish_rate: m.max_publish_rate,
        };
        // the upstream TLS files are read by `app::check_files`
        if mqtt.upstream.tls_host().is_none() && mqtt.upstream_tls != super::UpstreamTls::default()
        {
            p.add(
                "mqtt.upstream_ca_file",
                "upstream TLS settings need upstream = \"mqtts://host:port\"",
            );
        }
        if mqtt.upstream_tls.cert_file.is_some() != mqtt.upstream_tls.key_file.is_some() {
            p.add(
                "mqtt.upstream_cert_file",
                "upstream_cert_file and upstream_key_file go together",
            );
        }
        if mqtt.max_connections == Some(0) {
            p.add("mqtt.max_connections", "must be at least 1");
        }
        if mqtt.max_publish_rate == Some(0) {
            p.add("mqtt.max_publish_rate", "must be at least 1");
        }
        if mqtt.queue_limit == 0 {
            p.add("mqtt.queue_limit", "must be at least 1");
        }
        if mqtt.upstream_keep_alive < Duration::from_secs(1)
            || mqtt.upstream_keep_alive > Duration::from_secs(65535)
        {
            p.add("mqtt.upstream_keep_alive", "must be between 1s and 65535s");
        }
        mqtt
    }
}

impl super::tls::FileMqttTls {
    /// `[mqtt.tls]`.
    fn validate(self, p: &mut Problems) -> Option<super::MqttTls> {
        let t = self;
        let listen = p.check(
            "mqtt.tls.listen",
            addr(t.listen.as_deref(), "0.0.0.0:8883"),
            ([0, 0, 0, 0], 8883).into(),
        );
        let tls = collect(p, |f| t.tls().validate("mqtt.tls", f))?;
        Some(super::MqttTls { listen, tls })
    }
}

impl FileWebSocket {
    /// `[mqtt.websocket]`.
    fn validate(self, p: &mut Problems) -> super::MqttWebSocket {
        let w = self;
        let path = w.path.unwrap_or_else(|| "/mqtt".into());
        if !path.starts_with('/') {
            p.add("mqtt.websocket.path", "must start with /");
        }
        super::MqttWebSocket {
            listen: p.check(
                "mqtt.websocket.listen",
                addr(w.listen.as_deref(), "0.0.0.0:8083"),
                ([0, 0, 0, 0], 8083).into(),
            ),
            path,
            tls: w
                .tls
                .and_then(|t| collect(p, |f| t.validate("mqtt.websocket.tls", f))),
        }
    }
}

impl FileInstance {
    /// `[[instance]]` at `path` (`instance[0]`), its name checked by the caller.
    fn validate(self, p: &mut Problems, path: &str, mode: Mode) -> InstanceConfig {
        let inst = self;
        let match_rule = match_rule(p, path, inst.match_rule);
        let broadcast = filters(p, &format!("{path}.broadcast"), &inst.broadcast);
        let ack_timeout = p.check(
            &format!("{path}.ack_timeout"),
            duration(inst.ack_timeout.as_deref(), Duration::from_secs(30)),
            Duration::from_secs(30),
        );
        let max_inflight = inst.max_inflight.unwrap_or(100);
        if max_inflight == 0 || max_inflight > 65_000 {
            p.add(
                format!("{path}.max_inflight"),
                "must be between 1 and 65000",
            );
        }
        let http = inst
            .http
            .map(|h| collect(p, |f| h.validate(&format!("{path}.http"), &inst.name, f)));
        let editor = inst.editor.map(|e| {
            collect(p, |f| {
                e.validate(&format!("{path}.editor"), http.is_some(), f)
            })
        });
        let upstream_password =
            upstream_password(p, path, inst.upstream_password, inst.upstream_password_file);
        if upstream_password.is_some() && inst.upstream_username.is_none() {
            p.add(
                format!("{path}.upstream_username"),
                "is required with upstream_password (MQTT sends no password without a username in 3.1.1)",
            );
        }
        if inst.acl.is_some() && mode == Mode::Share {
            p.add(
                format!("{path}.acl"),
                "is applied in dispatch mode only; in share mode use the broker's ACL (or set mqtt.mode = \"dispatch\")",
            );
        }
        if inst.max_replicas == Some(0) {
            p.add(format!("{path}.max_replicas"), "must be at least 1");
        }
        if inst
            .upstream_client_id
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.len() > 65_535)
        {
            p.add(
                format!("{path}.upstream_client_id"),
                "must be 1-65535 bytes",
            );
        }
        let complete = inst
            .complete
            .and_then(|c| complete(p, &format!("{path}.complete"), c, mode, ack_timeout));
        InstanceConfig {
            complete,
            http,
            editor,
            password_file: password_file(inst.password_file),
            upstream_username: inst.upstream_username,
            upstream_password: upstream_password.map(super::Secret::new),
            upstream_client_id: inst.upstream_client_id,
            max_replicas: inst.max_replicas,
            name: inst.name,
            match_rule,
            broadcast,
            strategy: inst.strategy.unwrap_or_default(),
            key_level: inst.key_level,
            ack_timeout,
            max_inflight,
            failback: inst.failback.unwrap_or(false),
            acl: inst.acl.map(|a| super::Acl {
                publish: a
                    .publish
                    .map(|f| filters(p, &format!("{path}.acl.publish"), &f)),
                subscribe: a
                    .subscribe
                    .map(|f| filters(p, &format!("{path}.acl.subscribe"), &f)),
            }),
        }
    }
}

/// The one rule of an instance's `match` table.
fn match_rule(p: &mut Problems, path: &str, m: FileMatch) -> MatchRule {
    let rules: Vec<MatchRule> = [
        m.client_id.map(MatchRule::ClientId),
        m.client_id_prefix.map(MatchRule::ClientIdPrefix),
        m.username.map(MatchRule::Username),
    ]
    .into_iter()
    .flatten()
    .collect();
    match <[MatchRule; 1]>::try_from(rules) {
        Ok([rule]) => rule,
        Err(rules) => {
            p.add(
                format!("{path}.match"),
                format!(
                    "needs exactly one of client_id, client_id_prefix or username (found {})",
                    rules.len()
                ),
            );
            MatchRule::ClientId(String::new())
        }
    }
}

/// `upstream_password`, or what `upstream_password_file` holds.
fn upstream_password(
    p: &mut Problems,
    path: &str,
    password: Option<String>,
    file: Option<String>,
) -> Option<String> {
    match (password, file) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{path}.upstream_password"),
                "set upstream_password or upstream_password_file, not both",
            );
            None
        }
        (Some(pw), None) => Some(pw),
        (None, Some(file)) => match std::fs::read_to_string(&file) {
            Ok(pw) => Some(pw.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                p.add(
                    format!("{path}.upstream_password_file"),
                    format!("cannot read {file:?}: {e}"),
                );
                None
            }
        },
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_defaults_beside_the_config_or_to_systemds_state_directory() {
        let base = Some(Path::new("/etc/flowgate"));
        let beside = Some(PathBuf::from("/etc/flowgate/flowgate-data"));
        assert_eq!(data_dir(None, base, None, true), Ok(beside));
        let systemd = Some("/var/lib/flowgate:/var/lib/other");
        let state = Some(PathBuf::from("/var/lib/flowgate"));
        assert_eq!(data_dir(None, base, systemd, true), Ok(state));
        // config text of no file (tests, the library): nothing on disk, even
        // under systemd
        assert_eq!(data_dir(None, None, None, true), Ok(None));
        assert_eq!(data_dir(None, None, systemd, true), Ok(None));
        // a broker of the user's own keeps its own state
        assert_eq!(data_dir(None, base, systemd, false), Ok(None));
        assert_eq!(data_dir(Some(""), base, systemd, true), Ok(None));
        let own = Some(PathBuf::from("state"));
        assert_eq!(data_dir(Some("state"), base, systemd, true), Ok(own));
        assert!(data_dir(Some("state"), base, None, false)
            .expect_err("refused")
            .to_string()
            .contains("upstream = \"embedded\""));
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert!(data_dir(Some(file), None, None, true)
            .expect_err("refused")
            .to_string()
            .contains("is not a directory"));
    }
}
