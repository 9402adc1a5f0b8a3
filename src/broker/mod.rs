//! The embedded broker (rumqttd), behind flowgate's own config.
//!
//! rumqttd runs on threads of its own with its own runtimes and has no stop
//! signal: it lives until the process exits. flowgate binds two loopback
//! listeners on free ports, hands them to it (vendor patch 7), and waits until
//! both (3.1.1 and 5.0) answer. It listens on 127.0.0.1 only:
//! clients reach it through flowgate's MQTT listener, never directly.
//! rumqttd is built from `vendor/rumqttd` (the published 0.20.0 with the
//! fixes listed in its FLOWGATE.md).

pub mod store;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("cannot bind a loopback port for the embedded broker: {0}")]
    Port(std::io::Error),
    #[error("embedded broker config rejected: {0}")]
    Config(String),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded broker did not answer on {0} within {1:?}")]
    NotListening(SocketAddr, Duration),
}

/// Where the embedded broker listens, per protocol.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
}

/// A listener on a free loopback port, handed to rumqttd as it is: a port
/// released and bound again could be taken in between (by another embedded
/// broker in the same process, whose clients would then share ours).
fn loopback_listener() -> Result<(TcpListener, SocketAddr), BrokerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .map_err(BrokerError::Port)
}

fn settings(name: &str, addr: SocketAddr, max_packet: usize) -> String {
    format!(
        "[{name}.1]\nname = \"{name}\"\nlisten = \"{addr}\"\nnext_connection_delay_ms = 0\n\
         [{name}.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = {max_packet}\n\
         max_inflight_count = 500\ndynamic_filters = true\n"
    )
}

/// A CONNECT, clean session, with a client id used once (a probe that times
/// out leaves a half-set-up connection of its id behind; the unpatched
/// rumqttd 0.20 then took the listener down, vendor/rumqttd/FLOWGATE.md).
fn probe_connect(v5: bool, attempt: u32) -> Vec<u8> {
    connect_frame(
        v5,
        &format!("flowgate-probe-{}-{attempt}", std::process::id()),
    )
}

/// A CONNECT, clean session, keep-alive 10 s, client id `id`.
fn connect_frame(v5: bool, id: &str) -> Vec<u8> {
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0x02,
        0x00,
        0x0a,
    ];
    if v5 {
        body.push(0x00); // no properties
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);
    frame
}

/// Probes failed in a row before the broker counts as down.
pub const WATCH_FALLS: u32 = 3;

/// Watches the embedded broker until `shutdown`: every `every`, a whole MQTT
/// handshake on each listener (`[v4, v5]`). After [`WATCH_FALLS`] failed
/// rounds in a row `up(false)`, at the next good one `up(true)`; each
/// change once. rumqttd's threads can die (a panic on its router thread
/// ends all routing) while flowgate goes on: this makes it visible.
pub async fn watch(
    listeners: [SocketAddr; 2],
    every: Duration,
    mut up: impl FnMut(bool),
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (mut failed, mut is_up) = (0u32, true);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let round = async {
            let mut ok = true;
            for (addr, v5) in [(listeners[0], false), (listeners[1], true)] {
                // one fixed client id per listener: a new id per probe would
                // leave rumqttd an entry per probe for good
                let id = ["flowgate-watchdog-4", "flowgate-watchdog-5"][usize::from(v5)];
                ok &= answers(addr, &connect_frame(v5, id)).await;
            }
            ok
        };
        let ok = tokio::select! {
            ok = round => ok,
            () = shutdown.cancelled() => return,
        };
        failed = if ok { 0 } else { failed + 1 };
        let now_up = ok || (is_up && failed < WATCH_FALLS);
        if now_up != is_up {
            is_up = now_up;
            up(now_up);
        }
    }
}

/// A whole MQTT handshake (a bare TCP connect makes rumqttd log an error):
/// CONNECT, a CONNACK back, DISCONNECT.
async fn answers(addr: SocketAddr, connect: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(connect).await.ok()?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.ok()?;
        let _ = s.write_all(&[0xe0, 0x00]).await;
        (first[0] == 0x20).then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(()))
    )
}

/// Starts rumqttd on two free loopback ports and waits until it answers;
/// with a `store`, it starts with the store's retained messages and
/// persistent sessions and reports their changes to it.
pub async fn start(
    max_packet: usize,
    store: Option<&store::Store>,
) -> Result<EmbeddedBroker, BrokerError> {
    let (v4_listener, v4) = loopback_listener()?;
    let (v5_listener, v5) = loopback_listener()?;
    let text = format!(
        "id = 0\n[router]\nmax_connections = 100010\nmax_outgoing_packet_count = 1000\n\
         max_segment_size = 104857600\nmax_segment_count = 10\n{}{}",
        settings("v4", v4, max_packet),
        settings("v5", v5, max_packet)
    );
    let mut config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    for (servers, listener) in [(&mut config.v4, v4_listener), (&mut config.v5, v5_listener)] {
        let bound = rumqttd::persist::BoundListener::new(listener);
        for server in servers.iter_mut().flat_map(|s| s.values_mut()) {
            server.bound = Some(bound.clone());
        }
    }
    config.router.retained_store = store.map(|s| s.router.clone());
    config.router.session_store = store.map(|s| s.sessions.clone());
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let limit = Duration::from_secs(10);
    let mut attempt = 0;
    for (addr, v5) in [(v4, false), (v5, true)] {
        let start = Instant::now();
        loop {
            attempt += 1;
            if answers(addr, &probe_connect(v5, attempt)).await {
                break;
            }
            if start.elapsed() > limit {
                return Err(BrokerError::NotListening(addr, limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!(v4 = %v4, v5 = %v5, "embedded broker listening on loopback");
    Ok(EmbeddedBroker { v4, v5 })
}
