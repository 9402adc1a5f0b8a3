//! Palette changes from the editor on every replica in turn: install (`POST
//! /nodes`), enable, disable or upgrade (`PUT /nodes/{module}`), remove
//! (`DELETE /nodes/{module}`). When one replica refuses, what was done on
//! the replicas before it is undone where Node-RED can undo it (an install
//! is removed, an enable or disable turned back); the answer names the
//! replica and says what each one has.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::client;
use crate::http::backend::Backend;

/// What a palette request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Install,
    /// `PUT /nodes/{module}` with `{"enabled": bool}`.
    Enable {
        module: String,
        enabled: bool,
    },
    /// `PUT /nodes/{module}` with a version: an upgrade.
    Upgrade {
        module: String,
    },
    Remove {
        module: String,
    },
}

/// The module a `/nodes/{module}` path names (`@scope/name` or `name`),
/// as Node-RED's routes read it; `None` for other paths.
pub fn module_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/nodes/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [scope, name] if scope.starts_with('@') && !name.is_empty() => Some(rest),
        [name] if !name.is_empty() && !name.starts_with('@') && *name != "messages" => Some(rest),
        _ => None,
    }
}

/// Reads a palette request: `None` when it is not one (a read, a node set).
pub fn classify(method: &Method, path: &str, body: &[u8]) -> Option<Change> {
    if *method == Method::POST && path == "/nodes" {
        return Some(Change::Install);
    }
    let module = module_of(path)?.to_string();
    match *method {
        Method::DELETE => Some(Change::Remove { module }),
        Method::PUT => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            match v.get("enabled").and_then(Value::as_bool) {
                Some(enabled) => Some(Change::Enable { module, enabled }),
                None => Some(Change::Upgrade { module }),
            }
        }
        _ => None,
    }
}

/// One request as the editor sent it, to send to each replica.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What a replica answered.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    /// A refusal in words: the status and Node-RED's error `message` (or
    /// the body as it is).
    pub fn reason(&self) -> String {
        let text = String::from_utf8_lossy(&self.body).into_owned();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        format!("answered {}: {message}", self.status)
    }
}

pub async fn send(addr: &str, req: &Request) -> Result<Answer, client::ClientError> {
    let headers: Vec<(&str, &str)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (status, body) = client::request(
        req.method.clone(),
        &format!("http://{addr}"),
        &req.path,
        &headers,
        req.body.clone(),
    )
    .await?;
    Ok(Answer { status, body })
}

/// The request that undoes `change` on a replica that answered `done`, if
/// Node-RED has one.
pub fn undo(change: &Change, done: &Answer) -> Option<Request> {
    match change {
        Change::Install => {
            let v: Value = serde_json::from_slice(&done.body).ok()?;
            let name = v.get("name")?.as_str()?;
            Some(Request {
                method: Method::DELETE,
                path: format!("/nodes/{name}"),
                headers: Vec::new(),
                body: Bytes::new(),
            })
        }
        Change::Enable { module, enabled } => Some(Request {
            method: Method::PUT,
            path: format!("/nodes/{module}"),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(serde_json::json!({ "enabled": !enabled }).to_string()),
        }),
        Change::Upgrade { .. } | Change::Remove { .. } => None,
    }
}

/// Undoes `change` on the replicas that made it (`done`: each with its
/// answer); what each one has now.
pub async fn undo_all(change: &Change, done: &[(&Arc<Backend>, Answer)]) -> String {
    let mut said = Vec::new();
    for (d, answer) in done {
        said.push(match undo(change, answer) {
            Some(u) => match send(&d.addr, &u).await {
                Ok(a) if ok(a.status) => format!("replica {} undone", d.label),
                Ok(a) => format!(
                    "replica {} could not undo it (answered {})",
                    d.label, a.status
                ),
                Err(e) => format!("replica {} could not undo it ({e})", d.label),
            },
            None => format!(
                "replica {} keeps the change (Node-RED cannot undo a removal or an upgrade)",
                d.label
            ),
        });
    }
    if said.is_empty() {
        "no replica changed".into()
    } else {
        said.join("; ")
    }
}

/// Is this answer a success?
pub fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// The status to give the editor for a refusal: the replica's own when it
/// is an error status, else 500.
pub fn refusal_status(status: u16) -> StatusCode {
    StatusCode::from_u16(status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_requests_are_told_from_reads_and_node_sets() {
        assert_eq!(
            classify(&Method::POST, "/nodes", b"{}"),
            Some(Change::Install)
        );
        assert_eq!(
            classify(
                &Method::PUT,
                "/nodes/node-red-contrib-x",
                br#"{"enabled":false}"#
            ),
            Some(Change::Enable {
                module: "node-red-contrib-x".into(),
                enabled: false
            })
        );
        assert_eq!(
            classify(
                &Method::PUT,
                "/nodes/@scope/mod",
                br#"{"module":"@scope/mod","version":"2.0.0"}"#
            ),
            Some(Change::Upgrade {
                module: "@scope/mod".into()
            })
        );
        assert_eq!(
            classify(&Method::DELETE, "/nodes/node-red-contrib-x", b""),
            Some(Change::Remove {
                module: "node-red-contrib-x".into()
            })
        );
        // a node set, the catalogues, reads: not palette changes
        assert_eq!(
            classify(&Method::PUT, "/nodes/node-red/inject", b"{}"),
            None
        );
        assert_eq!(
            classify(&Method::GET, "/nodes/node-red-contrib-x", b""),
            None
        );
        assert_eq!(classify(&Method::GET, "/nodes", b""), None);
        assert_eq!(classify(&Method::DELETE, "/nodes/messages", b""), None);
    }

    #[test]
    fn an_install_is_undone_by_removing_it_and_a_toggle_by_the_other_one() {
        let done = Answer {
            status: 200,
            body: Bytes::from_static(br#"{"name":"node-red-contrib-x","version":"1.0.0"}"#),
        };
        let u = undo(&Change::Install, &done).expect("undo");
        assert_eq!(
            (u.method, u.path.as_str()),
            (Method::DELETE, "/nodes/node-red-contrib-x")
        );
        let u = undo(
            &Change::Enable {
                module: "m".into(),
                enabled: false,
            },
            &done,
        )
        .expect("undo");
        assert_eq!(u.method, Method::PUT);
        assert_eq!(&u.body[..], br#"{"enabled":true}"#);
        assert!(undo(&Change::Remove { module: "m".into() }, &done).is_none());
    }
}
