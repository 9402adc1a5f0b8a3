//! MQTT 5 through dispatch mode, on the embedded broker and a real
//! Mosquitto: every publish property both ways, subscription options and
//! identifiers, expiry counted down in flowgate's queue, reason codes.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, Publish, PublishProperties, RetainForwardRule,
    SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use crate::dispatch::{start, Upstream};
use crate::support::*;

/// What a v5 test client saw.
#[derive(Debug)]
enum Got {
    Publish(Box<Publish>),
    PubAck(PubAckReason),
    SubAck,
}

/// A v5 client whose event loop runs in a task and reports publishes and
/// PUBACKs; connected once it returns.
pub(crate) struct V5 {
    pub(crate) client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Got>,
    task: tokio::task::JoinHandle<()>,
    /// The CONNACK's session present flag.
    session_present: bool,
}

impl V5 {
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        id: &str,
        tune: impl FnOnce(&mut MqttOptions),
    ) -> Self {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        tune(&mut opts);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (up_tx, mut up_rx) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut up = Some(up_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        if let Some(u) = up.take() {
                            let _ = u.send(c.session_present).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Got::Publish(Box::new(p)));
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(Got::PubAck(a.reason));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Got::SubAck);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let session_present = tokio::time::timeout(Duration::from_secs(10), up_rx.recv())
            .await
            .expect("v5 client connects")
            .expect("connack");
        Self {
            client,
            rx,
            task,
            session_present,
        }
    }

    pub(crate) async fn next_publish(&mut self) -> Publish {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await {
                Ok(Some(Got::Publish(p))) => return *p,
                Ok(Some(_)) => {}
                _ => panic!("no publish within 10 s"),
            }
        }
    }

    async fn next_puback(&mut self) -> PubAckReason {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await {
                Ok(Some(Got::PubAck(r))) => return r,
                Ok(Some(_)) => {}
                _ => panic!("no PUBACK within 10 s"),
            }
        }
    }

    /// Subscribes and waits for the SUBACK (publishes before it are lost
    /// to the caller).
    pub(crate) async fn subscribed(&mut self, filter: Filter) {
        self.subscribe(filter, None).await;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await {
                Ok(Some(Got::SubAck)) => return,
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK within 10 s"),
            }
        }
    }

    /// Nothing published to it for `quiet`.
    pub(crate) async fn nothing_for(&mut self, quiet: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Got::Publish(p))) => return Some(*p),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }

    async fn subscribe(&self, filter: Filter, id: Option<usize>) {
        let props = id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        match props {
            Some(p) => self
                .client
                .subscribe_many_with_properties([filter], p)
                .await
                .expect("subscribe"),
            None => self
                .client
                .subscribe_many([filter])
                .await
                .expect("subscribe"),
        }
    }
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn props(expiry: u32, tag: &str) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(expiry),
        response_topic: Some(format!("resp/{tag}")),
        correlation_data: Some(Bytes::from(format!("\u{0}\u{1}corr-{tag}"))),
        user_properties: vec![
            ("a".into(), "1".into()),
            ("b".into(), tag.into()),
            ("a".into(), "3".into()),
        ],
        content_type: Some("application/json".into()),
        ..Default::default()
    }
}

/// Every property but the expiry (counted down) and the subscription
/// identifiers (the receiver's own) arrives as sent.
fn assert_same(what: &str, got: &Publish, sent: &PublishProperties, ids: &[usize]) {
    let p = got
        .properties
        .clone()
        .unwrap_or_else(|| panic!("{what}: no properties"));
    assert_eq!(
        p.payload_format_indicator, sent.payload_format_indicator,
        "{what}"
    );
    assert_eq!(p.response_topic, sent.response_topic, "{what}");
    assert_eq!(p.correlation_data, sent.correlation_data, "{what}");
    assert_eq!(
        p.user_properties, sent.user_properties,
        "{what}: user properties in order"
    );
    assert_eq!(p.content_type, sent.content_type, "{what}");
    let (e, s) = (
        p.message_expiry_interval.unwrap_or(0),
        sent.message_expiry_interval.unwrap_or(0),
    );
    assert!(e <= s && e + 3 >= s, "{what}: expiry {e} of {s}");
    assert_eq!(
        p.subscription_identifiers, ids,
        "{what}: subscription identifiers"
    );
}

#[tokio::test]
async fn every_publish_property_crosses_dispatch_mode_both_ways() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        eventually("the upstream session speaks MQTT 5", || async {
            let (_, body) = http_get(app.admin_addr, "/api/instances").await;
            body.contains("\"upstream_protocol\": \"5.0\"")
        })
        .await;
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        replica
            .subscribe(Filter::new("req/#", QoS::ExactlyOnce), Some(7))
            .await;
        // an application of its own, not a replica (passes through flowgate)
        let mut app_client = V5::connect(app.mqtt_addr, "requester", |_| {}).await;
        app_client
            .subscribe(Filter::new("resp/#", QoS::ExactlyOnce), None)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let tag = format!("{name}-{qos:?}");
            let sent = props(300, &tag);
            app_client
                .client
                .publish_with_properties(
                    format!("req/{tag}"),
                    qos,
                    false,
                    tag.clone(),
                    sent.clone(),
                )
                .await
                .expect("publish");
            let got = replica.next_publish().await;
            assert_eq!(got.topic.as_ref(), format!("req/{tag}").as_bytes(), "{tag}");
            // rumqttd 0.20 delivers at the subscription's QoS (README,
            // known broker behaviour); Mosquitto at the lower of the two
            let want = if name == "embedded" {
                QoS::ExactlyOnce
            } else {
                qos
            };
            assert_eq!(got.qos, want, "{tag}");
            assert_same(&format!("{tag} to the replica"), &got, &sent, &[7]);

            // the answer, as a Node-RED request/response flow sends it
            let answer = props(200, &format!("{tag}-answer"));
            replica
                .client
                .publish_with_properties(format!("resp/{tag}"), qos, false, "ok", answer.clone())
                .await
                .expect("answer");
            let got = app_client.next_publish().await;
            assert_eq!(
                got.topic.as_ref(),
                format!("resp/{tag}").as_bytes(),
                "{tag}"
            );
            assert_same(&format!("{tag} from the replica"), &got, &answer, &[]);
        }
        app.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn a_v311_and_a_v5_replica_each_get_what_their_protocol_carries() {
    let mosquitto = Upstream::Mosquitto(Mosquitto::start().await);
    let app = start(&mosquitto, "strategy = \"round-robin\"").await;
    let mut v5 = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
    v5.subscribe(Filter::new("jobs/#", QoS::AtLeastOnce), None)
        .await;
    let mut v3 = Client3::connect(app.mqtt_addr, "line1-nodered", true);
    v3.subscribe("jobs/#", rumqttc::QoS::AtLeastOnce).await;
    let sender = V5::connect(app.mqtt_addr, "sender", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        sender
            .client
            .publish_with_properties(
                format!("jobs/{i}"),
                QoS::AtLeastOnce,
                false,
                "x",
                props(60, "j"),
            )
            .await
            .expect("publish");
    }
    // round robin: five each; the v5 copy has every property
    for _ in 0..5 {
        let p = v5.next_publish().await;
        assert_same("to the v5 replica", &p, &props(60, "j"), &[]);
    }
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(10), v3.events.recv()).await {
            Ok(Some(crate::support::Seen::Message(m))) => assert_eq!(m, b"x"),
            other => panic!("the 3.1.1 replica: {other:?}"),
        }
    }
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn expiry_counts_down_while_a_message_waits_and_an_expired_one_is_dropped() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        replica
            .subscribe(Filter::new("jobs/#", QoS::AtLeastOnce), None)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        replica.client.disconnect().await.expect("disconnect");
        drop(replica);
        // no replica: flowgate's upstream session takes them into its queue
        let sender = V5::connect(app.mqtt_addr, "sender", |_| {}).await;
        let short = PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        };
        let long = PublishProperties {
            message_expiry_interval: Some(100),
            ..Default::default()
        };
        for (topic, p) in [("jobs/short", short), ("jobs/long", long)] {
            sender
                .client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, "x", p)
                .await
                .expect("publish");
        }
        eventually("both messages wait in flowgate's queue", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_dispatch_queued_messages",
                &[("instance", "line1")],
            ) == 2.0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        replica
            .subscribe(Filter::new("jobs/#", QoS::AtLeastOnce), None)
            .await;
        let got = replica.next_publish().await;
        assert_eq!(got.topic.as_ref(), b"jobs/long", "{name}");
        let left = got.properties.and_then(|p| p.message_expiry_interval);
        assert!(
            matches!(left, Some(96..=98)),
            "{name}: expiry left {left:?}"
        );
        assert!(
            replica
                .nothing_for(Duration::from_millis(500))
                .await
                .is_none(),
            "{name}"
        );
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        assert_eq!(
            metric_sum(
                &m,
                "flowgate_dispatch_dropped_total",
                &[("instance", "line1"), ("reason", "expired")]
            ),
            1.0,
            "{name}"
        );
        app.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn subscription_options_no_local_and_retain_handling_hold() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let outside = V5::connect(app.mqtt_addr, "outside", |_| {}).await;
        outside
            .client
            .publish("cfg/a", QoS::AtLeastOnce, true, "retained")
            .await
            .expect("retained");
        tokio::time::sleep(Duration::from_millis(300)).await;

        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        // retain handling 2: no retained message on subscribe
        let mut never = Filter::new("cfg/#", QoS::AtLeastOnce);
        never.retain_forward_rule = RetainForwardRule::Never;
        replica.subscribe(never, None).await;
        // no local: the instance's own publishes do not come back (rumqttd
        // 0.20 ignores no local: README, known broker behaviour)
        let mut chat = Filter::new("chat/#", QoS::AtLeastOnce);
        chat.nolocal = true;
        replica.subscribe(chat, None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        replica
            .client
            .publish("chat/1", QoS::AtLeastOnce, false, "mine")
            .await
            .expect("publish");
        outside
            .client
            .publish("chat/2", QoS::AtLeastOnce, false, "theirs")
            .await
            .expect("publish");
        let mut got = vec![replica.next_publish().await.payload];
        if name == "embedded" {
            // rumqttd ignores no local: the replica's own comes back too
            got.push(replica.next_publish().await.payload);
            assert!(
                got.contains(&Bytes::from_static(b"mine")),
                "{name}: {got:?}"
            );
        }
        assert!(
            got.contains(&Bytes::from_static(b"theirs")),
            "{name}: {got:?}"
        );
        let extra = replica.nothing_for(Duration::from_millis(500)).await;
        assert!(extra.is_none(), "{name}: {extra:?}");

        // retain handling 0 (the default) on another filter: it comes
        replica
            .subscribe(Filter::new("cfg/a", QoS::AtLeastOnce), None)
            .await;
        let got = replica.next_publish().await;
        assert_eq!(got.payload.as_ref(), b"retained", "{name}");
        assert!(got.retain, "{name}");
        app.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn the_brokers_reason_codes_reach_the_replica() {
    let mosquitto = Upstream::Mosquitto(Mosquitto::start().await);
    let app = start(&mosquitto, "").await;
    let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
    // nobody subscribes: Mosquitto answers 0x10 "no matching subscribers"
    replica
        .client
        .publish("nobody/here", QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    assert_eq!(
        replica.next_puback().await,
        PubAckReason::NoMatchingSubscribers
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn upstream_protocol_3_1_1_is_chosen_when_asked_and_carries_no_properties() {
    let mosquitto = Mosquitto::start().await;
    let upstream = Upstream::Mosquitto(mosquitto);
    let Upstream::Mosquitto(m) = &upstream else {
        unreachable!()
    };
    let app = flowgate(
        m.addr,
        "dispatch",
        "upstream_protocol = \"3.1.1\"",
        "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\n",
    )
    .await;
    eventually("the upstream session is 3.1.1", || async {
        let (_, body) = http_get(app.admin_addr, "/api/instances").await;
        body.contains("\"upstream_protocol\": \"3.1.1\"")
    })
    .await;
    let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
    replica
        .subscribe(Filter::new("req/#", QoS::AtLeastOnce), None)
        .await;
    let sender = V5::connect(app.mqtt_addr, "sender", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sender
        .client
        .publish_with_properties("req/1", QoS::AtLeastOnce, false, "x", props(60, "x"))
        .await
        .expect("publish");
    let got = replica.next_publish().await;
    assert!(
        got.properties
            .as_ref()
            .is_none_or(|p| p.user_properties.is_empty()),
        "a 3.1.1 session carried properties: {got:?}"
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_replicas_receive_maximum_bounds_what_it_holds_unacknowledged() {
    let app = start(&Upstream::Embedded, "max_inflight = 50").await;
    let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |o| {
        o.set_receive_maximum(Some(3));
        o.set_manual_acks(true);
    })
    .await;
    replica
        .subscribe(Filter::new("jobs/#", QoS::AtLeastOnce), None)
        .await;
    let sender = V5::connect(app.mqtt_addr, "sender", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        sender
            .client
            .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish");
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(replica.next_publish().await);
    }
    assert!(
        replica
            .nothing_for(Duration::from_millis(600))
            .await
            .is_none(),
        "a fourth unacknowledged message came"
    );
    replica.client.ack(&held[0]).await.expect("ack");
    replica.next_publish().await;
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_v5_replica_that_breaks_the_protocol_hears_why() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = start(&Upstream::Embedded, "").await;
    let mut s = tokio::net::TcpStream::connect(app.mqtt_addr)
        .await
        .expect("connect");
    // CONNECT 5.0, clean start, keep-alive 60, no properties, id "line1-nodered"
    let mut connect = vec![
        0x10, 26, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 13,
    ];
    connect.extend_from_slice(b"line1-nodered");
    s.write_all(&connect).await.expect("connect sent");
    let mut connack = [0u8; 5];
    s.read_exact(&mut connack).await.expect("connack");
    assert_eq!(&connack[..4], &[0x20, 3, 0, 0], "CONNACK success");
    // PUBLISH QoS 0 "a" with topic alias 0 (a protocol error): 0x94
    s.write_all(&[0x30, 8, 0, 1, b'a', 3, 0x23, 0, 0, b'x'])
        .await
        .expect("publish sent");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert_eq!(
        rest,
        [0xe0, 0x01, 0x94],
        "DISCONNECT topic alias invalid, then close"
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_replica_that_resumes_its_session_gets_what_waited_for_it() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let persistent = |o: &mut MqttOptions| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(300));
        };
        let replica = V5::connect(app.mqtt_addr, "line1-nodered", persistent).await;
        assert!(!replica.session_present, "{name}: no session yet");
        replica
            .subscribe(Filter::new("jobs/#", QoS::AtLeastOnce), Some(3))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        replica.client.disconnect().await.expect("disconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(replica);
        let sender = V5::connect(app.mqtt_addr, "sender", |_| {}).await;
        for i in 0..3 {
            sender
                .client
                .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, "x")
                .await
                .expect("publish");
        }
        eventually("the jobs wait for the instance", || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_dispatch_queued_messages",
                &[("instance", "line1")],
            ) == 3.0
        })
        .await;
        // back with clean start off: session present, and no SUBSCRIBE needed
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", persistent).await;
        assert!(replica.session_present, "{name}: the session was resumed");
        for _ in 0..3 {
            let p = replica.next_publish().await;
            let ids = p.properties.map(|p| p.subscription_identifiers);
            assert_eq!(ids, Some(vec![3]), "{name}: its subscription identifier");
        }
        replica.client.disconnect().await.expect("disconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(replica);
        // a clean start ends the session: nothing is resumed
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        assert!(!replica.session_present, "{name}: clean start");
        sender
            .client
            .publish("jobs/9", QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish");
        assert!(
            replica
                .nothing_for(Duration::from_millis(500))
                .await
                .is_none(),
            "{name}"
        );
        app.shutdown(Duration::from_secs(2)).await;
    }
}

/// A v5 will with a delay and a user property, as a replica's CONNECT sets it.
fn delayed_will(payload: &str, delay: u32) -> rumqttc::v5::mqttbytes::v5::LastWill {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    LastWill::new(
        "status/line1",
        payload,
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("why".into(), "will".into())],
        }),
    )
}

/// A replica on a bare socket: CONNECT 5.0 with `will` (no delay), CONNACK
/// read.
async fn raw_v5_replica(addr: std::net::SocketAddr, will: &str) -> tokio::net::TcpStream {
    use rumqttc::v5::mqttbytes::v5::{Connect, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut connect = bytes::BytesMut::new();
    let c = Connect {
        keep_alive: 60,
        client_id: "line1-nodered".into(),
        clean_start: true,
        properties: None,
    };
    Packet::Connect(c, Some(delayed_will(will, 0)), None)
        .write(&mut connect, None)
        .expect("encode CONNECT");
    s.write_all(&connect).await.expect("connect sent");
    let mut connack = [0u8; 5];
    s.read_exact(&mut connack).await.expect("connack");
    assert_eq!(&connack[..4], &[0x20, 3, 0, 0], "CONNACK success");
    s
}

impl V5 {
    /// The next publish with this payload, when it came, and the payloads
    /// of those before it (a QoS 1 duplicate of an earlier one).
    async fn next_with(&mut self, payload: &str) -> (Publish, std::time::Instant, Vec<Bytes>) {
        let mut skipped = Vec::new();
        loop {
            let p = self.next_publish().await;
            if p.payload == payload {
                return (p, std::time::Instant::now(), skipped);
            }
            skipped.push(p.payload);
        }
    }
}

/// The instance's will waits for its delay: a replica back in time cancels
/// it, none back publishes it after the delay, a session that ends at once
/// (no session expiry) publishes it at once; a DISCONNECT (even the short
/// form MQTT.js and Paho send) drops it, one with reason 0x04 publishes it,
/// as a broker does.
#[tokio::test]
async fn the_will_waits_for_its_delay_and_a_replica_back_in_time_cancels_it() {
    use tokio::io::AsyncWriteExt;
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let mut observer = V5::connect(app.mqtt_addr, &unique_id("observer"), |_| {}).await;
        observer
            .subscribe(Filter::new("status/#", QoS::AtLeastOnce), None)
            .await;
        let connected = || async {
            let (_, m) = http_get(app.admin_addr, "/metrics").await;
            metric_sum(
                &m,
                "flowgate_instance_replicas_connected",
                &[("instance", "line1")],
            )
        };
        let with_will = |payload: &'static str, delay: u32, expiry: Option<u32>| {
            move |o: &mut MqttOptions| {
                o.set_last_will(delayed_will(payload, delay));
                o.set_session_expiry_interval(expiry);
            }
        };
        // dies without DISCONNECT; another replica is back within the delay
        let first = V5::connect(app.mqtt_addr, "line1-nodered", with_will("a", 2, Some(300))).await;
        drop(first);
        eventually("the replica is gone", || async { connected().await == 0.0 }).await;
        let second =
            V5::connect(app.mqtt_addr, "line1-nodered", with_will("b", 2, Some(300))).await;
        if let Some(p) = observer.nothing_for(Duration::from_secs(3)).await {
            panic!("{name}: a will although a replica came back: {p:?}");
        }
        // none back: the will after its delay, with its properties
        let gone = std::time::Instant::now();
        drop(second);
        let (will, at, _) = observer.next_with("b").await;
        let waited = at - gone;
        assert_eq!(will.topic, "status/line1", "{name}");
        let props = will.properties.unwrap_or_default();
        assert_eq!(
            props.user_properties,
            vec![("why".into(), "will".into())],
            "{name}: the will's properties"
        );
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6),
            "{name}: the will came {waited:?} after the replica died (delay 2 s)"
        );
        // no session expiry: the session ends with the connection, and the
        // will goes out then (the earlier of the two)
        let third = V5::connect(app.mqtt_addr, "line1-nodered", with_will("c", 30, None)).await;
        let gone = std::time::Instant::now();
        drop(third);
        let (_, at, _) = observer.next_with("c").await;
        assert!(
            at - gone < Duration::from_secs(2),
            "{name}: the will of an ended session came after {:?}",
            at - gone
        );
        // DISCONNECT in its shortest form: no will
        let mut s = raw_v5_replica(app.mqtt_addr, "d").await;
        s.write_all(&[0xe0, 0x00]).await.expect("disconnect sent");
        eventually("the replica is gone", || async { connected().await == 0.0 }).await;
        drop(s);
        // DISCONNECT 0x04, "disconnect with will message"
        let mut s = raw_v5_replica(app.mqtt_addr, "e").await;
        s.write_all(&[0xe0, 0x01, 0x04])
            .await
            .expect("disconnect sent");
        let (will, _, skipped) = observer.next_with("e").await;
        assert_eq!(
            will.topic, "status/line1",
            "{name}: the will after DISCONNECT 0x04"
        );
        assert!(
            !skipped.iter().any(|p| p == "d"),
            "{name}: a will after a plain DISCONNECT: {skipped:?}"
        );
        drop(s);
        app.shutdown(Duration::from_secs(2)).await;
    }
}

/// Retained messages a replica gets on subscribe come at their QoS (at most
/// the subscription's), with the retain flag, through its window: a receive
/// maximum of 1 holds them back one at a time, none is lost.
#[tokio::test]
async fn retained_messages_on_subscribe_keep_their_qos_within_the_window() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let outside = V5::connect(app.mqtt_addr, "outside", |_| {}).await;
        for (topic, qos) in [
            ("ret/0", QoS::AtMostOnce),
            ("ret/1", QoS::AtLeastOnce),
            ("ret/2", QoS::ExactlyOnce),
        ] {
            outside
                .client
                .publish(topic, qos, true, topic)
                .await
                .expect("publish");
        }
        // stored once a plain client (passed through) gets all three
        let mut probes = 0;
        eventually("the broker holds the three retained messages", || {
            probes += 1;
            let id = format!("probe{probes}");
            async move {
                let mut probe = V5::connect(app.mqtt_addr, &id, |_| {}).await;
                probe
                    .subscribe(Filter::new("ret/#", QoS::AtMostOnce), None)
                    .await;
                let mut n = 0;
                while probe
                    .nothing_for(Duration::from_millis(300))
                    .await
                    .is_some()
                {
                    n += 1;
                }
                n == 3
            }
        })
        .await;
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |o| {
            o.set_receive_maximum(Some(1));
        })
        .await;
        replica
            .subscribe(Filter::new("ret/#", QoS::AtLeastOnce), Some(4))
            .await;
        let mut got = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let p = replica.next_publish().await;
            assert!(p.retain, "{name}: {p:?}");
            let ids = p.properties.map(|p| p.subscription_identifiers);
            assert_eq!(ids, Some(vec![4]), "{name}: its subscription identifier");
            got.insert(String::from_utf8_lossy(&p.topic).into_owned(), p.qos);
        }
        assert_eq!(got.get("ret/1"), Some(&QoS::AtLeastOnce), "{name}: {got:?}");
        assert_eq!(got.get("ret/2"), Some(&QoS::AtLeastOnce), "{name}: {got:?}");
        if name == "mosquitto" {
            // rumqttd sends retained messages at the subscription's QoS
            // (README, known broker behaviour)
            assert_eq!(got.get("ret/0"), Some(&QoS::AtMostOnce), "{name}: {got:?}");
        }
        assert!(
            replica
                .nothing_for(Duration::from_millis(300))
                .await
                .is_none(),
            "{name}: each once"
        );
        app.shutdown(Duration::from_secs(2)).await;
    }
}

/// Retain as published: a live message published with the retain flag
/// keeps it for a subscription that asks (Mosquitto; rumqttd 0.20 clears
/// it, README), loses it for one that does not; neither gets the retained
/// messages twice when flowgate subscribes again upstream with the option.
#[tokio::test]
async fn retain_as_published_keeps_the_flag_of_live_messages() {
    for upstream in Upstream::both().await {
        let name = upstream.name();
        let app = start(&upstream, "").await;
        let outside = V5::connect(app.mqtt_addr, "outside", |_| {}).await;
        let mut replica = V5::connect(app.mqtt_addr, "line1-nodered", |_| {}).await;
        let mut plain = Filter::new("plain/#", QoS::AtLeastOnce);
        plain.retain_forward_rule = RetainForwardRule::Never;
        replica.subscribed(plain).await;
        let mut rap = Filter::new("rap/#", QoS::AtLeastOnce);
        rap.preserve_retain = true;
        rap.retain_forward_rule = RetainForwardRule::Never;
        replica.subscribed(rap).await;
        let mut flags = std::collections::BTreeMap::new();
        for topic in ["plain/1", "rap/1"] {
            // until the subscriptions are live upstream (the SUBACK came
            // after the broker's; the publisher is another connection)
            outside
                .client
                .publish(topic, QoS::AtLeastOnce, true, topic)
                .await
                .expect("publish");
            let p = replica.next_publish().await;
            flags.insert(String::from_utf8_lossy(&p.topic).into_owned(), p.retain);
        }
        assert_eq!(flags.get("plain/1"), Some(&false), "{name}: {flags:?}");
        let rap_kept = name == "mosquitto";
        assert_eq!(flags.get("rap/1"), Some(&rap_kept), "{name}: {flags:?}");
        let extra = replica.nothing_for(Duration::from_millis(500)).await;
        assert!(extra.is_none(), "{name}: {extra:?}");
        app.shutdown(Duration::from_secs(2)).await;
    }
}
