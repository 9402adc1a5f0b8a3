//! The real binary: `check` and `run` as a user types them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// Kills the child process if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_lists_every_problem_and_exits_64() {
    let dir = temp_dir("check");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[mqtt]\nupstream = \"tcp://x\"\nmode = \"share\"\nlisten = \"1883\"\n[[instance]]\nname = \"a b\"\nmatch = {}\n",
    )
    .expect("write config");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "mqtt.upstream",
        "mqtt.listen",
        "instance[0].name",
        "instance[0].match",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
}

#[test]
fn check_plugin_refuses_what_only_the_proxy_uses() {
    let dir = temp_dir("check-plugin");
    let path = dir.join("plugin.toml");
    let run = |text: &str| {
        std::fs::write(&path, text).expect("write config");
        Command::new(BIN)
            .args(["check", "--plugin", "--config"])
            .arg(&path)
            .output()
            .expect("run")
    };
    let instance = "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"nr\" }\n";
    let out = run(&format!(
        "[mqtt]\nmode = \"share\"\n{instance}strategy = \"round-robin\"\n"
    ));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "mqtt: only the flowgate proxy",
        "instance[0].strategy: only",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    let out = run(&format!("node_id = \"b1\"\n{instance}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("upstream = \"mosquitto-plugin\""));
}

#[test]
fn check_prints_the_resolved_config() {
    let dir = temp_dir("check-ok");
    let path = dir.join("ok.toml");
    std::fs::write(
        &path,
        "node_id = \"n1\"\n[mqtt]\nupstream = \"mqtt://127.0.0.1:1884\"\nmode = \"share\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connect_timeout = \"10s\""), "{text}");
    assert!(
        text.contains("upstream = \"mqtt://127.0.0.1:1884\""),
        "{text}"
    );
}

#[tokio::test]
async fn run_announces_listeners_serves_a_client_and_drains_then_stops_on_sigterm() {
    let broker = Mosquitto::start().await;
    let dir = temp_dir("run");
    let config = dir.join("flowgate.toml");
    let ready = dir.join("ready.json");
    std::fs::write(
        &config,
        format!(
            "node_id = \"bin\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"mqtt://{}\"\nmode = \"share\"\n[[instance]]\nname = \"line1\"\n\
             match = {{ client_id = \"line1-nodered\" }}\n",
            broker.addr
        ),
    )
    .expect("write config");
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .args(["--drain-delay", "2s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flowgate starts"),
    );
    let start = Instant::now();
    let announced: serde_json::Value = loop {
        assert!(start.elapsed() < DEADLINE, "no ready file");
        if let Ok(text) = std::fs::read_to_string(&ready) {
            if let Ok(v) = serde_json::from_str(&text) {
                break v;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mqtt: std::net::SocketAddr = announced["mqtt"]
        .as_str()
        .expect("mqtt addr")
        .parse()
        .expect("addr");
    let mut c = Client3::connect(mqtt, "line1-nodered", true);
    c.subscribe("jobs/#", QoS::AtLeastOnce).await;
    assert!(broker.log_text().contains("line1-nodered-bin-0"));
    // the container health check
    let admin = format!(
        "http://{}",
        announced["admin"].as_str().expect("admin addr")
    );
    let health = Command::new(BIN)
        .args(["health", "--admin", &admin])
        .output()
        .expect("health runs");
    assert!(health.status.success(), "{health:?}");
    let down = Command::new(BIN)
        .args(["health", "--admin", "http://127.0.0.1:1"])
        .output()
        .expect("health runs");
    assert_eq!(down.status.code(), Some(1));

    let pid = child.0.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let start = Instant::now();
    // the drain delay: unready at once, everything else still serves
    let admin_addr: std::net::SocketAddr = announced["admin"]
        .as_str()
        .expect("admin addr")
        .parse()
        .expect("addr");
    loop {
        let (code, _) = http_get(admin_addr, "/readyz").await;
        if code == 503 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "/readyz still {code}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(admin_addr, "/healthz").await.0, 200);
    let mut late = Client3::connect(mqtt, "line1-nodered", true);
    late.subscribe("jobs/#", QoS::AtLeastOnce).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the checks took the whole drain delay: nothing shown"
    );
    let code = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s.code();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "flowgate did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "stopped before the drain delay ended"
    );
}

#[tokio::test]
async fn run_without_arguments_uses_the_default_config_and_serves_a_replica() {
    // the repository's default config, in a fresh directory, on free ports
    let dir = temp_dir("default");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/flowgate.toml"))
            .expect("default config exists")
            .replace("127.0.0.1:1883", "127.0.0.1:0")
            .replace("127.0.0.1:9090", "127.0.0.1:0");
    assert!(text.contains("upstream = \"embedded\"") && text.contains("mode = \"dispatch\""));
    std::fs::create_dir_all(dir.join("config")).expect("mkdir");
    std::fs::write(dir.join("config/flowgate.toml"), text).expect("write config");
    let mut child = tokio::process::Command::new(BIN)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("flowgate starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("flowgate announces its listeners")
        .expect("read")
        .expect("a line");
    let announced: serde_json::Value = serde_json::from_str(&line).expect("json line");
    let mqtt: std::net::SocketAddr = announced["mqtt"]
        .as_str()
        .expect("mqtt")
        .parse()
        .expect("addr");
    let mut replica = Client3::connect(mqtt, "line1-nodered", true);
    replica.subscribe("jobs/#", QoS::AtLeastOnce).await;
    publish_numbered(mqtt, "jobs", 3).await;
    let mut got = 0;
    while got < 3 {
        match tokio::time::timeout(DEADLINE, replica.events.recv()).await {
            Ok(Some(Seen::Message(_))) => got += 1,
            Ok(Some(Seen::Disconnected(e))) => panic!("replica disconnected: {e}"),
            Ok(Some(Seen::SubAck)) => {}
            _ => panic!("replica got {got} of 3"),
        }
    }
    let _ = child.kill().await;
}
