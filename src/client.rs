//! The client side of the admin API, for `flowgate status` and
//! `flowgate loadtest mqtt --admin`: one GET of `/api/instances` from a
//! running flowgate, parsed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin URL {0:?}: expected http://host:port")]
    Url(String),
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: not the JSON of /api/instances: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
}

/// The environment variable holding the token of a flowgate admin API.
pub const TOKEN_ENV: &str = "FLOWGATE_ADMIN_TOKEN";

/// A request to a flowgate admin API, with its bearer token from
/// `FLOWGATE_ADMIN_TOKEN` when that is set (never sent to other services).
pub async fn admin_request(
    method: hyper::Method,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, Bytes), ClientError> {
    let bearer = std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| format!("Bearer {}", t.trim()));
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(b) = &bearer {
        all.push(("authorization", b.as_str()));
    }
    request(method, base, path, &all, body).await
}

/// `GET {base}{path}` of a flowgate admin API (with its token, if set).
pub async fn admin_get(base: &str, path: &str) -> Result<(u16, Bytes), ClientError> {
    admin_request(hyper::Method::GET, base, path, &[], Bytes::new()).await
}

/// `GET {base}{path}`: the status code and body.
pub async fn get(base: &str, path: &str) -> Result<(u16, Bytes), ClientError> {
    request(hyper::Method::GET, base, path, &[], Bytes::new()).await
}

/// One request to `{base}{path}` on a fresh connection: status and body.
pub async fn request(
    method: hyper::Method,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, Bytes), ClientError> {
    let base = base.trim_end_matches('/');
    let url = format!("{base}{path}");
    let uri: Uri = url.parse().map_err(|_| ClientError::Url(base.into()))?;
    if uri.scheme_str() != Some("http") {
        return Err(ClientError::Url(base.into()));
    }
    let Some(authority) = uri.authority().map(|a| a.to_string()) else {
        return Err(ClientError::Url(base.into()));
    };
    let fail = |reason: String| ClientError::Request {
        url: url.clone(),
        reason,
    };
    let fetch = async {
        let addr = if uri.port().is_some() {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let stream = TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path())
            .header(hyper::header::HOST, authority.as_str());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| fail(e.to_string()))?;
        let exchange = async {
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        // the connection is driven here, beside its one exchange: no task
        // outlives the request
        tokio::pin!(conn, exchange);
        tokio::select! {
            biased;
            r = exchange.as_mut() => r,
            r = conn.as_mut() => match r {
                // closed after the response: what it sent is read
                Ok(()) => exchange.await,
                Err(e) => Err(fail(e.to_string())),
            },
        }
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .map_err(|_| fail(format!("no answer in {TIMEOUT:?}")))?
}

/// `/api/instances` as the client reads it (fields it does not know are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct InstancesDoc {
    pub node_id: String,
    pub mode: String,
    pub upstream: String,
    pub instances: Vec<InstanceDoc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceDoc {
    pub name: String,
    #[serde(default)]
    pub queued: i64,
    #[serde(default)]
    pub replicas: Vec<MqttReplicaDoc>,
    #[serde(default)]
    pub http: Vec<HttpReplicaDoc>,
    #[serde(default)]
    pub failovers: Vec<FailoverDoc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FailoverDoc {
    pub side: String,
    pub cause: String,
    pub from: Option<String>,
    pub to: String,
    pub seconds: f64,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MqttReplicaDoc {
    pub slot: u16,
    pub client_id: String,
    pub peer: String,
    pub accepted: bool,
    pub messages_to_replica: u64,
    pub messages_from_replica: u64,
    #[serde(default)]
    pub inflight: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpReplicaDoc {
    pub replica: String,
    pub addr: String,
    pub up: bool,
    pub draining: bool,
    pub inflight: usize,
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub rev: Option<String>,
    #[serde(default)]
    pub diverged: bool,
}

/// Fetches and parses `{base}/api/instances`.
pub async fn instances(base: &str) -> Result<InstancesDoc, ClientError> {
    let (status, body) = admin_get(base, "/api/instances").await?;
    let url = format!("{}/api/instances", base.trim_end_matches('/'));
    if status != 200 {
        return Err(ClientError::Status { url, status });
    }
    serde_json::from_slice(&body).map_err(|source| ClientError::Json { url, source })
}
