//! The editor's login, as Node-RED's `adminAuth` speaks it: `GET
//! /auth/login` says a username and password are asked, `POST /auth/token`
//! (an OAuth 2 password grant) trades them for a bearer token, `POST
//! /auth/revoke` ends it. Users come from a password file (the format
//! `mqtt.password_file` reads); tokens live in memory (a flowgate restart
//! logs every author out, as a Node-RED restart does without its session
//! store).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use crate::mqtt::auth::{PasswordFile, Verdict};

/// `GET /auth/login` when a login is needed (Node-RED's own answer).
pub const LOGIN_PROMPTS: &str = r#"{"type":"credentials","prompts":[{"id":"username","type":"text","label":"user.username"},{"id":"password","type":"password","label":"user.password"}]}"#;

/// Why a login gave no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("login refused: {}", .0.label())]
    Refused(Verdict),
    #[error("the system's random number generator failed")]
    NoRandom,
}

/// Who is logged in, by token.
pub struct Sessions {
    expiry: Duration,
    by_token: Mutex<HashMap<String, Session>>,
    rng: SystemRandom,
}

struct Session {
    user: String,
    until: Instant,
}

/// What `POST /auth/token` carried.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub grant_type: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Grant {
    /// Reads an `application/x-www-form-urlencoded` body (what the editor
    /// sends) or a JSON object.
    pub fn parse(body: &[u8]) -> Self {
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(body) {
            let field = |k: &str| o.get(k).and_then(|v| v.as_str()).map(str::to_string);
            return Self {
                grant_type: field("grant_type").unwrap_or_default(),
                username: field("username"),
                password: field("password"),
            };
        }
        let mut g = Self::default();
        for pair in body.split(|b| *b == b'&') {
            let (k, v) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            let v = form_decoded(v);
            match k {
                b"grant_type" => g.grant_type = v,
                b"username" => g.username = Some(v),
                b"password" => g.password = Some(v),
                _ => {}
            }
        }
        g
    }
}

/// A form field's value: `+` is a space, `%XX` a byte.
fn form_decoded(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < v.len() => {
                let hex = std::str::from_utf8(&v[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Sessions {
    pub fn new(expiry: Duration) -> Self {
        Self {
            expiry,
            by_token: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
        }
    }

    /// Checks a grant against `users` (on a blocking thread: a password
    /// hash costs tens of milliseconds); a new token, or why not.
    pub async fn login(
        &self,
        users: std::sync::Arc<PasswordFile>,
        grant: Grant,
    ) -> Result<(String, String), LoginError> {
        if grant.grant_type != "password" {
            return Err(LoginError::Refused(Verdict::NoCredentials));
        }
        let Grant {
            username, password, ..
        } = grant;
        let user = username.clone();
        let verdict = tokio::task::spawn_blocking(move || {
            users.check(username.as_deref(), password.as_deref().map(str::as_bytes))
        })
        .await
        .unwrap_or(Verdict::BadPassword);
        match (verdict, user) {
            (Verdict::Accepted, Some(user)) => Ok((self.issue(&user)?, user)),
            (Verdict::Accepted, None) => Err(LoginError::Refused(Verdict::NoCredentials)),
            (v, _) => Err(LoginError::Refused(v)),
        }
    }

    /// A new token for `user`.
    fn issue(&self, user: &str) -> Result<String, LoginError> {
        use base64ct::Encoding;
        let mut bytes = [0u8; 32];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| LoginError::NoRandom)?;
        let token = base64ct::Base64UrlUnpadded::encode_string(&bytes);
        let mut all = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        all.retain(|_, s| s.until > now);
        all.insert(
            token.clone(),
            Session {
                user: user.to_string(),
                until: now + self.expiry,
            },
        );
        Ok(token)
    }

    /// The user a token belongs to, while it lasts.
    pub fn user(&self, token: &str) -> Option<String> {
        let all = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        all.get(token)
            .filter(|s| s.until > Instant::now())
            .map(|s| s.user.clone())
    }

    pub fn revoke(&self, token: &str) {
        let mut all = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(token);
    }

    /// `POST /auth/token`'s answer for a new token (as oauth2orize gives it).
    pub fn token_json(&self, token: &str) -> String {
        serde_json::json!({
            "access_token": token,
            "expires_in": self.expiry.as_secs(),
            "token_type": "Bearer",
        })
        .to_string()
    }
}

/// The bearer token of a request: its `Authorization` header, else an
/// `access_token` query parameter (both as Node-RED takes them).
pub fn bearer<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    authorization
        .and_then(|a| {
            let (scheme, token) = a.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .or_else(|| {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix("access_token="))
        })
}

/// The cookie that carries the token for what the browser loads without
/// the editor's script (`<script src>` of a node's admin route, images):
/// taken for GET and HEAD only, so a request from another site cannot change
/// anything with it (and SameSite=Strict keeps other sites from sending it).
pub const COOKIE: &str = "flowgate-editor";

/// The `Set-Cookie` value after a login (`token`) or a logout (`None`).
pub fn set_cookie(token: Option<&str>, max_age: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!(
            "{COOKIE}={t}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
            max_age.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
    }
}

/// The token in a `Cookie` header's value.
pub fn cookie_token(cookies: &str) -> Option<&str> {
    cookies
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// May a request reach the replicas without a login? Only what Node-RED
/// itself serves before one: the editor's page and its static files, the
/// locales, node icons and module resources, and the login endpoints.
pub fn open_path(method: &str, path: &str) -> bool {
    if !matches!(method, "GET" | "HEAD") {
        return matches!(path, "/auth/token");
    }
    let segments = path.trim_start_matches('/').split('/').count();
    path == "/"
        || path == "/favicon.ico"
        || path == "/auth/login"
        || ["/red/", "/vendor/", "/types/", "/theme/", "/locales/", "/resources/"]
            .iter()
            .any(|p| path.starts_with(p))
        // `/icons/{module}/{icon}` and `/icons/{scope}/{module}/{icon}`;
        // `/icons` (the list) needs a login
        || (path.starts_with("/icons/") && (3..=4).contains(&segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_editors_form_is_read_field_by_field() {
        let g = Grant::parse(
            b"client_id=node-red-editor&grant_type=password&scope=&username=ann&password=p%40ss+word%21",
        );
        assert_eq!(
            g,
            Grant {
                grant_type: "password".into(),
                username: Some("ann".into()),
                password: Some("p@ss word!".into()),
            }
        );
        let j = Grant::parse(br#"{"grant_type":"password","username":"bo","password":"x"}"#);
        assert_eq!(j.username.as_deref(), Some("bo"));
        assert_eq!(Grant::parse(b"password=%4").password.as_deref(), Some("%4"));
        assert_eq!(
            Grant::parse(b"password=%zz").password.as_deref(),
            Some("%zz")
        );
    }

    #[test]
    fn only_the_editors_page_and_assets_are_open_without_a_login() {
        for (m, p) in [
            ("GET", "/"),
            ("GET", "/red/red.min.js"),
            ("GET", "/vendor/vendor.js"),
            ("GET", "/locales/editor"),
            ("GET", "/icons/node-red/inject.svg"),
            ("GET", "/icons/@scope/mod/x.svg"),
            ("GET", "/auth/login"),
            ("POST", "/auth/token"),
        ] {
            assert!(open_path(m, p), "{m} {p} is open");
        }
        for (m, p) in [
            ("GET", "/flows"),
            ("GET", "/settings"),
            ("GET", "/icons"),
            ("GET", "/nodes"),
            ("POST", "/flows"),
            ("POST", "/inject/abc"),
            ("POST", "/red/x"),
            ("GET", "/comms"),
            ("POST", "/auth/revoke"),
            ("GET", "/context/global"),
        ] {
            assert!(!open_path(m, p), "{m} {p} needs a login");
        }
    }

    #[test]
    fn a_bearer_comes_in_the_header_or_the_query() {
        assert_eq!(bearer(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc "), None), Some("abc"));
        assert_eq!(bearer(Some("Basic abc"), None), None);
        assert_eq!(bearer(None, Some("x=1&access_token=t")), Some("t"));
        assert_eq!(bearer(None, None), None);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_cleared_on_logout() {
        assert_eq!(cookie_token("a=1; flowgate-editor=tok; b=2"), Some("tok"));
        assert_eq!(cookie_token("flowgate-editorx=tok"), None);
        let set = set_cookie(Some("tok"), Duration::from_secs(60), true);
        assert!(
            set.starts_with("flowgate-editor=tok; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"),
            "{set}"
        );
        assert!(set.ends_with("; Secure"));
        assert!(set_cookie(None, Duration::ZERO, false).contains("Max-Age=0"));
    }

    #[test]
    fn a_token_lasts_until_it_expires_or_is_revoked() {
        let s = Sessions::new(Duration::from_secs(60));
        let t = s.issue("ann").expect("token");
        assert_eq!(s.user(&t).as_deref(), Some("ann"));
        assert_eq!(s.user("other"), None);
        s.revoke(&t);
        assert_eq!(s.user(&t), None);
        let short = Sessions::new(Duration::ZERO);
        let t = short.issue("ann").expect("token");
        assert_eq!(short.user(&t), None);
    }
}
