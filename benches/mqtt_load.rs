//! MQTT load generator for `bench/compare.sh` (a `harness = false` bench).
//!
//! `P` publishers send on `bench/{p}`; `K` subscribers share `bench/#`
//! between them (a `$share/bench/...` filter with `--share`, or the plain
//! filter that flowgate rewrites). Every client lives in this one process, so
//! the payload carries the send time in nanoseconds since a process-wide
//! `Instant` and the subscribers measure end-to-end latency against the same
//! clock. Payload: send time (ns), publisher, sequence (u64 LE each), filler.
//! Prints one JSON line. Example (all flags: see `usage`):
//! `cargo bench --bench mqtt_load -- --target 127.0.0.1:1883 --qos 1 --share --sub-id-unique`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{oneshot, watch};

const WARMUP_NS: u64 = 1_000_000_000;
const HEADER: usize = 24;
/// Drain: stop waiting once nothing arrived for DRAIN_IDLE, or after DRAIN_MAX.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
const DRAIN_MAX: Duration = Duration::from_secs(60);

struct Args {
    host: String,
    port: u16,
    label: String,
    qos: QoS,
    size: usize,
    rate: u64,
    duration: u64,
    subscribers: usize,
    sub_id: String,
    sub_id_unique: bool,
    share: bool,
    publishers: usize,
    cpu: Vec<(String, u32)>, // `--cpu name=pid`: report its CPU use over the window
    /// `--v5`: MQTT 5 clients (the default is 3.1.1).
    v5: bool,
    /// `--retain`: every publish retained (a broker's durable path).
    retain: bool,
    /// `--complete`: each subscriber publishes a result `done/{publisher}`
    /// per message it gets, at the message's QoS (flowgate's completion
    /// acknowledgement with `correlate = "topic:1"`; 3.1.1 clients).
    complete: bool,
}

/// A publisher of either protocol version.
enum Publisher {
    V4(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Publisher {
    async fn publish(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        match self {
            Self::V4(c) => c
                .publish(topic, qos, retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Self::V5(c) => c
                .publish(topic, qos5(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
        }
        .expect("publish can be queued (event loop alive)");
    }
}

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "mqtt_load: {msg}\nargs: --target HOST:PORT [--label L] [--qos 0|1] [--size BYTES] \
         [--rate MSGS_PER_S (0 = max)] [--duration SECS] [--subscribers K] [--sub-id ID] \
         [--sub-id-unique] [--share] [--publishers P] [--cpu NAME=PID]... [--v5] [--retain] [--complete]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        host: String::new(),
        port: 0,
        label: String::new(),
        qos: QoS::AtMostOnce,
        size: 64,
        rate: 0,
        duration: 5,
        subscribers: 2,
        sub_id: "bench-replica".into(),
        sub_id_unique: false,
        share: false,
        v5: false,
        retain: false,
        complete: false,
        publishers: 1,
        cpu: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {v:?} is not a number")))
        };
        match flag.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--target" => (a.host, a.port) = split(&flag, &value(), ':'),
            "--label" => a.label = value(),
            "--qos" => {
                a.qos = match value().as_str() {
                    "0" => QoS::AtMostOnce,
                    "1" => QoS::AtLeastOnce,
                    v => usage(&format!("--qos {v}: only 0 and 1")),
                }
            }
            "--size" => a.size = num(value()) as usize,
            "--rate" => a.rate = num(value()),
            "--duration" => a.duration = num(value()),
            "--subscribers" => a.subscribers = num(value()) as usize,
            "--publishers" => a.publishers = num(value()) as usize,
            "--sub-id" => a.sub_id = value(),
            "--sub-id-unique" => a.sub_id_unique = true,
            "--share" => a.share = true,
            "--v5" => a.v5 = true,
            "--retain" => a.retain = true,
            "--complete" => a.complete = true,
            "--cpu" => a.cpu.push(split(&flag, &value(), '=')),
            f => usage(&format!("unknown argument {f:?}")),
        }
    }
    if a.host.is_empty() || a.size < HEADER || a.duration < 2 || a.subscribers * a.publishers == 0 {
        usage("need --target; --size >= 24, --duration >= 2 (1 s warm-up), >= 1 client each");
    }
    if a.label.is_empty() {
        a.label = format!("{}:{}", a.host, a.port);
    }
    a
}

/// `A{sep}B` as (A, B parsed), or the usage message.
fn split<T: std::str::FromStr>(flag: &str, v: &str, sep: char) -> (String, T) {
    let pair = v
        .rsplit_once(sep)
        .and_then(|(l, r)| Some((l.to_owned(), r.parse().ok()?)));
    pair.unwrap_or_else(|| usage(&format!("{flag} {v:?}: want A{sep}B")))
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// User + system CPU time of a process in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // f[0] is field 3 (state) of proc(5), so utime (14) and stime (15) are f[11], f[12]
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// What every client task shares.
struct Shared {
    args: Args,
    /// Deliveries so far, for the drain.
    count: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn client(&self, id: String) -> (AsyncClient, rumqttc::EventLoop) {
        let mut o = MqttOptions::new(id, self.args.host.clone(), self.args.port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_inflight(1000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 10_000); // request channel capacity
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true); // as Mosquitto, flowgate and HAProxy do
        el.set_network_options(net);
        (client, el)
    }

    fn client5(&self, id: String) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
        let mut o = rumqttc::v5::MqttOptions::new(id, self.args.host.clone(), self.args.port);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true); // as for the 3.1.1 clients
        o.set_clean_start(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_outgoing_inflight_upper_limit(1000)
            .set_max_packet_size(Some(1 << 20))
            .set_network_options(net);
        rumqttc::v5::AsyncClient::new(o, 10_000)
    }

    async fn error5(&self, who: &str, e: rumqttc::v5::ConnectionError) {
        eprintln!("mqtt_load: {who}: {e}");
        self.errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn error(&self, who: &str, e: rumqttc::ConnectionError) {
        eprintln!("mqtt_load: {who}: {e}");
        self.errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await; // then poll reconnects
    }
}

/// One delivered message.
struct Rx {
    publisher: u64,
    seq: u64,
    sent_ns: u64,
    recv_ns: u64,
}

/// Subscribes, signals `ready` on the SUBACK, records every PUBLISH until `stop`.
async fn subscriber(
    sh: Arc<Shared>,
    id: String,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Rx> {
    let filter = if sh.args.share {
        "$share/bench/bench/#"
    } else {
        "bench/#"
    };
    let (client, mut el) = sh.client(id.clone());
    client
        .subscribe(filter, sh.args.qos)
        .await
        .expect("subscribe request can be queued");
    // results go from a task of their own: awaiting a publish here could
    // wait on the event loop this task polls
    let results = sh.args.complete.then(|| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, QoS)>();
        let client = client.clone();
        tokio::spawn(async move {
            while let Some((publisher, qos)) = rx.recv().await {
                if client
                    .publish(format!("done/{publisher}"), qos, false, b"ok".to_vec())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        tx
    });
    let mut ready = Some(ready);
    let mut out = Vec::with_capacity(1 << 20);
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            ev = el.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let recv_ns = now_ns();
                let word = |i: usize| {
                    let w = p.payload.get(i * 8..i * 8 + 8)?;
                    Some(u64::from_le_bytes(w.try_into().ok()?))
                };
                if let (Some(sent_ns), Some(publisher), Some(seq)) = (word(0), word(1), word(2)) {
                    if let Some(r) = &results {
                        let _ = r.send((publisher, p.qos));
                    }
                    out.push(Rx {
                        publisher,
                        seq,
                        sent_ns,
                        recv_ns,
                    });
                }
                sh.count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    panic!("subscriber {id}: SUBSCRIBE {filter} refused");
                }
                let _ = ready.take().map(|r| r.send(()));
            }
            Ok(_) => {}
            Err(e) => {
                sh.error(&format!("subscriber {id}"), e).await;
            }
        }
    }
    out
}

/// The payload's header words: sent time, publisher, sequence.
fn header(payload: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| {
        let w = payload.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(w.try_into().ok()?))
    };
    Some((word(0)?, word(1)?, word(2)?))
}

/// The MQTT 5 twin of [`subscriber`].
async fn subscriber5(
    sh: Arc<Shared>,
    id: String,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Rx> {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, SubscribeReasonCode as C5};
    use rumqttc::v5::Event as E5;
    let filter = if sh.args.share {
        "$share/bench/bench/#"
    } else {
        "bench/#"
    };
    let (client, mut el) = sh.client5(id.clone());
    client
        .subscribe(filter, qos5(sh.args.qos))
        .await
        .expect("subscribe request can be queued");
    let mut ready = Some(ready);
    let mut out = Vec::with_capacity(1 << 20);
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            ev = el.poll() => ev,
        };
        match event {
            Ok(E5::Incoming(P5::Publish(p))) => {
                let recv_ns = now_ns();
                if let Some((sent_ns, publisher, seq)) = header(&p.payload) {
                    out.push(Rx {
                        publisher,
                        seq,
                        sent_ns,
                        recv_ns,
                    });
                }
                sh.count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(E5::Incoming(P5::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, C5::Success(_)))
                {
                    panic!("subscriber {id}: SUBSCRIBE {filter} refused");
                }
                let _ = ready.take().map(|r| r.send(()));
            }
            Ok(_) => {}
            Err(e) => sh.error5(&format!("subscriber {id}"), e).await,
        }
    }
    out
}

/// Connects publisher `index` (either version), drives its event loop in a
/// task, and once the CONNACK arrived returns the client.
async fn connect_publisher(sh: Arc<Shared>, index: usize) -> Publisher {
    if !sh.args.v5 {
        return Publisher::V4(connect_publisher4(sh, index).await);
    }
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::Event as E5;
    let id = format!("bench-pub-{}-{index}", std::process::id());
    let (client, mut el) = sh.client5(id.clone());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(E5::Incoming(P5::ConnAck(_))) => {
                    let _ = tx.take().map(|tx| tx.send(()));
                }
                Ok(_) => {}
                Err(e) => sh.error5(&format!("publisher {id}"), e).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("publisher gets a CONNACK within 10 s")
        .expect("publisher event loop is running");
    Publisher::V5(client)
}

async fn connect_publisher4(sh: Arc<Shared>, index: usize) -> AsyncClient {
    let id = format!("bench-pub-{}-{index}", std::process::id());
    let (client, mut el) = sh.client(id.clone());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.take().map(|tx| tx.send(()));
                }
                Ok(_) => {}
                Err(e) => {
                    sh.error(&format!("publisher {id}"), e).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("publisher gets a CONNACK within 10 s")
        .expect("publisher event loop is running");
    client
}

/// Sends on `bench/{index}` until `end_ns` at the publisher's share of the
/// rate (0 = as fast as the client takes them); returns how many publishes
/// were accepted.
async fn send(sh: Arc<Shared>, client: Publisher, index: u64, end_ns: u64) -> u64 {
    let a = &sh.args;
    let rate = a.rate as f64 / a.publishers as f64;
    let topic = format!("bench/{index}");
    let filler = vec![0xa5u8; a.size];
    let start = now_ns();
    let mut seq = 0u64;
    loop {
        let now = now_ns();
        if now >= end_ns {
            return seq;
        }
        if rate > 0.0 && seq as f64 >= (now - start) as f64 * rate / 1e9 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let mut payload = filler.clone();
        for (i, w) in [now_ns(), index, seq].into_iter().enumerate() {
            payload[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        client
            .publish(topic.clone(), a.qos, a.retain, payload)
            .await;
        seq += 1;
    }
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> Option<f64> {
    let i = ((sorted_ns.len() as f64 * p).ceil() as usize).max(1) - 1;
    Some(*sorted_ns.get(i)? as f64 / 1000.0)
}

async fn run(args: Args) {
    now_ns(); // fix the epoch
    let sh = Arc::new(Shared {
        args,
        count: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let a = &sh.args;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (mut subs, mut readies) = (Vec::new(), Vec::new());
    for k in 0..a.subscribers {
        let id = if a.sub_id_unique {
            format!("{}-{k}", a.sub_id)
        } else {
            a.sub_id.clone()
        };
        let (tx, rx) = oneshot::channel();
        readies.push(rx);
        let stop = stop_rx.clone();
        if a.v5 {
            subs.push(tokio::spawn(subscriber5(sh.clone(), id, tx, stop)));
        } else {
            subs.push(tokio::spawn(subscriber(sh.clone(), id, tx, stop)));
        }
    }
    for rx in readies {
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("every subscriber gets a SUBACK within 10 s")
            .expect("subscriber task is running");
    }
    let mut pubs = Vec::new();
    for p in 0..a.publishers {
        pubs.push(connect_publisher(sh.clone(), p).await);
    }

    let t0 = now_ns();
    let end_ns = t0 + a.duration * 1_000_000_000;
    let mut watched = a.cpu.clone();
    watched.push(("tool".into(), std::process::id()));
    let cpu0: Vec<_> = watched.iter().map(|(_, pid)| cpu_ticks(*pid)).collect();
    let senders: Vec<_> = (pubs.into_iter().enumerate())
        .map(|(i, c)| tokio::spawn(send(sh.clone(), c, i as u64, end_ns)))
        .collect();
    let mut sent = 0;
    for s in senders {
        sent += s.await.expect("sender task finishes");
    }
    let window_s = (now_ns() - t0) as f64 / 1e9;
    // ticks per second at USER_HZ = 100 is a percentage of one core
    let cpu_pct = |before: Option<u64>, pid| Some((cpu_ticks(pid)? - before?) as f64 / window_s);
    let cpu: serde_json::Map<_, _> = (watched.into_iter().zip(cpu0))
        .map(|((name, pid), before)| (name, cpu_pct(before, pid).into()))
        .collect();

    // drain: until everything arrived, nothing moved for DRAIN_IDLE, or DRAIN_MAX
    let drain_start = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let n = sh.count.load(Ordering::Relaxed);
        if n >= sent || last_change.elapsed() > DRAIN_IDLE || drain_start.elapsed() > DRAIN_MAX {
            break;
        }
        if n != last {
            (last, last_change) = (n, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let mut rx: Vec<Rx> = Vec::new();
    for s in subs {
        rx.extend(s.await.expect("subscriber task finishes"));
    }

    let (warm, end) = (t0 + WARMUP_NS, end_ns);
    let in_window = rx
        .iter()
        .filter(|r| (warm..end).contains(&r.recv_ns))
        .count();
    let mut lat: Vec<u64> = (rx.iter())
        .filter(|r| (warm..end).contains(&r.sent_ns))
        .map(|r| r.recv_ns.saturating_sub(r.sent_ns))
        .collect();
    lat.sort_unstable();
    let mut ids: Vec<(u64, u64)> = rx.iter().map(|r| (r.publisher, r.seq)).collect();
    ids.sort_unstable();
    ids.dedup();
    let received = ids.len() as u64;
    let line = serde_json::json!({
        "target_label": a.label,
        "protocol": if a.v5 { "5" } else { "3.1.1" },
        "retain": a.retain,
        "complete": a.complete,
        "qos": a.qos as u8,
        "size": a.size,
        "sent": sent,
        "received": received,
        "lost": sent as i64 - received as i64,
        "duplicates": rx.len() as u64 - received,
        "rate_target": a.rate,
        "sent_per_s": sent as f64 / window_s,
        "msgs_per_s": in_window as f64 / ((end - warm) as f64 / 1e9),
        "p50_us": percentile_us(&lat, 0.50),
        "p99_us": percentile_us(&lat, 0.99),
        "drain_s": drain_s,
        "errors": sh.errors.load(Ordering::Relaxed),
        "cpu_pct": cpu,
    });
    println!("{line}");
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime can be built");
    runtime.block_on(run(args));
    // the client tasks still run; do not wait for them
    runtime.shutdown_timeout(Duration::from_millis(100));
}
