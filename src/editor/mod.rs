//! An instance's Node-RED editor through flowgate, as if its replicas were
//! one Node-RED (`[instance.editor]`): a listener of its own, apart from the
//! public one.
//!
//! - Reads (the editor page, `GET /flows`, `/settings`, `/nodes`, the inject
//!   button, ...) go to one replica, the *editor replica*: the lowest healthy
//!   slot, kept until it goes down.
//! - `POST /flows` (Deploy) is a rolling deploy over every replica
//!   ([`crate::deploy`]); the editor's request answers once every replica runs
//!   the new flows, or with the error and what each replica runs.
//! - The `/comms` WebSocket carries the editor replica's events and the debug
//!   messages of every replica, each tagged with its replica ([`comms`]).
//! - The login is Node-RED's adminAuth protocol, answered by flowgate from a
//!   password file ([`auth`]); the replicas' own admin API is reached without
//!   one (keep it reachable only by flowgate).

pub mod auth;
pub mod comms;
pub mod palette;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EditorConfig;
use crate::deploy::{Change, Deploy, DeployError, EditorPost, Registry};
use crate::http::backend::{Backend, Body, BoxError, Pool};
use crate::http::forward::strip_hop_by_hop;
use crate::metrics::Metrics;
use crate::mqtt::auth::PasswordFile;

/// One instance's editor listener.
pub struct Editor {
    pub instance: String,
    pub cfg: EditorConfig,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    deploys: Arc<Registry>,
    users: Option<Arc<PasswordFile>>,
    sessions: auth::Sessions,
    /// The replica reads go to, kept until it goes down.
    current: Mutex<Option<usize>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

fn json(code: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Node-RED's error answer: `{"code": ..., "message": ...}`.
fn error(code: StatusCode, kind: &str, message: &str) -> Response<Body> {
    json(
        code,
        serde_json::json!({ "code": kind, "message": message }).to_string(),
    )
}

fn empty(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r
}

impl Editor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instance: &str,
        cfg: EditorConfig,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        deploys: Arc<Registry>,
        users: Option<Arc<PasswordFile>>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            instance: instance.to_string(),
            sessions: auth::Sessions::new(cfg.session_expiry),
            cfg,
            pool,
            metrics,
            deploys,
            users,
            current: Mutex::new(None),
            tracker,
            shutdown,
        }
    }

    /// The editor replica: the one reads went to while it stays up, else
    /// the lowest healthy slot.
    pub fn replica(&self) -> Option<Arc<Backend>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = current.and_then(|i| self.pool.backends.get(i)) {
            if b.is_up() {
                return Some(b.clone());
            }
        }
        let next = self.pool.backends.iter().find(|b| b.is_up())?.clone();
        if *current != Some(next.index) {
            tracing::info!(instance = %self.instance, replica = %next.label, "editor replica: {}", next.addr);
        }
        *current = Some(next.index);
        Some(next)
    }

    /// Every replica, for what all of them must see.
    pub fn replicas(&self) -> &[Arc<Backend>] {
        &self.pool.backends
    }

    /// Answers one request of the editor.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        proto: &'static str,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/auth/login") => {
                let prompts = if self.cfg.login {
                    auth::LOGIN_PROMPTS
                } else {
                    "{}"
                };
                return json(StatusCode::OK, prompts);
            }
            (&Method::POST, "/auth/token") if self.cfg.login => return self.login(req).await,
            // the socket's login is its first message
            (_, "/comms") if crate::http::forward::is_upgrade(req.headers()) => {
                return comms::upgrade(self.clone(), req)
            }
            _ => {}
        }
        let user = if self.cfg.login {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let mut user =
                auth::bearer(header, req.uri().query()).and_then(|t| self.sessions.user(t));
            if user.is_none() && matches!(method, Method::GET | Method::HEAD) {
                user = req
                    .headers()
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(auth::cookie_token)
                    .and_then(|t| self.sessions.user(t));
            }
            if user.is_none() && !auth::open_path(method.as_str(), &path) {
                return empty(StatusCode::UNAUTHORIZED);
            }
            user
        } else {
            None
        };
        match (&method, path.as_str()) {
            (&Method::POST, "/auth/revoke") => self.revoke(req).await,
            (&Method::POST, "/flows") => self.deploy(req).await,
            (&Method::POST, "/nodes") => self.palette(req).await,
            (&Method::PUT | &Method::DELETE, p) if palette::module_of(p).is_some() => {
                self.palette(req).await
            }
            _ => self.forward(req, user.as_deref(), peer, proto).await,
        }
    }

    async fn login(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(users) = self.users.clone() else {
            return empty(StatusCode::NOT_FOUND);
        };
        let body = match read_body(req, 64 << 10).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let grant = auth::Grant::parse(&body);
        let result = self.sessions.login(users, grant).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(auth::LoginError::Refused(v)) => v.label(),
            Err(auth::LoginError::NoRandom) => "error",
        };
        self.metrics
            .editor_logins
            .with_label_values(&[self.instance.as_str(), label])
            .inc();
        match result {
            Ok((token, user)) => {
                tracing::info!(instance = %self.instance, %user, "editor login");
                let mut r = json(StatusCode::OK, self.sessions.token_json(&token));
                self.set_cookie(&mut r, Some(&token));
                r
            }
            Err(e) => {
                tracing::warn!(instance = %self.instance, error = %e, "editor login refused");
                json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"error":"invalid_grant","error_description":"wrong username or password"}"#,
                )
            }
        }
    }

    async fn revoke(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match read_body(req, 64 << 10).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let token = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string))
            .or_else(|| {
                body.split(|b| *b == b'&')
                    .find_map(|kv| kv.strip_prefix(b"token="))
                    .map(|t| String::from_utf8_lossy(t).into_owned())
            });
        if let Some(t) = token {
            self.sessions.revoke(&t);
        }
        let mut r = empty(StatusCode::OK);
        self.set_cookie(&mut r, None);
        r
    }

    fn set_cookie(&self, r: &mut Response<Body>, token: Option<&str>) {
        let value = auth::set_cookie(token, self.cfg.session_expiry, self.cfg.tls.is_some());
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }

    /// Deploy: the editor's flows to every replica in turn.
    async fn deploy(&self, req: Request<Incoming>) -> Response<Body> {
        let value = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (version, kind) = (
            value("node-red-api-version"),
            value("node-red-deployment-type"),
        );
        let body = match read_body(req, self.cfg.max_body.bytes()).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let post = match EditorPost::parse(body, version.as_deref(), kind.as_deref()) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
        };
        let api_v2 = post.api_v2;
        let deploy = Deploy::of(
            self.pool.clone(),
            self.metrics.clone(),
            Change::Editor(post),
            self.cfg.step_timeout,
        );
        if !self.deploys.begin(&self.instance, deploy.status.clone()) {
            self.metrics
                .editor_deploys
                .with_label_values(&[self.instance.as_str(), "busy"])
                .inc();
            return error(
                StatusCode::CONFLICT,
                "deploy_in_progress",
                "another deploy of this instance is running: try again when it is done",
            );
        }
        tracing::info!(instance = %self.instance, "deploy from the editor: rolling out to every replica");
        // the deploy goes on to its end if the editor goes away
        let outcome = self.tracker.spawn(deploy.run()).await;
        match outcome {
            Ok(Ok(rev)) if api_v2 => json(
                StatusCode::OK,
                serde_json::json!({ "rev": rev }).to_string(),
            ),
            Ok(Ok(_)) => empty(StatusCode::NO_CONTENT),
            Ok(Err(DeployError::Conflict(m))) => {
                error(StatusCode::CONFLICT, "version_mismatch", &m)
            }
            Ok(Err(DeployError::Preflight(m))) => {
                error(StatusCode::BAD_REQUEST, "deploy_refused", &m)
            }
            Ok(Err(DeployError::Failed(m))) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "deploy_failed", &m)
            }
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "deploy_failed",
                &format!("the deploy stopped: {e}"),
            ),
        }
    }

    /// A palette change: on every replica in turn, undone on those already
    /// changed when one refuses.
    async fn palette(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let headers: Vec<(String, String)> = ["content-type", "accept", "node-red-api-version"]
            .iter()
            .filter_map(|name| {
                let v = req.headers().get(*name)?.to_str().ok()?;
                Some((name.to_string(), v.to_string()))
            })
            .collect();
        let body = match read_body(req, self.cfg.max_body.bytes()).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let Some(change) = palette::classify(&method, &path, &body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "not a palette change",
            );
        };
        let count = |result: &str| {
            self.metrics
                .editor_palette
                .with_label_values(&[self.instance.as_str(), result])
                .inc();
        };
        if let Some(b) = self.pool.backends.iter().find(|b| !b.is_up()) {
            count("refused");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "replica_down",
                &format!(
                    "replica {} ({}) is down: a palette change goes to every replica; nothing changed",
                    b.label, b.addr
                ),
            );
        }
        let request = palette::Request {
            method,
            path,
            headers,
            body,
        };
        let editor = self.replica().map(|b| b.index);
        let mut done: Vec<(&Arc<Backend>, palette::Answer)> = Vec::new();
        for b in &self.pool.backends {
            let (status, why) = match palette::send(&b.addr, &request).await {
                Ok(a) if palette::ok(a.status) => {
                    tracing::info!(instance = %self.instance, replica = %b.label, change = ?change, "palette change done");
                    done.push((b, a));
                    continue;
                }
                Ok(a) => (palette::refusal_status(a.status), a.reason()),
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
            };
            let undone = palette::undo_all(&change, &done).await;
            let message = format!(
                "replica {} refused the palette change: {why}; {undone}",
                b.label
            );
            tracing::warn!(instance = %self.instance, "{message}");
            count("failed");
            return error(status, "palette_failed", &message);
        }
        count("done");
        let answer = done
            .iter()
            .find(|(b, _)| Some(b.index) == editor)
            .or(done.first())
            .map(|(_, a)| (a.status, a.body.clone()));
        match answer {
            Some((status, body)) => {
                json(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body)
            }
            None => empty(StatusCode::NO_CONTENT),
        }
    }

    /// Any other request: to the editor replica.
    async fn forward(
        &self,
        req: Request<Incoming>,
        user: Option<&str>,
        peer: SocketAddr,
        proto: &'static str,
    ) -> Response<Body> {
        let Some(backend) = self.replica() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_replica",
                &format!("no replica of {} is up", self.instance),
            );
        };
        let settings = req.method() == Method::GET && req.uri().path() == "/settings";
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        // flowgate's token is not the replica's business
        parts.headers.remove(header::AUTHORIZATION);
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Some(pq) = parts.uri.path_and_query() {
            if let Ok(uri) = pq.as_str().parse() {
                parts.uri = uri;
            }
        }
        let body: Body = Limited::new(body, self.cfg.max_body.bytes())
            .map_err(|e| e as BoxError)
            .boxed();
        let resp = match self.send(&backend, Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if let (true, Some(user), true) = (settings, user, parts.status == StatusCode::OK) {
            return with_user(parts, body, user).await;
        }
        Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
    }

    /// Sends a request to `backend` on a pooled or new connection.
    async fn send(
        &self,
        backend: &Backend,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let cfg = &self.pool.cfg;
        let mut sender = match backend.checkout(cfg.idle_timeout) {
            Some(s) => s,
            None => backend.connect(cfg.connect_timeout).await.map_err(|e| {
                tracing::warn!(instance = %self.instance, replica = %backend.label, error = %e, "editor: replica unreachable");
                error(
                    StatusCode::BAD_GATEWAY,
                    "replica_unreachable",
                    &format!("replica {} ({}): {e}", backend.label, backend.addr),
                )
            })?,
        };
        match tokio::time::timeout(self.cfg.timeout, sender.send_request(req)).await {
            Ok(Ok(resp)) => {
                backend.checkin(sender);
                Ok(resp)
            }
            Ok(Err(e)) => {
                let too_large = std::error::Error::source(&e).is_some_and(|s| {
                    s.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                });
                if too_large {
                    return Err(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request_too_large",
                        &format!(
                            "the request body is over {} bytes",
                            self.cfg.max_body.bytes()
                        ),
                    ));
                }
                tracing::warn!(instance = %self.instance, replica = %backend.label, error = %e, "editor: replica failed the request");
                Err(error(
                    StatusCode::BAD_GATEWAY,
                    "replica_failed",
                    &format!("replica {} ({}): {e}", backend.label, backend.addr),
                ))
            }
            Err(_) => Err(error(
                StatusCode::GATEWAY_TIMEOUT,
                "replica_timeout",
                &format!(
                    "replica {} did not answer within {:?}",
                    backend.label, self.cfg.timeout
                ),
            )),
        }
    }

    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn user_of(&self, token: &str) -> Option<String> {
        self.sessions.user(token)
    }
}

/// `GET /settings` with the logged-in user added, as Node-RED adds it (the
/// editor shows its user menu and Logout from it).
async fn with_user(
    mut parts: hyper::http::response::Parts,
    body: Incoming,
    user: &str,
) -> Response<Body> {
    let bytes = match Limited::new(body, 16 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                "replica_failed",
                &format!("reading /settings: {e}"),
            )
        }
    };
    let out = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert(
                "user".into(),
                serde_json::json!({ "username": user, "permissions": "*" }),
            );
            Bytes::from(serde_json::Value::Object(o).to_string())
        }
        _ => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    Response::from_parts(parts, Full::new(out).map_err(|e| match e {}).boxed())
}

/// A request's whole body, at most `limit` bytes; else the answer to give.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!("the request body is over {limit} bytes"),
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("cannot read the request: {e}"),
        )),
    }
}

/// Serves one editor listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    editor: Arc<Editor>,
    tls: Option<Arc<crate::tls::Acceptor>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let proto = if tls.is_some() { "https" } else { "http" };
    let timeout = editor.pool.cfg.header_timeout;
    let service = move |peer| {
        let editor = editor.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let editor = editor.clone();
            async move { Ok::<_, std::convert::Infallible>(editor.handle(req, peer, proto).await) }
        })
    };
    let owner = (shutdown, tracker);
    crate::listener::serve_http1(listener, "editor", tls, timeout, service, owner).await;
}
