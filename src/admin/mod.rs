//! The admin HTTP listener: `/metrics` (Prometheus text), `/api/instances`
//! (JSON), `/healthz` (the process answers), `/readyz` (it takes traffic;
//! 503 once shutdown began) and `/status` (a live page drawn from
//! `/api/instances` in the browser, no external assets). Routing is a plain
//! function of the request so it is testable without a socket; only [`serve`]
//! touches the network as a server, and [`client`] reads the API of another
//! flowgate for `flowgate status` and `flowgate loadtest`.

/// Moved to [`crate::client`] (deploy and the CLI use it; kept here for old paths).
pub use crate::client;

/// The page served at `/status`.
const STATUS_PAGE: &str = include_str!("status.html");

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::deploy::{Deploy, DeployStatus};
use crate::http::backend::Pool;
use crate::metrics::Metrics;
use crate::mqtt::replicas::{InstanceView, Instances};

/// What the admin handlers read.
pub struct AdminState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub instances: Arc<Instances>,
    /// The instances' HTTP replica pools.
    pub pools: Vec<Arc<Pool>>,
    pub ready: AtomicBool,
    /// The bundled broker answers (its watchdog; always true with a broker
    /// of the user's own).
    pub broker_up: AtomicBool,
    /// The last rolling deploy of each instance (shared with the editor
    /// listeners: one deploy at a time per instance).
    pub deploys: Arc<crate::deploy::Registry>,
    /// Where deploys started through the API run: the app's tracker, so a
    /// deploy in progress is waited for on shutdown (within `--grace`).
    pub tasks: TaskTracker,
}

/// Does the request carry the admin token (when one is configured)? Health
/// and readiness always answer; `/metrics` too with `metrics_public`. The
/// token comes as `Authorization: Bearer ...` or, for the status page opened
/// in a browser, as `?token=...`.
fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.config.admin.token else {
        return true;
    };
    let path = req.uri().path();
    if path == "/healthz"
        || path == "/readyz"
        || (path == "/metrics" && state.config.admin.metrics_public)
    {
        return true;
    }
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    bearer
        .or(query)
        .is_some_and(|t| token.matches(t.as_bytes()))
}

/// Time a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest flows file a deploy accepts.
const MAX_FLOWS: usize = 64 << 20;

/// `GET /api/instances/{name}/deploy`: the last deploy's status.
fn deploy_status(state: &AdminState, path: &str) -> Option<Response<Full<Bytes>>> {
    let name = path
        .strip_prefix("/api/instances/")?
        .strip_suffix("/deploy")?;
    let Some(status) = state.deploys.get(name) else {
        return Some(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no deploy for this instance\n",
        ));
    };
    let body = serde_json::to_vec_pretty(&status);
    Some(match body {
        Ok(json) => text(StatusCode::OK, "application/json", json),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    })
}

/// `POST /api/instances/{name}/deploy[?step_timeout=60s]` with a flows file:
/// starts a rolling deploy (202), or says why not.
async fn start_deploy(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let Some(name) = path
        .strip_prefix("/api/instances/")
        .and_then(|p| p.strip_suffix("/deploy"))
        .map(str::to_string)
    else {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    };
    let Some(pool) = state.pools.iter().find(|p| p.instance == name).cloned() else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such instance with http replicas (a deploy needs their admin API)\n",
        );
    };
    let step_timeout = match query
        .split('&')
        .find_map(|kv| kv.strip_prefix("step_timeout="))
    {
        Some(v) => match humantime::parse_duration(v) {
            Ok(d) => d,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("step_timeout: {e}\n"),
                )
            }
        },
        None => std::time::Duration::from_secs(60),
    };
    let body = match http_body_util::Limited::new(req.into_body(), MAX_FLOWS)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("cannot read the flows: {e}\n"),
            )
        }
    };
    let flows = match crate::deploy::flows_of(&body) {
        Ok(f) => f,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("flows: {e}\n"),
            )
        }
    };
    let deploy = Deploy::new(pool, state.metrics.clone(), flows, step_timeout);
    if !state.deploys.begin(&name, deploy.status.clone()) {
        return text(
            StatusCode::CONFLICT,
            "text/plain",
            "a deploy of this instance is running\n",
        );
    }
    tracing::info!(instance = %name, "rolling deploy started through the admin API");
    state.tasks.spawn(async move {
        let _ = deploy.run().await;
    });
    text(
        StatusCode::ACCEPTED,
        "application/json",
        serde_json::json!({ "instance": name, "status": format!("/api/instances/{name}/deploy") })
            .to_string(),
    )
}

#[derive(Serialize)]
struct InstancesBody<'a> {
    node_id: &'a str,
    mode: crate::config::Mode,
    upstream: String,
    instances: Vec<InstanceBody>,
}

#[derive(Serialize)]
struct InstanceBody {
    #[serde(flatten)]
    mqtt: InstanceView,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    http: Vec<HttpReplicaView>,
    /// What the public HTTP listener lets through (with `block_admin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<PublicView>,
    /// Active-standby failovers (the last ones kept), oldest first.
    failovers: Vec<crate::metrics::Failover>,
    /// The last rolling deploy (from the admin API or the editor), with each
    /// replica's step while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    deploy: Option<DeployStatus>,
}

#[derive(Serialize)]
struct PublicView {
    /// The flows were read at least once (before: only `public_paths`).
    read: bool,
    /// "GET /api/:id", "* /dashboard (dashboard)", ...
    routes: Vec<String>,
}

fn public_view(pool: &Pool) -> Option<PublicView> {
    pool.cfg.block_admin.then(|| PublicView {
        read: pool.public.read(),
        routes: pool.public.routes().published.clone(),
    })
}

#[derive(Serialize)]
struct HttpReplicaView {
    replica: String,
    addr: String,
    up: bool,
    draining: bool,
    inflight: usize,
    /// Responses from this replica so far (rate = difference over time).
    requests: u64,
    /// Its Node-RED flow rev, when its admin API answers (divergence watch).
    rev: Option<String>,
    /// Its flows differ from most replicas'.
    diverged: bool,
}

fn http_views(pool: &Pool) -> Vec<HttpReplicaView> {
    pool.backends
        .iter()
        .map(|b| (b, b.rev()))
        .map(|(b, (rev, diverged))| HttpReplicaView {
            replica: b.label.clone(),
            addr: b.addr.clone(),
            up: b.is_up(),
            draining: b.is_draining(),
            inflight: b.inflight.load(Ordering::Relaxed),
            requests: b.requests_total(),
            rev,
            diverged,
        })
        .collect()
}

/// `POST /api/instances/{name}/replicas/{r}/drain` (or `/undrain`).
fn drain(state: &AdminState, path: &str) -> Option<Response<Full<Bytes>>> {
    let rest = path.strip_prefix("/api/instances/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [name, "replicas", replica, action] = parts.as_slice() else {
        return None;
    };
    let draining = match *action {
        "drain" => true,
        "undrain" => false,
        _ => return None,
    };
    let Some(pool) = state.pools.iter().find(|p| p.instance == *name) else {
        return Some(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such instance with http replicas\n",
        ));
    };
    let Some(backend) = pool.backends.iter().find(|b| b.label == *replica) else {
        return Some(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such replica\n",
        ));
    };
    backend.set_draining(draining);
    tracing::info!(
        instance = name,
        replica,
        draining,
        "http replica drain changed through the admin API"
    );
    let body = serde_json::json!({
        "instance": name,
        "replica": replica,
        "draining": draining,
        "inflight": backend.inflight.load(Ordering::Relaxed),
    });
    Some(text(StatusCode::OK, "application/json", body.to_string()))
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Answers one admin request.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method == Method::POST {
        return drain(state, path)
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
    }
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    if let Some(resp) = deploy_status(state, path) {
        return resp;
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        "/api/instances" => {
            let body = InstancesBody {
                node_id: &state.config.node_id,
                mode: state.config.mqtt.mode,
                upstream: state.config.mqtt.upstream.to_string(),
                instances: state
                    .instances
                    .views()
                    .into_iter()
                    .map(|mqtt| {
                        let pool = state.pools.iter().find(|p| p.instance == mqtt.name);
                        InstanceBody {
                            deploy: state.deploys.get(&mqtt.name),
                            failovers: state.metrics.failovers(&mqtt.name),
                            http: pool.map(|p| http_views(p)).unwrap_or_default(),
                            public: pool.and_then(|p| public_view(p)),
                            mqtt,
                        }
                    })
                    .collect(),
            };
            match serde_json::to_vec_pretty(&body) {
                Ok(json) => text(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        }
        "/status" => text(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match (
            state.ready.load(Ordering::Relaxed),
            state.broker_up.load(Ordering::Relaxed),
        ) {
            (true, true) => text(StatusCode::OK, "text/plain", "ready\n"),
            (false, _) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "shutting down\n",
            ),
            (true, false) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "the bundled broker does not answer\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin API until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    tls: Option<Arc<crate::tls::Acceptor>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let service = move |_peer| {
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(answer(&state, req).await) }
        })
    };
    let owner = (shutdown, tracker);
    crate::listener::serve_http1(listener, "admin", tls, HANDSHAKE_TIMEOUT, service, owner).await;
}

/// One admin request: its token checked, then routed.
async fn answer(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(state, &req) {
        tracing::debug!(path = %req.uri().path(), "admin request without the token: 401");
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "this admin API needs its bearer token\n",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        r
    } else if req.method() == Method::POST && req.uri().path().ends_with("/deploy") {
        start_deploy(state, req).await
    } else {
        route(state, req.method(), req.uri().path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AdminState {
        let config = Config::parse(
            "node_id = \"n\"\n[mqtt]\nupstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"line1\"\nmatch = { client_id = \"x\" }\n",
            "t",
        )
        .expect("valid config");
        let metrics = Arc::new(Metrics::new());
        let instances = Arc::new(Instances::new(&config.instances, &metrics));
        AdminState {
            config: Arc::new(config),
            metrics,
            instances,
            pools: Vec::new(),
            ready: AtomicBool::new(true),
            broker_up: AtomicBool::new(true),
            deploys: Default::default(),
            tasks: TaskTracker::new(),
        }
    }

    #[test]
    fn routes() {
        let s = state();
        assert_eq!(route(&s, &Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(route(&s, &Method::GET, "/readyz").status(), StatusCode::OK);
        // the bundled broker's watchdog found it dead
        s.broker_up.store(false, Ordering::Relaxed);
        let not_ready = route(&s, &Method::GET, "/readyz").status();
        assert_eq!(not_ready, StatusCode::SERVICE_UNAVAILABLE);
        s.broker_up.store(true, Ordering::Relaxed);
        s.ready.store(false, Ordering::Relaxed);
        assert_eq!(
            route(&s, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            route(&s, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&s, &Method::PUT, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&s, &Method::POST, "/metrics").status(),
            StatusCode::NOT_FOUND
        );
        let api = route(&s, &Method::GET, "/api/instances");
        assert_eq!(api.headers()[CONTENT_TYPE], "application/json");
        let page = route(&s, &Method::GET, "/status");
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.headers()[CONTENT_TYPE]
            .to_str()
            .is_ok_and(|v| v.starts_with("text/html")));
        let metrics = route(&s, &Method::GET, "/metrics");
        assert_eq!(metrics.status(), StatusCode::OK);
    }
}
