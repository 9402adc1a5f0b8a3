//! The `http` table of an instance: its replicas' web traffic.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{humantime_ser, ByteSize, ValueError};

/// How requests are spread over an instance's HTTP replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Two random healthy replicas, the one with fewer requests in flight.
    #[default]
    LeastInflight,
    RoundRobin,
    /// Every request to one active replica; the others take over when it fails.
    ActiveStandby,
    /// Rendezvous hashing of a key of the request (`key`): each key value
    /// stays on one replica; a request without it goes by least-inflight.
    KeyHash,
}

/// Where a request's `key-hash` key is: `header:NAME`, `path:N` (path
/// segment N, 0-based), `query:NAME`, `cookie:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    /// A header (name lowercased).
    Header(String),
    Path(usize),
    Query(String),
    Cookie(String),
}

impl RequestKey {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::NotRequestKey(text.to_owned());
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        let token = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match kind {
            "header" if token(name) => Ok(Self::Header(name.to_ascii_lowercase())),
            "path" => name.parse().map(Self::Path).map_err(|_| bad()),
            "query" if !name.is_empty() => Ok(Self::Query(name.to_owned())),
            "cookie" if token(name) => Ok(Self::Cookie(name.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(n) => write!(f, "header:{n}"),
            Self::Path(n) => write!(f, "path:{n}"),
            Self::Query(n) => write!(f, "query:{n}"),
            Self::Cookie(n) => write!(f, "cookie:{n}"),
        }
    }
}

impl Serialize for RequestKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A validated `http` table.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Serve only requests for this `Host` (several instances on one listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `host:port` of each replica; the index is the replica's label.
    pub replicas: Vec<String>,
    pub balance: Balance,
    /// `key-hash`: where the request's key is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<RequestKey>,
    pub health_path: String,
    pub health_status: u16,
    pub health_tcp_only: bool,
    #[serde(with = "humantime_ser")]
    pub health_interval: Duration,
    #[serde(with = "humantime_ser")]
    pub health_timeout: Duration,
    pub health_rise: u32,
    pub health_fall: u32,
    pub sticky: bool,
    pub sticky_paths: Vec<String>,
    pub sticky_cookie: String,
    /// Default deny: only what the flows publish (and `public_paths`)
    /// passes; `false` passes every request through.
    pub block_admin: bool,
    /// Paths answered 403 even when a route the flows publish covers them
    /// (Node-RED's admin API wins over `http in` routes on one root).
    pub admin_paths: Vec<String>,
    /// Path prefixes the public listener always lets through (any method):
    /// `httpStatic` roots, paths of nodes flowgate does not read.
    pub public_paths: Vec<String>,
    pub replica_header: bool,
    pub max_body: ByteSize,
    #[serde(with = "humantime_ser")]
    pub timeout: Duration,
    #[serde(with = "humantime_ser")]
    pub connect_timeout: Duration,
    /// Idle pooled connections to replicas close after this; shorter than
    /// Node.js's 5 s keep-alive so a reused connection is never one Node closes.
    #[serde(with = "humantime_ser")]
    pub idle_timeout: Duration,
    /// Retries allowed as a share of requests (0.2 = one retry per five).
    pub retry_budget: f64,
    /// Active-standby: a lower-numbered replica that is up again takes the
    /// active role back (default false).
    pub failback: bool,
    /// Active-standby and key-hash: the IP each replica's MQTT connection
    /// comes from, one per replica (default: the replica's own host when it
    /// is an IP).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mqtt_hosts: Vec<std::net::IpAddr>,
    /// How often each replica's flow `rev` is read (divergence watch); 0 = off.
    #[serde(with = "humantime_ser")]
    pub rev_interval: Duration,
    /// Serve this listener over HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::TlsConfig>,
    /// Largest request head (request line and headers); more is answered 431.
    pub max_header_size: ByteSize,
    /// Time a client has to send a whole request head (slowloris); 408 after.
    #[serde(with = "humantime_ser")]
    pub header_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHttp {
    listen: Option<String>,
    host: Option<String>,
    #[serde(default)]
    replicas: Vec<String>,
    balance: Option<Balance>,
    key: Option<String>,
    health_path: Option<String>,
    health_status: Option<u16>,
    health_tcp_only: Option<bool>,
    health_interval: Option<String>,
    health_timeout: Option<String>,
    health_rise: Option<u32>,
    health_fall: Option<u32>,
    sticky: Option<bool>,
    sticky_paths: Option<Vec<String>>,
    sticky_cookie: Option<String>,
    block_admin: Option<bool>,
    admin_paths: Option<Vec<String>>,
    #[serde(default)]
    public_paths: Vec<String>,
    replica_header: Option<bool>,
    max_body: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    retry_budget: Option<f64>,
    failback: Option<bool>,
    #[serde(default)]
    mqtt_hosts: Vec<String>,
    rev_interval: Option<String>,
    tls: Option<super::tls::FileTls>,
    max_header_size: Option<String>,
    header_timeout: Option<String>,
}

fn dur(
    p: &mut Vec<(String, String)>,
    path: &str,
    key: &str,
    v: Option<String>,
    default: Duration,
) -> Duration {
    match v {
        None => default,
        Some(t) => super::types::duration(Some(&t), default).unwrap_or_else(|e| {
            p.push((format!("{path}.{key}"), e.to_string()));
            default
        }),
    }
}

impl FileHttp {
    /// Checks `replicas` and `mqtt_hosts` (one per replica); the hosts.
    fn check_replicas(&self, path: &str, p: &mut Vec<(String, String)>) -> Vec<std::net::IpAddr> {
        if self.replicas.is_empty() {
            p.push((
                format!("{path}.replicas"),
                "needs at least one \"host:port\"".into(),
            ));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            let ok = r
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                p.push((
                    format!("{path}.replicas[{i}]"),
                    format!("{r:?} is not \"host:port\""),
                ));
            }
        }
        let mut mqtt_hosts = Vec::new();
        for (i, h) in self.mqtt_hosts.iter().enumerate() {
            match h.parse::<std::net::IpAddr>() {
                Ok(ip) => mqtt_hosts.push(ip),
                Err(_) => p.push((
                    format!("{path}.mqtt_hosts[{i}]"),
                    format!("{h:?} is not an IP address"),
                )),
            }
        }
        if !self.mqtt_hosts.is_empty() && self.mqtt_hosts.len() != self.replicas.len() {
            p.push((
                format!("{path}.mqtt_hosts"),
                format!(
                    "has {} entries for {} replicas (one per replica)",
                    self.mqtt_hosts.len(),
                    self.replicas.len()
                ),
            ));
        }
        mqtt_hosts
    }

    /// `max_body` and `max_header_size` (at least 8KiB).
    fn sizes(&self, path: &str, p: &mut Vec<(String, String)>) -> (ByteSize, ByteSize) {
        let max_body = match ByteSize::parse(self.max_body.as_deref().unwrap_or("10MiB")) {
            Ok(b) => b,
            Err(e) => {
                p.push((format!("{path}.max_body"), e.to_string()));
                ByteSize(10 << 20)
            }
        };
        let max_header_size =
            match ByteSize::parse(self.max_header_size.as_deref().unwrap_or("64KiB")) {
                Ok(b) if b.bytes() >= 8192 => b,
                Ok(_) => {
                    p.push((
                        format!("{path}.max_header_size"),
                        "must be at least 8KiB".into(),
                    ));
                    ByteSize(64 << 10)
                }
                Err(e) => {
                    p.push((format!("{path}.max_header_size"), e.to_string()));
                    ByteSize(64 << 10)
                }
            };
        (max_body, max_header_size)
    }

    /// Validates; problems are (path, message) pairs.
    pub(super) fn validate(
        self,
        path: &str,
        instance: &str,
        p: &mut Vec<(String, String)>,
    ) -> HttpConfig {
        let listen = listen(path, self.listen.as_deref(), p);
        let mqtt_hosts = self.check_replicas(path, p);
        let (max_body, max_header_size) = self.sizes(path, p);
        let tls = self.tls.and_then(|t| t.validate(&format!("{path}.tls"), p));
        let retry_budget = self.retry_budget.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&retry_budget) {
            p.push((
                format!("{path}.retry_budget"),
                "must be between 0 and 1".into(),
            ));
        }
        let health_rise = self.health_rise.unwrap_or(2);
        let health_fall = self.health_fall.unwrap_or(2);
        if health_rise == 0 || health_fall == 0 {
            p.push((
                format!("{path}.health_rise"),
                "health_rise and health_fall must be at least 1".into(),
            ));
        }
        for (i, pp) in self.public_paths.iter().enumerate() {
            if !pp.starts_with('/') {
                p.push((
                    format!("{path}.public_paths[{i}]"),
                    format!("{pp:?} must start with /"),
                ));
            }
        }
        let balance = self.balance.unwrap_or_default();
        let key = key(path, self.key.as_deref(), balance, p);
        let mut d = |key: &str, v: Option<String>, default: Duration| dur(p, path, key, v, default);
        HttpConfig {
            listen,
            host: self.host.map(|h| h.to_ascii_lowercase()),
            replicas: self.replicas,
            balance,
            key,
            health_path: self.health_path.unwrap_or_else(|| "/flows/state".into()),
            health_status: self.health_status.unwrap_or(200),
            health_tcp_only: self.health_tcp_only.unwrap_or(false),
            health_interval: d(
                "health_interval",
                self.health_interval,
                Duration::from_secs(1),
            ),
            health_timeout: d(
                "health_timeout",
                self.health_timeout,
                Duration::from_secs(1),
            ),
            health_rise,
            health_fall,
            sticky: self.sticky.unwrap_or(true),
            sticky_paths: self
                .sticky_paths
                .unwrap_or_else(|| vec!["/socket.io".into(), "/ui".into(), "/dashboard".into()]),
            sticky_cookie: self
                .sticky_cookie
                .unwrap_or_else(|| format!("flowgate_{instance}")),
            block_admin: self.block_admin.unwrap_or(true),
            admin_paths: self.admin_paths.unwrap_or_else(default_admin_paths),
            public_paths: self.public_paths,
            replica_header: self.replica_header.unwrap_or(true),
            max_body,
            timeout: d("timeout", self.timeout, Duration::from_secs(60)),
            connect_timeout: d(
                "connect_timeout",
                self.connect_timeout,
                Duration::from_secs(2),
            ),
            idle_timeout: d("idle_timeout", self.idle_timeout, Duration::from_secs(4)),
            retry_budget,
            failback: self.failback.unwrap_or(false),
            mqtt_hosts,
            rev_interval: d("rev_interval", self.rev_interval, Duration::from_secs(10)),
            tls,
            max_header_size,
            header_timeout: d(
                "header_timeout",
                self.header_timeout,
                Duration::from_secs(10),
            ),
        }
    }
}

/// `listen`: required.
fn listen(path: &str, text: Option<&str>, p: &mut Vec<(String, String)>) -> SocketAddr {
    match text.map(str::parse::<SocketAddr>) {
        Some(Ok(a)) => a,
        Some(Err(_)) => {
            p.push((
                format!("{path}.listen"),
                "is not an address such as \"0.0.0.0:1880\"".into(),
            ));
            ([0, 0, 0, 0], 1880).into()
        }
        None => {
            p.push((format!("{path}.listen"), "is required".into()));
            ([0, 0, 0, 0], 1880).into()
        }
    }
}

/// `key`: required by key-hash, refused by the others.
fn key(
    path: &str,
    key: Option<&str>,
    balance: Balance,
    p: &mut Vec<(String, String)>,
) -> Option<RequestKey> {
    match (key, balance) {
        (Some(k), Balance::KeyHash) => match RequestKey::parse(k) {
            Ok(k) => Some(k),
            Err(e) => {
                p.push((format!("{path}.key"), e.to_string()));
                None
            }
        },
        (None, Balance::KeyHash) => {
            p.push((
                format!("{path}.key"),
                "balance = \"key-hash\" needs a key: \"header:NAME\", \"path:N\", \"query:NAME\" or \"cookie:NAME\"".into(),
            ));
            None
        }
        (Some(_), _) => {
            p.push((
                format!("{path}.key"),
                "is used only with balance = \"key-hash\"".into(),
            ));
            None
        }
        (None, _) => None,
    }
}

/// Node-RED's editor and admin API paths, blocked on the public side.
fn default_admin_paths() -> Vec<String> {
    [
        "/",
        "/flows",
        "/flow",
        "/nodes",
        "/settings",
        "/auth",
        "/red",
        "/library",
        "/context",
    ]
    .map(String::from)
    .to_vec()
}
