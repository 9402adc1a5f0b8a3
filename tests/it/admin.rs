//! The admin listener over a real socket.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn admin_endpoints_answer() {
    let broker = Mosquitto::start().await;
    let app = flowgate(
        broker.addr,
        "share",
        "",
        "[[instance]]\nname = \"line1\"\nmatch = { username = \"nr\" }\n",
    )
    .await;
    assert_eq!(
        http_get(app.admin_addr, "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(http_get(app.admin_addr, "/readyz").await.0, 200);
    let (status, metrics) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("flowgate_instance_replicas_connected{instance=\"line1\"} 0"),
        "{metrics}"
    );
    // the counters alerts watch exist at 0 before their first count
    for line in [
        "flowgate_mqtt_errors_total{kind=\"malformed_packet\"} 0",
        "flowgate_mqtt_errors_total{kind=\"upstream_unreachable\"} 0",
        "flowgate_mqtt_rewrites_total{instance=\"line1\",kind=\"client_id\"} 0",
        "flowgate_dispatch_dropped_total{instance=\"line1\",reason=\"expired\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let (status, body) = http_get(app.admin_addr, "/api/instances").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["node_id"], "fg1");
    assert_eq!(v["mode"], "share");
    assert_eq!(v["instances"][0]["name"], "line1");
    assert_eq!(http_get(app.admin_addr, "/nope").await.0, 404);
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_admin_token_guards_everything_but_health_and_public_metrics() {
    init_logs();
    let token = "s3cret-token-0123456789";
    for metrics_public in [false, true] {
        let text = format!(
            "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\
             metrics_public = {metrics_public}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"line1\"\n\
             match = {{ username = \"nr\" }}\n"
        );
        let app = flowgate::app::App::start(
            flowgate::config::Config::parse(&text, "test").expect("valid config"),
        )
        .await
        .expect("starts");
        let base = format!("http://{}", app.admin_addr);
        let get = |path: &'static str, auth: Option<String>| {
            let base = base.clone();
            async move {
                let headers: Vec<(&str, &str)> = auth
                    .as_deref()
                    .map(|a| vec![("authorization", a)])
                    .unwrap_or_default();
                flowgate::admin::client::request(
                    hyper::Method::GET,
                    &base,
                    path,
                    &headers,
                    bytes::Bytes::new(),
                )
                .await
                .expect("answers")
                .0
            }
        };
        let bearer = Some(format!("Bearer {token}"));
        let wrong = Some("Bearer s3cret-token-0123456780".to_string());
        assert_eq!(get("/healthz", None).await, 200);
        assert_eq!(get("/readyz", None).await, 200);
        assert_eq!(get("/api/instances", None).await, 401);
        assert_eq!(get("/api/instances", wrong.clone()).await, 401);
        assert_eq!(get("/api/instances", bearer.clone()).await, 200);
        assert_eq!(get("/status", None).await, 401);
        assert_eq!(
            get("/metrics", None).await,
            if metrics_public { 200 } else { 401 }
        );
        assert_eq!(get("/metrics", bearer.clone()).await, 200);
        // the status page opened in a browser carries it in the query
        let path = format!("/api/instances?token={token}");
        let (status, _) = http_get(app.admin_addr, &path).await;
        assert_eq!(status, 200);
        app.shutdown(Duration::from_secs(2)).await;
    }
}
