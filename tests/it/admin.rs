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
    let (status, body) = http_get(app.admin_addr, "/api/instances").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["node_id"], "fg1");
    assert_eq!(v["mode"], "share");
    assert_eq!(v["instances"][0]["name"], "line1");
    assert_eq!(http_get(app.admin_addr, "/nope").await.0, 404);
    app.shutdown(Duration::from_secs(5)).await;
}
