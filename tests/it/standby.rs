//! Active-standby: one active replica gets every message (or request), hot
//! standbys take over when it dies or hangs; failovers are measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dispatch::{publish, start, Upstream};
use crate::http::{balancer, load, request, Replica as WebReplica};
use crate::support::*;

/// A replica whose flow takes `delay` per message and acknowledges after it;
/// `hang` makes it stop (socket open, nothing processed or acknowledged).
struct Rep {
    tasks: Vec<JoinHandle<()>>,
    hang: Arc<AtomicBool>,
}

#[derive(Debug)]
enum Got {
    Msg(usize, String, Instant),
    SubAck(usize),
}

impl Rep {
    async fn start(
        addr: SocketAddr,
        n: usize,
        delay: Duration,
        tx: &mpsc::UnboundedSender<Got>,
        filters: &[&str],
    ) -> Self {
        let mut opts = MqttOptions::new("line1-nodered", addr.ip().to_string(), addr.port());
        opts.set_manual_acks(true);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        let (work_tx, mut work_rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
        let hang = Arc::new(AtomicBool::new(false));
        let (acker, worker_tx, hung) = (client.clone(), tx.clone(), hang.clone());
        let worker = tokio::spawn(async move {
            while let Some(p) = work_rx.recv().await {
                if hung.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let _ = worker_tx.send(Got::Msg(
                    n,
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    Instant::now(),
                ));
                let _ = acker.ack(&p).await;
            }
        });
        let events = tx.clone();
        let io = tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                match ev {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = work_tx.send(p);
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        let _ = events.send(Got::SubAck(n));
                    }
                    _ => {}
                }
            }
        });
        for f in filters {
            client
                .subscribe(*f, QoS::AtLeastOnce)
                .await
                .expect("subscribe queued");
        }
        Self {
            tasks: vec![worker, io],
            hang,
        }
    }

    /// Like `kill -9`: the process and its socket are gone at once.
    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts replicas one after the other (so replica i holds slot i) and waits
/// for each one's SUBACKs.
async fn reps(
    addr: SocketAddr,
    delays: &[Duration],
    filters: &[&str],
) -> (Vec<Rep>, mpsc::UnboundedReceiver<Got>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut out = Vec::new();
    for (n, &delay) in delays.iter().enumerate() {
        out.push(Rep::start(addr, n, delay, &tx, filters).await);
        let mut acks = 0;
        while acks < filters.len() {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(Got::SubAck(m))) if m == n => acks += 1,
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK for replica {n}"),
            }
        }
    }
    (out, rx)
}

/// Messages per replica until `done` holds.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    n: usize,
    mut done: impl FnMut(&[Vec<(u64, Instant)>]) -> bool,
) -> Vec<Vec<(u64, Instant)>> {
    let mut per = vec![Vec::new(); n];
    let start = Instant::now();
    while !done(&per) {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Got::Msg(r, payload, at))) => {
                per[r].push((payload.parse().unwrap_or(u64::MAX), at))
            }
            Ok(Some(_)) => {}
            _ => panic!(
                "timed out; got {:?}",
                per.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        }
    }
    per
}

async fn failovers(app: &flowgate::app::App, side: &str, cause: &str) -> f64 {
    let instance = if side == "http" { "web" } else { "line1" };
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    metric_sum(
        &m,
        "flowgate_failover_seconds_count",
        &[("instance", instance), ("side", side), ("cause", cause)],
    )
}

#[tokio::test]
async fn active_standby_gives_the_whole_stream_to_one_replica_and_broadcasts_to_all() {
    let app = start(&Upstream::Embedded, "strategy = \"active-standby\"").await;
    let (_reps, mut rx) = reps(app.mqtt_addr, &[Duration::ZERO; 3], &["jobs/#", "config/#"]).await;
    const N: usize = 300;
    publish(&app, "jobs", N).await;
    let per = collect(&mut rx, 3, |p| p[0].len() >= N).await;
    assert_eq!(per[0].len(), N);
    assert!(
        per[1].is_empty() && per[2].is_empty(),
        "standbys got jobs: {} {}",
        per[1].len(),
        per[2].len()
    );
    let seq: Vec<u64> = per[0].iter().map(|m| m.0).collect();
    assert!(
        seq.windows(2).all(|w| w[0] < w[1]),
        "the active replica got them in order"
    );
    // broadcast filters reach every replica, standbys included
    publish(&app, "config", 1).await;
    collect(&mut rx, 3, |p| p.iter().all(|r| !r.is_empty())).await;
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn killing_the_active_replica_moves_the_stream_in_order_to_the_next_standby() {
    for upstream in Upstream::both().await {
        let app = start(
            &upstream,
            "strategy = \"active-standby\"\nmax_inflight = 50",
        )
        .await;
        let (reps, mut rx) = reps(
            app.mqtt_addr,
            &[Duration::from_millis(3), Duration::ZERO, Duration::ZERO],
            &["jobs/#"],
        )
        .await;
        const N: usize = 300;
        publish(&app, "jobs", N).await;
        let before = collect(&mut rx, 3, |p| p[0].len() >= 40).await;
        reps[0].kill();
        let killed = Instant::now();
        let per = collect(&mut rx, 3, |p| {
            let mut all: Vec<u64> = before[0]
                .iter()
                .chain(&p[0])
                .chain(&p[1])
                .map(|m| m.0)
                .collect();
            all.sort_unstable();
            all.dedup();
            all.len() >= N
        })
        .await;
        let name = upstream.name();
        assert!(
            per[2].is_empty(),
            "{name}: the second standby got {} messages",
            per[2].len()
        );
        let seq: Vec<u64> = per[1].iter().map(|m| m.0).collect();
        assert!(!seq.is_empty(), "{name}: nothing reached the standby");
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "{name}: the standby got the stream out of order: {seq:?}"
        );
        let first = per[1][0].1.saturating_duration_since(killed);
        eventually("the failover is recorded", || async {
            failovers(&app, "mqtt", "disconnect").await == 1.0
        })
        .await;
        eprintln!("{name}: killed active replica -> next delivery to the standby after {first:?}");
        app.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn a_hung_active_replica_is_replaced_after_the_ack_timeout_and_keeps_no_role() {
    let app = start(
        &Upstream::Embedded,
        "strategy = \"active-standby\"\nack_timeout = \"400ms\"",
    )
    .await;
    let (reps, mut rx) = reps(app.mqtt_addr, &[Duration::ZERO; 2], &["jobs/#"]).await;
    reps[0].hang.store(true, Ordering::Relaxed);
    const N: usize = 50;
    let sent = Instant::now();
    publish(&app, "jobs", N).await;
    let per = collect(&mut rx, 2, |p| p[1].len() >= N).await;
    assert!(
        per[0].is_empty(),
        "the hung replica processed {}",
        per[0].len()
    );
    let seq: Vec<u64> = per[1].iter().map(|m| m.0).collect();
    assert_eq!(
        seq,
        (0..N as u64).collect::<Vec<_>>(),
        "in order, each once"
    );
    let waited = per[1][0].1.duration_since(sent);
    assert!(
        waited >= Duration::from_millis(400),
        "replaced before the ack timeout: {waited:?}"
    );
    assert_eq!(failovers(&app, "mqtt", "ack_timeout").await, 1.0);
    // the hung replica recovers: it gets no role back (no flapping)
    reps[0].hang.store(false, Ordering::Relaxed);
    publish(&app, "jobs", 20).await;
    let after = collect(&mut rx, 2, |p| p[1].len() >= 20).await;
    assert!(
        after[0].is_empty(),
        "the recovered replica took the role back"
    );
    eprintln!("hung active replica (ack timeout 400 ms) -> first delivery to the standby {waited:?} after the publish");
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn http_active_standby_fails_over_a_killed_replica_without_a_failed_request() {
    let reps = [
        WebReplica::start("r0", 0).await,
        WebReplica::start("r1", 0).await,
        WebReplica::start("r2", 0).await,
    ];
    let refs: Vec<&WebReplica> = reps.iter().collect();
    let (app, addr) = balancer(&refs, "balance = \"active-standby\"").await;
    let first = load(addr, 4, 1.0).await;
    assert!(!first.is_empty());
    assert!(
        first
            .iter()
            .all(|r| matches!(r, Ok((200, rep)) if rep == "0")),
        "all to the active replica: {:?}",
        first
            .iter()
            .filter(|r| !matches!(r, Ok((200, rep)) if rep == "0"))
            .take(3)
            .collect::<Vec<_>>()
    );
    let during = tokio::spawn(load(addr, 4, 2.0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    reps[0].kill();
    let during = during.await.expect("load");
    let failed: Vec<_> = during
        .iter()
        .filter(|r| !matches!(r, Ok((200, _))))
        .collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        !during
            .iter()
            .any(|r| matches!(r, Ok((_, rep)) if rep == "2")),
        "the second standby served requests"
    );
    let after = load(addr, 4, 0.5).await;
    assert!(
        after
            .iter()
            .all(|r| matches!(r, Ok((200, rep)) if rep == "1")),
        "the lowest standby is active now: {:?}",
        after
            .iter()
            .filter(|r| !matches!(r, Ok((200, rep)) if rep == "1"))
            .take(3)
            .collect::<Vec<_>>()
    );
    eventually("the http failover is recorded", || async {
        failovers(&app, "http", "refused").await + failovers(&app, "http", "error").await == 1.0
    })
    .await;
    let (_, api) = http_get(app.admin_addr, "/api/instances").await;
    assert!(
        api.contains("\"failovers\"") && api.contains("\"side\": \"http\""),
        "{api}"
    );
    app.shutdown(Duration::from_secs(2)).await;
    for r in &reps {
        r.kill();
    }
}

/// A relay that connects to `target` from `source` (a loopback address of
/// its own), like a replica on another host; returns where to connect.
async fn from_host(source: [u8; 4], target: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket
                    .bind((std::net::Ipv4Addr::from(source), 0).into())
                    .expect("bind source");
                if let Ok(mut out) = socket.connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn mqtt_and_http_sides_keep_the_same_replica_active_and_fail_over_together() {
    // replica "a" lives on 127.0.0.3, replica "b" on 127.0.0.2
    let web_b = WebReplica::start_at("b", [127, 0, 0, 2], 0).await;
    let web_a = WebReplica::start_at("a", [127, 0, 0, 3], 0).await;
    let extra = format!(
        "strategy = \"active-standby\"\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [\"{}\", \"{}\"]\nbalance = \"active-standby\"\nhealth_interval = \"100ms\"\npublic_paths = [\"/\"]\n",
        web_b.addr, web_a.addr
    );
    let app = start(&Upstream::Embedded, &extra).await;
    let http = app.http_addrs[0].1;
    // "a" connects first: slot 0, the active MQTT replica
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut mqtt = Vec::new();
    for (n, host) in [[127, 0, 0, 3], [127, 0, 0, 2]].into_iter().enumerate() {
        let via = from_host(host, app.mqtt_addr).await;
        mqtt.push(Rep::start(via, n, Duration::ZERO, &tx, &["jobs/#"]).await);
        loop {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(Got::SubAck(m))) if m == n => break,
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK for replica {n}"),
            }
        }
    }
    publish(&app, "jobs", 20).await;
    let per = collect(&mut rx, 2, |p| p[0].len() >= 20).await;
    assert!(per[1].is_empty());
    // HTTP follows: replica 1 ("a", 127.0.0.3), though replica 0 is lower
    for _ in 0..10 {
        let (status, replica, _, body) = request(http, "GET", "/hello", &[], bytes::Bytes::new())
            .await
            .expect("request");
        assert_eq!((status, replica.as_str(), &body[..]), (200, "1", &b"a"[..]));
    }
    // a's web side dies: both sides move to b
    web_a.kill();
    eventually("replica 1 is down on the HTTP side", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_replica_up", &[("replica", "1")]) == 0.0
    })
    .await;
    publish(&app, "jobs", 20).await;
    let per = collect(&mut rx, 2, |p| p[1].len() >= 20).await;
    assert_eq!(
        per[0].len(),
        0,
        "the old active replica got messages after the failover"
    );
    assert_eq!(failovers(&app, "mqtt", "health").await, 1.0);
    let (status, replica, _, body) = request(http, "GET", "/hello", &[], bytes::Bytes::new())
        .await
        .expect("request");
    assert_eq!((status, replica.as_str(), &body[..]), (200, "0", &b"b"[..]));
    app.shutdown(Duration::from_secs(2)).await;
    web_b.kill();
    for r in &mqtt {
        r.kill();
    }
}

/// Issue 16: with `key-hash` on both sides and each copy's MQTT and HTTP
/// sides tied by host, one key value reaches the same copy over MQTT (a topic
/// level) and over HTTP (a path segment), whatever order the MQTT replicas
/// connected in.
#[tokio::test]
async fn one_key_reaches_the_same_copy_over_mqtt_and_http() {
    // copy i: its HTTP side is replica i, on 127.0.0.(i+2)
    let hosts = [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]];
    let mut webs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        webs.push(WebReplica::start_at(&format!("w{i}"), *h, 0).await);
    }
    let list: Vec<String> = webs.iter().map(|w| format!("\"{}\"", w.addr)).collect();
    let extra = format!(
        "strategy = \"key-hash\"\nkey_level = 1\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [{}]\nbalance = \"key-hash\"\nkey = \"path:1\"\nhealth_interval = \"100ms\"\n\
         public_paths = [\"/\"]\n",
        list.join(", ")
    );
    let app = start(&Upstream::Embedded, &extra).await;
    let http = app.http_addrs[0].1;
    // the MQTT sides connect in another order than the HTTP list: their
    // slots are not their HTTP indexes
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut mqtt = Vec::new();
    for copy in [2usize, 0, 1] {
        let via = from_host(hosts[copy], app.mqtt_addr).await;
        mqtt.push(Rep::start(via, copy, Duration::ZERO, &tx, &["jobs/+"]).await);
        loop {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(Got::SubAck(m))) if m == copy => break,
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK for copy {copy}"),
            }
        }
    }
    const N: usize = 100;
    publish(&app, "jobs", N).await;
    let per = collect(&mut rx, 3, |p| p.iter().map(Vec::len).sum::<usize>() >= N).await;
    let mut mqtt_copy = vec![usize::MAX; N];
    for (copy, got) in per.iter().enumerate() {
        assert!(got.len() >= 10, "copy {copy} got {} of {N} keys", got.len());
        for (key, _) in got {
            mqtt_copy[*key as usize] = copy;
        }
    }
    for (key, &copy) in mqtt_copy.iter().enumerate() {
        let (status, replica, _, body) = request(
            http,
            "GET",
            &format!("/device/{key}"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("request");
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(
            replica,
            copy.to_string(),
            "key {key}: MQTT on copy {copy}, HTTP on replica {replica}"
        );
    }
    app.shutdown(Duration::from_secs(2)).await;
    for w in &webs {
        w.kill();
    }
    for r in &mqtt {
        r.kill();
    }
}
