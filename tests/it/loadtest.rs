//! `flowgate loadtest` (the real binary) against replicas capped at 10 per
//! second behind flowgate: 1 and 2 replicas give about 1x and 2x, each with
//! its share, for HTTP and for MQTT in dispatch mode.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flowgate::app::App;
use flowgate::config::Config;
use flowgate::loadtest::Report;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::http::{balancer, Replica};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// Runs `flowgate loadtest ...args --out DIR` (the real binary), checks it
/// printed its table and wrote its chart, and reads the report it wrote.
pub(crate) async fn loadtest(tag: &str, args: Vec<String>) -> Report {
    let dir = temp_dir(tag);
    let out = tokio::process::Command::new(BIN)
        .arg("loadtest")
        .args(args)
        .arg("--out")
        .arg(&dir)
        .kill_on_drop(true)
        .output()
        .await
        .expect("flowgate loadtest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadtest {tag} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("achieved/s"), "no table printed:\n{stdout}");
    let svg = std::fs::read_to_string(dir.join("report.svg")).expect("report.svg written");
    assert!(svg.starts_with("<svg") && svg.contains("replica"), "{svg}");
    read_report(&dir.join("report.json"))
}

/// Owned arguments for a command line.
pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn read_report(path: &Path) -> Report {
    let text = std::fs::read_to_string(path).expect("report.json written");
    serde_json::from_str(&text).expect("report.json parses")
}

/// The one step's achieved rate, and each replica's share of it.
fn achieved(report: &Report) -> (f64, Vec<(String, f64)>) {
    let step = &report.steps[0];
    let shares = step
        .replicas
        .iter()
        .map(|(name, s)| (name.clone(), s.share))
        .collect();
    (step.achieved_rate, shares)
}

fn assert_scales(kind: &str, one: (f64, Vec<(String, f64)>), two: (f64, Vec<(String, f64)>)) {
    assert!(
        (8.5..=11.5).contains(&one.0),
        "{kind}: one replica capped at 10/s achieved {:.1}/s",
        one.0
    );
    let ratio = two.0 / one.0;
    assert!(
        (1.8..=2.2).contains(&ratio),
        "{kind}: 2 replicas achieved {:.1}/s, {ratio:.2}x of one ({:.1}/s)",
        two.0,
        one.0
    );
    assert_eq!(one.1.len(), 1, "{kind}: {:?}", one.1);
    assert_eq!(two.1.len(), 2, "{kind}: {:?}", two.1);
    for (name, share) in &two.1 {
        assert!(
            (0.4..=0.6).contains(share),
            "{kind}: replica {name} has {:.0}% of 2",
            share * 100.0
        );
    }
}

#[tokio::test]
async fn loadtest_http_shows_two_capped_replicas_doing_twice_the_work() {
    let mut results = Vec::new();
    for n in [1usize, 2] {
        let mut reps = Vec::new();
        for i in 0..n {
            reps.push(Replica::start(&format!("r{i}"), 0).await);
        }
        let refs: Vec<&Replica> = reps.iter().collect();
        let (app, addr) = balancer(&refs, "").await;
        let url = format!("http://{addr}/api");
        let report = loadtest(
            &format!("lt-http-{n}"),
            strings(&["http", "--url", &url, "--ramp", "25", "--step", "3s"]),
        )
        .await;
        assert_eq!(report.kind, "http");
        assert_eq!(report.steps[0].target_rate, 25.0);
        assert!(report.steps[0].latency_ms.is_some());
        assert_eq!(report.timeline.len(), 3);
        results.push(achieved(&report));
        app.shutdown(Duration::from_secs(2)).await;
        for r in &reps {
            r.kill();
        }
    }
    let two = results.pop().expect("two");
    let one = results.pop().expect("one");
    assert_scales("http", one, two);
}

/// A replica whose flow handles 10 messages/s at most: each job is answered
/// on `replies` with its `seq` and the replica's name, then acknowledged.
fn capped_replica(addr: SocketAddr, name: &str) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("line1-nodered", addr.ip().to_string(), addr.port());
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let (work_tx, mut work_rx) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let worker = client.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        while let Some(p) = work_rx.recv().await {
            next = next.max(tokio::time::Instant::now());
            tokio::time::sleep_until(next).await;
            next += Duration::from_millis(100);
            let Ok(job) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                continue;
            };
            let reply = serde_json::json!({ "seq": job["seq"], "replica": name });
            let _ = worker
                .publish("replies", QoS::AtLeastOnce, false, reply.to_string())
                .await;
            let _ = worker.ack(&p).await;
        }
    });
    let task = tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = work_tx.send(p);
            }
        }
    });
    (client, task)
}

async fn dispatch_flowgate() -> App {
    init_logs();
    let text =
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
                upstream = \"embedded\"\nmode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
                match = { client_id = \"line1-nodered\" }\n";
    App::start(Config::parse(text, "test").expect("valid config"))
        .await
        .expect("flowgate starts")
}

#[tokio::test]
async fn loadtest_mqtt_shows_two_capped_replicas_doing_twice_the_work_in_dispatch_mode() {
    let mut results = Vec::new();
    for n in [1usize, 2] {
        let app = dispatch_flowgate().await;
        let admin = format!("http://{}", app.admin_addr);
        let mut reps = Vec::new();
        for i in 0..n {
            let (client, task) = capped_replica(app.mqtt_addr, &format!("r{i}"));
            client
                .subscribe("jobs/#", QoS::AtLeastOnce)
                .await
                .expect("subscribe queued");
            reps.push((client, task));
        }
        // wait until flowgate shows every replica connected and subscribed
        let start = Instant::now();
        loop {
            let (_, body) = http_get(app.admin_addr, "/api/instances").await;
            let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
            if doc["instances"][0]["replicas_connected"] == n {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "replicas did not connect: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let broker = app.mqtt_addr.to_string();
        let report = loadtest(
            &format!("lt-mqtt-{n}"),
            strings(&[
                "mqtt",
                "--broker",
                &broker,
                "--topic",
                "jobs/{seq}",
                "--qos",
                "1",
                "--reply-topic",
                "replies",
                "--admin",
                &admin,
                "--ramp",
                "25",
                "--step",
                "3s",
            ]),
        )
        .await;
        assert_eq!(report.kind, "mqtt");
        assert_eq!(report.replica_source, "reply:replies");
        results.push(achieved(&report));
        for (client, task) in reps {
            let _ = client.disconnect().await;
            task.abort();
        }
        app.shutdown(Duration::from_secs(2)).await;
    }
    let two = results.pop().expect("two");
    let one = results.pop().expect("one");
    assert_scales("mqtt", one, two);
}
