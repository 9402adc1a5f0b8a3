//! The parts of Node-RED's admin API a rolling deploy uses, on one replica:
//! `GET /flows` and `POST /flows` (API v2, with `rev`), `GET /flows/state`,
//! `GET /nodes` (the node types it has).

use bytes::Bytes;
use hyper::Method;
use serde_json::Value;

use crate::admin::client;

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

impl NodeRed {
    pub fn new(addr: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
        }
    }

    pub async fn flows(&self) -> Result<Flows, String> {
        let (status, body) =
            client::request(Method::GET, &self.base, "/flows", &[V2], Bytes::new())
                .await
                .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("GET /flows answered {status}"));
        }
        let v: FlowsV2<'_> = serde_json::from_slice(&body)
            .map_err(|e| format!("GET /flows: not the API v2 answer: {e}"))?;
        let flows = serde_json::from_str(v.flows.get()).map_err(|e| format!("GET /flows: {e}"))?;
        Ok(Flows {
            rev: v.rev,
            flows,
            raw: v.flows.get().to_string(),
        })
    }

    /// Puts flows read before back (a full deploy, API v1: no `rev` check);
    /// the rev they run under.
    pub async fn restore(&self, raw: &str) -> Result<String, String> {
        self.post(
            &[("Node-RED-Deployment-Type", "full")],
            Bytes::from(raw.to_string()),
        )
        .await?;
        Ok(self.flows().await?.rev)
    }

    /// The editor's `POST /flows`, as it sent it; the new rev when the
    /// answer names it (API v2).
    pub async fn post_editor(&self, post: &super::EditorPost) -> Result<Option<String>, String> {
        let mut headers = vec![("Node-RED-Deployment-Type", post.kind.as_str())];
        if post.api_v2 {
            headers.push(V2);
        }
        let answer = self.post(&headers, post.body.clone()).await?;
        Ok(serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v["rev"].as_str().map(str::to_string)))
    }

    /// `POST /flows` with JSON `body`: the answer's body when it is 2xx.
    async fn post(&self, headers: &[(&str, &str)], body: Bytes) -> Result<Bytes, String> {
        let mut all = headers.to_vec();
        all.push(("content-type", "application/json"));
        let (status, resp) = client::request(Method::POST, &self.base, "/flows", &all, body)
            .await
            .map_err(|e| e.to_string())?;
        if !(200..300).contains(&status) {
            let why = String::from_utf8_lossy(&resp);
            return Err(format!("POST /flows answered {status}: {}", why.trim()));
        }
        Ok(resp)
    }

    /// The node types of the replica's enabled node sets.
    pub async fn types(&self) -> Result<Vec<String>, String> {
        let (status, body) = client::request(
            Method::GET,
            &self.base,
            "/nodes",
            &[("accept", "application/json")],
            Bytes::new(),
        )
        .await
        .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("GET /nodes answered {status}"));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("GET /nodes: {e}"))?;
        let sets = v.as_array().ok_or("GET /nodes: not a list of node sets")?;
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
    pub async fn deploy(&self, flows: &Value, rev: &str) -> Result<String, String> {
        let body = serde_json::json!({ "flows": flows, "rev": rev }).to_string();
        let (status, resp) = client::request(
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
        .await
        .map_err(|e| e.to_string())?;
        if status != 200 {
            let why = String::from_utf8_lossy(&resp);
            return Err(format!("POST /flows answered {status}: {}", why.trim()));
        }
        let v: Value = serde_json::from_slice(&resp).map_err(|e| format!("POST /flows: {e}"))?;
        v["rev"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "POST /flows: no rev in the answer".to_string())
    }

    /// Where the flows' HTTP routes live (`httpNodeRoot` from `GET
    /// /settings`); `None` when it is `false` (no `http in` routes).
    pub async fn node_root(&self) -> Result<Option<String>, String> {
        let (status, body) = client::get(&self.base, "/settings")
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("GET /settings answered {status}"));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("GET /settings: {e}"))?;
        Ok(match &v["httpNodeRoot"] {
            Value::Bool(false) => None,
            Value::String(s) => Some(s.clone()),
            _ => Some("/".into()),
        })
    }

    /// `start` once the flows run (needs `runtimeState.enabled` in settings.js).
    pub async fn state(&self) -> Result<String, String> {
        let (status, body) = client::get(&self.base, "/flows/state")
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("GET /flows/state answered {status}"));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| format!("GET /flows/state: {e}"))?;
        Ok(v["state"].as_str().unwrap_or("unknown").to_string())
    }
}
