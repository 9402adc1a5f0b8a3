//! TLS settings of a listener (`[mqtt.tls]`, `[mqtt.websocket.tls]`,
//! `[admin.tls]`, `[instance.http.tls]`) and of the upstream broker
//! (`upstream = "mqtts://..."` with `upstream_ca_file`...). The files are read
//! at validation, so `flowgate check` reports a bad certificate, and again on
//! SIGHUP.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate asked for.
    None,
    /// Asked for; a client without one is let in, a bad one is refused.
    Optional,
    /// A client without a certificate signed by `client_ca_file` is refused.
    Required,
}

/// A validated TLS table of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// TLS to the upstream broker (`upstream = "mqtts://host:port"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// CA certificates the broker's certificate must chain to; the system's
    /// (`/etc/ssl/certs/ca-certificates.crt`) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key for brokers that ask for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry (default: the host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
    client_auth: Option<ClientAuth>,
}

/// `[mqtt.tls]`: a TLS table with the listener's address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMqttTls {
    pub listen: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
    client_auth: Option<ClientAuth>,
}

impl FileMqttTls {
    pub fn tls(self) -> FileTls {
        FileTls {
            cert_file: self.cert_file,
            key_file: self.key_file,
            client_ca_file: self.client_ca_file,
            client_auth: self.client_auth,
        }
    }
}

impl FileTls {
    /// Checks the table; problems go to `found` as (path, message). Its files
    /// are read by `app::check_files`.
    pub fn validate(self, path: &str, found: &mut Vec<(String, String)>) -> Option<TlsConfig> {
        let mut missing = |key: &str| found.push((format!("{path}.{key}"), "is required".into()));
        let cert_file = self.cert_file.map(PathBuf::from);
        let key_file = self.key_file.map(PathBuf::from);
        if cert_file.is_none() {
            missing("cert_file");
        }
        if key_file.is_none() {
            missing("key_file");
        }
        let client_ca_file = self.client_ca_file.map(PathBuf::from);
        let client_auth = match (self.client_auth, &client_ca_file) {
            (None, None) => ClientAuth::None,
            (None, Some(_)) => ClientAuth::Required,
            (Some(ClientAuth::None), _) => ClientAuth::None,
            (Some(auth), Some(_)) => auth,
            (Some(_), None) => {
                found.push((
                    format!("{path}.client_auth"),
                    "needs client_ca_file, the CA that client certificates must chain to".into(),
                ));
                ClientAuth::None
            }
        };
        let cfg = TlsConfig {
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file,
            client_auth,
        };
        Some(cfg)
    }
}
