//! Dispatch mode, each test against the embedded broker and a real Mosquitto.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flowgate::app::App;
use flowgate::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::support::*;

/// Where the broker is: the embedded one, or a Mosquitto the test keeps alive.
pub(crate) enum Upstream {
    Embedded,
    Mosquitto(Mosquitto),
}

impl Upstream {
    pub(crate) async fn both() -> Vec<Upstream> {
        vec![
            Upstream::Embedded,
            Upstream::Mosquitto(Mosquitto::start().await),
        ]
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Upstream::Embedded => "embedded",
            Upstream::Mosquitto(_) => "mosquitto",
        }
    }

    fn config_value(&self) -> String {
        match self {
            Upstream::Embedded => "embedded".into(),
            Upstream::Mosquitto(m) => format!("mqtt://{}", m.addr),
        }
    }
}

pub(crate) async fn start(upstream: &Upstream, instance_extra: &str) -> App {
    init_logs();
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\nmode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\nbroadcast = [\"config/#\"]\n{instance_extra}\n",
        upstream.config_value()
    );
    App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts")
}

/// A replica: a rumqttc client with manual acks whose "flow" takes `delay`
/// per message, one at a time, and acks only if `ack` says so.
struct Replica {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
enum Got {
    Msg {
        replica: usize,
        payload: String,
        retain: bool,
    },
    SubAck(usize),
    Down(usize),
}

fn replica(
    addr: SocketAddr,
    n: usize,
    delay: Duration,
    ack: bool,
    tx: mpsc::UnboundedSender<Got>,
) -> Replica {
    let mut opts = MqttOptions::new("line1-nodered", addr.ip().to_string(), addr.port());
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let (work_tx, mut work_rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
    let acker = client.clone();
    let worker_tx = tx.clone();
    tokio::spawn(async move {
        while let Some(p) = work_rx.recv().await {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = worker_tx.send(Got::Msg {
                replica: n,
                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                retain: p.retain,
            });
            if ack {
                let _ = acker.ack(&p).await;
            }
        }
    });
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = work_tx.send(p);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(Got::SubAck(n));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(Got::Down(n));
                    return;
                }
            }
        }
    });
    Replica { client, task }
}

/// Starts `count` replicas subscribed to `filter` and waits for their SUBACKs.
async fn replicas(
    addr: SocketAddr,
    specs: &[(Duration, bool)],
    filter: &str,
) -> (Vec<Replica>, mpsc::UnboundedReceiver<Got>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut out = Vec::new();
    for (n, &(delay, ack)) in specs.iter().enumerate() {
        let r = replica(addr, n, delay, ack, tx.clone());
        r.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        loop {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(Got::SubAck(m))) if m == n => break,
                Ok(Some(Got::Down(m))) => panic!("replica {m} went down"),
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK for replica {n}"),
            }
        }
        out.push(r);
    }
    (out, rx)
}

/// Collects messages until `done(per-replica payloads)` or the deadline.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    n: usize,
    mut done: impl FnMut(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let mut per = vec![Vec::new(); n];
    let start = Instant::now();
    while !done(&per) {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Got::Msg {
                replica, payload, ..
            })) => per[replica].push(payload),
            Ok(Some(_)) => {}
            _ => panic!(
                "timed out; got {:?}",
                per.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        }
    }
    per
}

/// What a publisher sends through flowgate (an unmatched client) or direct.
pub(crate) async fn publish(app: &App, topic: &str, n: usize) {
    publish_numbered(app.mqtt_addr, topic, n).await;
}

#[tokio::test]
async fn each_message_reaches_exactly_one_of_2_and_4_replicas() {
    for upstream in Upstream::both().await {
        for count in [2usize, 4] {
            let app = start(&upstream, "").await;
            let specs = vec![(Duration::ZERO, true); count];
            let (reps, mut rx) = replicas(app.mqtt_addr, &specs, "jobs/#").await;
            const N: usize = 1000;
            publish(&app, "jobs", N).await;
            let per = collect(&mut rx, count, |p| {
                p.iter().map(Vec::len).sum::<usize>() >= N
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut all: Vec<String> = per.into_iter().flatten().collect();
            while let Ok(Got::Msg { payload, .. }) = rx.try_recv() {
                all.push(payload);
            }
            let unique: HashSet<&String> = all.iter().collect();
            assert_eq!(
                all.len(),
                N,
                "{}: {count} replicas, duplicates ({} unique)",
                upstream.name(),
                unique.len()
            );
            assert_eq!(
                unique.len(),
                N,
                "{}: {count} replicas, missing",
                upstream.name()
            );
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            let to = metric_sum(
                &m,
                "flowgate_replica_messages_total",
                &[("instance", "line1"), ("direction", "to_replica")],
            );
            assert_eq!(to, N as f64);
            for slot in 0..count {
                let got = metric_sum(
                    &m,
                    "flowgate_replica_messages_total",
                    &[
                        ("instance", "line1"),
                        ("replica", &slot.to_string()),
                        ("direction", "to_replica"),
                    ],
                );
                assert!(
                    got >= (N / count / 3) as f64,
                    "{}: slot {slot} got {got}",
                    upstream.name()
                );
            }
            drop(reps);
            app.shutdown(Duration::from_secs(5)).await;
        }
    }
}

#[tokio::test]
async fn unacked_messages_move_to_the_surviving_replica() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "ack_timeout = \"500ms\"\nmax_inflight = 20").await;
        // replica 0 takes messages and never acknowledges; replica 1 works
        let (reps, mut rx) = replicas(
            app.mqtt_addr,
            &[(Duration::ZERO, false), (Duration::ZERO, true)],
            "jobs/#",
        )
        .await;
        const N: usize = 200;
        publish(&app, "jobs", N).await;
        let per = collect(&mut rx, 2, |p| {
            p[1].iter().collect::<HashSet<_>>().len() >= N
        })
        .await;
        assert!(
            !per[0].is_empty(),
            "{}: the silent replica got nothing: test proves nothing",
            upstream.name()
        );
        // then the silent replica disconnects
        reps[0].task.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut acked = per[1].clone();
        while let Ok(Got::Msg {
            replica: 1,
            payload,
            ..
        }) = rx.try_recv()
        {
            acked.push(payload);
        }
        let unique: HashSet<&String> = acked.iter().collect();
        assert_eq!(
            unique.len(),
            N,
            "{}: every message reached the working replica",
            upstream.name()
        );
        assert_eq!(
            acked.len(),
            N,
            "{}: none twice to the replica that acknowledged",
            upstream.name()
        );
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        assert!(
            metric_sum(
                &m,
                "flowgate_dispatch_redeliveries_total",
                &[("instance", "line1")]
            ) >= per[0].len() as f64
        );
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn key_hash_keeps_each_key_on_one_replica_and_moves_only_the_leavers() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "strategy = \"key-hash\"\nkey_level = 1").await;
        let (mut reps, mut rx) =
            replicas(app.mqtt_addr, &[(Duration::ZERO, true); 3], "sensors/#").await;
        let owners = |per: &[Vec<String>]| {
            let mut owner: HashMap<String, HashSet<usize>> = HashMap::new();
            for (r, msgs) in per.iter().enumerate() {
                for m in msgs {
                    owner.entry(m.clone()).or_default().insert(r);
                }
            }
            owner
        };
        // 20 devices x 5 messages: payload = device name
        let send = |app: &App| {
            let addr = app.mqtt_addr;
            async move {
                let mut opts = MqttOptions::new("sensor-pub", "127.0.0.1", addr.port());
                opts.set_inflight(100);
                let (c, mut el) = AsyncClient::new(opts, 1000);
                for round in 0..5 {
                    for d in 0..20 {
                        c.publish(
                            format!("sensors/dev{d}/t"),
                            QoS::AtLeastOnce,
                            false,
                            format!("dev{d}"),
                        )
                        .await
                        .expect("queued");
                    }
                    let _ = round;
                }
                let mut acks = 0;
                while acks < 100 {
                    if let Ok(Event::Incoming(Packet::PubAck(_))) = el.poll().await {
                        acks += 1;
                    }
                }
            }
        };
        send(&app).await;
        let per = collect(&mut rx, 3, |p| p.iter().map(Vec::len).sum::<usize>() >= 100).await;
        let before = owners(&per);
        assert_eq!(before.len(), 20);
        assert!(
            before.values().all(|o| o.len() == 1),
            "{}: a key on two replicas: {before:?}",
            upstream.name()
        );
        let used: HashSet<usize> = before.values().flatten().copied().collect();
        assert!(
            used.len() >= 2,
            "{}: all keys on one replica",
            upstream.name()
        );
        // replica 2 leaves
        let leaver = reps.remove(2);
        let _ = leaver.client.disconnect().await;
        let start_wait = Instant::now();
        loop {
            let (_, body) = http_get(app.admin_addr, "/api/instances").await;
            if body.matches("\"slot\"").count() == 2 {
                break;
            }
            assert!(start_wait.elapsed() < DEADLINE, "replica 2 never left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        send(&app).await;
        let per = collect(&mut rx, 3, |p| p.iter().map(Vec::len).sum::<usize>() >= 100).await;
        let after = owners(&per);
        for (key, owner) in &after {
            assert_eq!(owner.len(), 1, "{}: {key} split", upstream.name());
            let was = before[key].iter().next().copied();
            if was != Some(2) {
                assert_eq!(
                    owner.iter().next().copied(),
                    was,
                    "{}: {key} moved though its replica stayed",
                    upstream.name()
                );
            }
        }
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn least_inflight_gives_a_slow_replica_fewer_messages() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "max_inflight = 4").await;
        let (_reps, mut rx) = replicas(
            app.mqtt_addr,
            &[
                (Duration::from_millis(2), true),
                (Duration::from_millis(8), true),
            ],
            "jobs/#",
        )
        .await;
        const N: usize = 500;
        publish(&app, "jobs", N).await;
        let per = collect(&mut rx, 2, |p| p.iter().map(Vec::len).sum::<usize>() >= N).await;
        let ratio = per[0].len() as f64 / per[1].len().max(1) as f64;
        assert!(
            (2.5..=6.0).contains(&ratio),
            "{}: fast/slow = {ratio:.2} ({} vs {})",
            upstream.name(),
            per[0].len(),
            per[1].len()
        );
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn the_will_is_published_once_when_the_last_replica_dies() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        let mut observer = Client3::connect(app.mqtt_addr, &unique_id("observer"), true);
        observer.subscribe("line1/status", QoS::AtLeastOnce).await;
        let mut reps = Vec::new();
        let (tx, _rx) = mpsc::unbounded_channel();
        for n in 0..2 {
            let mut opts = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
            opts.set_last_will(rumqttc::LastWill::new(
                "line1/status",
                "offline",
                QoS::AtLeastOnce,
                false,
            ));
            let (client, mut el) = AsyncClient::new(opts, 100);
            client
                .subscribe("jobs/#", QoS::AtLeastOnce)
                .await
                .expect("queued");
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                while el.poll().await.is_ok() {}
                let _ = tx.send(n);
            });
            reps.push((client, task));
        }
        eventually("both replicas connected", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_instance_replicas_connected",
                &[("instance", "line1")],
            ) == 2.0
        })
        .await;
        // one replica dies without DISCONNECT: no will
        reps[0].1.abort();
        eventually("first replica gone", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_instance_replicas_connected",
                &[("instance", "line1")],
            ) == 1.0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(seen) = observer.events.try_recv() {
            panic!(
                "{}: the observer saw {seen:?} while a replica lives",
                upstream.name()
            );
        }
        // the last one dies: the will, once
        reps[1].1.abort();
        let mut wills = 0;
        let start_wait = Instant::now();
        while start_wait.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(Seen::Message(p))) =
                tokio::time::timeout(Duration::from_millis(100), observer.events.recv()).await
            {
                assert_eq!(p, b"offline");
                wills += 1;
            }
        }
        assert_eq!(wills, 1, "{}: will count", upstream.name());
        app.shutdown(Duration::from_secs(5)).await;
    }
}

/// Each new will makes flowgate reconnect its upstream session with it; on
/// rumqttd a reconnect that beat the broker's clean-up of the old connection
/// had the new will published at once (CI saw it).
#[tokio::test]
async fn changing_the_will_never_publishes_it() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        let mut observer = Client3::connect(app.mqtt_addr, &unique_id("observer"), true);
        observer.subscribe("line1/status", QoS::AtLeastOnce).await;
        let connected = |n: f64| {
            let admin = app.admin_addr;
            move || async move {
                let (_, m) = http_get(admin, "/metrics").await;
                metric_sum(
                    &m,
                    "flowgate_instance_replicas_connected",
                    &[("instance", "line1")],
                ) == n
            }
        };
        for round in 0..20 {
            let mut opts = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
            opts.set_last_will(rumqttc::LastWill::new(
                "line1/status",
                format!("offline {round}"),
                QoS::AtLeastOnce,
                false,
            ));
            let (client, mut el) = AsyncClient::new(opts, 10);
            let task = tokio::spawn(async move { while el.poll().await.is_ok() {} });
            eventually("the replica connected", connected(1.0)).await;
            // leaves cleanly: no will from flowgate either
            client.disconnect().await.expect("queued");
            eventually("the replica gone", connected(0.0)).await;
            let _ = task.await;
        }
        // the last reconnect has time to go wrong too
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(seen) = observer.events.try_recv() {
            panic!("{}: the observer saw {seen:?}", upstream.name());
        }
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn retained_messages_reach_each_subscribing_replica() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        // a retained message published before any replica exists
        let mut opts = MqttOptions::new(unique_id("retainer"), "127.0.0.1", app.mqtt_addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = AsyncClient::new(opts, 10);
        c.publish("settings/mode", QoS::AtLeastOnce, true, "auto")
            .await
            .expect("queued");
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) =
                tokio::time::timeout(DEADLINE, el.poll())
                    .await
                    .expect("puback")
            {
                break;
            }
        }
        let (_reps, mut rx) =
            replicas(app.mqtt_addr, &[(Duration::ZERO, true); 2], "settings/#").await;
        let mut got = [false; 2];
        let start_wait = Instant::now();
        while !(got[0] && got[1]) {
            assert!(
                start_wait.elapsed() < DEADLINE,
                "{}: retained reached {got:?}",
                upstream.name()
            );
            if let Ok(Some(Got::Msg {
                replica,
                payload,
                retain,
            })) = tokio::time::timeout(DEADLINE, rx.recv()).await
            {
                assert_eq!(payload, "auto");
                assert!(retain, "delivered as retained");
                got[replica] = true;
            }
        }
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn retained_messages_reach_a_replica_that_subscribes_while_a_stream_flows() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        let mut opts = MqttOptions::new("streamer", "127.0.0.1", app.mqtt_addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = AsyncClient::new(opts, 1000);
        c.publish("settings/mode", QoS::AtLeastOnce, true, "auto")
            .await
            .expect("queued");
        // a live stream on the same filter, every 5 ms, before and during the
        // replicas' subscription (the retained fetch must not wait for it to stop)
        let stream = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            for i in 0u64.. {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = c.try_publish("settings/live", QoS::AtMostOnce, false, i.to_string());
                    }
                    ev = el.poll() => if ev.is_err() { tokio::time::sleep(Duration::from_millis(50)).await },
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_reps, mut rx) =
            replicas(app.mqtt_addr, &[(Duration::ZERO, true); 2], "settings/#").await;
        let mut got = [false; 2];
        let start_wait = Instant::now();
        while !(got[0] && got[1]) {
            // well under the fetch's 5 s bound (upstream_connect_timeout)
            assert!(
                start_wait.elapsed() < Duration::from_secs(3),
                "{}: retained reached {got:?} while the stream flowed",
                upstream.name()
            );
            if let Ok(Some(Got::Msg {
                replica,
                payload,
                retain: true,
            })) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await
            {
                assert_eq!(payload, "auto");
                got[replica] = true;
            }
        }
        stream.abort();
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn v5_replicas_get_each_message_once_and_their_publishes_go_upstream() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};

    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        let mut observer = Client3::connect(app.mqtt_addr, &unique_id("observer"), true);
        observer.subscribe("results/#", QoS::AtLeastOnce).await;
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, String)>();
        let mut clients = Vec::new();
        for n in 0..2 {
            let opts = O5::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
            let (client, mut el) = C5::new(opts, 1000);
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(E5::Incoming(P5::Publish(p))) => {
                            let _ = tx.send((n, String::from_utf8_lossy(&p.payload).into_owned()));
                        }
                        Ok(E5::Incoming(P5::SubAck(_))) => {
                            let _ = tx.send((n, "suback".into()));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send((n, format!("error {e}")));
                            return;
                        }
                    }
                }
            });
            client
                .subscribe("jobs/#", Q5::AtLeastOnce)
                .await
                .expect("queued");
            loop {
                let (_, ev) = tokio::time::timeout(DEADLINE, rx.recv())
                    .await
                    .expect("suback")
                    .expect("open");
                assert!(!ev.starts_with("error"), "{}: {ev}", upstream.name());
                if ev == "suback" {
                    break;
                }
            }
            clients.push((client, task));
        }
        const N: usize = 200;
        publish(&app, "jobs", N).await;
        let mut seen = HashSet::new();
        let mut per = [0usize; 2];
        while seen.len() < N {
            let (n, ev) = tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .expect("message")
                .expect("open");
            assert!(!ev.starts_with("error"), "{}: {ev}", upstream.name());
            assert!(seen.insert(ev), "{}: duplicate", upstream.name());
            per[n] += 1;
        }
        assert!(per.iter().all(|&c| c > 0), "{}: {per:?}", upstream.name());
        // a replica's own publish reaches other clients
        clients[0]
            .0
            .publish("results/1", Q5::AtLeastOnce, false, "done")
            .await
            .expect("queued");
        let got = loop {
            match tokio::time::timeout(DEADLINE, observer.events.recv()).await {
                Ok(Some(Seen::Message(p))) => break p,
                Ok(Some(Seen::Disconnected(e))) => panic!("observer lost: {e}"),
                Ok(Some(_)) => {}
                _ => panic!("{}: replica publish never arrived", upstream.name()),
            }
        };
        assert_eq!(got, b"done");
        for (c, t) in clients {
            let _ = c.disconnect().await;
            t.abort();
        }
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn messages_wait_for_a_replica_and_broadcasts_reach_all() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        // a replica subscribes, then leaves: flowgate keeps the subscription
        let (first, mut rx) = replicas(app.mqtt_addr, &[(Duration::ZERO, true)], "jobs/#").await;
        let _ = first[0].client.disconnect().await;
        eventually("the replica left", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_instance_replicas_connected",
                &[("instance", "line1")],
            ) == 0.0
        })
        .await;
        drop(first);
        while rx.try_recv().is_ok() {}
        // jobs published with no replica wait in flowgate's queue
        const N: usize = 50;
        publish(&app, "jobs", N).await;
        eventually("jobs queued", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_dispatch_queued_messages",
                &[("instance", "line1")],
            ) == N as f64
        })
        .await;
        // one replica comes back: the queued jobs go to it, once each
        let (back, mut rx) = replicas(app.mqtt_addr, &[(Duration::ZERO, true)], "jobs/#").await;
        let per = collect(&mut rx, 1, |p| p[0].len() >= N).await;
        let unique: HashSet<&String> = per.iter().flatten().collect();
        assert_eq!(
            unique.len(),
            N,
            "{}: queued jobs delivered once each",
            upstream.name()
        );
        drop(back);
        // broadcast filters: every subscribed replica gets each message
        let (_reps, mut rx) =
            replicas(app.mqtt_addr, &[(Duration::ZERO, true); 2], "config/#").await;
        publish(&app, "config", 5).await;
        let per = collect(&mut rx, 2, |p| p.iter().all(|m| m.len() >= 5)).await;
        assert!(
            per.iter().all(|m| m.len() == 5),
            "{}: broadcast {per:?}",
            upstream.name()
        );
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn qos2_messages_go_through_once_both_ways() {
    for upstream in Upstream::both().await {
        let app = start(&upstream, "").await;
        let mut observer = Client3::connect(app.mqtt_addr, &unique_id("observer"), true);
        observer.subscribe("results/#", QoS::ExactlyOnce).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = replica(app.mqtt_addr, 0, Duration::ZERO, true, tx);
        r.client
            .subscribe("jobs/#", QoS::ExactlyOnce)
            .await
            .expect("queued");
        loop {
            if let Ok(Some(Got::SubAck(_))) = tokio::time::timeout(DEADLINE, rx.recv()).await {
                break;
            }
        }
        let mut opts = MqttOptions::new("q2-pub", "127.0.0.1", app.mqtt_addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = AsyncClient::new(opts, 100);
        for i in 0..20 {
            c.publish(format!("jobs/{i}"), QoS::ExactlyOnce, false, i.to_string())
                .await
                .expect("queued");
        }
        let pubs = tokio::spawn(async move {
            let mut done = 0;
            while done < 20 {
                if let Ok(Event::Incoming(Packet::PubComp(_))) = el.poll().await {
                    done += 1;
                }
            }
        });
        let per = collect(&mut rx, 1, |p| p[0].len() >= 20).await;
        tokio::time::timeout(DEADLINE, pubs)
            .await
            .expect("publisher completes")
            .expect("task");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut all = per[0].clone();
        while let Ok(Got::Msg { payload, .. }) = rx.try_recv() {
            all.push(payload);
        }
        assert_eq!(
            all.len(),
            20,
            "{}: each QoS 2 message once",
            upstream.name()
        );
        // and a replica's QoS 2 publish reaches the observer once
        r.client
            .publish("results/x", QoS::ExactlyOnce, false, "ok")
            .await
            .expect("queued");
        let mut got = 0;
        let start_wait = Instant::now();
        while start_wait.elapsed() < Duration::from_millis(1500) {
            if let Ok(Some(Seen::Message(p))) =
                tokio::time::timeout(Duration::from_millis(100), observer.events.recv()).await
            {
                assert_eq!(p, b"ok");
                got += 1;
            }
        }
        assert_eq!(got, 1, "{}: replica QoS 2 publish", upstream.name());
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn two_flowgate_nodes_with_upstream_share_split_one_instance() {
    let broker = Mosquitto::start().await;
    let mut apps = Vec::new();
    for node in ["fga", "fgb"] {
        let text = format!(
            "node_id = \"{node}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"mqtt://{}\"\nmode = \"dispatch\"\nupstream_share = true\n[[instance]]\nname = \"line1\"\n\
             match = {{ client_id = \"line1-nodered\" }}\n",
            broker.addr
        );
        apps.push(
            App::start(Config::parse(&text, "test").expect("valid"))
                .await
                .expect("starts"),
        );
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reps = Vec::new();
    for (n, app) in apps.iter().enumerate() {
        let r = replica(app.mqtt_addr, n, Duration::ZERO, true, tx.clone());
        r.client
            .subscribe("jobs/#", QoS::AtLeastOnce)
            .await
            .expect("queued");
        loop {
            if let Ok(Some(Got::SubAck(m))) = tokio::time::timeout(DEADLINE, rx.recv()).await {
                if m == n {
                    break;
                }
            }
        }
        reps.push(r);
    }
    const N: usize = 400;
    publish_numbered(broker.addr, "jobs", N).await;
    let per = collect(&mut rx, 2, |p| p.iter().map(Vec::len).sum::<usize>() >= N).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut all: Vec<String> = per.iter().flatten().cloned().collect();
    while let Ok(Got::Msg { payload, .. }) = rx.try_recv() {
        all.push(payload);
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(
        (all.len(), unique.len()),
        (N, N),
        "each job once across both nodes"
    );
    assert!(
        per.iter().all(|p| p.len() * 10 >= N * 3),
        "both nodes took a share: {:?}",
        per.iter().map(Vec::len).collect::<Vec<_>>()
    );
    for app in apps {
        app.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn the_instance_acl_refuses_subscriptions_and_publishes_with_the_right_codes() {
    let app = start(
        &Upstream::Embedded,
        "acl = { publish = [\"replies/#\"], subscribe = [\"jobs/#\", \"config/#\"] }",
    )
    .await;
    // an outside observer sees what reaches the broker
    let mut observer = Client3::connect(app.mqtt_addr, &unique_id("observer"), true);
    observer.subscribe("#", QoS::AtLeastOnce).await;

    // 3.1.1 replica: SUBACK carries a failure for the filter outside the acl
    let mut opts = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("jobs/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("secret/#".into(), QoS::AtLeastOnce),
        ])
        .await
        .expect("queued");
    client
        .publish("secret/x", QoS::AtLeastOnce, false, "no")
        .await
        .expect("queued");
    client
        .publish("replies/x", QoS::AtLeastOnce, false, "yes")
        .await
        .expect("queued");
    let (mut suback, mut acks) = (None, 0);
    let start = Instant::now();
    while suback.is_none() || acks < 2 {
        assert!(start.elapsed() < DEADLINE, "no SUBACK or PUBACKs");
        match tokio::time::timeout(DEADLINE, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(s)))) => suback = Some(s.return_codes),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("replica connection: {other:?}"),
        }
    }
    assert_eq!(
        suback.expect("suback"),
        vec![
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure
        ]
    );
    // the allowed publish reaches the broker, the refused one never does
    let start = Instant::now();
    loop {
        match tokio::time::timeout(DEADLINE, observer.events.recv()).await {
            Ok(Some(Seen::Message(m))) => {
                assert_ne!(m, b"no", "a refused publish reached the broker");
                if m == b"yes" {
                    break;
                }
            }
            Ok(Some(_)) => {}
            _ => panic!("the allowed publish never arrived"),
        }
        assert!(start.elapsed() < DEADLINE);
    }

    // 5.0 replica: PUBACK says "not authorized"
    let mut opts5 =
        rumqttc::v5::MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
    opts5.set_keep_alive(Duration::from_secs(30));
    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(opts5, 100);
    c5.publish(
        "secret/y",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "no",
    )
    .await
    .expect("queued");
    let reason = loop {
        match tokio::time::timeout(DEADLINE, el5.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(a)))) => {
                break a.reason
            }
            Ok(Ok(_)) => {}
            other => panic!("v5 replica: {other:?}"),
        }
    };
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(&m, "flowgate_acl_denied_total", &[("kind", "publish")]),
        2.0
    );
    assert_eq!(
        metric_sum(&m, "flowgate_acl_denied_total", &[("kind", "subscribe")]),
        1.0
    );
    app.shutdown(Duration::from_secs(2)).await;
}

/// A replica through flowgate that publishes on `out/q{qos}` until `stop`:
/// QoS 0 as fast as it can, QoS 1 at 50/s. Reports what it published (QoS 1
/// payloads) and the PUBACKs it got.
fn publishing_replica(
    addr: SocketAddr,
    qos: QoS,
    stop: tokio_util::sync::CancellationToken,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
    mpsc::UnboundedReceiver<String>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut opts = MqttOptions::new("line1-nodered", "127.0.0.1", addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let acked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let polling = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    let tag = free_port();
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0u64.. {
            if qos == QoS::AtLeastOnce {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
            } else if stop.is_cancelled() {
                break;
            }
            let payload = format!("{tag}-{seq}");
            let topic = if qos == QoS::AtMostOnce {
                "out/q0"
            } else {
                "out/q1"
            };
            tokio::select! {
                () = stop.cancelled() => break,
                r = client.publish(topic, qos, false, payload.clone()) => r.expect("queued"),
            }
            if qos == QoS::AtLeastOnce {
                let _ = sent_tx.send(payload);
            }
        }
    });
    (polling, publishing, sent_rx, acked)
}

#[tokio::test]
async fn a_12_s_broker_outage_loses_no_acknowledged_publish_and_leaves_no_replica_waiting() {
    const OUTAGE: Duration = Duration::from_secs(12);
    init_logs();
    let mut broker = Mosquitto::start_persistent("outage").await;
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://{}\"\nmode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n",
        broker.addr
    );
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    // what the replicas publish, seen by a session on the broker itself that
    // outlives the outage
    let mut opts = MqttOptions::new(unique_id("observer"), "127.0.0.1", broker.addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    let (observer, mut observer_el) = AsyncClient::new(opts, 100);
    observer
        .subscribe("out/#", QoS::AtLeastOnce)
        .await
        .expect("queued");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let observing = tokio::spawn(async move {
        loop {
            match observer_el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = seen_tx.send((p.qos, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = seen_tx.send((QoS::ExactlyOnce, String::new()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let (qos, _) = tokio::time::timeout(DEADLINE, seen_rx.recv())
        .await
        .expect("the observer's SUBACK")
        .expect("observer alive");
    assert_eq!(qos, QoS::ExactlyOnce, "SUBACK first");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut replicas = Vec::new();
    for qos in [
        QoS::AtMostOnce,
        QoS::AtMostOnce,
        QoS::AtLeastOnce,
        QoS::AtLeastOnce,
    ] {
        replicas.push(publishing_replica(app.mqtt_addr, qos, stop.clone()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.stop();
    let outage = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    broker.start_again().await;
    eprintln!("broker out for {:?}", outage.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    // every QoS 1 publish a replica made, and whether it was acknowledged
    let mut sent = HashSet::new();
    let mut waiting = Vec::new();
    for (polling, publishing, mut sent_rx, acked) in replicas {
        publishing.await.expect("publisher ends");
        let mut mine = 0;
        while let Ok(p) = sent_rx.try_recv() {
            sent.insert(p);
            mine += 1;
        }
        let start = Instant::now();
        while acked.load(std::sync::atomic::Ordering::Relaxed) < mine && start.elapsed() < DEADLINE
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = acked.load(std::sync::atomic::Ordering::Relaxed);
        if got < mine {
            waiting.push(format!("{got} of {mine}"));
        }
        polling.abort();
    }
    assert!(
        waiting.is_empty(),
        "replicas left waiting for PUBACKs (acked of sent): {waiting:?}"
    );
    let (mut q0, mut q1) = (0usize, HashSet::new());
    let start = Instant::now();
    while q1.len() < sent.len() && start.elapsed() < DEADLINE {
        match tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await {
            Ok(Some((QoS::AtMostOnce, _))) => q0 += 1,
            Ok(Some((_, p))) => {
                q1.insert(p);
            }
            _ => {}
        }
    }
    let lost: Vec<&String> = sent.difference(&q1).collect();
    eprintln!(
        "outage: {} QoS 1 publishes acknowledged, {} lost; {q0} QoS 0 delivered",
        sent.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // 2 replicas at 50/s with the broker up for 4 s, and what they could
    // send while it was down
    assert!(sent.len() > 300, "QoS 1 publishes: {}", sent.len());
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_mqtt_errors_total",
            &[("kind", "upstream_backlog")]
        ),
        0.0
    );
    observing.abort();
    app.shutdown(Duration::from_secs(2)).await;
}
