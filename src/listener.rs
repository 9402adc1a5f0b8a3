//! Accepting connections, shared by every listener (MQTT, HTTP, admin): waits
//! for the next connection or for shutdown, and backs off on accept errors
//! (EMFILE and friends) instead of spinning.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

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
