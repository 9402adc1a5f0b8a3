//! The bundled broker (the embedded rumqttd) on its own: what a broker must
//! survive from its clients.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::support::*;

/// CONNECT 3.1.1, clean session, keep-alive 30 s.
fn connect_v4(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);
    frame
}

/// Connects, sends CONNECT and waits for the CONNACK's first byte.
async fn connack(addr: SocketAddr, id: &str) -> Result<u8, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(&connect_v4(id))
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        let _ = s.write_all(&[0xe0, 0x00]).await;
        Ok(head[0])
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "no CONNACK within 5 s".to_string())?
}

/// rumqttd 0.20 (bytebeamio/rumqtt#1062): a client that resets its
/// connection before its CONNACK is written leaves its client id behind;
/// the next CONNECT with that id panicked while holding a lock, and from then
/// on every connection to that listener panicked: one broken client took the
/// bundled broker down for everyone. flowgate builds a patched copy
/// (vendor/rumqttd).
#[tokio::test]
async fn a_client_reset_during_its_handshake_does_not_take_the_broker_down() {
    let broker = flowgate::broker::start(1 << 20, None)
        .await
        .expect("broker starts");
    for round in 0..20 {
        // CONNECT then an immediate reset (SO_LINGER 0): the CONNACK finds the
        // socket gone
        let s = TcpStream::connect(broker.v4).await.expect("connects");
        s.set_zero_linger().expect("linger");
        let mut s = s;
        s.write_all(&connect_v4("device-7")).await.expect("writes");
        drop(s);
        // the same id again, then another client: both get their CONNACK
        for id in ["device-7", "bystander"] {
            let first = connack(broker.v4, id)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {id}: {e}"));
            assert_eq!(first, 0x20, "round {round}: {id} got a CONNACK");
        }
    }
}

/// One short session: CONNECT, CONNACK, a PINGREQ answered, DISCONNECT and
/// close. `Err` when the broker closed it before the PINGRESP, or it took
/// longer than the deadline.
async fn short_session(addr: SocketAddr, id: &str) -> Result<(), String> {
    tokio::time::timeout(DEADLINE, session_of(addr, id))
        .await
        .map_err(|_| format!("{id}: no CONNACK or PINGRESP within {DEADLINE:?}"))?
}

async fn session_of(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&connect_v4(id))
        .await
        .map_err(|e| e.to_string())?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)
        .await
        .map_err(|e| format!("{id}: no CONNACK: {e}"))?;
    s.write_all(&[0xc0, 0x00])
        .await
        .map_err(|e| e.to_string())?;
    let mut pong = [0u8; 2];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut pong)).await {
        Ok(Ok(_)) if pong == [0xd0, 0x00] => {}
        other => return Err(format!("{id}: closed before its PINGRESP: {other:?}")),
    }
    let _ = s.write_all(&[0xe0, 0x00]).await;
    Ok(())
}

/// rumqttd 0.20: a client that sends DISCONNECT and closes its socket leaves
/// the router two disconnect events for its connection id, the DISCONNECT
/// and its link's own when the socket ends. The first frees the id and the
/// next client to connect is given it; the second then closed that client, a
/// bystander: the likely cause of a test's observer closed at its first
/// SUBSCRIBE in CI (flowgate's start-up probe and watchdog end with
/// DISCONNECT). Patched: the link's event names its connection, and a stale
/// one is ignored (vendor/rumqttd/FLOWGATE.md, patch 8).
#[tokio::test]
async fn a_client_leaving_with_disconnect_never_closes_the_next_one() {
    let broker = flowgate::broker::start(1 << 20, None)
        .await
        .expect("broker starts");
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..12 {
        clients.spawn(async move {
            let mut closed = Vec::new();
            for n in 0..400 {
                if let Err(e) = short_session(broker.v4, &format!("c{c}-{n}")).await {
                    closed.push(e);
                }
            }
            closed
        });
    }
    let closed: Vec<String> = clients.join_all().await.into_iter().flatten().collect();
    assert!(
        closed.is_empty(),
        "{} of 4800 sessions closed by the broker: {:?}",
        closed.len(),
        &closed[..closed.len().min(3)]
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// The flowgate binary on `config` (the bundled broker), killed on drop.
struct Flowgate {
    child: tokio::process::Child,
    mqtt: SocketAddr,
    admin: SocketAddr,
}

impl Flowgate {
    async fn run(config: &Path) -> Self {
        let ready = config.with_extension("ready.json");
        let _ = std::fs::remove_file(&ready);
        let child = tokio::process::Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .args(["--drain-delay", "0s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("flowgate starts");
        let start = Instant::now();
        let announced: serde_json::Value = loop {
            assert!(start.elapsed() < DEADLINE, "no ready file");
            if let Ok(v) = std::fs::read_to_string(&ready)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr = |key: &str| -> SocketAddr {
            announced[key]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{key} address in {announced}"))
        };
        Self {
            mqtt: addr("mqtt"),
            admin: addr("admin"),
            child,
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_get(self.admin, "/metrics").await;
        metric_sum(&text, name, &[])
    }

    /// SIGTERM (a clean stop) or SIGKILL; waits for the exit, returns its code.
    async fn stop(mut self, signal: &str) -> Option<i32> {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("flowgate stops")
            .expect("wait")
            .code()
    }
}

/// An MQTT 5 client of the bundled broker, through flowgate.
async fn v5_client(addr: SocketAddr, id: &str) -> (C5, mpsc::UnboundedReceiver<P5>) {
    v5_session(addr, id, false).await
}

/// The same with a persistent session when `persistent` (clean start off, no
/// expiry).
async fn v5_session(
    addr: SocketAddr,
    id: &str,
    persistent: bool,
) -> (C5, mpsc::UnboundedReceiver<P5>) {
    let mut opts = O5::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    if persistent {
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(u32::MAX));
    }
    let (client, mut el) = C5::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let E5::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

/// Waits for the packet `want` picks out; panics at the deadline.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<P5>, mut want: impl FnMut(P5) -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(p)) => {
                if let Some(t) = want(p) {
                    return t;
                }
            }
            _ => panic!("timed out or disconnected"),
        }
    }
}

/// Publishes at QoS 1 and waits for the broker's PUBACK.
async fn publish_acked(
    (client, rx): &mut (C5, mpsc::UnboundedReceiver<P5>),
    topic: &str,
    payload: &str,
    retain: bool,
    props: PublishProperties,
) {
    client
        .publish_with_properties(topic, Q5::AtLeastOnce, retain, payload.to_string(), props)
        .await
        .expect("queued");
    next(rx, |p| matches!(p, P5::PubAck(_)).then_some(())).await;
}

/// The retained messages `status/#` gets on subscribe: (topic, payload,
/// user properties), sorted. A live marker published after the subscription
/// ends the list (retained messages come first).
async fn retained_status(addr: SocketAddr) -> Vec<(String, String, Vec<(String, String)>)> {
    let (client, mut rx) = v5_client(addr, "reader").await;
    client
        .subscribe("status/#", Q5::AtLeastOnce)
        .await
        .expect("queued");
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(())).await;
    client
        .publish("status/~marker", Q5::AtLeastOnce, false, "end")
        .await
        .expect("queued");
    let mut got = Vec::new();
    loop {
        let p = next(&mut rx, |p| match p {
            P5::Publish(p) => Some(p),
            _ => None,
        })
        .await;
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if topic == "status/~marker" {
            break;
        }
        assert!(p.retain, "{topic}: a retained message on subscribe");
        let user = p.properties.map(|p| p.user_properties).unwrap_or_default();
        got.push((
            topic,
            String::from_utf8_lossy(&p.payload).into_owned(),
            user,
        ));
    }
    let _ = client.disconnect().await;
    got.sort();
    got
}

/// Issue 21: the bundled broker keeps its retained messages across a clean
/// stop and a crash, every property with them; a store it cannot read stops
/// the start with the file's name.
#[tokio::test]
async fn retained_messages_survive_a_restart_and_a_crash() {
    let dir = temp_dir("bundled-restart");
    let config = dir.join("flowgate.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let user = vec![("site".to_string(), "north".to_string())];
    let with_user = PublishProperties {
        user_properties: user.clone(),
        content_type: Some("text/plain".into()),
        ..Default::default()
    };

    let fg = Flowgate::run(&config).await;
    let mut publisher = v5_client(fg.mqtt, &unique_id("publisher")).await;
    publish_acked(
        &mut publisher,
        "status/line1",
        "up",
        true,
        with_user.clone(),
    )
    .await;
    publish_acked(
        &mut publisher,
        "status/line2",
        "up",
        true,
        Default::default(),
    )
    .await;
    // a retained empty message clears; an empty live one does not
    publish_acked(&mut publisher, "status/line2", "", true, Default::default()).await;
    publish_acked(
        &mut publisher,
        "status/line1",
        "",
        false,
        Default::default(),
    )
    .await;
    let _ = publisher.0.disconnect().await;
    // SIGTERM at once: the clean stop writes what is not yet on disk
    assert_eq!(fg.stop("-TERM").await, Some(0));
    assert!(
        dir.join("flowgate-data/broker.redb").is_file(),
        "the store lives beside the config"
    );

    let fg = Flowgate::run(&config).await;
    assert_eq!(fg.metric("flowgate_broker_retained_restored").await, 1.0);
    let line1 = ("status/line1".to_string(), "up".to_string(), user.clone());
    assert_eq!(retained_status(fg.mqtt).await, vec![line1.clone()]);
    let mut publisher = v5_client(fg.mqtt, &unique_id("publisher")).await;
    publish_acked(
        &mut publisher,
        "status/line3",
        "down",
        true,
        Default::default(),
    )
    .await;
    let _ = publisher.0.disconnect().await;
    // a crash loses nothing on disk: wait for the commit, then SIGKILL
    let on_disk = || async { fg.metric("flowgate_broker_store_pending").await == 0.0 };
    eventually("the change is on disk", on_disk).await;
    assert!(fg.metric("flowgate_broker_store_changes_total").await >= 1.0);
    assert_eq!(fg.stop("-KILL").await, None);

    let fg = Flowgate::run(&config).await;
    let line3 = ("status/line3".to_string(), "down".to_string(), vec![]);
    assert_eq!(retained_status(fg.mqtt).await, vec![line1.clone(), line3]);
    assert_eq!(fg.stop("-TERM").await, Some(0));

    // a damaged store: a start that recovers restores all of it (redb keeps
    // the last whole commit), one that cannot fails naming the file, and the
    // file stays as it was
    let store = dir.join("flowgate-data/broker.redb");
    let len = std::fs::metadata(&store).expect("store").len();
    for cut in [len / 2, 8192] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&store)
            .expect("open");
        file.set_len(cut).expect("truncate");
        drop(file);
        let ready = config.with_extension("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = tokio::process::Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .args(["--drain-delay", "0s"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("runs");
        let started = Instant::now();
        let exited = loop {
            assert!(started.elapsed() < DEADLINE, "neither started nor failed");
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if ready.is_file() {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match exited {
            None => {
                // recovered: every retained message, or it is a silent loss
                drop(child);
                let fg = Flowgate::run(&config).await;
                let line3 = ("status/line3".to_string(), "down".to_string(), vec![]);
                assert_eq!(retained_status(fg.mqtt).await, vec![line1.clone(), line3]);
                assert_eq!(fg.stop("-TERM").await, Some(0));
                assert_ne!(cut, 8192, "8 KiB cannot hold the store");
            }
            Some(status) => {
                let mut err = String::new();
                let mut stderr = child.stderr.take().expect("piped");
                let _ = stderr.read_to_string(&mut err).await;
                assert!(!status.success(), "started on a damaged store: {err}");
                assert!(err.contains("broker.redb"), "names the file: {err}");
                assert_eq!(
                    std::fs::metadata(&store).expect("kept").len(),
                    cut,
                    "the damaged file is left as it was"
                );
            }
        }
    }
}

/// The watchdog behind `/readyz` and `flowgate_broker_up`: quiet while the
/// broker answers; a listener that takes connections and answers nothing (as
/// rumqttd's does once its router thread is gone) counts as down after
/// `WATCH_FALLS` rounds; up again at the first good round.
#[tokio::test]
async fn the_watchdog_sees_a_broker_that_stops_answering() {
    use flowgate::broker::{watch, WATCH_FALLS};
    let broker = flowgate::broker::start(1 << 20, None)
        .await
        .expect("broker starts");
    // a silent peer: accepts and reads, never answers; switched to forward
    // to the real v4 listener when `answer` is set
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let silent_addr = silent.local_addr().expect("addr");
    let answer = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = answer.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = silent.accept().await {
            let relay = relay.clone();
            tokio::spawn(async move {
                if relay.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut up) = TcpStream::connect(broker.v4).await {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                } else {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                }
            });
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let every = Duration::from_millis(50);
    let up = move |up| {
        let _ = tx.send((up, Instant::now()));
    };
    let started = Instant::now();
    let first = tokio::spawn(watch([silent_addr, broker.v5], every, up, stop.clone()));
    let (state, at) = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a change")
        .expect("the watchdog runs");
    assert!(!state, "down first");
    // each round waits 1 s for the silent listener's CONNACK
    let rounds = at.duration_since(started).as_secs_f64();
    assert!(rounds >= f64::from(WATCH_FALLS), "down after {rounds:.1} s");
    answer.store(true, std::sync::atomic::Ordering::Relaxed);
    let (state, _) = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a change")
        .expect("the watchdog runs");
    assert!(state, "up again once it answers");
    stop.cancel();
    // no probe of the first watch (same client ids) overlaps the second's
    let _ = first.await;

    // the real listeners: no change reported for a few rounds
    let (tx, mut rx) = mpsc::unbounded_channel::<bool>();
    let stop = tokio_util::sync::CancellationToken::new();
    let up = move |up| {
        let _ = tx.send(up);
    };
    tokio::spawn(watch([broker.v4, broker.v5], every, up, stop.clone()));
    let quiet = tokio::time::timeout(Duration::from_millis(600), rx.recv()).await;
    assert!(
        quiet.is_err(),
        "a change while the broker answers: {quiet:?}"
    );
    stop.cancel();
}

/// An MQTT 5 client with a persistent session (clean start off, no expiry).
async fn v5_persistent(addr: SocketAddr, id: &str) -> (C5, mpsc::UnboundedReceiver<P5>) {
    v5_session(addr, id, true).await
}

/// The payloads of the PUBLISHes that arrive until none comes for `quiet`.
async fn payloads(rx: &mut mpsc::UnboundedReceiver<P5>, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(quiet, rx.recv()).await {
        if let P5::Publish(p) = p {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    got
}

/// A 3.1.1 client on a raw socket: CONNECT with clean session off, and
/// the CONNACK's session-present flag.
async fn raw_persistent(addr: SocketAddr, id: &str) -> (TcpStream, bool) {
    let mut frame = connect_v4(id);
    frame[9] = 0x00; // connect flags: clean session off
    let mut s = TcpStream::connect(addr).await.expect("connects");
    s.write_all(&frame).await.expect("CONNECT");
    let mut ack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut ack))
        .await
        .expect("a CONNACK")
        .expect("reads");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK accepted: {ack:?}");
    (s, ack[2] & 1 == 1)
}

/// Reads one 4-byte ack (PUBREC, PUBCOMP, ...) and returns it.
async fn raw_ack(s: &mut TcpStream) -> [u8; 4] {
    let mut ack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut ack))
        .await
        .expect("an ack")
        .expect("reads");
    ack
}

/// Issue 21: persistent sessions and what is queued for them survive a clean
/// stop and a crash of the bundled broker: an offline subscriber's QoS 1
/// alert, 50 jobs held for a dispatch instance whose replicas are all gone
/// (flowgate's own upstream session), and a QoS 2 exchange half done, which
/// completes exactly once.
#[tokio::test]
async fn persistent_sessions_and_their_queues_survive_a_restart_and_a_crash() {
    let dir = temp_dir("bundled-sessions");
    let config = dir.join("flowgate.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\n",
    )
    .expect("write config");
    let fg = Flowgate::run(&config).await;

    // an offline persistent subscriber
    let (sub, mut sub_rx) = v5_persistent(fg.mqtt, "alerts-sub").await;
    sub.subscribe("alerts/#", Q5::AtLeastOnce)
        .await
        .expect("queued");
    next(&mut sub_rx, |p| matches!(p, P5::SubAck(_)).then_some(())).await;
    let _ = sub.disconnect().await;
    // a replica takes jobs, then every replica is gone
    let (replica, mut replica_rx) = v5_client(fg.mqtt, "line1-nodered").await;
    replica
        .subscribe("jobs/#", Q5::AtLeastOnce)
        .await
        .expect("queued");
    next(&mut replica_rx, |p| {
        matches!(p, P5::SubAck(_)).then_some(())
    })
    .await;
    let _ = replica.disconnect().await;
    drop(replica_rx);
    // a QoS 2 publisher half way: PUBLISH, PUBREC, no PUBREL yet
    let (mut q2, present) = raw_persistent(fg.mqtt, "q2-pub").await;
    assert!(!present);
    let mut publish = vec![0x34, 0];
    publish.extend_from_slice(&[0, 9]);
    publish.extend_from_slice(b"alerts/q2");
    publish.extend_from_slice(&[0, 7]); // packet id 7
    publish.extend_from_slice(b"once");
    publish[1] = (publish.len() - 2) as u8;
    q2.write_all(&publish).await.expect("PUBLISH");
    assert_eq!(raw_ack(&mut q2).await, [0x50, 2, 0, 7], "PUBREC");
    drop(q2);

    let mut publisher = v5_client(fg.mqtt, &unique_id("publisher")).await;
    publish_acked(
        &mut publisher,
        "alerts/fire",
        "alert 1",
        false,
        Default::default(),
    )
    .await;
    for i in 0..50 {
        let job = format!("job {i}");
        publish_acked(
            &mut publisher,
            &format!("jobs/{i}"),
            &job,
            false,
            Default::default(),
        )
        .await;
    }
    let _ = publisher.0.disconnect().await;
    // SIGTERM at once: the clean stop takes a last snapshot
    assert_eq!(fg.stop("-TERM").await, Some(0));

    let fg = Flowgate::run(&config).await;
    // alerts-sub, q2-pub and flowgate's upstream session for line1
    assert!(fg.metric("flowgate_broker_sessions_restored").await >= 3.0);
    let (sub, mut sub_rx) = v5_persistent(fg.mqtt, "alerts-sub").await;
    let present = next(&mut sub_rx, |p| match p {
        P5::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    assert!(present, "the subscriber's session was kept");
    let got = next(&mut sub_rx, |p| match p {
        P5::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
        _ => None,
    })
    .await;
    assert_eq!(got, "alert 1");
    // the QoS 2 exchange completes: PUBREL, PUBCOMP, the message once
    let (mut q2, present) = raw_persistent(fg.mqtt, "q2-pub").await;
    assert!(present, "the publisher's session was kept");
    q2.write_all(&[0x62, 2, 0, 7]).await.expect("PUBREL");
    assert_eq!(raw_ack(&mut q2).await, [0x70, 2, 0, 7], "PUBCOMP");
    // a PUBREL sent again is completed again, and delivers nothing more
    q2.write_all(&[0x62, 2, 0, 7]).await.expect("PUBREL");
    assert_eq!(raw_ack(&mut q2).await, [0x70, 2, 0, 7], "PUBCOMP again");
    let got = payloads(&mut sub_rx, Duration::from_millis(500)).await;
    assert_eq!(got, ["once"], "the QoS 2 message exactly once");
    drop(q2);
    // the 50 jobs reach a replica that comes back
    let (replica, mut replica_rx) = v5_client(fg.mqtt, "line1-nodered").await;
    replica
        .subscribe("jobs/#", Q5::AtLeastOnce)
        .await
        .expect("queued");
    let mut jobs = std::collections::BTreeSet::new();
    let start = Instant::now();
    while jobs.len() < 50 {
        assert!(start.elapsed() < DEADLINE, "{} of 50 jobs", jobs.len());
        if let Ok(Some(P5::Publish(p))) =
            tokio::time::timeout(Duration::from_millis(200), replica_rx.recv()).await
        {
            jobs.insert(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    let _ = replica.disconnect().await;

    // a crash: what was acknowledged and is in a snapshot on disk is kept
    let _ = sub.disconnect().await;
    drop(sub_rx);
    let mut publisher = v5_client(fg.mqtt, &unique_id("publisher")).await;
    publish_acked(
        &mut publisher,
        "alerts/fire",
        "alert 2",
        false,
        Default::default(),
    )
    .await;
    let _ = publisher.0.disconnect().await;
    // the one message queued for a persistent session is in a snapshot
    eventually("the queued alert is on disk", || async {
        fg.metric("flowgate_broker_queued_stored").await == 1.0
    })
    .await;
    assert_eq!(fg.stop("-KILL").await, None);

    let fg = Flowgate::run(&config).await;
    let (sub, mut sub_rx) = v5_persistent(fg.mqtt, "alerts-sub").await;
    let got = payloads(&mut sub_rx, Duration::from_millis(1500)).await;
    assert_eq!(got, ["alert 2"], "the alert acknowledged before the crash");
    let _ = sub.disconnect().await;
    assert_eq!(fg.stop("-TERM").await, Some(0));
}
