//! The `editor` table of an instance: its Node-RED editor and admin API
//! served by flowgate on a listener of their own, as if the replicas were one
//! Node-RED.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{humantime_ser, ByteSize};

/// A validated `editor` table.
#[derive(Debug, Clone, Serialize)]
pub struct EditorConfig {
    pub listen: SocketAddr,
    /// The editor's login screen (Node-RED's adminAuth protocol) checks
    /// users against `password_file`; `false`: anyone who reaches the
    /// listener edits the flows.
    pub login: bool,
    /// `username:hash` lines, the format `mqtt.password_file` reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Serve the editor over HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::TlsConfig>,
    /// How long a login lasts (Node-RED's `sessionExpiryTime`, 7 days).
    #[serde(with = "humantime_ser")]
    pub session_expiry: Duration,
    /// How long each step of a Deploy's rollout may take on one replica
    /// (drain, start of the new flows).
    #[serde(with = "humantime_ser")]
    pub step_timeout: Duration,
    /// Largest request body (Node-RED's `apiMaxLength`, 5 MB).
    pub max_body: ByteSize,
    /// A request to a replica's admin API that takes longer fails (504).
    #[serde(with = "humantime_ser")]
    pub timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileEditor {
    listen: Option<String>,
    login: Option<bool>,
    password_file: Option<String>,
    tls: Option<super::tls::FileTls>,
    session_expiry: Option<String>,
    step_timeout: Option<String>,
    max_body: Option<String>,
    timeout: Option<String>,
}

impl FileEditor {
    /// Validates; problems are (path, message) pairs. `has_http`: the
    /// instance has an `http` table naming its replicas.
    pub(super) fn validate(
        self,
        path: &str,
        has_http: bool,
        p: &mut Vec<(String, String)>,
    ) -> EditorConfig {
        let mut problem = |key: &str, message: String| p.push((format!("{path}{key}"), message));
        if !has_http {
            problem(
                "",
                "needs the instance's http table: the editor talks to the replicas it names".into(),
            );
        }
        let listen = match self.listen.as_deref().map(str::parse::<SocketAddr>) {
            Some(Ok(a)) => a,
            Some(Err(_)) => {
                problem(
                    ".listen",
                    "is not an address such as \"127.0.0.1:1880\"".into(),
                );
                ([127, 0, 0, 1], 1880).into()
            }
            None => {
                problem(".listen", "is required".into());
                ([127, 0, 0, 1], 1880).into()
            }
        };
        let login = self.login.unwrap_or(true);
        let password_file = self.password_file.map(PathBuf::from);
        match (&password_file, login) {
            (None, true) => problem(
                ".password_file",
                "is required for the editor's login (or set login = false)".into(),
            ),
            // read by `app::check_files`
            (Some(_), true) => {}
            (Some(_), false) => problem(
                ".password_file",
                "is not read with login = false: remove one of them".into(),
            ),
            _ => {}
        }
        let mut duration = |key: &str, text: Option<String>, default: Duration| match text {
            None => default,
            Some(t) => match humantime::parse_duration(&t) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    problem(
                        &format!(".{key}"),
                        format!("{t:?} is not a duration above 0 such as \"30s\""),
                    );
                    default
                }
            },
        };
        let session_expiry = duration(
            "session_expiry",
            self.session_expiry,
            Duration::from_secs(7 * 24 * 3600),
        );
        let step_timeout = duration("step_timeout", self.step_timeout, Duration::from_secs(60));
        let timeout = duration("timeout", self.timeout, Duration::from_secs(120));
        let max_body = match self.max_body.as_deref().map(ByteSize::parse) {
            None => ByteSize(5 << 20),
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                p.push((format!("{path}.max_body"), e.to_string()));
                ByteSize(5 << 20)
            }
        };
        let tls = self.tls.and_then(|t| t.validate(&format!("{path}.tls"), p));
        EditorConfig {
            listen,
            login,
            password_file,
            tls,
            session_expiry,
            step_timeout,
            max_body,
            timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const BASE: &str = "node_id = \"n\"\n[mqtt]\nupstream = \"mqtt://127.0.0.1:1\"\n[[instance]]\nname = \"line1\"\nmatch = { client_id = \"x\" }\n";
    const HTTP: &str =
        "[instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [\"127.0.0.1:1880\"]\n";

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t").and_then(|c| crate::app::check_files(&c, "t").map(|()| c)) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn an_editor_needs_replicas_a_listener_and_a_login_or_login_false() {
        let no_http = problems(&format!(
            "{BASE}[instance.editor]\nlisten = \"127.0.0.1:0\"\nlogin = false\n"
        ));
        assert!(
            no_http
                .iter()
                .any(|p| p.starts_with("instance[0].editor: needs the instance's http table")),
            "{no_http:?}"
        );
        let no_login = problems(&format!(
            "{BASE}{HTTP}[instance.editor]\nlisten = \"127.0.0.1:0\"\n"
        ));
        assert!(
            no_login
                .iter()
                .any(|p| p.starts_with("instance[0].editor.password_file: is required")),
            "{no_login:?}"
        );
        let missing = problems(&format!("{BASE}{HTTP}[instance.editor]\nlisten = \"127.0.0.1:0\"\npassword_file = \"/nonexistent/editors\"\n"));
        assert!(
            missing
                .iter()
                .any(|p| p.starts_with("instance[0].editor.password_file:")),
            "{missing:?}"
        );
        let both = problems(&format!("{BASE}{HTTP}[instance.editor]\nlisten = \"127.0.0.1:0\"\nlogin = false\npassword_file = \"/x\"\n"));
        assert!(
            both.iter()
                .any(|p| p.contains("is not read with login = false")),
            "{both:?}"
        );
        let bad = problems(&format!("{BASE}{HTTP}[instance.editor]\nlisten = \"nowhere\"\nlogin = false\nstep_timeout = \"0s\"\nmax_body = \"lots\"\n"));
        assert_eq!(bad.len(), 3, "{bad:?}");
        let ok = Config::parse(
            &format!("{BASE}{HTTP}[instance.editor]\nlisten = \"127.0.0.1:0\"\nlogin = false\n"),
            "t",
        )
        .expect("valid");
        let editor = ok.instances[0].editor.as_ref().expect("editor");
        assert!(!editor.login);
        assert_eq!(editor.step_timeout, std::time::Duration::from_secs(60));
        assert_eq!(editor.max_body.bytes(), 5 << 20);
    }
}
