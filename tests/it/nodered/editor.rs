//! The editor of an HA instance through flowgate's editor listener, with
//! three real Node-RED 4.1 replicas under load: the login, reads from one
//! replica, Deploy rolled out to every replica with no failed call and no
//! lost or duplicated job, a stale `rev` (409), a node type no replica has
//! (refused, nothing changed), bad bodies, and the debug messages of every
//! replica on the editor's one `/comms` socket.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::*;

/// An inject node ticking every 300 ms into a debug node, on the example's tab.
const TICKS: &str = r#"{"id":"a1f0c0de00000030","type":"inject","z":"a1f0c0de00000001","name":"tick","props":[{"p":"payload"}],"repeat":"0.3","crontab":"","once":true,"onceDelay":"0.1","topic":"","payload":"","payloadType":"date","x":120,"y":300,"wires":[["a1f0c0de00000031"]]},
{"id":"a1f0c0de00000031","type":"debug","z":"a1f0c0de00000001","name":"ticks","active":true,"tosidebar":true,"console":false,"tostatus":false,"complete":"payload","targetType":"msg","statusVal":"","statusType":"auto","x":320,"y":300,"wires":[]}"#;

/// One request to the editor listener: (status, body).
async fn call(
    editor: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut all = headers.to_vec();
    if let Some(b) = &bearer {
        all.push(("authorization", b.as_str()));
    }
    let (status, _, _, body) = crate::http::request(editor, method, path, &all, body.into())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Deploys `flows` over `rev` as the editor does (API v2, a full deploy).
async fn deploy_v2(editor: SocketAddr, token: &str, flows: &Value, rev: &str) -> (u16, String) {
    let body = json!({ "flows": flows, "rev": rev }).to_string();
    call(
        editor,
        "POST",
        "/flows",
        Some(token),
        &[
            ("content-type", "application/json"),
            ("Node-RED-API-Version", "v2"),
            ("Node-RED-Deployment-Type", "full"),
        ],
        body,
    )
    .await
}

async fn login(editor: SocketAddr, user: &str, password: &str) -> (u16, String) {
    call(
        editor,
        "POST",
        "/auth/token",
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("client_id=node-red-editor&grant_type=password&scope=&username={user}&password={password}"),
    )
    .await
}

/// A node package with one node type, `fgtest`, packed as npm packs it.
fn node_package(dir: &std::path::Path) -> std::path::PathBuf {
    let pkg = dir.join("pkg/package");
    std::fs::create_dir_all(&pkg).expect("package dir");
    std::fs::write(
        pkg.join("package.json"),
        r#"{"name":"node-red-contrib-fgtest","version":"1.0.0","node-red":{"nodes":{"fgtest":"fgtest.js"}}}"#,
    )
    .expect("package.json");
    std::fs::write(
        pkg.join("fgtest.js"),
        "module.exports = function (RED) {\n  function F(c) { RED.nodes.createNode(this, c); this.on('input', (m, send, done) => { send(m); done(); }); }\n  RED.nodes.registerType('fgtest', F);\n};\n",
    )
    .expect("fgtest.js");
    std::fs::write(
        pkg.join("fgtest.html"),
        "<script type=\"text/javascript\">RED.nodes.registerType('fgtest',{category:'function',color:'#a6bbcf',defaults:{name:{value:''}},inputs:1,outputs:1,label:function(){return this.name||'fgtest';}});</script>\n<script type=\"text/html\" data-template-name=\"fgtest\"><div class=\"form-row\"><input type=\"text\" id=\"node-input-name\"></div></script>\n",
    )
    .expect("fgtest.html");
    let tgz = dir.join("node-red-contrib-fgtest-1.0.0.tgz");
    let ok = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(dir.join("pkg"))
        .arg("package")
        .status()
        .expect("tar runs");
    assert!(ok.success(), "tar made the package");
    tgz
}

/// A Node-RED 4.1 or 5.0 replica running `flows`.
async fn replica(v5: bool, name: &str, mqtt: SocketAddr, port: u16, flows: &str) -> NodeRed {
    if v5 {
        NodeRed::start_v5(name, mqtt, port, flows).await
    } else {
        NodeRed::start_with(name, mqtt, port, flows, false).await
    }
}

fn example_flows() -> String {
    std::fs::read_to_string(root().join("deploy/examples/nodered-ha/flows.json"))
        .expect("example flows")
}

#[tokio::test]
async fn deploy_in_the_editor_reaches_every_nodered5_replica_and_loses_nothing() {
    editor_api(true).await;
}

/// The editor's API through flowgate (Node-RED 5.0 replicas; the page test
/// runs on 4.1 and 5.0).
async fn editor_api(v5: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("editor");
    let users = dir.join("editors");
    flowgate::mqtt::auth::set_user(&users, "ann", b"s3cret!").expect("password file");
    let ports = [free_port(), free_port(), free_port()];
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let config = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [{}]\nhealth_interval = \"200ms\"\nrev_interval = \"200ms\"\n\
         [instance.editor]\nlisten = \"127.0.0.1:0\"\npassword_file = \"{}\"\nmax_body = \"5MiB\"\n",
        list.join(", "),
        users.display()
    );
    init_logs();
    let app = App::start(Config::parse(&config, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let editor = app.editor_addrs[0].1;
    let flows = example_flows();
    let mut reps = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        reps.push(replica(v5, &format!("r{}", i + 1), app.mqtt_addr, *port, &flows).await);
    }
    replicas_connected(&app, 3).await;
    eventually("every HTTP replica is up", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_replica_up", &[("instance", "line1")]) == 3.0
    })
    .await;
    public_routes_read(&app).await;

    // the login, as the editor's login screen does it
    let (status, prompts) = call(editor, "GET", "/auth/login", None, &[], "").await;
    assert_eq!(status, 200);
    assert!(prompts.contains("\"credentials\""), "{prompts}");
    let (status, _) = call(editor, "GET", "/flows", None, &[], "").await;
    assert_eq!(status, 401, "the flows without a login");
    let (status, page) = call(editor, "GET", "/", None, &[], "").await;
    assert_eq!(status, 200, "the editor's page loads before the login");
    assert!(page.contains("Node-RED"), "{page}");
    assert_eq!(login(editor, "ann", "wrong").await.0, 401);
    assert_eq!(login(editor, "bob", "s3cret!").await.0, 401);
    let (status, token) = login(editor, "ann", "s3cret%21").await;
    assert_eq!(status, 200, "{token}");
    let token: Value = serde_json::from_str(&token).expect("token JSON");
    let token = token["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let (status, settings) = call(editor, "GET", "/settings", Some(&token), &[], "").await;
    assert_eq!(status, 200);
    let settings: Value = serde_json::from_str(&settings).expect("settings JSON");
    assert_eq!(
        settings["user"]["username"], "ann",
        "the editor shows who is logged in"
    );

    let (status, current) = call(
        editor,
        "GET",
        "/flows",
        Some(&token),
        &[("Node-RED-API-Version", "v2")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{current}");
    let current: Value = serde_json::from_str(&current).expect("flows JSON");
    let old_rev = current["rev"].as_str().expect("rev").to_string();
    let mut flows = current["flows"].as_array().expect("flows").clone();
    flows.extend(serde_json::from_str::<Vec<Value>>(&format!("[{TICKS}]")).expect("tick nodes"));
    let flows = Value::Array(flows);

    // the editor's socket, logged in and subscribed to the debug messages
    let tcp = tokio::net::TcpStream::connect(editor)
        .await
        .expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{editor}/comms"), tcp)
        .await
        .expect("comms socket");
    ws.send(Message::text(json!({ "auth": token }).to_string()))
        .await
        .expect("auth sent");
    let ack = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer to the login")
        .expect("socket open")
        .expect("a message");
    assert_eq!(ack.to_text().unwrap_or(""), r#"{"auth":"ok"}"#);
    ws.send(Message::text(r#"{"subscribe":"debug"}"#))
        .await
        .expect("subscribed");

    // Deploy under steady load
    let mqtt = app.mqtt_addr;
    let url = format!("http://{}/api", app.http_addrs[0].1);
    let jobs = tokio::spawn(loadtest("nr-editor-mqtt", mqtt_args(mqtt, "8", "20s")));
    let http_args = strings(&["http", "--url", &url, "--ramp", "8", "--step", "20s"]);
    let calls = tokio::spawn(loadtest("nr-editor-http", http_args));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let clicked = Instant::now();
    let (status, answer) = deploy_v2(editor, &token, &flows, &old_rev).await;
    let took = clicked.elapsed();
    assert_eq!(status, 200, "Deploy failed: {answer}");
    let answer: Value = serde_json::from_str(&answer).expect("Node-RED's answer shape");
    let new_rev = answer["rev"]
        .as_str()
        .expect("rev in the answer")
        .to_string();
    assert_ne!(new_rev, old_rev);
    for r in &reps {
        assert_eq!(rev_of(r).await, new_rev, "{} runs the new flows", r.name);
    }
    eprintln!(
        "Deploy to 3 Node-RED {} replicas answered in {took:?}",
        if v5 { 5 } else { 4 }
    );
    let jobs = jobs.await.expect("mqtt loadtest");
    let calls = calls.await.expect("http loadtest");
    for (what, r) in [("jobs", &jobs), ("calls", &calls)] {
        let t = &r.totals;
        assert_eq!(
            (t.ok, t.errors, t.duplicates),
            (t.sent, 0, 0),
            "{what} during the deploy: {t:?}\n{}",
            r.table()
        );
    }

    // the debug sidebar: every replica's ticks, each named after its replica
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 3 && Instant::now() < deadline {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await else {
            continue;
        };
        let Ok(Value::Array(batch)) = serde_json::from_str::<Value>(m.to_text().unwrap_or(""))
        else {
            continue;
        };
        for item in batch.iter().filter(|i| i["topic"] == "debug") {
            if let Some(name) = item["data"]["name"].as_str() {
                seen.insert(name.to_string());
            }
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            "ticks · replica 0",
            "ticks · replica 1",
            "ticks · replica 2"
        ],
        "the debug messages of every replica on the editor's socket"
    );

    // the same Deploy again over the old rev: Node-RED's 409
    let (status, answer) = deploy_v2(editor, &token, &flows, &old_rev).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("version_mismatch"), "{answer}");

    // a node type no replica has: refused before any replica changed
    let mut broken = flows.as_array().expect("flows").clone();
    broken.push(json!({"id": "b0rken000000001", "type": "no-such-node", "z": "a1f0c0de00000001", "wires": []}));
    let (status, answer) = deploy_v2(editor, &token, &Value::Array(broken), &new_rev).await;
    assert_eq!(status, 400, "{answer}");
    let message = serde_json::from_str::<Value>(&answer).expect("error JSON")["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("no-such-node"), "{message}");
    for r in &reps {
        assert_eq!(rev_of(r).await, new_rev, "{} kept its flows", r.name);
    }

    // bad bodies: a clear error each, nothing deployed
    let (status, answer) = call(
        editor,
        "POST",
        "/flows",
        Some(&token),
        &[
            ("content-type", "application/json"),
            ("Node-RED-API-Version", "v2"),
        ],
        "{not json",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not JSON"), "{answer}");
    let huge = vec![b' '; 50 << 20];
    let (status, answer) = call(
        editor,
        "POST",
        "/flows",
        Some(&token),
        &[
            ("content-type", "application/json"),
            ("Node-RED-API-Version", "v2"),
        ],
        huge,
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    let (status, _) = deploy_v2(editor, "not-a-token", &flows, &new_rev).await;
    assert_eq!(status, 401);
    for r in &reps {
        assert_eq!(rev_of(r).await, new_rev, "{} kept its flows", r.name);
    }

    // the palette: a node package (a tarball made here) installed through
    // the editor reaches every replica; one that cannot install changes none
    let tgz = node_package(&dir);
    let install = |url: String| {
        let body = json!({ "module": "node-red-contrib-fgtest", "url": url }).to_string();
        let token = token.clone();
        async move {
            let headers = [("content-type", "application/json")];
            call(editor, "POST", "/nodes", Some(&token), &headers, body).await
        }
    };
    let (status, answer) = install(dir.join("missing.tgz").display().to_string()).await;
    assert!(status >= 400, "{status} {answer}");
    assert!(answer.contains("no replica changed"), "{answer}");
    let (status, answer) = install(tgz.display().to_string()).await;
    assert_eq!(status, 200, "{answer}");
    for r in &reps {
        let (_, nodes) = call(
            r.addr(),
            "GET",
            "/nodes",
            None,
            &[("accept", "application/json")],
            "",
        )
        .await;
        assert!(
            nodes.contains("\"fgtest\""),
            "{} has the new node type: {nodes}",
            r.name
        );
    }

    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    for (result, n) in [("done", 1.0), ("failed", 1.0)] {
        assert_eq!(
            metric_sum(&m, "flowgate_editor_palette_total", &[("result", result)]),
            n,
            "palette {result}"
        );
    }
    for (result, n) in [("done", 1.0), ("conflict", 1.0), ("refused", 1.0)] {
        assert_eq!(
            metric_sum(&m, "flowgate_editor_deploys_total", &[("result", result)]),
            n,
            "{result}"
        );
    }
    assert_eq!(
        metric_sum(&m, "flowgate_editor_logins_total", &[("result", "ok")]),
        1.0
    );
    let (_, api) = http_get(app.admin_addr, "/api/instances").await;
    let api: Value = serde_json::from_str(&api).expect("instances JSON");
    // the last deploy shown: the refused one, and why
    let last = &api["instances"][0]["deploy"];
    assert_eq!(last["state"], "failed", "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap_or("")
            .contains("no-such-node"),
        "{last}"
    );

    // a replica dies part way through a Deploy: the editor is told, and the
    // replica already changed gets its old flows back. Calls queued on the
    // replicas (10/s each) keep replica 0 draining for a moment; replica 1
    // is killed then.
    let url = format!("http://{}/api", app.http_addrs[0].1);
    let burst = tokio::spawn(loadtest(
        "nr-editor-burst",
        strings(&["http", "--url", &url, "--ramp", "40", "--step", "3s"]),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut more = flows.as_array().expect("flows").clone();
    more.push(json!({"id": "a1f0c0de00000040", "type": "comment", "z": "a1f0c0de00000001", "name": "one more", "wires": []}));
    let rolling = tokio::spawn({
        let token = token.clone();
        let rev = new_rev.clone();
        async move { deploy_v2(editor, &token, &Value::Array(more), &rev).await }
    });
    eventually("replica 0 is draining for the deploy", || async {
        let (_, api) = http_get(app.admin_addr, "/api/instances").await;
        let api: Value = serde_json::from_str(&api).unwrap_or_default();
        let step = &api["instances"][0]["deploy"]["replicas"][0]["state"];
        step == "draining" || step == "deploying"
    })
    .await;
    reps[1].kill().await;
    let (status, answer) = rolling.await.expect("deploy task");
    let _ = burst.await;
    assert_eq!(status, 500, "{answer}");
    let message = serde_json::from_str::<Value>(&answer).expect("error JSON")["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("replica 1"), "{message}");
    assert!(
        message.contains(&format!("replica 0 is back on rev {new_rev}")),
        "{message}"
    );
    assert_eq!(
        rev_of(&reps[0]).await,
        new_rev,
        "replica 0 has its old flows back"
    );
    assert_eq!(rev_of(&reps[2]).await, new_rev, "replica 2 was not touched");
    for rep in &mut reps {
        rep.kill().await;
    }
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn deploy_clicked_in_the_editor_page_reaches_every_nodered4_replica() {
    editor_page(false).await;
}

#[tokio::test]
async fn deploy_clicked_in_the_editor_page_reaches_every_nodered5_replica() {
    editor_page(true).await;
}

/// The page: the editor opened through flowgate in headless chromium, a node
/// renamed and Deploy clicked while jobs and calls go through flowgate.
async fn editor_page(v5: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("editor-page");
    let users = dir.join("editors");
    flowgate::mqtt::auth::set_user(&users, "ann", b"s3cret").expect("password file");
    let ports = [free_port(), free_port(), free_port()];
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let config = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [{}]\nhealth_interval = \"200ms\"\n\
         [instance.editor]\nlisten = \"127.0.0.1:0\"\npassword_file = \"{}\"\n",
        list.join(", "),
        users.display()
    );
    init_logs();
    let app = App::start(Config::parse(&config, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let example = example_flows();
    let flows = format!("{},\n{TICKS}\n]", example.trim_end().trim_end_matches(']'));
    let mut reps = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        reps.push(replica(v5, &format!("r{}", i + 1), app.mqtt_addr, *port, &flows).await);
    }
    replicas_connected(&app, 3).await;
    eventually("every HTTP replica is up", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_http_replica_up", &[("instance", "line1")]) == 3.0
    })
    .await;
    public_routes_read(&app).await;
    let old_rev = rev_of(&reps[0]).await;

    let shot = dir.join("editor.png");
    let renamed = "answer (edited through flowgate)";
    let mut driver = Command::new("node")
        .arg(root().join("tests/node/editor_page.mjs"))
        .arg(format!("http://{}/", app.editor_addrs[0].1))
        .args(["ann", "s3cret", "a1f0c0de00000012", renamed])
        .arg(&shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the page driver");
    let mut lines = BufReader::new(driver.stdout.take().expect("stdout")).lines();
    let mut stdin = driver.stdin.take().expect("stdin");
    let first = tokio::time::timeout(Duration::from_secs(150), lines.next_line())
        .await
        .expect("the page is ready in time")
        .expect("driver output")
        .unwrap_or_default();
    let mut result: Value = serde_json::from_str(&first).unwrap_or_default();
    let mut load = None;
    if result["ready"] == true {
        let url = format!("http://{}/api", app.http_addrs[0].1);
        let jobs = tokio::spawn(loadtest(
            "nr-page-mqtt",
            mqtt_args(app.mqtt_addr, "8", "12s"),
        ));
        let http_args = strings(&["http", "--url", &url, "--ramp", "8", "--step", "12s"]);
        let calls = tokio::spawn(loadtest("nr-page-http", http_args));
        tokio::time::sleep(Duration::from_secs(2)).await;
        stdin.write_all(b"go\n").await.expect("go");
        drop(stdin);
        let last = tokio::time::timeout(Duration::from_secs(200), lines.next_line())
            .await
            .expect("the deploy ends in time")
            .expect("driver output")
            .unwrap_or_default();
        result = serde_json::from_str(&last).unwrap_or_default();
        load = Some((jobs, calls));
    } else {
        drop(stdin);
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), driver.wait()).await;
    eprintln!(
        "editor page (Node-RED {}): {result}",
        if v5 { 5 } else { 4 }
    );
    assert_eq!(result["step"], "done", "{result}");
    assert!(
        result["notification"]
            .as_str()
            .unwrap_or("")
            .contains("Successfully deployed"),
        "{result}"
    );
    // what went wrong in the page: nothing but the editor's reads before the
    // login (401, how Node-RED asks for one) and the palette's catalogue on
    // the internet (no network here)
    let list = |key: &str| -> Vec<String> {
        result[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let errors: Vec<String> = list("errors")
        .into_iter()
        .filter(|e| !e.starts_with("console: Failed to load resource"))
        .collect();
    assert_eq!(errors, Vec::<String>::new(), "{result}");
    assert!(
        list("refused")
            .iter()
            .all(|r| r.starts_with("login: 401 GET")),
        "{result}"
    );
    assert!(
        list("failed")
            .iter()
            .all(|f| !f.starts_with("http://127.0.0.1")),
        "{result}"
    );
    let names: Vec<String> = result["debugNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let replicas: std::collections::BTreeSet<&str> =
        names.iter().filter_map(|n| n.split(" · ").nth(1)).collect();
    assert!(
        replicas.len() >= 2,
        "the debug sidebar shows two replicas: {names:?}"
    );
    let new_rev = rev_of(&reps[0]).await;
    assert_ne!(new_rev, old_rev, "the flows changed");
    for r in &reps {
        assert_eq!(rev_of(r).await, new_rev, "{} runs the new flows", r.name);
        let (_, body) = http_get(r.addr(), "/flows").await;
        assert!(body.contains(renamed), "{} has the renamed node", r.name);
    }
    let (jobs, calls) = load.expect("the load ran");
    for (what, r) in [
        ("jobs", jobs.await.expect("mqtt")),
        ("calls", calls.await.expect("http")),
    ] {
        let t = &r.totals;
        assert_eq!(
            (t.ok, t.errors, t.duplicates),
            (t.sent, 0, 0),
            "{what} during the deploy: {t:?}\n{}",
            r.table()
        );
    }
    for rep in &mut reps {
        rep.kill().await;
    }
    app.shutdown(Duration::from_secs(2)).await;
}
