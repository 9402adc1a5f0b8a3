//! Config value types that carry their unit or shape: sizes, upstreams, and the
//! humantime (de)serialisation of durations.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// How an instance's messages are spread over its replicas (dispatch mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Each replica in turn.
    RoundRobin,
    /// The replica with the fewest unacknowledged messages (ties in turn).
    #[default]
    LeastInflight,
    /// Rendezvous hashing of the topic (or one topic level): a key stays on
    /// one replica, and a replica joining or leaving moves only its share.
    KeyHash,
    /// Every message to one active replica (the lowest connected, healthy
    /// slot); the others are hot standbys that take over when it fails.
    ActiveStandby,
}

/// A size in bytes, written in config as `"1MiB"`, `"512KiB"`, `"64kB"` or a
/// plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A config value that cannot be read; where it is reported, its key is
/// put in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{0:?} is not a size such as \"1MiB\"")]
    NotSize(String),
    #[error("unknown size unit {0:?} (use B, KiB, MiB, GiB, kB, MB, GB)")]
    SizeUnit(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} is not \"embedded\", \"mqtt://host:port\" or \"mqtts://host:port\"")]
    NotUpstream(String),
    #[error("{0:?} is not a port number")]
    NotPort(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} is not an address such as \"{1}\"")]
    NotAddress(String, &'static str),
    /// The text, and why humantime refused it.
    #[error("{0:?} is not a duration such as \"5s\": {1}")]
    NotDuration(String, String),
    #[error("{0:?} is not \"header:NAME\", \"path:N\", \"query:NAME\" or \"cookie:NAME\"")]
    NotRequestKey(String),
    #[error("{0:?}: expected \"topic:N\" (a 0-based topic level), \"json:FIELD\" or \"correlation-data\"")]
    NotCorrelate(String),
    #[error("only the bundled broker (mqtt.upstream = \"embedded\") keeps state here; leave data_dir out with a broker of your own")]
    DataDirWithoutBundledBroker,
    #[error("{0} is not a directory")]
    NotDirectory(String),
}

/// `text` as an address, or `default` when there is none.
pub fn addr(text: Option<&str>, default: &'static str) -> Result<SocketAddr, ValueError> {
    let text = text.unwrap_or(default);
    text.parse()
        .map_err(|_| ValueError::NotAddress(text.to_owned(), default))
}

/// `text` as a duration (`"5s"`, `"1m 30s"`), or `default` when there is none.
pub fn duration(text: Option<&str>, default: Duration) -> Result<Duration, ValueError> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ValueError::NotDuration(t.to_owned(), e.to_string())),
    }
}

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| ValueError::NotSize(text.to_owned()))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => return Err(ValueError::SizeUnit(other.to_owned())),
        };
        n.checked_mul(factor)
            .map(Self)
            .ok_or_else(|| ValueError::TooLarge(text.to_owned()))
    }

    /// The size as a `usize`, saturating on 32-bit targets.
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where replicas' and clients' sessions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The broker embedded in this process.
    Embedded,
    /// A broker over plain TCP, `mqtt://host:port` (host may be a name), or
    /// over TLS, `mqtts://host:port`.
    Mqtt { host: String, port: u16, tls: bool },
    /// The broker flowgate runs inside (the Mosquitto plugin); never parsed
    /// from a file.
    Host,
}

impl Upstream {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        if text == "embedded" {
            return Ok(Self::Embedded);
        }
        let (rest, tls) = match (text.strip_prefix("mqtt://"), text.strip_prefix("mqtts://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(ValueError::NotUpstream(text.to_owned())),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| ValueError::NotPort(port.to_owned()))?;
                (host, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(ValueError::NoHost(text.to_owned()));
        }
        Ok(Self::Mqtt {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// `host:port` to connect to.
    pub fn authority(&self) -> Option<String> {
        match self {
            Self::Embedded | Self::Host => None,
            Self::Mqtt { host, port, .. } if host.contains(':') => Some(format!("[{host}]:{port}")),
            Self::Mqtt { host, port, .. } => Some(format!("{host}:{port}")),
        }
    }

    /// The broker's host name, when it is reached over TLS.
    pub fn tls_host(&self) -> Option<&str> {
        match self {
            Self::Mqtt {
                host, tls: true, ..
            } => Some(host),
            _ => None,
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.authority() {
            None if *self == Self::Host => f.write_str("mosquitto-plugin"),
            None => f.write_str("embedded"),
            Some(a) if self.tls_host().is_some() => write!(f, "mqtts://{a}"),
            Some(a) => write!(f, "mqtt://{a}"),
        }
    }
}

impl Serialize for Upstream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Serialises a `Duration` as a humantime string ("10s").
pub mod humantime_ser {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1MiB"), Ok(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse("64kB"), Ok(ByteSize(64_000)));
        assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
        assert!(ByteSize::parse("1 parsec").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
    }

    #[test]
    fn upstreams() {
        assert_eq!(Upstream::parse("embedded"), Ok(Upstream::Embedded));
        assert_eq!(
            Upstream::parse("mqtt://broker:1884"),
            Ok(Upstream::Mqtt {
                host: "broker".into(),
                port: 1884,
                tls: false
            })
        );
        assert_eq!(
            Upstream::parse("mqtt://broker"),
            Ok(Upstream::Mqtt {
                host: "broker".into(),
                port: 1883,
                tls: false
            })
        );
        assert_eq!(
            Upstream::parse("mqtts://broker"),
            Ok(Upstream::Mqtt {
                host: "broker".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(
            Upstream::parse("mqtts://b:8884").map(|u| u.to_string()),
            Ok("mqtts://b:8884".into())
        );
        assert_eq!(
            Upstream::parse("mqtt://[::1]:1883").map(|u| u.to_string()),
            Ok("mqtt://[::1]:1883".into())
        );
        assert!(Upstream::parse("http://x").is_err());
        assert!(Upstream::parse("mqtt://:1883").is_err());
        assert!(Upstream::parse("mqtt://x:99999").is_err());
    }
}
