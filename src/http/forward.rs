//! One request through the balancer: policy checks (admin paths, body
//! limit), replica choice (sticky cookie, balancer), forwarding with retries,
//! WebSocket splicing, and the response headers flowgate adds.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::backend::{Backend, Body, Pool};
use super::h1::HOP_BY_HOP;
use super::policy::{self, TryFailure, Verdict};
use crate::config::RequestKey;

/// Name of the response header that says which replica answered.
pub const REPLICA_HEADER: &str = "x-flowgate-replica";

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
        })
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // headers named by Connection are hop-by-hop too
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        headers.remove(name);
    }
}

/// Does `path` fall under `prefix`? Case-insensitive, as Express (and so
/// Node-RED) routes: `/FLOWS` reaches the same handler as `/flows`.
fn path_matches(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    if prefix == b"/" {
        return path == b"/" || path.starts_with(b"/?");
    }
    path.len() >= prefix.len()
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(path.get(prefix.len()), None | Some(b'/' | b'?'))
}

/// The replica a sticky cookie names, in one `Cookie` header's value.
fn sticky_in(cookies: &str, cookie: &str) -> Option<usize> {
    cookies
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == cookie)
        .and_then(|(_, v)| v.strip_prefix('r'))
        .and_then(|v| v.parse().ok())
}

/// Texts of flowgate's own answers, the same on both paths.
pub(super) const BLOCKED_TEXT: &str = "the Node-RED admin API and editor are not served here\n";
pub(super) const TOO_LARGE_TEXT: &str = "request body too large\n";

pub(super) const NOT_PUBLISHED_TEXT: &str = "not found\n";

/// What the public listener does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Pass,
    /// Under an admin path: 403.
    Admin,
    /// No route the flows publish (nor `public_paths`) covers it: 404.
    Unpublished,
}

/// May a `method` request for `path` pass the public listener? With
/// `block_admin` (the default) only what the flows publish passes, and never
/// an admin path (Node-RED's admin routes win over `http in` routes on one
/// root); refusals are counted.
pub(super) fn access(pool: &Pool, method: &str, path: &str) -> Access {
    if !pool.cfg.block_admin {
        return Access::Pass;
    }
    let verdict = if pool.cfg.admin_paths.iter().any(|p| path_matches(path, p)) {
        Access::Admin
    } else if pool.public.allows(method, path) {
        Access::Pass
    } else {
        Access::Unpublished
    };
    if verdict != Access::Pass {
        pool.public.denied.inc();
    }
    verdict
}

/// Do responses on `path` carry the sticky cookie?
pub(super) fn sticky_path(pool: &Pool, path: &str) -> bool {
    pool.cfg.sticky && pool.cfg.sticky_paths.iter().any(|p| path_matches(path, p))
}

/// The replica the request's sticky cookie pins it to, if it can take it.
pub(super) fn pinned<'a>(
    pool: &Pool,
    cookies: impl IntoIterator<Item = &'a str>,
) -> Option<Arc<Backend>> {
    if !pool.cfg.sticky {
        return None;
    }
    cookies
        .into_iter()
        .find_map(|c| sticky_in(c, &pool.cfg.sticky_cookie))
        .and_then(|i| pool.sticky(i))
}

/// `key-hash`: the replica the request's key belongs to; `None` (least-
/// inflight then) for a request without it, counted, or another balance.
pub(super) fn keyed(
    pool: &Pool,
    target: &str,
    header: Option<&[u8]>,
    cookies: Option<&str>,
) -> Option<Arc<Backend>> {
    let key = pool.cfg.key.as_ref()?;
    match super::balancer::request_key(key, target, header, cookies) {
        Some(k) => pool.pick_keyed(crate::hash::key_hash(&k)),
        None => {
            pool.keyless.inc();
            None
        }
    }
}

/// The `Set-Cookie` value that pins a client to replica `index`.
pub(super) fn sticky_cookie(name: &str, index: usize) -> String {
    format!("{name}=r{index}; Path=/; HttpOnly; SameSite=Lax")
}

/// Keeps a replica's in-flight count right whatever way a request ends.
pub(super) struct InflightGuard(Arc<Backend>);

impl InflightGuard {
    pub(super) fn new(b: Arc<Backend>) -> Self {
        b.inflight.fetch_add(1, Ordering::Relaxed);
        b.inflight_gauge.inc();
        Self(b)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.inflight_gauge.dec();
    }
}

/// Handles one request for `pool`'s instance.
pub async fn handle(
    pool: Arc<Pool>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    proto: &'static str,
) -> Response<Body> {
    let cfg = &pool.cfg;
    let path = req.uri().path().to_owned();
    match access(&pool, req.method().as_str(), &path) {
        Access::Pass => {}
        Access::Admin => return status(StatusCode::FORBIDDEN, BLOCKED_TEXT),
        Access::Unpublished => return status(StatusCode::NOT_FOUND, NOT_PUBLISHED_TEXT),
    }
    let limit = cfg.max_body.bytes();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return status(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_TEXT);
    }
    let upgrade = is_upgrade(req.headers());
    let sticky_path = sticky_path(&pool, &path);
    let pinned = pinned(
        &pool,
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    // key-hash: the key's replica first (before a sticky cookie's)
    let pinned = request_key(&pool, &req).or(pinned);
    forwarded_headers(req.headers_mut(), peer, proto, upgrade);
    pool.count_request();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // a bodiless idempotent request can be rebuilt for a retry after sending
    let replayable = declared.unwrap_or(0) == 0
        && !req.headers().contains_key(header::TRANSFER_ENCODING)
        && policy::idempotent(req.method().as_str())
        && !upgrade;
    let replay = replayable.then(|| Replay {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    });
    let (parts, body) = req.into_parts();
    let body: Body = Limited::new(body, limit)
        .map_err(|e| e as super::backend::BoxError)
        .boxed();
    let mut outgoing = Some(Request::from_parts(parts, body));

    let mut tried = Vec::new();
    let started = Instant::now();
    let mut first = pinned;
    loop {
        let Some(backend) = first.take().or_else(|| pool.pick(&tried)) else {
            return status(StatusCode::BAD_GATEWAY, policy::NO_REPLICA_TEXT);
        };
        tried.push(backend.index);
        let Some(req) = outgoing
            .take()
            .or_else(|| replay.as_ref().map(Replay::request))
        else {
            return status(StatusCode::BAD_GATEWAY, policy::FAILED_TEXT);
        };
        let guard = InflightGuard::new(backend.clone());
        match send(&pool, &backend, req, upgrade).await {
            Outcome::Response(resp, sender) => {
                if let Some(s) = sender {
                    backend.checkin(s);
                }
                backend.duration.observe(started.elapsed().as_secs_f64());
                let to_client = Answered {
                    guard,
                    sticky_path,
                    client_upgrade,
                };
                return to_client.response(&pool, &backend, resp);
            }
            Outcome::Failed(failure, back) => {
                // a request that never reached the replica comes back, body and all
                outgoing = back;
                if let Verdict::Answer {
                    status: code, text, ..
                } = policy::settle(&pool, &backend, &failure, replay.is_some())
                {
                    return status(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                        text,
                    );
                }
            }
            Outcome::TooLarge => return status(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_TEXT),
        }
    }
}

/// What a bodiless idempotent request is rebuilt from for a retry after it
/// was sent.
struct Replay {
    method: hyper::Method,
    uri: hyper::Uri,
    headers: hyper::HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<Body> {
        let mut r = Request::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// key-hash: the replica of the request's key, if the pool hashes one.
fn request_key(pool: &Pool, req: &Request<Incoming>) -> Option<Arc<Backend>> {
    let key = pool.cfg.key.as_ref()?;
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let header = match key {
        RequestKey::Header(name) => req.headers().get(name.as_str()).map(|v| v.as_bytes()),
        _ => None,
    };
    let cookies = matches!(key, RequestKey::Cookie(_)).then(|| {
        let all = req.headers().get_all(header::COOKIE).iter();
        all.filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("; ")
    });
    keyed(pool, target, header, cookies.as_deref())
}

/// Hop-by-hop headers out; `X-Forwarded-For`, `-Proto` and `-Host` in.
fn forwarded_headers(
    headers: &mut hyper::HeaderMap,
    peer: SocketAddr,
    proto: &'static str,
    upgrade: bool,
) {
    let host = headers.get(header::HOST).cloned();
    strip_hop_by_hop(headers, upgrade);
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h);
    }
}

/// What a replica's response needs on its way to the client.
struct Answered {
    /// The replica's in-flight count, held until the body is done.
    guard: InflightGuard,
    /// Set the sticky cookie.
    sticky_path: bool,
    /// The client's side of an upgrade it asked for.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Answered {
    /// The response as the client gets it: counted, hop-by-hop headers out,
    /// the replica named, the sticky cookie set, an upgrade spliced.
    fn response(
        self,
        pool: &Pool,
        backend: &Arc<Backend>,
        mut resp: Response<Incoming>,
    ) -> Response<Body> {
        let cfg = &pool.cfg;
        let code = resp.status();
        backend.count(code.as_u16());
        pool.served(backend);
        let upgraded = code == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(resp.headers_mut(), upgraded);
        if cfg.replica_header {
            if let Ok(v) = HeaderValue::from_str(&backend.label) {
                resp.headers_mut().insert(REPLICA_HEADER, v);
            }
        }
        if self.sticky_path && !upgraded {
            let cookie = sticky_cookie(&cfg.sticky_cookie, backend.index);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        if upgraded {
            if let Some(client) = self.client_upgrade {
                splice(client, &mut resp, backend.clone());
            }
            return resp.map(|b| {
                b.map_err(|e| Box::new(e) as super::backend::BoxError)
                    .boxed()
            });
        }
        let (parts, body) = resp.into_parts();
        let counted = GuardedBody {
            inner: body,
            _guard: self.guard,
        };
        Response::from_parts(parts, counted.boxed())
    }
}

/// A response body that holds the replica's in-flight count until it ends.
struct GuardedBody {
    inner: Incoming,
    _guard: InflightGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = super::backend::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as super::backend::BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

enum Outcome {
    Response(
        Response<Incoming>,
        Option<hyper::client::conn::http1::SendRequest<Body>>,
    ),
    /// No response; a request that never left comes back with it.
    Failed(TryFailure, Option<Request<Body>>),
    TooLarge,
}

async fn send(pool: &Pool, backend: &Backend, mut req: Request<Body>, upgrade: bool) -> Outcome {
    let cfg = &pool.cfg;
    loop {
        // upgrades get a connection of their own
        let pooled = if upgrade {
            None
        } else {
            backend.checkout(cfg.idle_timeout)
        };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => match backend.connect(cfg.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    if e.refused() {
                        pool.passive_down(backend);
                    }
                    return Outcome::Failed(TryFailure::NotSent(e.to_string()), Some(req));
                }
            },
        };
        match tokio::time::timeout(cfg.timeout, sender.try_send_request(req)).await {
            Err(_) => return Outcome::Failed(TryFailure::Timeout, None),
            Ok(Ok(resp)) => return Outcome::Response(resp, (!upgrade).then_some(sender)),
            Ok(Err(mut e)) => match e.take_message() {
                // a stale pooled connection: a fresh one for the same replica
                Some(back) if reused => req = back,
                Some(back) => {
                    return Outcome::Failed(
                        TryFailure::NotSent(e.into_error().to_string()),
                        Some(back),
                    )
                }
                None => {
                    let err = e.into_error();
                    let too_large = std::error::Error::source(&err).is_some_and(|s| {
                        s.downcast_ref::<http_body_util::LengthLimitError>()
                            .is_some()
                    });
                    return if too_large {
                        Outcome::TooLarge
                    } else {
                        Outcome::Failed(TryFailure::Failed(err.to_string()), None)
                    };
                }
            },
        }
    }
}

/// Joins the client's and the replica's upgraded connections, until either
/// closes, the replica goes down or flowgate shuts down.
fn splice(client: hyper::upgrade::OnUpgrade, resp: &mut Response<Incoming>, backend: Arc<Backend>) {
    let upstream = hyper::upgrade::on(resp);
    let mut down = backend.down_signal();
    let owner = backend.clone();
    owner.spawn_until_shutdown(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let _guard = InflightGuard::new(backend);
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "spliced connection ended");
                }
            }
            _ = down.changed() => tracing::info!("replica down: closing its spliced connection"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::path_matches;

    #[test]
    fn admin_paths_match_as_node_red_routes_them() {
        for (path, prefix) in [
            ("/flows", "/flows"),
            ("/FLOWS", "/flows"),
            ("/Flows/state", "/flows"),
            ("/flows?x=1", "/flows"),
            ("/flows/", "/flows"),
            ("/", "/"),
            ("/?a", "/"),
        ] {
            assert!(path_matches(path, prefix), "{path} under {prefix}");
        }
        for (path, prefix) in [
            ("/flowsx", "/flows"),
            ("/api", "/flows"),
            ("/api", "/"),
            ("/fl", "/flows"),
        ] {
            assert!(!path_matches(path, prefix), "{path} not under {prefix}");
        }
    }
}
