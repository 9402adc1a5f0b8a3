//! The live views: `flowgate status` (the real binary) and the `/status` page
//! in a real headless browser (Debian's chromium driven by playwright-core),
//! while replicas take MQTT and HTTP traffic.

use std::path::PathBuf;
use std::time::Duration;

use flowgate::app::App;
use flowgate::config::Config;
use rumqttc::QoS;

use crate::http::Replica;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// flowgate (embedded broker, dispatch) with instance `line1`: two MQTT
/// replicas on `jobs/#` and one HTTP replica; returns the app, the replicas
/// (kept alive) and a task publishing and requesting until aborted.
async fn busy_flowgate() -> (App, Vec<Client3>, Replica, tokio::task::JoinHandle<()>) {
    init_logs();
    let web = Replica::start("r0", 0).await;
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [\"{}\"]\nhealth_interval = \"100ms\"\npublic_paths = [\"/\"]\n",
        web.addr
    );
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut r = Client3::connect(app.mqtt_addr, "line1-nodered", true);
        r.subscribe("jobs/#", QoS::AtLeastOnce).await;
        replicas.push(r);
    }
    let publisher = Client3::connect(app.mqtt_addr, "status-traffic", true);
    let http = app.http_addrs[0].1;
    let traffic = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for i in 0u64.. {
            tick.tick().await;
            let _ = publisher
                .client
                .publish(format!("jobs/{}", i % 7), QoS::AtLeastOnce, false, "job")
                .await;
            if i % 4 == 0 {
                tokio::spawn(http_get(http, "/hello"));
            }
        }
    });
    (app, replicas, web, traffic)
}

#[tokio::test]
async fn status_command_shows_each_replica_with_its_rate() {
    let (app, _replicas, web, traffic) = busy_flowgate().await;
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--once", "--interval", "1s", "--admin"])
        .arg(format!("http://{}", app.admin_addr))
        .kill_on_drop(true)
        .output()
        .await
        .expect("flowgate status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("instance line1"), "{text}");
    assert_eq!(text.matches("line1-nodered").count(), 2, "{text}");
    assert!(text.contains(&web.addr.to_string()), "{text}");
    // a rate was measured for the replicas taking jobs (not "-")
    let rated = text
        .lines()
        .filter(|l| l.contains("line1-nodered"))
        .filter(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|v| v.parse::<f64>().is_ok())
        })
        .count();
    assert_eq!(rated, 2, "{text}");

    let bad = tokio::process::Command::new(BIN)
        .args(["status", "--once", "--admin", "http://127.0.0.1:1"])
        .output()
        .await
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot connect"));
    traffic.abort();
    app.shutdown(Duration::from_secs(2)).await;
    web.kill();
}

#[tokio::test]
async fn status_page_loads_in_a_real_browser_with_no_console_errors() {
    let node_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        node_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/node` (bash .ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no chromium at {chromium}: `apt-get install chromium` (bash .ci/run does) or set CHROMIUM"
    );
    let (app, _replicas, web, traffic) = busy_flowgate().await;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let out = tokio::process::Command::new("node")
        .arg(node_dir.join("status_page.mjs"))
        .arg(format!("http://{}/status", app.admin_addr))
        .arg(&shot)
        .arg("2")
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "driver printed no JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(result["errors"], serde_json::json!([]), "{result}");
    let text = result["text"].as_str().unwrap_or_default();
    assert!(text.contains("instance line1"), "{text}");
    assert_eq!(text.matches("line1-nodered").count(), 2, "{text}");
    assert!(text.contains(&web.addr.to_string()), "{text}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    traffic.abort();
    app.shutdown(Duration::from_secs(2)).await;
    web.kill();
}
