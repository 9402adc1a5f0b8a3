//! Accepting connections, shared by every listener (MQTT, HTTP, admin,
//! editor): waits for the next connection or for shutdown, and backs off on
//! accept errors (EMFILE and friends) instead of spinning. The listeners that
//! hyper answers whole (admin, editor) share one serve loop, and every hyper
//! connection one graceful end.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The next connection, or `None` once `shutdown` is cancelled. An accept
/// error is logged (and counted as `kind="accept"` when `metrics` is given).
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &'static str,
    metrics: Option<&Metrics>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    if let Some(m) = metrics {
                        m.error("accept");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// Serves HTTP/1.1 with hyper on `listener` until `shutdown`: each connection
/// in a task of `tracker`, its TLS handshake (when `tls`) and its request
/// heads each within `header_timeout`, answered by the service `service`
/// makes for its peer; at shutdown each connection finishes what it is
/// answering.
pub async fn serve_http1<F, S>(
    listener: TcpListener,
    what: &'static str,
    tls: Option<Arc<crate::tls::Acceptor>>,
    header_timeout: Duration,
    service: F,
    (shutdown, tracker): (CancellationToken, TaskTracker),
) where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<BoxError>,
{
    let service = Arc::new(service);
    while let Some((tcp, peer)) = accept(&listener, &shutdown, what, None).await {
        let (service, tls, shutdown) = (service.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            let stream = match crate::tls::accept(tls.as_deref(), tcp, header_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, listener = what, "connection refused");
                    return;
                }
            };
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service(peer))
                .with_upgrades();
            drive_http1(conn, &shutdown, what).await;
        });
    }
}

/// Drives one hyper connection until it ends, or at `shutdown` lets it
/// finish the request it is answering and closes it.
pub async fn drive_http1<I, S>(
    conn: http1::UpgradeableConnection<I, S>,
    shutdown: &CancellationToken,
    what: &'static str,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<BoxError>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(error = %e, listener = what, "connection error");
        },
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
