//! The dispatcher's decisions, driven without sockets: events in, commands
//! and deliveries out through its channels.

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

fn pkid_of(cmd: &UpCmd) -> u16 {
    match cmd {
        UpCmd::PubAck(p) => *p,
        other => panic!("not a PUBACK: {other:?}"),
    }
}

#[test]
fn upstream_commands_wait_in_order_when_the_channel_is_full() {
    let (up, mut up_rx) = mpsc::channel(2);
    let mut d = Dispatcher::new(settings(), up, Arc::new(Metrics::new()));
    for pkid in 1..=5 {
        d.send_up(UpCmd::PubAck(pkid));
    }
    // two fit, three wait: none dropped
    assert_eq!(d.backlog.len(), 3);
    let mut got = Vec::new();
    while got.len() < 5 {
        while let Ok(cmd) = up_rx.try_recv() {
            got.push(pkid_of(&cmd));
        }
        d.flush_backlog();
        // a command sent while others wait goes behind them
        if got.len() == 2 {
            d.send_up(UpCmd::PubAck(6));
        }
    }
    while let Ok(cmd) = up_rx.try_recv() {
        got.push(pkid_of(&cmd));
    }
    d.flush_backlog();
    while let Ok(cmd) = up_rx.try_recv() {
        got.push(pkid_of(&cmd));
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    assert!(d.backlog.is_empty());
}

/// A dispatcher with its channels, driven by calling its handlers.
struct Rig {
    d: Dispatcher,
    up: mpsc::Receiver<UpCmd>,
    replicas: BTreeMap<u16, mpsc::Receiver<Outgoing>>,
}

impl Rig {
    fn new(complete: Option<crate::config::Complete>) -> Self {
        let (up_tx, up) = mpsc::channel(1024);
        let metrics = Arc::new(Metrics::new());
        let mut d = Dispatcher::new(
            DispatchSettings {
                complete,
                ..settings()
            },
            up_tx,
            metrics,
        );
        d.on_upstream(UpEvent::Up {
            session_present: true,
            protocol: crate::mqtt::codec::Protocol::V5,
        });
        Self {
            d,
            up,
            replicas: BTreeMap::new(),
        }
    }

    /// A replica joins and subscribes to `jobs/#` at QoS 1 (without
    /// retained messages).
    fn join(&mut self, slot: u16) {
        let (tx, rx) = mpsc::channel(64);
        let metrics = Metrics::new();
        self.d.on_replica(ReplicaEvent::Joined {
            slot,
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            tx,
            will: None,
            counters: Arc::new(metrics.replica("line1", slot)),
            limits: ReplicaLimits::default(),
            present: None,
        });
        self.d.on_replica(ReplicaEvent::Packet {
            slot,
            packet: Incoming::Subscribe {
                pkid: 1,
                // retain handling 2: no retained fetch (a side session)
                filters: vec![SubRequest {
                    retain_handling: 2,
                    ..SubRequest::new("jobs/#", 1)
                }],
                id: None,
            },
        });
        self.replicas.insert(slot, rx);
        self.drain_up();
    }

    fn leave(&mut self, slot: u16) {
        self.d.on_left(slot, false, None);
        self.replicas.remove(&slot);
    }

    /// The broker sends job `jobs/{n}` with packet id `pkid`.
    fn job(&mut self, n: u32, pkid: u16) {
        self.d.on_upstream(UpEvent::Packets(vec![Incoming::Publish {
            msg: Message {
                topic: format!("jobs/{n}"),
                payload: bytes::Bytes::from_static(b"{}"),
                qos: 1,
                retain: false,
                properties: None,
            },
            pkid,
            dup: false,
        }]));
    }

    /// The jobs `slot` got since the last call: (topic, its packet id).
    fn got(&mut self, slot: u16) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        if let Some(rx) = self.replicas.get_mut(&slot) {
            while let Ok(p) = rx.try_recv() {
                if let Outgoing::Publish { msg, pkid, .. } = p {
                    out.push((msg.topic, pkid));
                }
            }
        }
        out
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
        self.d.on_replica(ReplicaEvent::Packet {
            slot,
            packet: Incoming::PubAck(pkid, 0.into()),
        });
    }

    /// The replica publishes a result at `qos` (packet id 100 + n).
    fn result(&mut self, slot: u16, topic: &str, qos: u8, n: u16) {
        self.d.on_replica(ReplicaEvent::Packet {
            slot,
            packet: Incoming::Publish {
                msg: Message {
                    topic: topic.into(),
                    payload: bytes::Bytes::from_static(b"ok"),
                    qos,
                    retain: false,
                    properties: None,
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
        while let Ok(cmd) = self.up.try_recv() {
            match cmd {
                UpCmd::PubAck(p) => acks.push(p),
                UpCmd::Publish { msg, pkid, .. } => pubs.push((msg.topic, pkid)),
                _ => {}
            }
        }
        (acks, pubs)
    }

    /// The broker acknowledges the upstream publish `pkid`.
    fn broker_acks(&mut self, pkid: u16) {
        self.d
            .on_upstream(UpEvent::Packets(vec![Incoming::PubAck(pkid, 0.into())]));
    }
}

fn complete(correlate: &str) -> crate::config::Complete {
    crate::config::Complete {
        topic: vec![TopicFilter::new("done/#").expect("filter")],
        correlate: correlate.parse().expect("correlate"),
        timeout: Duration::from_secs(30),
    }
}

#[test]
fn a_job_is_acknowledged_upstream_when_its_result_is_stored_not_on_receipt() {
    let mut rig = Rig::new(Some(complete("topic:1")));
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
fn a_job_its_replica_took_and_did_not_finish_goes_to_another_when_it_leaves() {
    let mut rig = Rig::new(Some(complete("topic:1")));
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    rig.leave(0);
    assert!(rig.drain_up().0.is_empty());
    rig.join(1);
    let got = rig.got(1);
    assert_eq!(
        got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        ["jobs/7"]
    );
    rig.ack(1, got[0].1);
    rig.result(1, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn without_complete_receipt_is_done_as_before() {
    let mut rig = Rig::new(None);
    rig.join(0);
    rig.job(7, 10);
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn acknowledgements_stay_in_arrival_order_when_results_do_not() {
    let mut rig = Rig::new(Some(complete("topic:1")));
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
    let mut rig = Rig::new(Some(complete("json:id")));
    rig.join(0);
    rig.job(7, 10); // payload {} has no "id"
    let got = rig.got(0);
    rig.ack(0, got[0].1);
    assert_eq!(rig.drain_up().0, vec![10]);
    assert_eq!(rig.d.uncorrelated.get(), 1);
}

#[test]
fn a_result_naming_no_job_is_counted_and_acknowledges_nothing() {
    let mut rig = Rig::new(Some(complete("topic:1")));
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
    let mut rig = Rig::new(Some(complete("topic:1")));
    rig.join(0);
    rig.join(1);
    rig.job(7, 10);
    let (slot, pkid) = rig.holder();
    rig.ack(slot, pkid);
    // the other replica gets job 8 (fewer in flight) and holds it: by
    // least-inflight job 7 would now go back to the slow one
    let other = 1 - slot;
    rig.job(8, 11);
    assert_eq!(rig.got(other).len(), 1);
    // past complete.timeout (30 s): handed on, to the other replica
    rig.d.sweep_jobs(Instant::now() + Duration::from_secs(31));
    rig.d.pump();
    let got = rig.got(other);
    assert_eq!(
        got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        ["jobs/7"]
    );
    assert!(rig.got(slot).is_empty(), "not back to the slow replica");
    rig.ack(other, got[0].1);
    rig.result(other, "done/7", 0, 0);
    assert_eq!(rig.drain_up().0, vec![10]);
}

#[test]
fn two_jobs_with_one_key_are_finished_oldest_first() {
    let mut rig = Rig::new(Some(complete("topic:1")));
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
