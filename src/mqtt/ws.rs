//! MQTT over WebSocket (MQTT 3.1.1 and 5.0, section 6): the HTTP upgrade on
//! the configured path, the `mqtt` subprotocol, and a task that turns binary
//! frames into the byte stream the proxy reads (and back). After the upgrade
//! a WebSocket client is handled exactly as a TCP one.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;

use crate::stream::Stream;

/// Bytes buffered between the WebSocket task and the proxy, each way.
const PIPE: usize = 64 * 1024;

/// Why a WebSocket connection could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(tokio_tungstenite::tungstenite::Error),
    #[error("WebSocket: {0}")]
    Frames(tokio_tungstenite::tungstenite::Error),
    #[error("a text frame: MQTT over WebSocket is binary")]
    Text,
    #[error("pipe: {0}")]
    Pipe(#[from] std::io::Error),
}

/// The subprotocols MQTT clients offer (`mqttv3.1` from MQTT 3.1 clients).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Answers the upgrade on `path` and returns the MQTT byte stream; the
/// frames are carried by a task on `tasks` that ends with the connection.
pub async fn accept(
    stream: Stream,
    path: &str,
    max_packet: usize,
    tasks: &TaskTracker,
) -> Result<Stream, WsError> {
    let path = path.to_owned();
    // the callback's signature is tungstenite's
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            let mut e = ErrorResponse::new(Some(format!("MQTT over WebSocket is on {path}\n")));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| SUBPROTOCOLS.iter().any(|s| p.eq_ignore_ascii_case(s)));
        if let Some(p) = offered.and_then(|p| HeaderValue::from_str(p).ok()) {
            resp.headers_mut().insert("sec-websocket-protocol", p);
        }
        Ok(resp)
    };
    // a frame carries at most one packet in practice, but may carry several
    let limit = max_packet.saturating_add(16).saturating_mul(2);
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
        .await
        .map_err(WsError::Upgrade)?;
    let (ours, theirs) = tokio::io::duplex(PIPE);
    tasks.spawn(bridge(ws, theirs));
    Ok(Stream::Duplex(ours))
}

/// Copies binary frames' payloads into `pipe` and what comes out of `pipe`
/// into binary frames, until either side ends.
async fn bridge(ws: WebSocketStream<Stream>, pipe: DuplexStream) {
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let inbound = async {
        while let Some(msg) = source.next().await {
            match msg.map_err(WsError::Frames)? {
                Message::Binary(b) => wr.write_all(&b).await?,
                Message::Close(_) => break,
                Message::Text(_) => return Err(WsError::Text),
                // tungstenite answers pings itself
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        let _ = wr.shutdown().await;
        Ok(())
    };
    let outbound = async {
        let mut buf = BytesMut::with_capacity(PIPE);
        loop {
            buf.reserve(PIPE);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
            sink.send(Message::Binary(buf.split().freeze()))
                .await
                .map_err(WsError::Frames)?;
        }
        let _ = sink.close().await;
        Ok::<(), WsError>(())
    };
    let result = tokio::select! {
        r = inbound => r,
        r = outbound => r,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "WebSocket connection ended");
    }
}
