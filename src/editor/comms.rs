//! The editor's `/comms` WebSocket: the editor replica's events (node
//! status, notifications, the heartbeat) and the debug messages of every
//! replica, each tagged with its replica, on the one socket the editor opens.
//! flowgate answers the socket's login (`{"auth": token}`) itself; the
//! replicas' sockets need none.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SelectAll, StreamExt};
use futures_util::SinkExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::Editor;
use crate::http::backend::{Backend, Body};

/// Time the editor has to send its login on a new socket.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers the WebSocket handshake and serves the socket on a task.
pub fn upgrade(editor: Arc<Editor>, mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return super::error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a WebSocket handshake needs Sec-WebSocket-Key",
        );
    };
    let on = hyper::upgrade::on(&mut req);
    let ed = editor.clone();
    editor.tracker().spawn(async move {
        match on.await {
            Ok(up) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
                serve(ed, ws).await;
            }
            Err(e) => tracing::debug!(error = %e, "editor comms upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// What a message from the editor is.
#[derive(Debug, PartialEq, Eq)]
enum FromEditor {
    /// `{"auth": token}`: a login (or a new one).
    Auth(String),
    /// `{"subscribe": topic}`: every replica gets it.
    Subscribe,
    /// Anything else: for the editor replica.
    Other,
}

fn from_editor(text: &str) -> FromEditor {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => match (&v["auth"], &v["subscribe"]) {
            (Value::String(t), _) => FromEditor::Auth(t.clone()),
            (_, Value::String(_)) => FromEditor::Subscribe,
            _ => FromEditor::Other,
        },
        Err(_) => FromEditor::Other,
    }
}

/// What the editor gets of a replica's message (a JSON array of `{topic,
/// data}`): all of it from the editor replica, only the debug messages from
/// the others; every debug message named after its replica.
fn merge(text: &str, editor_replica: bool, replica: &str) -> Option<String> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
        // not the shape Node-RED sends: the editor replica's passes as is
        return editor_replica.then(|| text.to_string());
    };
    let kept: Vec<Value> = items
        .into_iter()
        .filter(|m| editor_replica || m["topic"] == "debug")
        .map(|mut m| {
            if m["topic"] == "debug" {
                tag(&mut m["data"], replica);
            }
            m
        })
        .collect();
    (!kept.is_empty()).then(|| Value::Array(kept).to_string())
}

/// Names a debug message's node after the replica it ran on: the sidebar
/// shows `name` (or the node id when it has none).
fn tag(data: &mut Value, replica: &str) {
    let Value::Object(o) = data else { return };
    let base = o
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .or_else(|| o.get("id").and_then(Value::as_str))
        .unwrap_or("")
        .to_string();
    o.insert(
        "name".into(),
        Value::String(format!("{base} · replica {replica}")),
    );
}

type Link = futures_util::stream::SplitSink<WebSocketStream<tokio::net::TcpStream>, Message>;

/// A WebSocket to a replica's `/comms`.
async fn connect(
    backend: &Backend,
    timeout: Duration,
) -> Result<WebSocketStream<tokio::net::TcpStream>, CommsError> {
    let tcp = backend.connect_tcp(timeout).await?;
    let url = format!("ws://{}/comms", backend.addr);
    let (ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::client_async(url, tcp))
        .await
        .map_err(|_| CommsError::HandshakeTimeout)??;
    Ok(ws)
}

/// Why a replica's `/comms` could not be reached.
#[derive(Debug, thiserror::Error)]
enum CommsError {
    #[error(transparent)]
    Connect(#[from] crate::http::backend::ConnectError),
    #[error("no WebSocket handshake in time")]
    HandshakeTimeout,
    #[error(transparent)]
    Handshake(#[from] tokio_tungstenite::tungstenite::Error),
}

/// The login on a new socket, when the editor has one: `true` to go on.
async fn login<S>(editor: &Editor, client: &mut WebSocketStream<S>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(AUTH_TIMEOUT, client.next()).await;
    let ok = match first {
        Ok(Some(Ok(Message::Text(t)))) => match from_editor(&t) {
            FromEditor::Auth(token) => editor.user_of(&token).is_some(),
            _ => false,
        },
        _ => false,
    };
    let answer = if ok {
        r#"{"auth":"ok"}"#
    } else {
        r#"{"auth":"fail"}"#
    };
    let _ = client.send(Message::text(answer)).await;
    ok
}

async fn serve<S>(editor: Arc<Editor>, mut client: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if editor.cfg.login && !login(&editor, &mut client).await {
        let _ = client.close(None).await;
        return;
    }
    let Some(main) = editor.replica() else {
        let _ = client.close(None).await;
        return;
    };
    let timeout = Duration::from_secs(5);
    let mut links: Vec<(usize, Link)> = Vec::new();
    let mut incoming = SelectAll::new();
    for b in editor.replicas().iter().filter(|b| b.is_up()) {
        match connect(b, timeout).await {
            Ok(ws) => {
                let (sink, stream) = ws.split();
                links.push((b.index, sink));
                let (i, label) = (b.index, b.label.clone());
                // a stream that ends says so: (replica, None)
                let tagged = stream
                    .map(Some)
                    .chain(futures_util::stream::once(async { None }))
                    .map(move |m| (i, label.clone(), m));
                incoming.push(tagged.boxed());
            }
            Err(e) if b.index == main.index => {
                tracing::warn!(instance = %editor.instance, replica = %b.label, error = %e, "editor comms: the editor replica's socket failed");
                let _ = client.close(None).await;
                return;
            }
            Err(e) => {
                tracing::warn!(instance = %editor.instance, replica = %b.label, error = %e, "editor comms: no debug messages from this replica");
            }
        }
    }
    let mut down = main.down_signal();
    loop {
        tokio::select! {
            () = editor.shutdown().cancelled() => break,
            _ = down.changed() => break,
            m = client.next() => match m {
                Some(Ok(Message::Text(t))) => match from_editor(&t) {
                    FromEditor::Auth(token) => {
                        let ok = editor.user_of(&token).is_some() || !editor.cfg.login;
                        let answer = if ok { r#"{"auth":"ok"}"# } else { r#"{"auth":"fail"}"# };
                        if client.send(Message::text(answer)).await.is_err() {
                            break;
                        }
                    }
                    kind => {
                        for (i, sink) in &mut links {
                            if kind == FromEditor::Subscribe || *i == main.index {
                                let _ = sink.send(Message::text(t.as_str())).await;
                            }
                        }
                    }
                },
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some((i, label, m)) = incoming.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(out) = merge(&t, i == main.index, &label) {
                        if client.send(Message::text(out)).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    if i == main.index {
                        // the editor opens a new socket, to the next editor replica
                        break;
                    }
                    tracing::info!(instance = %editor.instance, replica = %label, "editor comms: a replica's socket closed");
                    links.retain(|(j, _)| *j != i);
                }
            },
        }
    }
    let _ = client.close(None).await;
    for (_, mut sink) in links {
        let _ = sink.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_editor_replica_passes_whole_the_others_only_their_debug() {
        let batch = r#"[{"topic":"hb","data":1},{"topic":"debug","data":{"id":"d1","name":"out","msg":"x"}},{"topic":"status/n1","data":{"text":"ok"}}]"#;
        let mine: Value =
            serde_json::from_str(&merge(batch, true, "0").expect("kept")).expect("JSON");
        assert_eq!(mine.as_array().map(Vec::len), Some(3));
        assert_eq!(mine[1]["data"]["name"], "out · replica 0");
        assert_eq!(mine[0]["topic"], "hb");
        let other: Value =
            serde_json::from_str(&merge(batch, false, "2").expect("kept")).expect("JSON");
        assert_eq!(other.as_array().map(Vec::len), Some(1));
        assert_eq!(other[0]["data"]["name"], "out · replica 2");
        assert_eq!(other[0]["data"]["msg"], "x");
        assert_eq!(merge(r#"[{"topic":"hb","data":1}]"#, false, "1"), None);
        assert_eq!(merge("nonsense", false, "1"), None);
        assert_eq!(merge("nonsense", true, "1").as_deref(), Some("nonsense"));
    }

    #[test]
    fn a_debug_node_without_a_name_is_named_by_its_id() {
        let out = merge(
            r#"[{"topic":"debug","data":{"id":"abc","name":""}}]"#,
            false,
            "1",
        );
        let v: Value = serde_json::from_str(&out.expect("kept")).expect("JSON");
        assert_eq!(v[0]["data"]["name"], "abc · replica 1");
    }

    #[test]
    fn the_editors_messages_are_logins_subscriptions_or_for_the_editor_replica() {
        assert_eq!(from_editor(r#"{"auth":"t"}"#), FromEditor::Auth("t".into()));
        assert_eq!(
            from_editor(r#"{"subscribe":"debug"}"#),
            FromEditor::Subscribe
        );
        assert_eq!(from_editor(r#"{"topic":"x","data":1}"#), FromEditor::Other);
        assert_eq!(from_editor("]["), FromEditor::Other);
    }
}
