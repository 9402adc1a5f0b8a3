//! The parts of Node-RED's admin API a rolling deploy uses, on one replica:
//! `GET /flows` and `POST /flows` (API v2, with `rev`), `GET /flows/state`,
//! `GET /nodes` (the node types it has).

use bytes::Bytes;
use hyper::Method;
use serde_json::Value;

use crate::client;

const V2: (&str, &str) = ("Node-RED-API-Version", "v2");

/// A replica's admin API at `http://{addr}`.
pub struct NodeRed {
    base: String,
}

/// The flows a replica runs and their revision.
pub struct Flows {
    pub rev: String,
    pub flows: Value,
    /// The flows array as the replica wrote it: posted back as it is, it
    /// gives the same `rev` (Node-RED hashes the JSON text of its flows).
    pub raw: String,
}

#[derive(serde::Deserialize)]
struct FlowsV2<'a> {
    rev: String,
    #[serde(borrow)]
    flows: &'a serde_json::value::RawValue,
}

/// A request to a replica's admin API that failed, and which one.
#[derive(Debug, thiserror::Error)]
pub enum NodeRedError {
    #[error(transparent)]
    Request(#[from] client::ClientError),
    #[error("{request} answered {status}{}", answer(.body))]
    Status {
        request: &'static str,
        status: u16,
        body: String,
    },
    #[error("{request}: {source}")]
    Json {
        request: &'static str,
        source: serde_json::Error,
    },
    /// The answer is JSON, not of the shape expected (`what`).
    #[error("{request}: {what}")]
    Shape {
        request: &'static str,
        what: &'static str,
    },
}

/// `: body` after a status, when the answer had one.
fn answer(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// The answer's status, when not `ok`, as an error (with its body).
fn status(request: &'static str, status: u16, body: &[u8], ok: bool) -> Result<(), NodeRedError> {
    if ok {
        return Ok(());
    }
    Err(NodeRedError::Status {
        request,
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

fn json<T: serde::de::DeserializeOwned>(
    request: &'static str,
    body: &[u8],
) -> Result<T, NodeRedError> {
    serde_json::from_slice(body).map_err(|source| NodeRedError::Json { request, source })
}

impl NodeRed {
    pub fn new(addr: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
        }
    }

    pub async fn flows(&self) -> Result<Flows, NodeRedError> {
        const GET: &str = "GET /flows";
        let (code, body) =
            client::request(Method::GET, &self.base, "/flows", &[V2], Bytes::new()).await?;
        status(GET, code, &[], code == 200)?;
        let v: FlowsV2<'_> =
            serde_json::from_slice(&body).map_err(|source| NodeRedError::Json {
                request: "GET /flows (the API v2 answer)",
                source,
            })?;
        let flows = serde_json::from_str(v.flows.get()).map_err(|source| NodeRedError::Json {
            request: GET,
            source,
        })?;
        Ok(Flows {
            rev: v.rev,
            flows,
            raw: v.flows.get().to_string(),
        })
    }

    /// Puts flows read before back (a full deploy, API v1: no `rev` check);
    /// the rev they run under.
    pub async fn restore(&self, raw: &str) -> Result<String, NodeRedError> {
        self.post(
            &[("Node-RED-Deployment-Type", "full")],
            Bytes::from(raw.to_string()),
        )
        .await?;
        Ok(self.flows().await?.rev)
    }

    /// The editor's `POST /flows`, as it sent it (deployment type `kind`,
    /// API v2 or not); the new rev when the answer names it (API v2).
    pub async fn post_editor(
        &self,
        kind: &str,
        api_v2: bool,
        body: Bytes,
    ) -> Result<Option<String>, NodeRedError> {
        let mut headers = vec![("Node-RED-Deployment-Type", kind)];
        if api_v2 {
            headers.push(V2);
        }
        let answer = self.post(&headers, body).await?;
        Ok(serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v["rev"].as_str().map(str::to_string)))
    }

    /// `POST /flows` with JSON `body`: the answer's body when it is 2xx.
    async fn post(&self, headers: &[(&str, &str)], body: Bytes) -> Result<Bytes, NodeRedError> {
        let mut all = headers.to_vec();
        all.push(("content-type", "application/json"));
        let (code, resp) = client::request(Method::POST, &self.base, "/flows", &all, body).await?;
        status("POST /flows", code, &resp, (200..300).contains(&code))?;
        Ok(resp)
    }

    /// The node types of the replica's enabled node sets.
    pub async fn types(&self) -> Result<Vec<String>, NodeRedError> {
        const GET: &str = "GET /nodes";
        let (code, body) = client::request(
            Method::GET,
            &self.base,
            "/nodes",
            &[("accept", "application/json")],
            Bytes::new(),
        )
        .await?;
        status(GET, code, &[], code == 200)?;
        let v: Value = json(GET, &body)?;
        let sets = v.as_array().ok_or(NodeRedError::Shape {
            request: GET,
            what: "not a list of node sets",
        })?;
        Ok(sets
            .iter()
            .filter(|set| set["enabled"] != Value::Bool(false))
            .filter_map(|set| set["types"].as_array())
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect())
    }

    /// Deploys `flows` (a full deploy) over revision `rev`; the new revision.
    pub async fn deploy(&self, flows: &Value, rev: &str) -> Result<String, NodeRedError> {
        const POST: &str = "POST /flows";
        let body = serde_json::json!({ "flows": flows, "rev": rev }).to_string();
        let (code, resp) = client::request(
            Method::POST,
            &self.base,
            "/flows",
            &[
                V2,
                ("Node-RED-Deployment-Type", "full"),
                ("content-type", "application/json"),
            ],
            Bytes::from(body),
        )
        .await?;
        status(POST, code, &resp, code == 200)?;
        let v: Value = json(POST, &resp)?;
        v["rev"]
            .as_str()
            .map(str::to_string)
            .ok_or(NodeRedError::Shape {
                request: POST,
                what: "no rev in the answer",
            })
    }

    /// Where the flows' HTTP routes live (`httpNodeRoot` from `GET
    /// /settings`); `None` when it is `false` (no `http in` routes).
    pub async fn node_root(&self) -> Result<Option<String>, NodeRedError> {
        const GET: &str = "GET /settings";
        let (code, body) = client::get(&self.base, "/settings").await?;
        status(GET, code, &[], code == 200)?;
        let v: Value = json(GET, &body)?;
        Ok(match &v["httpNodeRoot"] {
            Value::Bool(false) => None,
            Value::String(s) => Some(s.clone()),
            _ => Some("/".into()),
        })
    }

    /// `start` once the flows run (needs `runtimeState.enabled` in settings.js).
    pub async fn state(&self) -> Result<String, NodeRedError> {
        const GET: &str = "GET /flows/state";
        let (code, body) = client::get(&self.base, "/flows/state").await?;
        status(GET, code, &[], code == 200)?;
        let v: Value = json(GET, &body)?;
        Ok(v["state"].as_str().unwrap_or("unknown").to_string())
    }
}
