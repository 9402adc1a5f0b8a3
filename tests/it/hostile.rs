//! Bad input and broken peers: one connection fails with a metric, the
//! others keep working, nothing panics.

use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const LINE1: &str = "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\n";

/// CONNECT 3.1.1 for the line1 replica.
fn replica_connect() -> Vec<u8> {
    [
        &[
            0x10, 25, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 13,
        ][..],
        b"line1-nodered",
    ]
    .concat()
}

/// Reads until the peer closes; returns what arrived. Fails at the deadline.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .expect("flowgate closes the connection")
        .unwrap_or_default();
    got
}

async fn errors(app: &flowgate::app::App, kind: &str) -> f64 {
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    metric_sum(&m, "flowgate_mqtt_errors_total", &[("kind", kind)])
}

/// A healthy replica subscribed to jobs/#; checks it still receives.
async fn assert_still_served(broker: &Mosquitto, good: &mut Client3) {
    publish_numbered(broker.addr, "jobs", 5).await;
    let mut n = 0;
    let start = Instant::now();
    while n < 5 {
        assert!(start.elapsed() < DEADLINE, "healthy replica got {n} of 5");
        match tokio::time::timeout(DEADLINE, good.events.recv()).await {
            Ok(Some(Seen::Message(_))) => n += 1,
            Ok(Some(Seen::Disconnected(e))) => panic!("healthy replica lost its session: {e}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn malformed_and_oversized_packets_close_only_their_connection() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "max_packet_size = \"64KiB\"", LINE1).await;
    let mut good = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    good.subscribe("jobs/#", QoS::AtLeastOnce).await;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // SUBSCRIBE with flags 0000 instead of 0010
        (
            "bad subscribe flags",
            [&[0x80, 6, 0, 1, 0, 1, b'x', 0][..]].concat(),
            "malformed_packet",
        ),
        // SUBSCRIBE whose filter length runs past the packet
        (
            "truncated filter",
            [&[0x82, 6, 0, 1, 0, 9, b'x', 0][..]].concat(),
            "malformed_packet",
        ),
        // SUBSCRIBE with a filter that is not UTF-8
        (
            "bad utf-8",
            [&[0x82, 6, 0, 1, 0, 1, 0xff, 0][..]].concat(),
            "malformed_packet",
        ),
        // a PUBLISH announcing 256 MiB, with no body
        (
            "oversized",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            "packet_too_large",
        ),
        // five remaining-length bytes
        (
            "bad length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            "malformed_packet",
        ),
        // a second CONNECT
        ("second connect", replica_connect(), "protocol_violation"),
    ];
    for (name, bytes, kind) in cases {
        let before = errors(&app, kind).await;
        let mut s = TcpStream::connect(app.mqtt_addr).await.expect("connect");
        s.write_all(&replica_connect()).await.expect("write");
        s.write_all(&bytes).await.expect("write");
        let got = read_until_closed(&mut s).await;
        // at most the broker's CONNACK came back before the close
        assert!(got.len() <= 4, "{name}: {got:?}");
        eventually(&format!("{name}: one {kind} error counted"), || async {
            errors(&app, kind).await == before + 1.0
        })
        .await;
    }
    assert_still_served(&broker, &mut good).await;
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_first_packets_are_refused() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "connect_timeout = \"300ms\"", LINE1).await;
    let mut good = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    good.subscribe("jobs/#", QoS::AtLeastOnce).await;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "publish before connect",
            vec![0x30, 3, 0, 1, b't'],
            "protocol_violation",
        ),
        (
            "unknown protocol level",
            [&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 30, 0, 0][..]].concat(),
            "unsupported_protocol",
        ),
        (
            "reserved connect flag",
            [&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 30, 0, 0][..]].concat(),
            "malformed_packet",
        ),
        ("silent", vec![], "connect_timeout"),
        (
            "slowloris half a connect",
            vec![0x10, 25, 0, 4],
            "connect_timeout",
        ),
    ];
    for (name, bytes, kind) in cases {
        let before = errors(&app, kind).await;
        let mut s = TcpStream::connect(app.mqtt_addr).await.expect("connect");
        s.write_all(&bytes).await.expect("write");
        let got = read_until_closed(&mut s).await;
        assert!(got.is_empty(), "{name}: {got:?}");
        eventually(&format!("{name}: one {kind} error counted"), || async {
            errors(&app, kind).await == before + 1.0
        })
        .await;
    }
    assert_still_served(&broker, &mut good).await;
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn connect_sent_one_byte_at_a_time_is_accepted() {
    let broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let mut s = TcpStream::connect(app.mqtt_addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for byte in replica_connect() {
        s.write_all(&[byte]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack))
        .await
        .expect("connack")
        .expect("read");
    assert_eq!(connack, [0x20, 2, 0, 0]);
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unreachable_broker_answers_connack_server_unavailable() {
    let closed = free_port();
    let app = flowgate(([127, 0, 0, 1], closed).into(), "share", "", LINE1).await;
    for (connect, expected) in [
        (replica_connect(), vec![0x20, 2, 0, 3]),
        (
            [
                &[
                    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 1,
                ][..],
                b"x",
            ]
            .concat(),
            vec![],
        ),
    ] {
        let mut s = TcpStream::connect(app.mqtt_addr).await.expect("connect");
        s.write_all(&connect).await.expect("write");
        let got = read_until_closed(&mut s).await;
        // replicas get a refusal they understand; unmatched clients are closed
        assert_eq!(got, expected);
    }
    assert_eq!(errors(&app, "upstream_unreachable").await, 2.0);
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn broker_death_ends_replica_sessions_and_flowgate_keeps_accepting() {
    let mut broker = Mosquitto::start().await;
    let app = flowgate(broker.addr, "share", "", LINE1).await;
    let mut a = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    a.subscribe("jobs/#", QoS::AtLeastOnce).await;
    broker.kill();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < DEADLINE,
            "replica never noticed the broker died"
        );
        if let Ok(Some(Seen::Disconnected(_))) =
            tokio::time::timeout(DEADLINE, a.events.recv()).await
        {
            break;
        }
    }
    let (status, _) = http_get(app.admin_addr, "/healthz").await;
    assert_eq!(status, 200);
    app.shutdown(Duration::from_secs(5)).await;
}

/// CONNECT 3.1.1 for the line1 replica with a 1 s keep-alive.
fn replica_connect_keep_alive_1s() -> Vec<u8> {
    [
        &[0x10, 25, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 1, 0, 13][..],
        b"line1-nodered",
    ]
    .concat()
}

#[tokio::test]
async fn dispatch_mode_closes_bad_or_silent_replicas_and_serves_the_rest() {
    let app = flowgate::app::App::start(
        flowgate::config::Config::parse(
            &format!("node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n{LINE1}"),
            "test",
        )
        .expect("valid config"),
    )
    .await
    .expect("flowgate starts");
    let mut good = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    good.subscribe("jobs/#", QoS::AtLeastOnce).await;

    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        (
            "bad subscribe flags",
            replica_connect(),
            vec![0x80, 6, 0, 1, 0, 1, b'x', 0],
            "malformed_packet",
        ),
        (
            "oversized",
            replica_connect(),
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            "packet_too_large",
        ),
        (
            "second connect",
            replica_connect(),
            replica_connect(),
            "malformed_packet",
        ),
        (
            "truncated filter",
            replica_connect(),
            vec![0x82, 6, 0, 1, 0, 9, b'x', 0],
            "malformed_packet",
        ),
        (
            "silent past keep-alive",
            replica_connect_keep_alive_1s(),
            vec![],
            "keep_alive_timeout",
        ),
    ];
    for (name, connect, bytes, kind) in cases {
        let before = errors(&app, kind).await;
        let mut s = TcpStream::connect(app.mqtt_addr).await.expect("connect");
        s.write_all(&connect).await.expect("write");
        s.write_all(&bytes).await.expect("write");
        let got = read_until_closed(&mut s).await;
        // flowgate answered the CONNECT itself
        assert!(got.starts_with(&[0x20, 2, 0, 0]), "{name}: {got:?}");
        eventually(&format!("{name}: one {kind} error counted"), || async {
            errors(&app, kind).await == before + 1.0
        })
        .await;
    }
    // the healthy replica still gets its work
    publish_numbered(app.mqtt_addr, "jobs", 5).await;
    let mut n = 0;
    while n < 5 {
        match tokio::time::timeout(DEADLINE, good.events.recv()).await {
            Ok(Some(Seen::Message(_))) => n += 1,
            Ok(Some(Seen::Disconnected(e))) => panic!("healthy replica lost its session: {e}"),
            Ok(Some(_)) => {}
            _ => panic!("healthy replica got {n} of 5"),
        }
    }
    app.shutdown(Duration::from_secs(5)).await;
}
