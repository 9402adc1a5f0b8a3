//! flowgate inside Mosquitto: the real Mosquitto 2.1.2 (built once from
//! `../shared/vendor` by `tests/mosquitto21/build.sh`) with the
//! `flowgate-mosquitto` plugin loaded, real rumqttc clients, and a flowgate
//! proxy in share mode in front of the same broker for the mixed setup.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::mqtt5::V5;
use crate::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Mosquitto 2.1.2 and the plugin (`cargo build -p flowgate-mosquitto`),
/// built once per test run.
fn parts() -> &'static (PathBuf, PathBuf) {
    static PARTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PARTS.get_or_init(|| {
        let out = Command::new("bash")
            .arg(format!("{ROOT}/tests/mosquitto21/build.sh"))
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "Mosquitto 2.1.2 could not be built (.ci/run installs cmake, libcjson-dev, libssl-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let broker = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "flowgate-mosquitto"])
            .current_dir(ROOT)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the plugin does not build");
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{ROOT}/target"));
        let plugin = PathBuf::from(target).join("debug/libflowgate_mosquitto.so");
        assert!(plugin.exists(), "no {}", plugin.display());
        (broker, plugin)
    })
}

/// A plugin broker: the TOML `flowgate` written to a file, the admin listener
/// on a free port.
struct PluginBroker {
    broker: Mosquitto,
    admin: std::net::SocketAddr,
    toml: PathBuf,
}

const INSTANCE: &str =
    "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"nr\" }\nbroadcast = [\"config/#\"]\n";

async fn plugin_broker(node_id: &str, instances: &str) -> PluginBroker {
    let (bin, so) = parts();
    let dir = temp_dir("plugin");
    let toml = dir.join("flowgate.toml");
    // port 0: the plugin logs the address it bound (a port picked here and
    // released could be taken by another test before the plugin binds it)
    std::fs::write(
        &toml,
        format!("node_id = \"{node_id}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{instances}"),
    )
    .expect("write the plugin config");
    let broker = Mosquitto::start_bin(
        bin.to_str().expect("utf-8 path"),
        &format!(
            "plugin {}\nplugin_opt_config {}\n",
            so.display(),
            toml.display()
        ),
    )
    .await;
    let admin = admin_addr(&broker.log_text()).expect("the plugin logs its admin address");
    eventually("the plugin's admin listener answers", || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
    })
    .await;
    PluginBroker {
        broker,
        admin,
        toml,
    }
}

/// The address in the plugin's "admin listener on http://ADDR (...)" line.
fn admin_addr(log: &str) -> Option<std::net::SocketAddr> {
    let (_, rest) = log.split_once("admin listener on http://")?;
    rest.split_once(' ')?.0.parse().ok()
}

/// A replica or a plain client: payloads it received, v3.1.1 or v5.
enum Sub {
    V3(Client3),
    V5(V5),
}

impl Sub {
    async fn connect(addr: std::net::SocketAddr, id: &str, v5: bool) -> Self {
        if v5 {
            Sub::V5(V5::connect(addr, id, |_| {}).await)
        } else {
            Sub::V3(Client3::connect(addr, id, true))
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        match self {
            Sub::V3(c) => c.subscribe(filter, QoS::AtLeastOnce).await,
            Sub::V5(c) => {
                // no-local set: the plugin clears it (a protocol error on a
                // shared subscription), as the proxy does
                let mut f = rumqttc::v5::mqttbytes::v5::Filter::new(
                    filter,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                );
                f.nolocal = true;
                c.subscribed(f).await
            }
        }
    }

    /// What arrived within `quiet` of the last message.
    async fn collect(&mut self, into: &mut Vec<String>, quiet: Duration) {
        loop {
            match self {
                Sub::V3(c) => match tokio::time::timeout(quiet, c.events.recv()).await {
                    Ok(Some(Seen::Message(p))) => {
                        into.push(String::from_utf8_lossy(&p).into_owned())
                    }
                    Ok(Some(Seen::Disconnected(e))) => panic!("a client was disconnected: {e}"),
                    Ok(Some(Seen::SubAck)) => {}
                    _ => return,
                },
                Sub::V5(c) => match c.nothing_for(quiet).await {
                    Some(p) => into.push(String::from_utf8_lossy(&p.payload).into_owned()),
                    None => return,
                },
            }
        }
    }
}

/// Delivers until `n` messages arrived over `subs` (each collected per
/// client), then waits for stragglers.
async fn deliveries(subs: &mut [Sub], n: usize) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = subs.iter().map(|_| Vec::new()).collect();
    let start = Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < n {
        assert!(
            start.elapsed() < DEADLINE,
            "delivered {} of {n}",
            got.iter().map(Vec::len).sum::<usize>()
        );
        for (s, g) in subs.iter_mut().zip(got.iter_mut()) {
            s.collect(g, Duration::from_millis(20)).await;
        }
    }
    for (s, g) in subs.iter_mut().zip(got.iter_mut()) {
        s.collect(g, Duration::from_millis(300)).await;
    }
    got
}

/// Each of `0..n` exactly once over `got`, and each share at least `min_share`
/// of a fair one.
fn exactly_once_and_fair(got: &[Vec<String>], n: usize, min_share: f64) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in got.iter().flatten() {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    assert_eq!(counts.len(), n, "every job delivered");
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(
        twice.is_empty(),
        "{} jobs delivered more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let fair = n as f64 / got.len() as f64;
    for (i, g) in got.iter().enumerate() {
        assert!(
            g.len() as f64 >= fair * min_share,
            "replica {i} got {} of {n} (a fair share is {fair})",
            g.len()
        );
    }
}

fn replicas_metric(metrics: &str, slot: &str, direction: &str) -> f64 {
    metric_sum(
        metrics,
        "flowgate_replica_messages_total",
        &[
            ("instance", "line1"),
            ("replica", slot),
            ("direction", direction),
        ],
    )
}

#[tokio::test]
async fn two_and_four_replicas_share_jobs_exactly_once_inside_mosquitto() {
    let pb = plugin_broker("b1", INSTANCE).await;
    let addr = pb.broker.addr;
    const N: usize = 1000;
    // a plain client on the same filter: untouched, it gets every job
    let mut plain = Sub::connect(addr, "dashboard", false).await;
    plain.subscribe("jobs/#").await;

    let mut delivered: HashMap<usize, usize> = HashMap::new();
    for (round, replicas) in [2usize, 4].into_iter().enumerate() {
        // 3.1.1 and v5 replicas alternate, all with the one client id
        let mut subs = Vec::new();
        for i in 0..replicas {
            let mut s = Sub::connect(addr, "nr", i % 2 == 1).await;
            s.subscribe("jobs/#").await;
            s.subscribe("config/#").await;
            subs.push(s);
        }
        let (_, api) = http_get(pb.admin, "/api/instances").await;
        let api: serde_json::Value = serde_json::from_str(&api).expect("json");
        let ids: Vec<&str> = api["instances"][0]["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .filter_map(|r| r["upstream_client_id"].as_str())
            .collect();
        let want: Vec<String> = (0..replicas).map(|s| format!("nr-b1-{s}")).collect();
        assert_eq!(ids, want, "round {round}: lowest free slots, handed back");
        assert_eq!(api["mode"], "share");

        let topic = format!("jobs/r{round}");
        publish_numbered(addr, &topic, N).await;
        let got = deliveries(&mut subs, N).await;
        exactly_once_and_fair(&got, N, 0.5);
        let mut all = Vec::new();
        plain.collect(&mut all, Duration::from_millis(300)).await;
        assert_eq!(all.len(), N, "the plain client got every job");

        // a broadcast filter reaches every replica
        publish_numbered(addr, "config", 1).await;
        for s in &mut subs {
            let mut got = Vec::new();
            let start = Instant::now();
            while got.is_empty() {
                assert!(start.elapsed() < DEADLINE, "a replica missed the broadcast");
                s.collect(&mut got, Duration::from_millis(50)).await;
            }
            assert_eq!(got, ["0"]);
        }

        // what the metrics count is what the replicas received
        let (_, metrics) = http_get(pb.admin, "/metrics").await;
        for (slot, g) in got.iter().enumerate() {
            // the jobs and the broadcast, added to earlier rounds' on this slot
            *delivered.entry(slot).or_default() += g.len() + 1;
            assert_eq!(
                replicas_metric(&metrics, &slot.to_string(), "to_replica") as usize,
                delivered[&slot],
                "slot {slot}: counted deliveries, round {round}"
            );
        }
        let connected = metric_sum(
            &metrics,
            "flowgate_instance_replicas_connected",
            &[("instance", "line1")],
        );
        assert_eq!(connected as usize, replicas);
        drop(subs);
        eventually("the replicas' slots are handed back", || async {
            let (_, api) = http_get(pb.admin, "/api/instances").await;
            api.contains("\"replicas\": []")
        })
        .await;
    }
}

#[tokio::test]
async fn a_bad_config_stops_mosquitto_with_the_reason_and_a_bad_reload_changes_nothing() {
    let (bin, so) = parts();
    let dir = temp_dir("plugin-bad");
    let toml = dir.join("flowgate.toml");
    // a proxy's file handed to the plugin
    std::fs::write(
        &toml,
        format!("[mqtt]\nupstream = \"mqtt://127.0.0.1:1883\"\n{INSTANCE}"),
    )
    .expect("write");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nplugin {}\nplugin_opt_config {}\n",
            free_port(),
            so.display(),
            toml.display()
        ),
    )
    .expect("write");
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .output(),
    )
    .await
    .expect("Mosquitto stops by itself")
    .expect("Mosquitto runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "Mosquitto started with a bad plugin config:\n{log}"
    );
    assert!(
        log.contains("flowgate: cannot start:")
            && log.contains("mqtt: only the flowgate proxy uses this key"),
        "the reason is in Mosquitto's log:\n{log}"
    );

    // a running broker: a bad file on SIGHUP is refused, the rules stay; a
    // good one changes the broadcast filters for the next SUBSCRIBE
    let pb = plugin_broker("b1", INSTANCE).await;
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    };
    std::fs::write(&pb.toml, "node_id = \n").expect("write");
    hup(pb.broker.pid());
    eventually("the refused reload is logged", || async {
        pb.broker
            .log_text()
            .contains("reload refused, the running config stays")
    })
    .await;
    std::fs::write(
        &pb.toml,
        format!(
            "node_id = \"b1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            INSTANCE.replace("config/#", "alerts/#")
        ),
    )
    .expect("write");
    hup(pb.broker.pid());
    eventually("the reload is logged", || async {
        pb.broker.log_text().contains("flowgate: config reloaded")
    })
    .await;
    let mut subs = Vec::new();
    for _ in 0..2 {
        let mut s = Sub::connect(pb.broker.addr, "nr", false).await;
        s.subscribe("alerts/#").await;
        s.subscribe("config/#").await;
        subs.push(s);
    }
    publish_numbered(pb.broker.addr, "alerts", 1).await;
    publish_numbered(pb.broker.addr, "config", 10).await;
    let got = deliveries(&mut subs, 2 + 10).await;
    // before the reload: alerts shared (1) and config broadcast (20)
    let total: usize = got.iter().map(Vec::len).sum();
    assert_eq!(
        total, 12,
        "alerts/0 to both (broadcast now), config/0..9 shared once: {got:?}"
    );
}

#[tokio::test]
async fn a_plugin_broker_and_a_share_mode_proxy_serve_one_instance_together() {
    let pb = plugin_broker("b1", INSTANCE).await;
    let proxy = flowgate(pb.broker.addr, "share", "", INSTANCE).await;
    // one replica straight to the plugin broker, one through the proxy
    let mut subs = vec![
        Sub::connect(pb.broker.addr, "nr", false).await,
        Sub::connect(proxy.mqtt_addr, "nr", true).await,
    ];
    for s in &mut subs {
        s.subscribe("jobs/#").await;
    }
    const N: usize = 1000;
    publish_numbered(pb.broker.addr, "jobs", N).await;
    let got = deliveries(&mut subs, N).await;
    exactly_once_and_fair(&got, N, 0.5);
    // the proxy's replica (nr-fg1-0 upstream) is no replica to the plugin:
    // the plugin broker lists only its own
    let (_, api) = http_get(pb.admin, "/api/instances").await;
    assert!(
        api.contains("\"nr-b1-0\"") && !api.contains("nr-fg1-0"),
        "{api}"
    );
}

#[tokio::test]
async fn a_replicas_unsubscribe_leaves_the_share_group() {
    let pb = plugin_broker("b1", INSTANCE).await;
    let addr = pb.broker.addr;
    let mut a = Client3::connect(addr, "nr", true);
    let mut b = Sub::connect(addr, "nr", false).await;
    a.subscribe("jobs/#", QoS::AtLeastOnce).await;
    b.subscribe("jobs/#").await;
    // replica a leaves the group (its UNSUBSCRIBE rewritten as its SUBSCRIBE
    // was); b gets every job from then on
    a.client
        .unsubscribe("jobs/#")
        .await
        .expect("unsubscribe is queued");
    eventually("the plugin broker logs the unsubscribe", || async {
        pb.broker
            .log_text()
            .contains("Received UNSUBSCRIBE from nr-b1-0")
    })
    .await;
    const N: usize = 200;
    publish_numbered(addr, "jobs", N).await;
    let mut subs = [b];
    let got = deliveries(&mut subs, N).await;
    exactly_once_and_fair(&got, N, 1.0);
    let mut stray = Vec::new();
    Sub::V3(a)
        .collect(&mut stray, Duration::from_millis(300))
        .await;
    assert!(
        stray.is_empty(),
        "the replica that left got {} jobs",
        stray.len()
    );
}
