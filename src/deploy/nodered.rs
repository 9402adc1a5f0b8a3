//! The parts of Node-RED's admin API a rolling deploy uses, on one replica:
//! `GET /flows` and `POST /flows` (API v2, with `rev`), `GET /flows/state`.

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
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("GET /flows: {e}"))?;
        let rev = v["rev"].as_str().ok_or("GET /flows: no rev (API v1?)")?;
        Ok(Flows {
            rev: rev.to_string(),
            flows: v["flows"].clone(),
        })
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
