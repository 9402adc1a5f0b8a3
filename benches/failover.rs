//! Active-standby failover times (a `harness = false` bench): for MQTT and
//! HTTP, a killed active replica and a hung one, `ROUNDS` failovers each
//! (default 20) under a steady stream. Two figures per failover:
//! - flowgate's own (`flowgate_failover_seconds`): from the fault being
//!   observable (socket closed, first missed ack deadline, first failed probe,
//!   failed request) to the first message/response served by the new replica;
//! - outside: from the moment the bench killed or hung the replica to the first
//!   message received (MQTT) or response completed (HTTP) from another one.
//!
//! `cargo bench --bench failover` (ROUNDS=20). Prints a table and one JSON line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate::app::App;
use flowgate::config::Config;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const ACK_TIMEOUT_MS: u64 = 200;
const PROBE_MS: u64 = 100;
const DEADLINE: Duration = Duration::from_secs(20);

type Seen = mpsc::UnboundedSender<(usize, Instant)>;

/// An MQTT replica: acknowledges each message unless hung; reports arrivals.
struct MqttReplica {
    id: usize,
    hang: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MqttReplica {
    async fn start(addr: SocketAddr, id: usize, seen: Seen) -> Self {
        let mut opts = MqttOptions::new("line1-nodered", addr.ip().to_string(), addr.port());
        opts.set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        let hang = Arc::new(AtomicBool::new(false));
        let (hung, acker) = (hang.clone(), client.clone());
        let (subacked_tx, mut subacked) = mpsc::channel(1);
        let io = tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                match ev {
                    Event::Incoming(Packet::Publish(p)) if !hung.load(Ordering::Relaxed) => {
                        let _ = seen.send((id, Instant::now()));
                        let _ = acker.try_ack(&p);
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        let _ = subacked_tx.try_send(());
                    }
                    _ => {}
                }
            }
        });
        client
            .subscribe("jobs/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        tokio::time::timeout(DEADLINE, subacked.recv())
            .await
            .expect("SUBACK in time");
        Self {
            id,
            hang,
            tasks: vec![io],
        }
    }

    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start(config: &str) -> App {
    App::start(Config::parse(config, "bench").expect("valid config"))
        .await
        .expect("flowgate starts")
}

/// Waits for the next failover flowgate records after `before` of them.
async fn recorded(app: &App, instance: &str, before: usize) -> f64 {
    let start = Instant::now();
    loop {
        let list = app.metrics.failovers(instance);
        if list.len() > before {
            return list[list.len() - 1].seconds;
        }
        assert!(start.elapsed() < DEADLINE, "no failover recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `rounds` MQTT failovers; `hang` picks hung over killed.
async fn mqtt(rounds: usize, hang: bool) -> (Vec<f64>, Vec<f64>) {
    let app = start(&format!(
        "node_id = \"b\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"line1-nodered\" }}\n\
         strategy = \"active-standby\"\nack_timeout = \"{ACK_TIMEOUT_MS}ms\"\n"
    ))
    .await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut live = vec![
        MqttReplica::start(app.mqtt_addr, 0, seen_tx.clone()).await,
        MqttReplica::start(app.mqtt_addr, 1, seen_tx.clone()).await,
    ];
    let mut next_id = 2;
    // a steady stream: 500 QoS 1 messages a second
    let mut opts = MqttOptions::new("bench-pub", "127.0.0.1", app.mqtt_addr.port());
    opts.set_inflight(1000);
    let (publisher, mut el) = AsyncClient::new(opts, 10_000);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let stream = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        loop {
            tick.tick().await;
            let _ = publisher.try_publish("jobs/x", QoS::AtLeastOnce, false, "job");
        }
    });
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // the active replica is the one receiving
        let (active, _) = tokio::time::timeout(DEADLINE, seen.recv())
            .await
            .expect("messages flow")
            .expect("open");
        while seen.try_recv().is_ok() {}
        let before = app.metrics.failovers("line1").len();
        let idx = live
            .iter()
            .position(|r| r.id == active)
            .expect("active is live");
        let t0 = Instant::now();
        if hang {
            live[idx].hang.store(true, Ordering::Relaxed);
        } else {
            live[idx].kill();
        }
        let t1 = loop {
            let (who, at) = tokio::time::timeout(DEADLINE, seen.recv())
                .await
                .expect("the stream resumes")
                .expect("open");
            if who != active && at >= t0 {
                break at;
            }
        };
        outside.push(t1.duration_since(t0).as_secs_f64());
        inside.push(recorded(&app, "line1", before).await);
        let old = live.remove(idx);
        old.kill();
        live.push(MqttReplica::start(app.mqtt_addr, next_id, seen_tx.clone()).await);
        next_id += 1;
    }
    stream.abort();
    app.shutdown(Duration::from_secs(1)).await;
    (inside, outside)
}

/// A stand-in HTTP replica on a fixed port: answers its index, or never when hung.
struct WebReplica {
    port: u16,
    hang: Arc<AtomicBool>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl WebReplica {
    async fn start(index: usize, port: u16, hang: Arc<AtomicBool>) -> Self {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let port = listener.local_addr().expect("addr").port();
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (t, h) = (tasks.clone(), hang.clone());
        tasks.lock().expect("tasks").spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let h = h.clone();
                let service =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move {
                            if h.load(Ordering::Relaxed) {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(index.to_string()),
                            )))
                        }
                    });
                t.lock().expect("tasks").spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { port, hang, tasks }
    }

    fn kill(&self) {
        self.tasks.lock().expect("tasks").abort_all();
    }
}

/// One GET on a fresh connection: the replica that answered, if it succeeded.
async fn get(addr: SocketAddr) -> Option<String> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get("/api")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let ok = resp.status().is_success();
    let replica = resp
        .headers()
        .get("x-flowgate-replica")?
        .to_str()
        .ok()?
        .to_string();
    resp.into_body().collect().await.ok()?;
    ok.then_some(replica)
}

async fn all_up(app: &App, n: usize) {
    let start = Instant::now();
    let admin = format!("http://{}", app.admin_addr);
    while start.elapsed() < DEADLINE {
        if let Ok(doc) = flowgate::admin::client::instances(&admin).await {
            if doc.instances[0].http.iter().filter(|h| h.up).count() == n {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replicas did not come back up");
}

/// `rounds` HTTP failovers; returns (inside, outside, failed requests).
async fn http(rounds: usize, hang: bool) -> (Vec<f64>, Vec<f64>, usize) {
    let mut reps = Vec::new();
    for i in 0..3 {
        reps.push(WebReplica::start(i, 0, Arc::new(AtomicBool::new(false))).await);
    }
    let list: Vec<String> = reps
        .iter()
        .map(|r| format!("\"127.0.0.1:{}\"", r.port))
        .collect();
    let app = start(&format!(
        "node_id = \"b\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"web\"\n\
         match = {{ client_id = \"web\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [{}]\n\
         balance = \"active-standby\"\nhealth_interval = \"{PROBE_MS}ms\"\nhealth_timeout = \"{PROBE_MS}ms\"\n\
         timeout = \"3s\"\npublic_paths = [\"/\"]\n",
        list.join(", ")
    ))
    .await;
    let addr = app.http_addrs[0].1;
    // open loop: a request every 2 ms, each reporting (replica, done) or failure
    let (done_tx, mut done) = mpsc::unbounded_channel::<(Option<String>, Instant)>();
    let stream = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        loop {
            tick.tick().await;
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let r = get(addr).await;
                let _ = tx.send((r, Instant::now()));
            });
        }
    });
    let (mut inside, mut outside, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let active = loop {
            match tokio::time::timeout(DEADLINE, done.recv())
                .await
                .expect("responses")
                .expect("open")
            {
                (Some(r), _) => break r,
                (None, _) => failed += 1,
            }
        };
        let i: usize = active.parse().expect("index");
        let before = app.metrics.failovers("web").len();
        let t0 = Instant::now();
        if hang {
            reps[i].hang.store(true, Ordering::Relaxed);
        } else {
            reps[i].kill();
        }
        let t1 = loop {
            match tokio::time::timeout(DEADLINE, done.recv())
                .await
                .expect("responses")
                .expect("open")
            {
                (Some(r), at) if r != active && at >= t0 => break at,
                (None, _) => failed += 1,
                _ => {}
            }
        };
        outside.push(t1.duration_since(t0).as_secs_f64());
        inside.push(recorded(&app, "web", before).await);
        // bring it back as a standby
        if hang {
            reps[i].hang.store(false, Ordering::Relaxed);
        } else {
            let port = reps[i].port;
            reps[i] = WebReplica::start(i, port, Arc::new(AtomicBool::new(false))).await;
        }
        all_up(&app, 3).await;
    }
    stream.abort();
    // failures still arriving for requests sent before the end
    tokio::time::sleep(Duration::from_millis(3500)).await;
    while let Ok((r, _)) = done.try_recv() {
        if r.is_none() {
            failed += 1;
        }
    }
    app.shutdown(Duration::from_secs(1)).await;
    for r in &reps {
        r.kill();
    }
    (inside, outside, failed)
}

fn stats(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.is_empty() { 0.0 } else { s[s.len() / 2] };
    (median * 1000.0, s.last().copied().unwrap_or(0.0) * 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut json = HashMap::new();
    println!("{rounds} failovers each; ms: median / worst");
    println!(
        "{:<22} {:>22} {:>22} {:>8}",
        "scenario", "flowgate (fault->served)", "outside (act->served)", "failed"
    );
    for (name, kind) in [
        ("mqtt killed", 0),
        ("mqtt hung", 1),
        ("http killed", 2),
        ("http hung", 3),
    ] {
        let (inside, outside, failed) = rt.block_on(async {
            match kind {
                0 => {
                    let (i, o) = mqtt(rounds, false).await;
                    (i, o, 0)
                }
                1 => {
                    let (i, o) = mqtt(rounds, true).await;
                    (i, o, 0)
                }
                2 => http(rounds, false).await,
                _ => http(rounds, true).await,
            }
        });
        let (im, iw) = stats(&inside);
        let (om, ow) = stats(&outside);
        println!(
            "{name:<22} {:>10.1} / {:>9.1} {:>10.1} / {:>9.1} {failed:>8}",
            im, iw, om, ow
        );
        json.insert(name, serde_json::json!({"inside_ms": [im, iw], "outside_ms": [om, ow], "failed": failed, "rounds": rounds}));
    }
    println!(
        "{}",
        serde_json::json!({"ack_timeout_ms": ACK_TIMEOUT_MS, "probe_interval_ms": PROBE_MS, "results": json})
    );
}
