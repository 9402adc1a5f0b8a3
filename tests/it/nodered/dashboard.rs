//! Dashboard 2.0 (`@flowfuse/node-red-dashboard` 1.31) on two real Node-RED
//! 4.1 replicas behind flowgate, open in Debian's headless chromium: the page
//! loads through the public listener, stays live over socket.io, and when the
//! replica it is on dies it goes on updating from the other.

use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

use super::*;

/// A dashboard page with one `ui-text` showing what the replica it is on
/// got last on `ui/value`: "from {REPLICA} #{n}", and one counting the
/// results of jobs: a job (`jobs/{id}`, dispatched: one replica does it)
/// publishes `done/{id}`; `ui/#` and `done/#` are broadcast, so every
/// replica's widgets see every value and every result.
fn flows() -> String {
    r##"[
{"id":"t1","type":"tab","label":"dashboard"},
{"id":"mb1","type":"mqtt-broker","name":"flowgate","broker":"${MQTT_HOST}","port":"${MQTT_PORT}","clientid":"line1-nodered","autoConnect":true,"usetls":false,"protocolVersion":"4","keepalive":"60","cleansession":true,"autoUnsubscribe":true,"birthTopic":"","birthQos":"0","birthPayload":"","birthMsg":{},"closeTopic":"","closeQos":"0","closePayload":"","closeMsg":{},"willTopic":"","willQos":"0","willPayload":"","willMsg":{},"userProps":"","sessionExpiry":""},
{"id":"mi1","type":"mqtt in","z":"t1","name":"values","topic":"ui/value","qos":"1","datatype":"utf8","broker":"mb1","nl":false,"rap":true,"rh":0,"inputs":0,"wires":[["fn1"]]},
{"id":"fn1","type":"function","z":"t1","func":"msg.payload = 'from ' + env.get('REPLICA') + ' #' + msg.payload;\nreturn msg;","outputs":1,"wires":[["ux1"]]},
{"id":"ub1","type":"ui-base","name":"UI","path":"/dashboard","includeClientData":true,"acceptsClientConfig":["ui-notification","ui-control"],"showPathInSidebar":false,"navigationStyle":"default","titleBarStyle":"default"},
{"id":"uth","type":"ui-theme","name":"Default","colors":{"surface":"#ffffff","primary":"#0094CE","bgPage":"#eeeeee","groupBg":"#ffffff","groupOutline":"#cccccc"},"sizes":{"density":"default","pagePadding":"12px","groupGap":"12px","groupBorderRadius":"4px","widgetGap":"12px"}},
{"id":"up1","type":"ui-page","name":"Line 1","ui":"ub1","path":"/line1","icon":"home","layout":"grid","theme":"uth","order":1,"className":"","visible":"true","disabled":"false"},
{"id":"ug1","type":"ui-group","name":"Live","page":"up1","width":"6","height":"1","order":1,"showTitle":true,"className":"","visible":"true","disabled":"false","groupType":"default"},
{"id":"ux1","type":"ui-text","z":"t1","group":"ug1","order":1,"width":0,"height":0,"name":"","label":"value","format":"{{msg.payload}}","layout":"row-spread","style":false,"font":"","fontSize":16,"color":"#717171","className":"","wires":[]},
{"id":"mi2","type":"mqtt in","z":"t1","name":"jobs","topic":"jobs/#","qos":"1","datatype":"utf8","broker":"mb1","nl":false,"rap":true,"rh":0,"inputs":0,"wires":[["fn2"]]},
{"id":"fn2","type":"function","z":"t1","func":"msg.topic = 'done/' + msg.topic.split('/')[1];\nmsg.payload = env.get('REPLICA');\nreturn msg;","outputs":1,"wires":[["mo2"]]},
{"id":"mo2","type":"mqtt out","z":"t1","name":"done","topic":"","qos":"1","retain":"false","broker":"mb1","wires":[]},
{"id":"mi3","type":"mqtt in","z":"t1","name":"results","topic":"done/#","qos":"1","datatype":"utf8","broker":"mb1","nl":false,"rap":true,"rh":0,"inputs":0,"wires":[["fn3"]]},
{"id":"fn3","type":"function","z":"t1","func":"const seen = context.get('seen') || {};\nseen[msg.topic] = true;\ncontext.set('seen', seen);\nmsg.payload = 'results ' + Object.keys(seen).length;\nreturn msg;","outputs":1,"wires":[["ux2"]]},
{"id":"ux2","type":"ui-text","z":"t1","group":"ug1","order":2,"width":0,"height":0,"name":"","label":"jobs","format":"{{msg.payload}}","layout":"row-spread","style":false,"font":"","fontSize":16,"color":"#717171","className":"","wires":[]}
]"##
    .to_string()
}

/// "from {replica} #{n}" in the page's text.
fn shown(text: &str) -> Option<(String, u64)> {
    let at = text.find("from ")?;
    let mut words = text[at + 5..].split_whitespace();
    let replica = words.next()?.to_string();
    let n = words.next()?.strip_prefix('#')?.parse().ok()?;
    Some((replica, n))
}

/// The driver's next line, as JSON; panics at the deadline.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> serde_json::Value {
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the page driver reports within the deadline")
        .expect("reads")
        .expect("the page driver is running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// The next value the page shows: (replica, n, ms since the driver started).
async fn next_shown(lines: &mut Lines<BufReader<ChildStdout>>) -> (String, u64, u64) {
    loop {
        let v = next_line(lines).await;
        assert!(v["done"].is_null(), "the driver stopped: {v}");
        if let Some((replica, n)) = shown(v["text"].as_str().unwrap_or_default()) {
            return (replica, n, v["t"].as_u64().unwrap_or_default());
        }
    }
}

/// `tests/node/dashboard_page.mjs` on `url`, saving `shot`, with a cookie set
/// first when given; its reports come line by line.
struct Page {
    driver: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Page {
    fn open(url: &str, shot: &str, cookie: Option<&str>) -> Self {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut driver = Command::new("node")
            .arg(root().join("tests/node/dashboard_page.mjs"))
            .arg(url)
            .arg(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(shot))
            .args(cookie)
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let lines = BufReader::new(driver.stdout.take().expect("piped")).lines();
        Self { driver, lines }
    }

    /// Closes the page: its last report (`errors`, `failed`, `transports`).
    async fn close(mut self) -> serde_json::Value {
        drop(self.driver.stdin.take());
        loop {
            let v = next_line(&mut self.lines).await;
            if v["done"] == true {
                return v;
            }
        }
    }
}

/// Publishes `ui/value` 0, 1, 2, ... every 100 ms until aborted.
async fn feed(addr: SocketAddr) {
    let opts = rumqttc::MqttOptions::new("dashboard-feed", addr.ip().to_string(), addr.port());
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for n in 0u64.. {
        let _ = client
            .publish("ui/value", rumqttc::QoS::AtLeastOnce, false, n.to_string())
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_dashboard_page_goes_on_updating_when_its_replica_dies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no chromium at {chromium}: `apt-get install chromium` (bash .ci/run does) or set CHROMIUM"
    );
    init_logs();
    let text =
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
                mode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
                match = { client_id = \"line1-nodered\" }\nbroadcast = [\"ui/#\", \"done/#\"]\n";
    let bridge = App::start(Config::parse(text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let mut reps = Vec::new();
    for i in 1..=2 {
        let name = format!("r{i}");
        reps.push(NodeRed::start_with(&name, bridge.mqtt_addr, free_port(), &flows(), true).await);
    }
    replicas_connected(&bridge, 2).await;
    let behind: Vec<&NodeRed> = reps.iter().collect();
    let web = flowgate_for("mqtt://127.0.0.1:1", "share", &behind).await;
    let feeding = tokio::spawn(feed(bridge.mqtt_addr));

    let url = format!("http://{}/dashboard/line1", web.http_addrs[0].1);
    let mut page = Page::open(&url, "dashboard.png", None);
    let lines = &mut page.lines;

    // the page is live: two values from one replica
    let (first, n1, _) = next_shown(lines).await;
    let (on, n2, _) = next_shown(lines).await;
    assert_eq!(on, first, "the page moved before any replica died");
    assert!(n2 > n1, "{n1} then {n2}");
    // the replica the page is on dies
    let i = reps
        .iter()
        .position(|r| r.name == on)
        .unwrap_or_else(|| panic!("the page shows replica {on}"));
    let killed = Instant::now();
    reps[i].kill().await;
    let (other, n3, _) = loop {
        let (replica, n, t) = next_shown(lines).await;
        if replica != on {
            break (replica, n, t);
        }
    };
    let gap = killed.elapsed();
    eprintln!("the page showed {other} #{n3} {gap:?} after {on} was killed");
    assert!(n3 > n2);
    assert!(
        gap < Duration::from_secs(2),
        "the page went on after {gap:?}"
    );
    // and goes on
    let (still, n4, _) = next_shown(lines).await;
    assert_eq!(still, other);
    assert!(n4 > n3);

    let done = page.close().await;
    let errors: Vec<String> = done["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "console while the replica died: {errors:?}; failed requests: {}",
        done["failed"]
    );
    assert!(errors.is_empty(), "{errors:?}");
    // socket.io's handshake over long polling, then its WebSocket, both
    // through flowgate
    assert_eq!(
        done["transports"],
        serde_json::json!(["polling", "websocket"]),
        "{done}"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");

    // results of jobs done on either replica reach every replica's page:
    // the killed replica back, 20 jobs, each page pinned to one replica
    reps[i].spawn().await;
    replicas_connected(&bridge, 2).await;
    publish_numbered(bridge.mqtt_addr, "jobs", 20).await;
    for (r, rep) in reps.iter().enumerate() {
        let cookie = format!("flowgate_line1=r{r}");
        let mut page = Page::open(&url, &format!("dashboard-r{r}.png"), Some(&cookie));
        let expected = rep.name.clone();
        let start = Instant::now();
        loop {
            let v = next_line(&mut page.lines).await;
            assert!(v["done"].is_null(), "the driver stopped: {v}");
            let text = v["text"].as_str().unwrap_or_default();
            assert!(
                start.elapsed() < DEADLINE,
                "the page on {expected} never showed 20 results: {text}"
            );
            if text.contains("results 20") && shown(text).is_some_and(|(on, _)| on == expected) {
                break;
            }
        }
        let done = page.close().await;
        assert_eq!(done["errors"], serde_json::json!([]), "page on {expected}");
    }

    feeding.abort();
    web.shutdown(Duration::from_secs(2)).await;
    bridge.shutdown(Duration::from_secs(2)).await;
    drop(reps);
}
