//! The HTTP balancer: listeners for the instances' web traffic, each routing
//! by `Host` to an instance's replica [`backend::Pool`]. The balancing choice
//! ([`balancer`]) and health state ([`health`]) are pure; [`forward`] moves
//! one request; only this module and `backend` touch sockets.

pub mod backend;
pub mod balancer;
pub mod forward;
pub mod h1;
pub mod health;
pub mod lean;
mod policy;
pub mod routes;
pub mod shards;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use backend::Pool;

/// The pools served on one listener, by host (`None`: any host).
pub struct Site {
    pools: Vec<(Option<String>, Arc<Pool>)>,
}

impl Site {
    /// The TLS table of the listener (the first instance on it that has one;
    /// validation makes instances sharing a listener agree).
    pub fn tls(&self) -> Option<&crate::config::TlsConfig> {
        self.pools.iter().find_map(|(_, p)| p.cfg.tls.as_ref())
    }
}

impl Site {
    /// The app's metrics (every pool holds the same registry).
    pub fn metrics(&self) -> Option<&crate::metrics::Metrics> {
        self.pools.first().map(|(_, p)| &*p.metrics)
    }

    /// The pool for a request's `Host` (port ignored): an exact host match,
    /// else the pool without a host.
    fn route(&self, host: Option<&str>) -> Option<Arc<Pool>> {
        let host = host.map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, port)| {
                    if port.chars().all(|c| c.is_ascii_digit()) {
                        name
                    } else {
                        h
                    }
                })
                .to_ascii_lowercase()
        });
        self.pools
            .iter()
            .find(|(h, _)| h.is_some() && h.as_deref() == host.as_deref())
            .or_else(|| self.pools.iter().find(|(h, _)| h.is_none()))
            .map(|(_, p)| p.clone())
    }
}

/// Groups pools by listen address.
pub fn sites(pools: &[Arc<Pool>]) -> BTreeMap<SocketAddr, Site> {
    let mut out: BTreeMap<SocketAddr, Site> = BTreeMap::new();
    for pool in pools {
        out.entry(pool.cfg.listen)
            .or_insert_with(|| Site { pools: Vec::new() })
            .pools
            .push((pool.cfg.host.clone(), pool.clone()));
    }
    out
}

/// Longest response head accepted from a replica.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// Limits of a listener's request heads: the strictest of its instances'.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header: usize,
    pub header_timeout: std::time::Duration,
}

/// Serves one listener until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    site: Arc<Site>,
    tls: Option<Arc<crate::tls::Acceptor>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    shards: Arc<shards::Shards>,
) {
    let limits = Limits {
        max_header: site
            .pools
            .iter()
            .map(|(_, p)| p.cfg.max_header_size.bytes())
            .min()
            .unwrap_or(64 << 10),
        header_timeout: site
            .pools
            .iter()
            .map(|(_, p)| p.cfg.header_timeout)
            .min()
            .unwrap_or(std::time::Duration::from_secs(10)),
    };
    let proto = if tls.is_some() { "https" } else { "http" };
    while let Some((tcp, peer)) = crate::listener::accept(&listener, &shutdown, "http", None).await
    {
        let site = site.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        // the socket moves to a shard's runtime: registered there on first poll
        let tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "http connection lost before it was served");
                continue;
            }
        };
        shards.run(&tracker, async move {
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "http connection not registered");
                    return;
                }
            };
            let stream = match crate::tls::accept(tls.as_deref(), tcp, limits.header_timeout).await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "http connection refused");
                    return;
                }
            };
            lean::serve(stream, site, peer, proto, limits, shutdown).await;
        });
    }
}

/// Serves the rest of a connection with hyper: what the lean path does not
/// carry (upgrades, HTTP/1.0, chunked request bodies, `Expect`).
pub async fn serve_hyper<S>(
    io: S,
    site: Arc<Site>,
    peer: SocketAddr,
    proto: &'static str,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let site = site.clone();
        async move {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let resp = match site.route(host.as_deref()) {
                Some(pool) => forward::handle(pool, req, peer, proto).await,
                None => {
                    let mut r = hyper::Response::new(http_body_util::BodyExt::boxed(
                        http_body_util::BodyExt::map_err(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"unknown host\n")),
                            |e| match e {},
                        ),
                    ));
                    *r.status_mut() = StatusCode::MISDIRECTED_REQUEST;
                    r
                }
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header.max(8192))
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    crate::listener::drive_http1(conn, &shutdown, "http").await;
}
