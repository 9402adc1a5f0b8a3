//! The dispatcher's promises, driven without sockets: events in, actions
//! out, on a clock the test moves.

use proptest::prelude::{any, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig};
use proptest::strategy::Strategy as Gen;

use super::super::wire;
use super::*;

fn settings() -> DispatchSettings {
    DispatchSettings {
        instance: "line1".into(),
        strategy: Strategy::LeastInflight,
        key_level: None,
        broadcast: Vec::new(),
        ack_timeout: Duration::from_secs(10),
        max_inflight: 16,
        failback: false,
        tie: None,
        key_hosts: Vec::new(),
        acl: None,
        queue_limit: 1000,
        upstream_share: false,
        upstream_addr: "127.0.0.1:1".into(),
        upstream_addr_v5: "127.0.0.1:1".into(),
        upstream_client_id: "flowgate-test-line1".into(),
        retained_timeout: Duration::from_secs(1),
        upstream_login: super::super::upstream::Login::default(),
        retain_options: true,
        complete: None,
    }
}

fn msg(topic: &str, qos: u8) -> Message {
    Message {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"{}"),
        qos: wire::QoS::from_bits(qos),
        retain: false,
        properties: None,
    }
}

/// A dispatcher, the actions it took since the test last looked, and a
/// clock.
struct Rig {
    d: Dispatcher,
    now: Instant,
    up: Vec<UpCmd>,
    to: BTreeMap<u16, Vec<Outgoing>>,
    present: Vec<(u16, bool)>,
    fetches: Vec<(u16, u64, Vec<String>)>,
}

impl Rig {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(f: impl FnOnce(&mut DispatchSettings)) -> Self {
        let mut cfg = settings();
        f(&mut cfg);
        let now = Instant::now();
        let mut rig = Self {
            d: Dispatcher::new(cfg, Arc::new(Metrics::new()), now),
            now,
            up: Vec::new(),
            to: BTreeMap::new(),
            present: Vec::new(),
            fetches: Vec::new(),
        };
        rig.send(Event::Upstream(UpEvent::Up {
            session_present: true,
            protocol: crate::mqtt::codec::Protocol::V5,
            window: None,
        }));
        rig
    }

    fn completing(correlate: &str) -> Self {
        Self::with(|s| s.complete = Some(complete(correlate)))
    }

    /// Feeds one event at the rig's time and records what it decided.
    fn send(&mut self, ev: Event) {
        for a in self.d.handle(ev, self.now) {
            match a {
                Action::ToReplica(slot, p) => self.to.entry(slot).or_default().push(p),
                Action::Present(slot, p) => self.present.push((slot, p)),
                Action::Up(cmd) => self.up.push(cmd),
                Action::Fetch {
                    slot,
                    generation,
                    fetch,
                } => self.fetches.push((slot, generation, fetch.filters)),
            }
        }
    }

    /// Time passes; the dispatcher's tick sees it.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.send(Event::Tick);
    }

    fn joined(&mut self, slot: u16, limits: ReplicaLimits, will: Option<Will>) {
        self.send(Event::Joined {
            slot,
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            will,
            counters: Arc::new(Metrics::new().replica("line1", slot)),
            limits,
        });
    }

    /// A replica joins and subscribes to `jobs/#` at QoS 2 (without
    /// retained messages); its SUBACK and the upstream SUBSCRIBE are taken.
    fn join(&mut self, slot: u16) {
        self.joined(slot, ReplicaLimits::default(), None);
        self.subscribe(slot, "jobs/#", 2);
        if let Some(sent) = self.to.get_mut(&slot) {
            sent.retain(|p| !matches!(p, Outgoing::SubAck { .. }));
        }
        self.up.retain(|c| !matches!(c, UpCmd::Subscribe { .. }));
    }

    fn subscribe(&mut self, slot: u16, filter: &str, retain_handling: u8) {
        self.send(Event::Packet {
            slot,
            packet: Incoming::Subscribe {
                pkid: 1,
                filters: vec![SubRequest {
                    retain_handling,
                    ..SubRequest::new(filter, wire::QoS::ExactlyOnce)
                }],
                id: None,
            },
        });
    }

    fn leave(&mut self, slot: u16, clean: bool) {
        self.send(Event::Left {
            slot,
            clean,
            expiry: None,
        });
    }

    /// The broker sends `topic` at `qos` with packet id `pkid`.
    fn publish(&mut self, topic: &str, qos: u8, pkid: u16) {
        self.send(Event::Upstream(UpEvent::Packets(vec![Incoming::Publish {
            msg: msg(topic, qos),
            pkid,
            dup: false,
        }])));
    }

    /// The broker sends job `jobs/{n}` (QoS 1) with packet id `pkid`.
    fn job(&mut self, n: u32, pkid: u16) {
        self.publish(&format!("jobs/{n}"), 1, pkid);
    }

    /// The messages `slot` got since the last call: (topic, its packet id).
    fn got(&mut self, slot: u16) -> Vec<(String, u16)> {
        self.got_all(slot)
            .into_iter()
            .map(|(m, pkid)| (m.topic, pkid))
            .collect()
    }

    fn got_all(&mut self, slot: u16) -> Vec<(Message, u16)> {
        let mut out = Vec::new();
        let mut rest = Vec::new();
        for p in self.to.remove(&slot).unwrap_or_default() {
            match p {
                Outgoing::Publish { msg, pkid, .. } => out.push((msg, pkid)),
                other => rest.push(other),
            }
        }
        if !rest.is_empty() {
            self.to.insert(slot, rest);
        }
        out
    }

    /// Everything else `slot` was sent since the last call.
    fn sent(&mut self, slot: u16) -> Vec<Outgoing> {
        self.to.remove(&slot).unwrap_or_default()
    }

    /// What each SUBACK `slot` got since the test last looked granted.
    fn subacks(&mut self, slot: u16) -> Vec<Vec<u8>> {
        (self.sent(slot).into_iter())
            .filter_map(|p| match p {
                Outgoing::SubAck { granted, .. } => Some(granted),
                _ => None,
            })
            .collect()
    }

    /// The packet ids of the SUBSCRIBEs sent upstream (they stay in `up`).
    fn up_subscribes(&self) -> Vec<u16> {
        (self.up.iter())
            .filter_map(|c| match c {
                UpCmd::Subscribe { pkid, .. } => Some(*pkid),
                _ => None,
            })
            .collect()
    }

    /// Which of replicas 0 and 1 got the one job sent, and its packet id.
    fn holder(&mut self) -> (u16, u16) {
        match self.got(0).first() {
            Some(g) => (0, g.1),
            None => (1, self.got(1)[0].1),
        }
    }

    /// `slot` acknowledges receipt of every job it got since the last call.
    fn ack_all(&mut self, slot: u16) {
        for (_, pkid) in self.got(slot) {
            self.ack(slot, pkid);
        }
    }

    /// The replica acknowledges receipt (PUBACK).
    fn ack(&mut self, slot: u16, pkid: u16) {
        self.send(Event::Packet {
            slot,
            packet: Incoming::PubAck(pkid, 0.into()),
        });
    }

    /// The replica publishes a result at `qos` (packet id 100 + n).
    fn result(&mut self, slot: u16, topic: &str, qos: u8, n: u16) {
        self.send(Event::Packet {
            slot,
            packet: Incoming::Publish {
                msg: Message {
                    payload: bytes::Bytes::from_static(b"ok"),
                    ..msg(topic, qos)
                },
                pkid: if qos == 0 { 0 } else { 100 + n },
                dup: false,
            },
        });
    }

    /// What went upstream since the last call: acks by packet id, and
    /// publishes by topic with their upstream packet id.
    fn drain_up(&mut self) -> (Vec<u16>, Vec<(String, u16)>) {
        let (mut acks, mut pubs) = (Vec::new(), Vec::new());
        for cmd in std::mem::take(&mut self.up) {
            match cmd {
                UpCmd::PubAck(p) => acks.push(p),
                UpCmd::Publish { msg, pkid, .. } => pubs.push((msg.topic, pkid)),
                _ => {}
            }
        }
        (acks, pubs)
    }

    fn up_acks(&mut self) -> Vec<u16> {
        self.drain_up().0
    }

    /// The broker acknowledges the upstream publish `pkid`.
    fn broker_acks(&mut self, pkid: u16) {
        self.send(Event::Upstream(UpEvent::Packets(vec![Incoming::PubAck(
            pkid,
            0.into(),
        )])));
    }
}

fn complete(correlate: &str) -> crate::config::Complete {
    crate::config::Complete {
        topic: vec![TopicFilter::new("done/#").expect("filter")],
        correlate: correlate.parse().expect("correlate"),
        timeout: Duration::from_secs(30),
    }
}

fn topics(got: &[(String, u16)]) -> Vec<&str> {
    got.iter().map(|g| g.0.as_str()).collect()
}

// ---- at least once: ack upstream only after a replica did, in order ----

#[test]
fn a_message_is_acknowledged_upstream_only_after_a_replica_acknowledged_it() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    assert_eq!(topics(&got), ["jobs/7"]);
    assert!(rig.up_acks().is_empty(), "delivered is not acknowledged");
    rig.ack(0, got[0].1);
    assert_eq!(rig.up_acks(), [10]);
}

#[test]
fn upstream_acknowledgements_keep_arrival_order_when_replicas_do_not() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.join(1);
    rig.job(1, 10);
    rig.job(2, 11);
    let (first, second) = (rig.got(0), rig.got(1));
    assert_eq!((first.len(), second.len()), (1, 1), "one each");
    // the later message is acknowledged first: it waits for the earlier
    rig.ack(1, second[0].1);
    assert!(rig.up_acks().is_empty());
    rig.ack(0, first[0].1);
    assert_eq!(rig.up_acks(), [10, 11]);
}

#[test]
fn a_message_the_broker_resends_while_flowgate_holds_it_is_not_delivered_twice() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.job(7, 10);
    rig.job(7, 10);
    assert_eq!(rig.got(0).len(), 1);
}

#[test]
fn qos0_goes_to_one_replica_and_no_copy_is_kept() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.join(1);
    rig.publish("jobs/1", 0, 0);
    let got: Vec<_> = [rig.got_all(0), rig.got_all(1)].concat();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.qos, got[0].1), (wire::QoS::AtMostOnce, 0));
    // nothing in flight: its replica leaving hands nothing on
    rig.leave(0, false);
    rig.leave(1, false);
    rig.join(2);
    assert!(rig.got(2).is_empty());
}

#[test]
fn qos2_is_received_upstream_once_the_replica_received_it() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.publish("jobs/1", 2, 10);
    let got = rig.got_all(0);
    assert_eq!(got[0].0.qos, wire::QoS::ExactlyOnce);
    assert!(rig.up.is_empty());
    rig.send(Event::Packet {
        slot: 0,
        packet: Incoming::PubRec(got[0].1, 0.into()),
    });
    assert_eq!(rig.sent(0), [Outgoing::PubRel(got[0].1)]);
    assert!(matches!(rig.up[..], [UpCmd::PubRec(10)]));
    rig.up.clear();
    rig.send(Event::Upstream(UpEvent::Packets(vec![Incoming::PubRel(
        10,
    )])));
    assert!(matches!(rig.up[..], [UpCmd::PubComp(10)]));
}

// ---- re-delivery: a departed or stalled replica's messages ----

#[test]
fn a_departed_replicas_unacknowledged_messages_go_to_another_oldest_first() {
    let mut rig = Rig::new();
    rig.join(0);
    for n in 1..=3 {
        rig.job(n, 10 + n as u16);
    }
    assert_eq!(rig.got(0).len(), 3);
    rig.leave(0, false);
    assert!(rig.up_acks().is_empty());
    rig.join(1);
    let got = rig.got(1);
    assert_eq!(topics(&got), ["jobs/1", "jobs/2", "jobs/3"]);
    for (_, pkid) in got.iter().rev() {
        rig.ack(1, *pkid);
    }
    assert_eq!(rig.up_acks(), [11, 12, 13]);
}

#[test]
fn a_replica_that_stops_acknowledging_loses_its_messages_after_ack_timeout() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.join(1);
    rig.job(1, 10);
    let (slow, pkid) = rig.holder();
    let other = 1 - slow;
    rig.advance(Duration::from_secs(9));
    assert!(rig.got(other).is_empty(), "not before ack_timeout");
    rig.advance(Duration::from_secs(2));
    assert_eq!(topics(&rig.got(other)), ["jobs/1"]);
    // a stalled replica gets nothing new until it acknowledges again
    rig.job(2, 11);
    rig.job(3, 12);
    assert!(rig.got(slow).is_empty());
    assert_eq!(rig.got(other).len(), 2);
    // its late ack of a message handed on acknowledges nothing upstream
    rig.ack(slow, pkid);
    assert!(rig.up_acks().is_empty());
    rig.job(4, 13);
    rig.job(5, 14);
    assert!(
        !rig.got(slow).is_empty(),
        "acknowledging again: back in turn"
    );
}

// ---- bounded queue, windows, back-pressure ----

#[test]
fn messages_wait_in_a_bounded_queue_then_the_broker_is_not_read() {
    let mut rig = Rig::with(|s| s.queue_limit = 3);
    for n in 1..=3 {
        assert!(rig.d.takes_upstream());
        rig.job(n, 10 + n as u16);
    }
    assert!(!rig.d.takes_upstream(), "full: the broker holds the rest");
    rig.join(0);
    assert_eq!(rig.got(0).len(), 3);
    assert!(rig.d.takes_upstream());
}

#[test]
fn the_window_bounds_unacknowledged_messages_per_replica() {
    let mut rig = Rig::with(|s| s.max_inflight = 2);
    rig.join(0);
    for n in 1..=3 {
        rig.job(n, 10 + n as u16);
    }
    let got = rig.got(0);
    assert_eq!(topics(&got), ["jobs/1", "jobs/2"]);
    rig.ack(0, got[0].1);
    assert_eq!(topics(&rig.got(0)), ["jobs/3"]);
}

#[test]
fn a_replicas_receive_maximum_lowers_its_window() {
    let mut rig = Rig::new();
    let limits = ReplicaLimits {
        receive_max: Some(1),
        v5: true,
        ..ReplicaLimits::default()
    };
    rig.joined(0, limits, None);
    rig.subscribe(0, "jobs/#", 2);
    rig.job(1, 10);
    rig.job(2, 11);
    assert_eq!(rig.got(0).len(), 1);
}

// ---- the instance's will ----

fn will(delay: u32) -> Will {
    Will {
        msg: msg("status/line1", 1),
        delay,
    }
}

fn wills_published(rig: &mut Rig) -> usize {
    rig.drain_up()
        .1
        .iter()
        .filter(|(t, _)| t == "status/line1")
        .count()
}

#[test]
fn the_will_goes_out_only_when_the_last_replica_dies() {
    let mut rig = Rig::new();
    rig.joined(0, ReplicaLimits::default(), Some(will(0)));
    rig.joined(1, ReplicaLimits::default(), Some(will(0)));
    assert!(rig.up.iter().any(|c| matches!(c, UpCmd::SetWill(Some(_)))));
    rig.leave(0, false);
    assert_eq!(wills_published(&mut rig), 0, "one replica is left");
    rig.leave(1, false);
    assert_eq!(wills_published(&mut rig), 1);
}

#[test]
fn no_will_when_the_last_replica_disconnects_cleanly() {
    let mut rig = Rig::new();
    rig.joined(0, ReplicaLimits::default(), Some(will(0)));
    rig.leave(0, true);
    assert_eq!(wills_published(&mut rig), 0);
}

#[test]
fn a_will_delay_waits_and_a_replica_back_in_time_cancels_it() {
    let keep = ReplicaLimits {
        keep: Some(Duration::from_secs(60)),
        ..ReplicaLimits::default()
    };
    let mut rig = Rig::new();
    rig.joined(0, keep, Some(will(5)));
    rig.leave(0, false);
    rig.advance(Duration::from_secs(4));
    rig.joined(1, keep, None);
    rig.advance(Duration::from_secs(10));
    assert_eq!(wills_published(&mut rig), 0, "cancelled");
    rig.leave(1, false);
    rig.advance(Duration::from_secs(4));
    assert_eq!(wills_published(&mut rig), 0, "within the delay");
    rig.advance(Duration::from_secs(2));
    assert_eq!(wills_published(&mut rig), 1);
}

// ---- strategies ----

/// Which slot got each of `n` jobs sent one at a time (each acknowledged).
fn owners(rig: &mut Rig, slots: &[u16], keys: impl Iterator<Item = u32>) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, k) in keys.enumerate() {
        rig.job(k, i as u16 + 1);
        let mut owner = None;
        for &s in slots {
            for (_, pkid) in rig.got(s) {
                assert!(owner.is_none(), "one message, one replica");
                owner = Some(s);
                rig.ack(s, pkid);
            }
        }
        out.push(owner.expect("delivered"));
    }
    out
}

#[test]
fn round_robin_takes_each_replica_in_turn() {
    let mut rig = Rig::with(|s| s.strategy = Strategy::RoundRobin);
    for s in 0..3 {
        rig.join(s);
    }
    let got = owners(&mut rig, &[0, 1, 2], 0..6);
    assert_eq!(got[..3], got[3..], "the same turn twice");
    let mut first: Vec<u16> = got[..3].to_vec();
    first.sort_unstable();
    assert_eq!(first, [0, 1, 2]);
}

#[test]
fn least_inflight_picks_the_replica_with_fewer_unacknowledged() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.join(1);
    rig.job(1, 10);
    let (busy, _) = rig.holder();
    // the busy one keeps its message: the next three alternate no more
    rig.job(2, 11);
    assert_eq!(rig.got(1 - busy).len(), 1);
    rig.job(3, 12);
    rig.job(4, 13);
    assert_eq!(rig.got(busy).len() + rig.got(1 - busy).len(), 2);
}

#[test]
fn key_hash_keeps_a_key_on_one_replica_and_moves_only_a_leavers_keys() {
    let mut rig = Rig::with(|s| {
        s.strategy = Strategy::KeyHash;
        s.key_level = Some(1);
    });
    for s in 0..3 {
        rig.join(s);
    }
    let before = owners(&mut rig, &[0, 1, 2], 0..90);
    assert_eq!(before, owners(&mut rig, &[0, 1, 2], 0..90), "stable");
    for s in 0..3 {
        let share = before.iter().filter(|&&o| o == s).count();
        assert!((15..=45).contains(&share), "replica {s} has {share} of 90");
    }
    rig.leave(2, true);
    let after = owners(&mut rig, &[0, 1], 0..90);
    for (b, a) in before.iter().zip(&after) {
        if *b != 2 {
            assert_eq!(a, b, "a key of a replica that stayed moved");
        }
    }
    assert!(after.contains(&0) && after.contains(&1));
}

#[test]
fn active_standby_gives_everything_to_one_replica_and_fails_over() {
    let mut rig = Rig::with(|s| s.strategy = Strategy::ActiveStandby);
    rig.join(1);
    rig.join(0);
    assert!(owners(&mut rig, &[0, 1], 0..5).iter().all(|&s| s == 1));
    // the active one leaves holding a message: the standby takes it
    rig.job(9, 100);
    assert_eq!(rig.got(1).len(), 1);
    rig.leave(1, false);
    assert_eq!(topics(&rig.got(0)), ["jobs/9"]);
    // the first replica back does not take the role (no failback)
    rig.join(1);
    let next = owners(&mut rig, &[0, 1], 10..13);
    assert!(next.iter().all(|&s| s == 0), "{next:?}");
}

#[test]
fn active_standby_with_failback_gives_the_role_back_to_the_lower_slot() {
    let mut rig = Rig::with(|s| {
        s.strategy = Strategy::ActiveStandby;
        s.failback = true;
    });
    rig.join(0);
    rig.join(1);
    rig.leave(0, false);
    assert!(owners(&mut rig, &[0, 1], 0..3).iter().all(|&s| s == 1));
    rig.join(0);
    assert!(owners(&mut rig, &[0, 1], 3..6).iter().all(|&s| s == 0));
}

#[test]
fn broadcast_topics_go_to_every_replica_acknowledged_at_once() {
    let mut rig = Rig::with(|s| s.broadcast = vec![TopicFilter::new("jobs/config").expect("f")]);
    rig.join(0);
    rig.join(1);
    rig.publish("jobs/config", 1, 10);
    assert_eq!(rig.got(0).len(), 1);
    assert_eq!(rig.got(1).len(), 1);
    assert_eq!(rig.up_acks(), [10]);
}

// ---- replicas' own publishes and subscriptions ----

#[test]
fn a_replicas_publish_is_acknowledged_with_the_brokers_reason() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.result(0, "out/1", 1, 5);
    let (_, pubs) = rig.drain_up();
    assert_eq!(topics(&pubs), ["out/1"]);
    assert!(rig.sent(0).is_empty(), "not before the broker has it");
    rig.send(Event::Upstream(UpEvent::Packets(vec![Incoming::PubAck(
        pubs[0].1,
        0x10.into(),
    )])));
    assert_eq!(rig.sent(0), [Outgoing::PubAck(105, 0x10.into())]);
}

#[test]
fn publishes_the_broker_did_not_acknowledge_go_again_with_dup_when_it_is_back() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.result(0, "out/1", 1, 5);
    rig.up.clear();
    rig.send(Event::Upstream(UpEvent::Down));
    rig.send(Event::Upstream(UpEvent::Up {
        session_present: true,
        protocol: crate::mqtt::codec::Protocol::V5,
        window: None,
    }));
    assert!(matches!(
        &rig.up[..],
        [UpCmd::Publish { msg, dup: true, .. }] if msg.topic == "out/1"
    ));
}

#[test]
fn a_replicas_suback_waits_for_the_brokers() {
    let mut rig = Rig::new();
    rig.joined(0, ReplicaLimits::default(), None);
    rig.subscribe(0, "a/#", 2);
    rig.subscribe(0, "b/#", 2);
    let pkids = rig.up_subscribes();
    assert_eq!(pkids.len(), 2);
    assert!(rig.subacks(0).is_empty());
    // the broker grants QoS 1 to the first and refuses the second
    let suback = |pkid, code| Incoming::SubAck(pkid, vec![code], AckProps::default());
    rig.send(Event::Upstream(UpEvent::Packets(vec![
        suback(pkids[0], 1),
        suback(pkids[1], 0x87),
    ])));
    assert_eq!(rig.subacks(0), [vec![1], vec![0x87]]);
}

#[test]
fn shared_and_forbidden_subscriptions_are_refused() {
    let mut rig = Rig::with(|s| {
        s.acl = Some(crate::config::Acl {
            publish: Some(vec![TopicFilter::new("out/#").expect("f")]),
            subscribe: Some(vec![TopicFilter::new("jobs/#").expect("f")]),
        })
    });
    rig.joined(0, ReplicaLimits::default(), None);
    rig.subscribe(0, "$share/g/jobs/#", 2);
    rig.subscribe(0, "secret/#", 2);
    assert_eq!(
        rig.subacks(0),
        [
            vec![wire::SUB_SHARED_NOT_SUPPORTED],
            vec![wire::SUB_NOT_AUTHORIZED]
        ]
    );
    rig.result(0, "secret/x", 1, 1);
    assert_eq!(
        rig.sent(0),
        [Outgoing::PubAck(101, wire::NOT_AUTHORIZED.into())]
    );
    assert!(rig.drain_up().1.is_empty(), "nothing upstream");
}

#[test]
fn retained_messages_are_fetched_on_subscribe_for_that_join_only() {
    let mut rig = Rig::new();
    rig.joined(0, ReplicaLimits::default(), None);
    rig.subscribe(0, "cfg/#", 0);
    let pkid = *rig.up_subscribes().first().expect("subscribed upstream");
    assert!(rig.fetches.is_empty(), "not before the SUBACK");
    rig.send(Event::Upstream(UpEvent::Packets(vec![Incoming::SubAck(
        pkid,
        vec![2],
        AckProps::default(),
    )])));
    let (slot, generation, filters) = rig.fetches.pop().expect("a fetch");
    assert_eq!((slot, filters), (0, vec!["cfg/#".to_owned()]));
    let retained = Message {
        retain: true,
        ..msg("cfg/a", 1)
    };
    rig.send(Event::Fetched {
        slot,
        generation,
        messages: vec![retained.clone()],
    });
    let got = rig.got_all(0);
    assert_eq!(got.len(), 1);
    assert!(got[0].0.retain, "the retain flag as a broker sends it");
    // a fetch for an earlier connection of the slot is dropped
    rig.leave(0, true);
    rig.joined(0, ReplicaLimits::default(), None);
    rig.subscribe(0, "cfg/#", 2);
    rig.send(Event::Fetched {
        slot,
        generation,
        messages: vec![retained],
    });
    assert!(rig.got(0).is_empty());
}

#[test]
fn an_expired_message_is_not_delivered_and_is_acknowledged() {
    let mut rig = Rig::new();
    let mut m = msg("jobs/1", 1);
    m.properties = Some(Box::new(rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(5),
        ..Default::default()
    }));
    rig.send(Event::Upstream(UpEvent::Packets(vec![Incoming::Publish {
        msg: m.clone(),
        pkid: 10,
        dup: false,
    }])));
    rig.send(Event::Upstream(UpEvent::Packets(vec![Incoming::Publish {
        msg: m,
        pkid: 11,
        dup: false,
    }])));
    rig.advance(Duration::from_secs(2));
    let v5 = ReplicaLimits {
        v5: true,
        receive_max: Some(1),
        ..ReplicaLimits::default()
    };
    rig.joined(0, v5, None);
    rig.subscribe(0, "jobs/#", 2);
    let got = rig.got_all(0);
    let left = got[0]
        .0
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert_eq!(left, Some(3), "counted down by the time it waited");
    rig.advance(Duration::from_secs(4));
    rig.ack(0, got[0].1);
    assert!(rig.got(0).is_empty(), "the second expired while it waited");
    assert_eq!(rig.up_acks(), [10, 11]);
}

#[test]
fn a_slot_resumes_the_session_its_last_replica_kept() {
    let keep = ReplicaLimits {
        keep: Some(Duration::from_secs(60)),
        ..ReplicaLimits::default()
    };
    let mut rig = Rig::new();
    rig.joined(0, keep, None);
    rig.subscribe(0, "jobs/#", 2);
    rig.leave(0, true);
    rig.job(1, 10);
    rig.joined(0, keep, None);
    assert_eq!(rig.present.pop(), Some((0, true)));
    assert_eq!(topics(&rig.got(0)), ["jobs/1"], "its subscriptions too");
    // a clean start does not resume; nor does a session past its expiry
    rig.leave(0, true);
    rig.joined(
        0,
        ReplicaLimits {
            clean_start: true,
            ..keep
        },
        None,
    );
    assert_eq!(rig.present.pop(), Some((0, false)));
    rig.subscribe(0, "jobs/#", 2);
    rig.leave(0, true);
    rig.advance(Duration::from_secs(61));
    rig.joined(0, keep, None);
    assert_eq!(rig.present.pop(), Some((0, false)));
}

// ---- the broker's in-flight window ----

fn window(rig: &mut Rig, w: usize) {
    rig.send(Event::Upstream(UpEvent::Up {
        session_present: true,
        protocol: crate::mqtt::codec::Protocol::V5,
        window: Some(w),
    }));
}

#[test]
fn a_full_broker_window_while_a_replica_has_room_is_counted_once_per_episode() {
    let mut rig = Rig::completing("topic:1");
    window(&mut rig, 2);
    rig.join(0);
    rig.job(1, 10);
    assert_eq!(rig.d.window_full_total.get(), 0);
    rig.job(2, 11);
    assert_eq!(rig.d.window_full_total.get(), 1, "2 of 2 held, room left");
    rig.ack_all(0);
    assert_eq!(rig.d.window_full_total.get(), 1, "the same episode");
    rig.result(0, "done/1", 0, 0);
    assert_eq!(rig.up_acks(), [10]);
    assert!(!rig.d.window_full);
    rig.job(3, 12);
    assert_eq!(rig.d.window_full_total.get(), 2);
}

#[test]
fn a_full_broker_window_is_not_the_limit_when_the_replicas_are_full() {
    let mut rig = Rig::with(|s| s.max_inflight = 2);
    window(&mut rig, 2);
    rig.join(0);
    rig.job(1, 10);
    rig.job(2, 11);
    assert_eq!(rig.d.window_full_total.get(), 0);
}

// ---- completion acknowledgement ----

#[test]
fn a_job_is_acknowledged_upstream_when_its_result_is_stored_not_on_receipt() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    assert_eq!(got.len(), 1);
    rig.ack(0, got[0].1);
    assert_eq!(rig.drain_up().0, Vec::<u16>::new(), "receipt is not done");
    // a QoS 1 result: the job is done once the broker has the result
    rig.result(0, "done/7", 1, 1);
    let (acks, pubs) = rig.drain_up();
    assert!(acks.is_empty(), "before the broker stored the result");
    assert_eq!(pubs.len(), 1);
    rig.broker_acks(pubs[0].1);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn a_result_is_acknowledged_to_its_replica_at_once_and_its_job_upstream_once_stored() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.job(7, 10);
    rig.job(8, 11);
    rig.ack_all(0);
    rig.sent(0);
    // QoS 1 results, the second reusing the first's packet id at once
    rig.result(0, "done/7", 1, 1);
    assert_eq!(rig.sent(0), [Outgoing::PubAck(101, 0.into())], "at once");
    rig.send(Event::Packet {
        slot: 0,
        packet: Incoming::Publish {
            msg: msg("done/8", 1),
            pkid: 101,
            dup: false,
        },
    });
    assert_eq!(rig.sent(0), [Outgoing::PubAck(101, 0.into())], "not a DUP");
    let (acks, pubs) = rig.drain_up();
    assert!(acks.is_empty(), "the jobs wait for the broker");
    assert_eq!(topics(&pubs), ["done/7", "done/8"]);
    for (_, pkid) in &pubs {
        rig.broker_acks(*pkid);
    }
    assert_eq!(rig.up_acks(), [10, 11]);
    assert!(rig.sent(0).is_empty(), "nothing more for the replica");
}

#[test]
fn a_job_its_replica_took_and_did_not_finish_goes_to_another_when_it_leaves() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    rig.leave(0, false);
    assert!(rig.drain_up().0.is_empty());
    rig.join(1);
    let got = rig.got(1);
    assert_eq!(topics(&got), ["jobs/7"]);
    rig.ack(1, got[0].1);
    rig.result(1, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn without_complete_receipt_is_done_as_before() {
    let mut rig = Rig::new();
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn acknowledgements_stay_in_arrival_order_when_results_do_not() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.job(1, 10);
    rig.job(2, 11);
    rig.ack_all(0);
    rig.result(0, "done/2", 0, 0);
    assert!(rig.drain_up().0.is_empty(), "job 10 is not done yet");
    rig.result(0, "done/1", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10, 11]);
}

#[test]
fn a_job_without_a_key_is_done_on_receipt_and_counted() {
    let mut rig = Rig::completing("json:id");
    rig.join(0);
    rig.job(7, 10); // payload {} has no "id"
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    assert_eq!(rig.drain_up().0, vec![10]);
    assert_eq!(rig.d.uncorrelated.get(), 1);
}

#[test]
fn a_result_naming_no_job_is_counted_and_acknowledges_nothing() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.join(1);
    rig.job(7, 10);
    let (slot, pkid) = rig.holder();
    rig.ack(slot, pkid);
    rig.result(slot, "done/8", 0, 0); // no such job
    rig.result(1 - slot, "done/7", 0, 0); // another replica's job
    assert!(rig.drain_up().0.is_empty());
    assert_eq!(rig.d.unmatched.get(), 2);
    // results still go upstream as publishes
    rig.result(slot, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn a_job_not_done_within_the_timeout_goes_to_another_replica() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.join(1);
    rig.job(7, 10);
    let (slot, pkid) = rig.holder();
    rig.ack(slot, pkid);
    // the other replica gets job 8 (fewer in flight) and holds it: by
    // least-inflight job 7 would now go back to the slow one
    let other = 1 - slot;
    rig.advance(Duration::from_secs(20));
    rig.job(8, 11);
    let got8 = rig.got(other);
    assert_eq!(got8.len(), 1);
    rig.ack(other, got8[0].1);
    // past complete.timeout (30 s) for job 7 only: handed on, to the other
    rig.advance(Duration::from_secs(11));
    let got = rig.got(other);
    assert_eq!(topics(&got), ["jobs/7"]);
    assert!(rig.got(slot).is_empty(), "not back to the slow replica");
    rig.ack(other, got[0].1);
    rig.result(other, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn two_jobs_with_one_key_are_finished_oldest_first() {
    let mut rig = Rig::completing("topic:1");
    rig.join(0);
    rig.job(7, 10);
    rig.job(7, 11);
    rig.ack_all(0);
    rig.result(0, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10], "the older one");
    rig.result(0, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![11]);
    rig.result(0, "done/7", 0, 0);
    assert!(rig.drain_up().0.is_empty());
    assert_eq!(rig.d.unmatched.get(), 1, "a third result names no job");
}

// ---- any interleaving ----

#[derive(Debug, Clone)]
enum Step {
    /// The broker sends the next QoS 1 message.
    Message,
    Join(u16),
    Leave(u16, bool),
    /// A replica acknowledges the n-th message it holds (by the rig's record).
    Ack(u16, usize),
    /// Time passes (beyond ack_timeout when long).
    Wait(bool),
}

fn step() -> impl Gen<Value = Step> {
    prop_oneof![
        4 => Just(Step::Message),
        2 => (0u16..3).prop_map(Step::Join),
        1 => (0u16..3, any::<bool>()).prop_map(|(s, c)| Step::Leave(s, c)),
        6 => (0u16..3, 0usize..4).prop_map(|(s, n)| Step::Ack(s, n)),
        1 => any::<bool>().prop_map(Step::Wait),
    ]
}

/// No upstream message is in two places (queue, a replica's window) at
/// once, and each not yet acknowledged upstream is in one of them.
fn check_held(d: &Dispatcher, arrived: &[u16], acked: &[u16]) {
    let mut places: HashMap<u16, usize> = HashMap::new();
    let origins = d.queue.iter().map(|q| q.origin).chain(
        d.replicas
            .values()
            .flat_map(|r| r.inflight.values().map(|i| i.queued.origin)),
    );
    for o in origins {
        if let Origin::Upstream { pkid, .. } = o {
            *places.entry(pkid).or_default() += 1;
        }
    }
    for (pkid, n) in &places {
        assert_eq!(*n, 1, "message {pkid} is in {n} places at once");
    }
    for pkid in arrived {
        let done = acked.contains(pkid) || d.ack_order.iter().any(|p| p.pkid == *pkid && p.ready);
        assert!(
            done || places.contains_key(pkid),
            "message {pkid} is lost: neither held nor acknowledged"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_interleaving_loses_a_message_reorders_acks_or_doubles_a_delivery(
        steps in proptest::collection::vec(step(), 1..120),
        strategy in prop_oneof![
            Just(Strategy::RoundRobin),
            Just(Strategy::LeastInflight),
            Just(Strategy::KeyHash),
            Just(Strategy::ActiveStandby),
        ],
    ) {
        let mut rig = Rig::with(|s| {
            s.strategy = strategy;
            s.key_level = Some(1);
            s.max_inflight = 3;
        });
        let (mut arrived, mut acked) = (Vec::new(), Vec::new());
        // what each replica holds, as it saw it: packet ids in order
        let mut holds: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        let mut next = 0u16;
        let record = |rig: &mut Rig, holds: &mut BTreeMap<u16, Vec<u16>>, acked: &mut Vec<u16>| {
            for s in 0..3u16 {
                let got = rig.got(s);
                holds.entry(s).or_default().extend(got.iter().map(|g| g.1));
            }
            acked.extend(rig.up_acks());
        };
        for st in steps {
            match st {
                Step::Message => {
                    next += 1;
                    arrived.push(next);
                    rig.job(u32::from(next % 7), next);
                }
                Step::Join(s) if !rig.d.replicas.contains_key(&s) => rig.join(s),
                Step::Leave(s, clean) if rig.d.replicas.contains_key(&s) => {
                    rig.leave(s, clean);
                    holds.remove(&s);
                }
                Step::Ack(s, n) => {
                    let h = holds.entry(s).or_default();
                    if n < h.len() {
                        let pkid = h.remove(n);
                        rig.ack(s, pkid);
                    }
                }
                Step::Wait(long) => rig.advance(Duration::from_secs(if long { 11 } else { 1 })),
                _ => {}
            }
            record(&mut rig, &mut holds, &mut acked);
            check_held(&rig.d, &arrived, &acked);
        }
        // then one replica stays and acknowledges everything it gets
        for s in 0..3 {
            if rig.d.replicas.contains_key(&s) {
                rig.leave(s, true);
            }
        }
        holds.clear();
        rig.join(0);
        for _ in 0..arrived.len() + 1 {
            record(&mut rig, &mut holds, &mut acked);
            for pkid in holds.remove(&0).unwrap_or_default() {
                rig.ack(0, pkid);
            }
        }
        record(&mut rig, &mut holds, &mut acked);
        prop_assert_eq!(&acked, &arrived, "every message acknowledged once, in arrival order");
    }
}
