//! Share mode in front of a real Mosquitto.

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const LINE1: &str = "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\nbroadcast = [\"config/#\"]\n";

/// Drains every message a client has seen so far (payloads), failing on a disconnect.
fn drain(client: &mut Client3, into: &mut Vec<String>) {
    while let Ok(seen) = client.events.try_recv() {
        match seen {
            Seen::Message(payload) => into.push(String::from_utf8_lossy(&payload).into_owned()),
            Seen::Disconnected(e) => panic!("replica was disconnected: {e}"),
            Seen::SubAck => {}
        }
    }
}

#[tokio::test]
async fn replicas_with_one_client_id_stay_connected_and_share_each_message_once() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let mut a = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    let mut b = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    a.subscribe("jobs/#", QoS::AtLeastOnce).await;
    b.subscribe("jobs/#", QoS::AtLeastOnce).await;

    const N: usize = 1000;
    publish_numbered(broker.addr, "jobs", N).await;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let start = std::time::Instant::now();
    while got_a.len() + got_b.len() < N {
        assert!(
            start.elapsed() < DEADLINE,
            "delivered {} of {N}",
            got_a.len() + got_b.len()
        );
        drain(&mut a, &mut got_a);
        drain(&mut b, &mut got_b);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // nothing more arrives: each message exactly once
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain(&mut a, &mut got_a);
    drain(&mut b, &mut got_b);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in got_a.iter().chain(&got_b) {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    assert_eq!(counts.len(), N, "every message delivered");
    assert!(
        counts.values().all(|&c| c == 1),
        "no message delivered twice"
    );
    for (name, got) in [("a", &got_a), ("b", &got_b)] {
        assert!(
            got.len() * 10 >= N * 3,
            "replica {name} got {} of {N}, under 30%",
            got.len()
        );
    }

    // per-replica counters add up to what the replicas received
    let (_, metrics) = http_get(app.admin_addr, "/metrics").await;
    let to = |slot| {
        metric_sum(
            &metrics,
            "flowgate_replica_messages_total",
            &[
                ("instance", "line1"),
                ("replica", slot),
                ("direction", "to_replica"),
            ],
        )
    };
    assert_eq!(to("0") + to("1"), N as f64);
    let mut per_slot = [to("0") as usize, to("1") as usize];
    per_slot.sort_unstable();
    let mut per_client = [got_a.len(), got_b.len()];
    per_client.sort_unstable();
    assert_eq!(per_slot, per_client);
    assert_eq!(
        metric_sum(
            &metrics,
            "flowgate_instance_replicas_connected",
            &[("instance", "line1")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "flowgate_mqtt_rewrites_total",
            &[("instance", "line1"), ("kind", "subscribe")]
        ),
        2.0
    );

    // the broker saw two distinct ids and no takeover
    let log = broker.log_text();
    assert!(
        log.contains("line1-nodered-fg1-0") && log.contains("line1-nodered-fg1-1"),
        "{log}"
    );
    assert!(
        !log.contains("already connected"),
        "takeover in broker log:\n{log}"
    );
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn broadcast_filters_reach_every_replica() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let mut a = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    let mut b = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    a.subscribe("config/#", QoS::AtLeastOnce).await;
    b.subscribe("config/#", QoS::AtLeastOnce).await;
    publish_numbered(broker.addr, "config", 20).await;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let start = std::time::Instant::now();
    while got_a.len() < 20 || got_b.len() < 20 {
        assert!(
            start.elapsed() < DEADLINE,
            "broadcast: a {} b {}",
            got_a.len(),
            got_b.len()
        );
        drain(&mut a, &mut got_a);
        drain(&mut b, &mut got_b);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn v5_replicas_share_the_work_with_no_local_cleared() {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet, RetainForwardRule};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let mut clients = Vec::new();
    for n in 0..2 {
        let mut opts = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let tx = tx.clone();
        clients.push((
            client.clone(),
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let _ = tx.send((n, String::from_utf8_lossy(&p.payload).into_owned()));
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let _ = tx.send((n, format!("suback {:?}", ack.return_codes)));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send((n, format!("error {e}")));
                            return;
                        }
                    }
                }
            }),
        ));
        let filter = Filter {
            path: "jobs/#".into(),
            qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            nolocal: true,
            preserve_retain: true,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        client
            .subscribe_many([filter])
            .await
            .expect("subscribe queued");
    }
    let mut subacks = 0;
    while subacks < 2 {
        let (_, ev) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("suback")
            .expect("channel");
        assert!(ev.starts_with("suback [Success(AtLeastOnce)]"), "{ev}");
        subacks += 1;
    }
    const N: usize = 200;
    publish_numbered(broker.addr, "jobs", N).await;
    let mut per = [0usize; 2];
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let (n, ev) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("message")
            .expect("channel");
        assert!(!ev.starts_with("error"), "{ev}");
        assert!(seen.insert(ev), "duplicate delivery");
        per[n] += 1;
    }
    assert!(per.iter().all(|&c| c * 10 >= N * 3), "unfair share {per:?}");
    for (c, task) in clients {
        let _ = c.disconnect().await;
        task.abort();
    }
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn replica_slot_is_reused_after_reconnect() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let slots = || async {
        let (_, body) = http_get(app.admin_addr, "/api/instances").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["instances"][0]["replicas"]
            .as_array()
            .expect("replicas array")
            .iter()
            .map(|r| {
                (
                    r["slot"].as_u64().unwrap_or(99),
                    r["upstream_client_id"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut a = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    a.subscribe("jobs/#", QoS::AtLeastOnce).await;
    let mut b = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    b.subscribe("jobs/#", QoS::AtLeastOnce).await;
    assert_eq!(
        slots().await,
        vec![
            (0, "line1-nodered-fg1-0".to_owned()),
            (1, "line1-nodered-fg1-1".to_owned())
        ]
    );
    a.client.disconnect().await.expect("disconnect queued");
    eventually("slot 0 is freed", || async { slots().await.len() == 1 }).await;
    drop(a);
    let mut c = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    c.subscribe("jobs/#", QoS::AtLeastOnce).await;
    assert_eq!(
        slots().await,
        vec![
            (0, "line1-nodered-fg1-0".to_owned()),
            (1, "line1-nodered-fg1-1".to_owned())
        ]
    );
    app.shutdown(Duration::from_secs(5)).await;
}

/// Frames of a raw byte stream, as a sorted list (order between a PUBACK and
/// a delivery is the broker's choice).
fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(Some(h)) = flowgate::mqtt::codec::check_header(bytes, usize::MAX) {
        if bytes.len() < h.frame_len() {
            break;
        }
        out.push(bytes[..h.frame_len()].to_vec());
        bytes = &bytes[h.frame_len()..];
    }
    out.sort();
    out
}

/// A scripted 3.1.1 session: CONNECT, SUBSCRIBE raw/t QoS 1, PUBLISH to it
/// QoS 1; returns every byte the broker sent until 4 frames arrived.
async fn scripted_session(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let connect = [
        &[0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 8][..],
        b"sensor-1",
    ]
    .concat();
    let subscribe = [&[0x82, 10, 0, 1, 0, 5][..], b"raw/t", &[1]].concat();
    let publish = [&[0x32, 14, 0, 5][..], b"raw/t", &[0, 2], b"hello"].concat();
    s.write_all(&connect).await.expect("write");
    s.write_all(&subscribe).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut sent_publish = false;
    while frames(&got).len() < 4 {
        if !sent_publish && frames(&got).len() == 2 {
            s.write_all(&publish).await.expect("write");
            sent_publish = true;
        }
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("broker answers")
            .expect("read");
        assert!(n > 0, "closed early after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(&[0xe0, 0]).await.expect("disconnect");
    got
}

#[tokio::test]
async fn unmatched_client_session_is_byte_identical_to_a_direct_one() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let direct = scripted_session(broker.addr).await;
    let proxied = scripted_session(app.mqtt_addr).await;
    assert_eq!(frames(&direct), frames(&proxied));
    assert_eq!(frames(&direct).len(), 4);
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unmatched_client_bytes_reach_the_upstream_unchanged() {
    // a plain TCP listener as upstream records what flowgate sends
    let recorder = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = flowgate(recorder.local_addr().expect("addr"), "share", "", LINE1).await;
    let connect = [
        &[0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 4][..],
        b"dev1",
    ]
    .concat();
    // after the CONNECT, bytes that are not even valid MQTT: passed on anyway
    let rest: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut client = TcpStream::connect(app.mqtt_addr).await.expect("connect");
    client.write_all(&connect).await.expect("write");
    client.write_all(&rest).await.expect("write");
    client.shutdown().await.expect("half-close");
    // flowgate's start-up reachability probe connects first and sends nothing
    let (mut up, got) = loop {
        let (mut up, _) = tokio::time::timeout(DEADLINE, recorder.accept())
            .await
            .expect("flowgate connects")
            .expect("accept");
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, up.read_to_end(&mut got))
            .await
            .expect("eof")
            .expect("read");
        if !got.is_empty() {
            break (up, got);
        }
    };
    assert_eq!(got, [connect, rest].concat());
    // and the upstream's bytes come back the same way
    up.write_all(b"\x20\x02\x00\x00arbitrary")
        .await
        .expect("write");
    drop(up);
    let mut back = Vec::new();
    tokio::time::timeout(DEADLINE, client.read_to_end(&mut back))
        .await
        .expect("eof")
        .expect("read");
    assert_eq!(back, b"\x20\x02\x00\x00arbitrary");
    app.shutdown(Duration::from_secs(5)).await;
}
