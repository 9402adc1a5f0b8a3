//! `flowgate loadtest http`: GET requests on the ramp's schedule over a pool
//! of HTTP/1.1 keep-alive connections (at most `concurrency` in flight), the
//! replica read from the response header flowgate sets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::record::Outcome;
use super::report::{Input, Replicas, Report};
use super::{drive, Progress, Ramp, Recorder};

#[derive(Debug, Clone)]
pub struct HttpLoad {
    pub url: Uri,
    /// Requests in flight at most; more wait (their latency counts the wait).
    pub concurrency: usize,
    /// A request unanswered this long after its due time is an error.
    pub timeout: Duration,
    /// The response header naming the replica.
    pub replica_header: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpLoadError {
    #[error("--url {0}: only http:// URLs with a host are supported")]
    Url(String),
    #[error("--url {url}: cannot resolve {authority}: {source}")]
    Resolve {
        url: String,
        authority: String,
        source: std::io::Error,
    },
}

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    permits: Semaphore,
    header: String,
    /// The requests and their connections' drivers, waited for at the end.
    tasks: tokio_util::task::TaskTracker,
}

impl Target {
    async fn connection(&self) -> Result<SendRequest<Empty<Bytes>>, &'static str> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match pooled {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let stream = TcpStream::connect(self.addr).await.map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect")?;
        self.tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "loadtest connection ended");
            }
        });
        Ok(send)
    }

    async fn request(&self, recorder: &Recorder) -> Outcome {
        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Err("closed");
        };
        let mut send = match self.connection().await {
            Ok(s) => s,
            Err(kind) => return Outcome::Err(kind),
        };
        if send.ready().await.is_err() {
            return Outcome::Err("io");
        }
        let req = match Request::get(self.path.as_str())
            .header(hyper::header::HOST, self.host.as_str())
            .body(Empty::new())
        {
            Ok(r) => r,
            Err(_) => return Outcome::Err("request"),
        };
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(_) => return Outcome::Err("io"),
        };
        let status = resp.status();
        let replica = resp
            .headers()
            .get(self.header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(|name| recorder.replica(name));
        if resp.into_body().collect().await.is_err() {
            return Outcome::Err("io");
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // kept only while the run goes on (under the lock: the end's clear
        // sees it)
        if !self.tasks.is_closed() {
            idle.push(send);
        }
        drop(idle);
        match status.as_u16() {
            200..=399 => Outcome::Ok {
                replica,
                timed: true,
            },
            400..=499 => Outcome::Err("http_4xx"),
            _ => Outcome::Err("http_5xx"),
        }
    }
}

/// Runs the ramp against `load.url` and builds the report.
pub async fn run(
    load: &HttpLoad,
    ramp: &Ramp,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, HttpLoadError> {
    let url = load.url.to_string();
    if load.url.scheme_str() != Some("http") {
        return Err(HttpLoadError::Url(url));
    }
    let Some(authority) = load.url.authority().map(|a| a.to_string()) else {
        return Err(HttpLoadError::Url(url));
    };
    let with_port = if load.url.port().is_some() {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&with_port)
        .await
        .and_then(|mut a| {
            a.next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
        })
        .map_err(|source| HttpLoadError::Resolve {
            url: url.clone(),
            authority: authority.clone(),
            source,
        })?;
    let target = Arc::new(Target {
        addr,
        host: authority,
        path: load
            .url
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string()),
        idle: Mutex::new(Vec::new()),
        permits: Semaphore::new(load.concurrency.max(1)),
        header: load.replica_header.clone(),
        tasks: tokio_util::task::TaskTracker::new(),
    });
    let recorder = Arc::new(Recorder::new(ramp));
    let timeout = load.timeout;
    drive(ramp, &recorder, progress, |_, due| {
        recorder.begin();
        let (target, recorder) = (target.clone(), recorder.clone());
        target.clone().tasks.spawn(async move {
            let outcome = tokio::time::timeout_at(due + timeout, target.request(&recorder))
                .await
                .unwrap_or(Outcome::Err("timeout"));
            recorder.finish(due, outcome);
        });
    })
    .await;
    super::drain(&recorder, Instant::now() + timeout).await;
    // idle connections dropped, their drivers end; requests end by `timeout`
    target.tasks.close();
    target
        .idle
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    target.tasks.wait().await;
    let (samples, names) = recorder.take();
    Ok(Input {
        kind: "http",
        target: url,
        replica_source: format!("header:{}", load.replica_header),
        ramp,
        samples: &samples,
        replicas: Replicas::Samples(&names),
        duplicates: 0,
    }
    .build())
}
