//! The dispatcher task of one instance: all dispatch state and decisions.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::strategy::{self, Candidate, Strategy};
use super::upstream::{RetainedFetch, UpCmd, UpEvent};
use super::wire::{Incoming, Message, Outgoing};
use crate::metrics::{Metrics, ReplicaCounters};
use crate::mqtt::topic::TopicFilter;

/// Per-instance dispatch settings, from the config.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub instance: String,
    pub strategy: Strategy,
    pub key_level: Option<usize>,
    pub broadcast: Vec<TopicFilter>,
    pub ack_timeout: Duration,
    pub max_inflight: usize,
    pub queue_limit: usize,
    /// Subscribe upstream as `$share/{instance}/{filter}` (several nodes).
    pub upstream_share: bool,
    /// The broker, for side sessions fetching retained messages.
    pub upstream_addr: String,
    /// The main upstream session's client id (side sessions derive theirs).
    pub upstream_client_id: String,
    /// How long a side session waits for retained messages.
    pub retained_timeout: Duration,
}

/// What replica sessions tell the dispatcher.
pub enum ReplicaEvent {
    Joined {
        slot: u16,
        tx: mpsc::Sender<Outgoing>,
        will: Option<Message>,
        counters: Arc<ReplicaCounters>,
    },
    Left {
        slot: u16,
        clean: bool,
    },
    Packet {
        slot: u16,
        packet: Incoming,
    },
}

/// The replica sessions' way to the dispatcher.
#[derive(Clone)]
pub struct Handle {
    pub tx: mpsc::Sender<ReplicaEvent>,
}

/// Where a message delivered to a replica came from, so its ack can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// An upstream QoS 1/2 message with this packet id and QoS.
    Upstream { pkid: u16, qos: u8 },
    /// Nothing to acknowledge upstream.
    None,
}

#[derive(Debug, Clone)]
struct Queued {
    msg: Message,
    origin: Origin,
    redelivery: bool,
}

struct Inflight {
    queued: Queued,
    sent: Instant,
}

struct Replica {
    tx: mpsc::Sender<Outgoing>,
    subs: Vec<(TopicFilter, u8)>,
    inflight: BTreeMap<u16, Inflight>,
    /// QoS 2 deliveries past PUBREC, waiting for PUBCOMP.
    released: HashSet<u16>,
    next_pkid: u16,
    stalled: bool,
    counters: Arc<ReplicaCounters>,
    inflight_gauge: IntGauge,
}

impl Replica {
    /// The QoS granted to this replica for `topic`, if any filter matches.
    fn granted(&self, topic: &str) -> Option<u8> {
        self.subs
            .iter()
            .filter(|(f, _)| f.matches(topic))
            .map(|(_, q)| *q)
            .max()
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid)
                && !self.released.contains(&self.next_pkid)
            {
                return self.next_pkid;
            }
        }
    }
}

/// A replica's publish on its way upstream.
struct OutPub {
    slot: u16,
    replica_pkid: u16,
    msg: Message,
    /// PUBREC seen (QoS 2): only PUBREL/PUBCOMP left.
    received: bool,
}

struct PendingAck {
    pkid: u16,
    qos: u8,
    ready: bool,
}

/// A replica's SUBACK waiting for the broker's.
struct SubAckLater {
    slot: u16,
    pkid: u16,
    granted: Vec<u8>,
    /// Filters whose retained messages the replica gets after its SUBACK.
    fetch: Vec<String>,
}

pub struct Dispatcher {
    cfg: DispatchSettings,
    replicas: BTreeMap<u16, Replica>,
    queue: VecDeque<Queued>,
    turn: usize,
    up: mpsc::Sender<UpCmd>,
    upstream_up: bool,
    /// Filters subscribed upstream, with the QoS asked.
    filters: BTreeMap<String, u8>,
    /// Filters asked for while the upstream session was down.
    unsent: Vec<(String, u8)>,
    next_up_pkid: u16,
    /// Upstream packet ids of messages held (queued or in flight).
    held: HashSet<u16>,
    /// Upstream QoS 1/2 messages in the order received: MQTT wants their
    /// PUBACK/PUBREC in that order (rumqttd drops a session otherwise), so an
    /// ack waits until those before it are done.
    ack_order: VecDeque<PendingAck>,
    out: HashMap<u16, OutPub>,
    pending_subacks: HashMap<u16, Vec<SubAckLater>>,
    /// Replica SUBACKs held while the upstream session is down.
    waiting_for_up: Vec<SubAckLater>,
    fetches: u64,
    will: Option<Message>,
    metrics: Arc<Metrics>,
    queued_gauge: IntGauge,
    redeliveries: IntCounter,
}

impl Dispatcher {
    pub fn new(cfg: DispatchSettings, up: mpsc::Sender<UpCmd>, metrics: Arc<Metrics>) -> Self {
        let queued_gauge = metrics
            .dispatch_queued
            .with_label_values(&[cfg.instance.as_str()]);
        let redeliveries = metrics
            .dispatch_redeliveries
            .with_label_values(&[cfg.instance.as_str()]);
        Self {
            cfg,
            replicas: BTreeMap::new(),
            queue: VecDeque::new(),
            turn: 0,
            up,
            upstream_up: false,
            filters: BTreeMap::new(),
            unsent: Vec::new(),
            next_up_pkid: 0,
            held: HashSet::new(),
            ack_order: VecDeque::new(),
            out: HashMap::new(),
            pending_subacks: HashMap::new(),
            waiting_for_up: Vec::new(),
            fetches: 0,
            will: None,
            metrics,
            queued_gauge,
            redeliveries,
        }
    }

    /// Runs until `shutdown` or until every sender is gone.
    pub async fn run(
        mut self,
        mut replica_rx: mpsc::Receiver<ReplicaEvent>,
        mut up_rx: mpsc::Receiver<UpEvent>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(
            (self.cfg.ack_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        loop {
            let room = self.queue.len() < self.cfg.queue_limit;
            tokio::select! {
                ev = replica_rx.recv() => match ev {
                    Some(ev) => self.on_replica(ev),
                    None => return,
                },
                ev = up_rx.recv(), if room => match ev {
                    Some(ev) => self.on_upstream(ev),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn send_up(&self, cmd: UpCmd) {
        if let Err(e) = self.up.try_send(cmd) {
            tracing::warn!(instance = %self.cfg.instance, error = %e, "upstream command dropped");
            self.metrics.error("upstream_backlog");
        }
    }

    fn alloc_up_pkid(&mut self) -> u16 {
        loop {
            self.next_up_pkid = self.next_up_pkid.checked_add(1).unwrap_or(1);
            if !self.out.contains_key(&self.next_up_pkid) {
                return self.next_up_pkid;
            }
        }
    }

    fn upstream_filter(&self, filter: &str) -> String {
        if self.cfg.upstream_share {
            format!("$share/{}/{filter}", self.cfg.instance)
        } else {
            filter.to_owned()
        }
    }

    /// Subscribes upstream; the packet id of the SUBSCRIBE sent, if one was.
    fn subscribe_up(&mut self, filters: Vec<(String, u8)>) -> Option<u16> {
        if !self.upstream_up {
            // sent when the session is up again
            self.unsent.extend(filters);
            return None;
        }
        if filters.is_empty() {
            return None;
        }
        let pkid = self.alloc_up_pkid();
        let filters = filters
            .into_iter()
            .map(|(f, q)| (self.upstream_filter(&f), q))
            .collect();
        self.send_up(UpCmd::Subscribe { pkid, filters });
        Some(pkid)
    }

    fn is_broadcast(&self, topic: &str) -> bool {
        self.cfg.broadcast.iter().any(|b| b.matches(topic))
    }

    fn to_replica(&self, slot: u16, packet: Outgoing) -> bool {
        match self.replicas.get(&slot) {
            Some(r) => r.tx.try_send(packet).is_ok(),
            None => false,
        }
    }

    fn ack_upstream(&mut self, origin: Origin) {
        let Origin::Upstream { pkid, .. } = origin else {
            return;
        };
        if let Some(p) = self
            .ack_order
            .iter_mut()
            .find(|p| p.pkid == pkid && !p.ready)
        {
            p.ready = true;
        }
        while self.ack_order.front().is_some_and(|p| p.ready) {
            let Some(p) = self.ack_order.pop_front() else {
                break;
            };
            if p.qos == 2 {
                // held until the broker's PUBREL
                self.send_up(UpCmd::PubRec(p.pkid));
            } else {
                self.held.remove(&p.pkid);
                self.send_up(UpCmd::PubAck(p.pkid));
            }
        }
    }

    fn update_queue_gauge(&self) {
        self.queued_gauge.set(self.queue.len() as i64);
    }

    // ----- replica side -----

    fn on_replica(&mut self, ev: ReplicaEvent) {
        match ev {
            ReplicaEvent::Joined {
                slot,
                tx,
                will,
                counters,
            } => {
                let inflight_gauge = self
                    .metrics
                    .replica_inflight
                    .with_label_values(&[self.cfg.instance.as_str(), &slot.to_string()]);
                inflight_gauge.set(0);
                self.replicas.insert(
                    slot,
                    Replica {
                        tx,
                        subs: Vec::new(),
                        inflight: BTreeMap::new(),
                        released: HashSet::new(),
                        next_pkid: 0,
                        stalled: false,
                        counters,
                        inflight_gauge,
                    },
                );
                if will.is_some() && will != self.will {
                    self.will = will;
                    self.send_up(UpCmd::SetWill(self.will.clone()));
                }
            }
            ReplicaEvent::Left { slot, clean } => self.on_left(slot, clean),
            ReplicaEvent::Packet { slot, packet } => self.on_replica_packet(slot, packet),
        }
    }

    fn on_left(&mut self, slot: u16, clean: bool) {
        let Some(replica) = self.replicas.remove(&slot) else {
            return;
        };
        replica.inflight_gauge.set(0);
        let moved = self.requeue(replica.inflight);
        if moved > 0 {
            tracing::info!(instance = %self.cfg.instance, slot, moved, "unacknowledged messages of a departed replica go to others");
        }
        if !clean && self.replicas.is_empty() {
            if let Some(will) = self.will.clone() {
                tracing::info!(instance = %self.cfg.instance, topic = %will.topic, "last replica gone without DISCONNECT: publishing the instance's will");
                let pkid = if will.qos > 0 {
                    self.alloc_up_pkid()
                } else {
                    0
                };
                if will.qos > 0 {
                    self.out.insert(
                        pkid,
                        OutPub {
                            slot: u16::MAX,
                            replica_pkid: 0,
                            msg: will.clone(),
                            received: false,
                        },
                    );
                }
                self.send_up(UpCmd::Publish {
                    msg: will,
                    pkid,
                    dup: false,
                });
            }
        }
        self.pump();
    }

    /// Puts unacknowledged messages back at the front of the queue, oldest
    /// first. Returns how many.
    fn requeue(&mut self, inflight: BTreeMap<u16, Inflight>) -> usize {
        let mut items: Vec<Inflight> = inflight.into_values().collect();
        items.sort_by_key(|i| i.sent);
        let n = items.len();
        for item in items.into_iter().rev() {
            let mut q = item.queued;
            q.redelivery = true;
            self.queue.push_front(q);
        }
        self.redeliveries.inc_by(n as u64);
        self.update_queue_gauge();
        n
    }

    fn on_replica_packet(&mut self, slot: u16, packet: Incoming) {
        match packet {
            Incoming::PubAck(pkid) => self.on_replica_ack(slot, pkid, false),
            Incoming::PubRec(pkid) => self.on_replica_ack(slot, pkid, true),
            Incoming::PubComp(pkid) => {
                if let Some(r) = self.replicas.get_mut(&slot) {
                    r.released.remove(&pkid);
                }
            }
            Incoming::Publish { msg, pkid, .. } => self.on_replica_publish(slot, msg, pkid),
            Incoming::PubRel(pkid) => {
                // QoS 2 from the replica: our PUBREC followed the broker's, so
                // the message is already upstream
                self.to_replica(slot, Outgoing::PubComp(pkid));
            }
            Incoming::Subscribe { pkid, filters } => self.on_subscribe(slot, pkid, filters),
            Incoming::Unsubscribe { pkid, filters } => self.on_unsubscribe(slot, pkid, filters),
            _ => {}
        }
    }

    fn on_replica_ack(&mut self, slot: u16, pkid: u16, qos2: bool) {
        let Some(r) = self.replicas.get_mut(&slot) else {
            return;
        };
        if r.stalled {
            tracing::info!(instance = %self.cfg.instance, slot, "stalled replica acknowledges again");
            r.stalled = false;
        }
        let Some(done) = r.inflight.remove(&pkid) else {
            return; // already moved to another replica
        };
        if qos2 {
            r.released.insert(pkid);
            let _ = r.tx.try_send(Outgoing::PubRel(pkid));
        }
        r.inflight_gauge.set(r.inflight.len() as i64);
        self.ack_upstream(done.queued.origin);
        self.pump();
    }

    fn on_replica_publish(&mut self, slot: u16, msg: Message, replica_pkid: u16) {
        if msg.qos == 0 {
            self.send_up(UpCmd::Publish {
                msg,
                pkid: 0,
                dup: false,
            });
            return;
        }
        if self
            .out
            .values()
            .any(|o| o.slot == slot && o.replica_pkid == replica_pkid && !o.received)
        {
            return; // a DUP of a publish already on its way
        }
        let pkid = self.alloc_up_pkid();
        self.out.insert(
            pkid,
            OutPub {
                slot,
                replica_pkid,
                msg: msg.clone(),
                received: false,
            },
        );
        if self.upstream_up {
            self.send_up(UpCmd::Publish {
                msg,
                pkid,
                dup: false,
            });
        }
    }

    fn on_subscribe(&mut self, slot: u16, pkid: u16, filters: Vec<(String, u8)>) {
        let mut granted = Vec::with_capacity(filters.len());
        let mut new_up = Vec::new();
        let mut fetch = Vec::new();
        for (text, qos) in filters {
            let Ok(filter) = TopicFilter::new(&text) else {
                granted.push(0x80);
                continue;
            };
            if text.starts_with("$share/") {
                // dispatch mode shares by itself; a shared filter is refused
                granted.push(0x80);
                continue;
            }
            let qos = qos.min(2);
            granted.push(qos);
            if let Some(r) = self.replicas.get_mut(&slot) {
                r.subs.retain(|(f, _)| f.as_str() != text);
                r.subs.push((filter, qos));
            }
            if self.filters.get(&text).is_none_or(|&q| q < qos) {
                self.filters.insert(text.clone(), qos);
                new_up.push((text.clone(), qos));
            }
            fetch.push(text);
        }
        let ack = SubAckLater {
            slot,
            pkid,
            granted,
            fetch,
        };
        // the replica hears SUBACK once the broker's subscription is live
        if !self.upstream_up {
            self.unsent.extend(new_up);
            self.waiting_for_up.push(ack);
        } else {
            match self.subscribe_up(new_up) {
                Some(up_pkid) => self.pending_subacks.entry(up_pkid).or_default().push(ack),
                None => self.finish_subscribe(ack),
            }
        }
        self.pump();
    }

    /// Sends the replica its SUBACK, then its retained messages, which a
    /// side session fetches: the main session's subscription exists already
    /// and brokers do not all resend retained messages on a repeated SUBSCRIBE.
    fn finish_subscribe(&mut self, ack: SubAckLater) {
        let SubAckLater {
            slot,
            pkid,
            granted,
            fetch,
        } = ack;
        if !self.to_replica(slot, Outgoing::SubAck { pkid, granted }) || fetch.is_empty() {
            return;
        }
        let Some(r) = self.replicas.get(&slot) else {
            return;
        };
        self.fetches = self.fetches.wrapping_add(1);
        let fetcher = RetainedFetch {
            addr: self.cfg.upstream_addr.clone(),
            client_id: format!("{}-r{}", self.cfg.upstream_client_id, self.fetches),
            filters: fetch,
            timeout: self.cfg.retained_timeout,
        };
        let tx = r.tx.clone();
        let counters = r.counters.clone();
        let instance = self.cfg.instance.clone();
        tokio::spawn(async move {
            match fetcher.run().await {
                Ok(messages) => {
                    for msg in messages {
                        if tx
                            .send(Outgoing::Publish {
                                msg,
                                pkid: 0,
                                dup: false,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        counters.messages_to.inc();
                    }
                }
                Err(e) => {
                    tracing::warn!(%instance, slot, error = %e, "cannot fetch retained messages")
                }
            }
        });
    }

    fn on_unsubscribe(&mut self, slot: u16, pkid: u16, filters: Vec<String>) {
        let count = filters.len();
        if let Some(r) = self.replicas.get_mut(&slot) {
            r.subs
                .retain(|(f, _)| !filters.iter().any(|t| t == f.as_str()));
        }
        let unused: Vec<String> = filters
            .into_iter()
            .filter(|f| {
                self.filters.contains_key(f)
                    && !self
                        .replicas
                        .values()
                        .any(|r| r.subs.iter().any(|(s, _)| s.as_str() == f))
            })
            .collect();
        for f in &unused {
            self.filters.remove(f);
        }
        if !unused.is_empty() && self.upstream_up {
            let up_pkid = self.alloc_up_pkid();
            let filters = unused.iter().map(|f| self.upstream_filter(f)).collect();
            self.send_up(UpCmd::Unsubscribe {
                pkid: up_pkid,
                filters,
            });
        }
        self.to_replica(slot, Outgoing::UnsubAck { pkid, count });
    }

    // ----- upstream side -----

    fn on_upstream(&mut self, ev: UpEvent) {
        match ev {
            UpEvent::Up { session_present } => {
                self.upstream_up = true;
                let unsent = std::mem::take(&mut self.unsent);
                let sent = if session_present {
                    // the broker kept the session's subscriptions
                    self.subscribe_up(unsent)
                } else {
                    self.held.clear();
                    self.ack_order.clear();
                    let all: Vec<(String, u8)> =
                        self.filters.iter().map(|(f, q)| (f.clone(), *q)).collect();
                    self.subscribe_up(all)
                };
                let waiting = std::mem::take(&mut self.waiting_for_up);
                match sent {
                    Some(pkid) => self
                        .pending_subacks
                        .entry(pkid)
                        .or_default()
                        .extend(waiting),
                    None => waiting
                        .into_iter()
                        .for_each(|ack| self.finish_subscribe(ack)),
                }
                // publishes not yet acknowledged go again
                let mut again: Vec<(u16, Message, bool)> = self
                    .out
                    .iter()
                    .map(|(&pkid, o)| (pkid, o.msg.clone(), o.received))
                    .collect();
                again.sort_by_key(|(pkid, ..)| *pkid);
                for (pkid, msg, received) in again {
                    if received {
                        self.send_up(UpCmd::PubRel(pkid));
                    } else {
                        self.send_up(UpCmd::Publish {
                            msg,
                            pkid,
                            dup: true,
                        });
                    }
                }
            }
            UpEvent::Down => {
                self.upstream_up = false;
                // no SUBACK will come on this connection: the replicas wait
                // for the subscriptions made when the session is back
                let waiting = self.pending_subacks.drain().flat_map(|(_, v)| v);
                self.waiting_for_up.extend(waiting.collect::<Vec<_>>());
            }
            UpEvent::Packet(p) => self.on_upstream_packet(p),
        }
    }

    fn on_upstream_packet(&mut self, packet: Incoming) {
        match packet {
            Incoming::Publish { msg, pkid, .. } => self.on_upstream_publish(msg, pkid),
            Incoming::PubRel(pkid) => {
                self.held.remove(&pkid);
                self.send_up(UpCmd::PubComp(pkid));
            }
            Incoming::PubAck(pkid) => {
                if let Some(o) = self.out.remove(&pkid) {
                    self.to_replica(o.slot, Outgoing::PubAck(o.replica_pkid));
                }
            }
            Incoming::PubRec(pkid) => {
                if let Some(o) = self.out.get_mut(&pkid) {
                    o.received = true;
                    let (slot, rp) = (o.slot, o.replica_pkid);
                    self.send_up(UpCmd::PubRel(pkid));
                    self.to_replica(slot, Outgoing::PubRec(rp));
                }
            }
            Incoming::PubComp(pkid) => {
                self.out.remove(&pkid);
            }
            Incoming::SubAck(pkid) => {
                for ack in self.pending_subacks.remove(&pkid).unwrap_or_default() {
                    self.finish_subscribe(ack);
                }
            }
            _ => {}
        }
    }

    fn on_upstream_publish(&mut self, msg: Message, pkid: u16) {
        tracing::trace!(pkid, qos = msg.qos, topic = %msg.topic, "upstream publish");
        let origin = if msg.qos > 0 {
            if !self.held.insert(pkid) {
                return; // the broker resent a message we already hold
            }
            self.ack_order.push_back(PendingAck {
                pkid,
                qos: msg.qos,
                ready: false,
            });
            Origin::Upstream { pkid, qos: msg.qos }
        } else {
            Origin::None
        };
        if msg.retain {
            // sent because the main session (re)subscribed: replicas get
            // retained messages from a side session when they subscribe
            tracing::trace!(topic = %msg.topic, "retained message on the main session: acknowledged, not dispatched");
            self.ack_upstream(origin);
            return;
        }
        if self.is_broadcast(&msg.topic) {
            let targets: Vec<u16> = self
                .replicas
                .iter()
                .filter(|(_, r)| r.granted(&msg.topic).is_some())
                .map(|(&s, _)| s)
                .collect();
            self.fan_out(&msg, &targets);
            self.ack_upstream(origin);
            return;
        }
        self.queue.push_back(Queued {
            msg,
            origin,
            redelivery: false,
        });
        self.pump();
    }

    /// A copy to each of `slots`, acknowledged upstream at once.
    fn fan_out(&mut self, msg: &Message, slots: &[u16]) {
        for &slot in slots {
            let queued = Queued {
                msg: msg.clone(),
                origin: Origin::None,
                redelivery: false,
            };
            if !self.deliver(slot, queued) {
                self.metrics
                    .dispatch_dropped
                    .with_label_values(&[self.cfg.instance.as_str(), "replica_backlog"])
                    .inc();
                tracing::warn!(instance = %self.cfg.instance, slot, "broadcast copy dropped: replica backlog full");
            }
        }
    }

    // ----- delivery -----

    /// Sends one message to one replica; false when it cannot take it.
    fn deliver(&mut self, slot: u16, queued: Queued) -> bool {
        let Some(r) = self.replicas.get_mut(&slot) else {
            return false;
        };
        let Some(granted) = r.granted(&queued.msg.topic) else {
            return false;
        };
        let qos = queued.msg.qos.min(granted);
        let mut msg = queued.msg.clone();
        msg.qos = qos;
        let pkid = if qos > 0 { r.alloc_pkid() } else { 0 };
        if r.tx
            .try_send(Outgoing::Publish {
                msg,
                pkid,
                dup: false,
            })
            .is_err()
        {
            return false;
        }
        r.counters.messages_to.inc();
        tracing::trace!(slot, pkid, topic = %queued.msg.topic, "delivered");
        if qos > 0 {
            r.inflight.insert(
                pkid,
                Inflight {
                    queued,
                    sent: Instant::now(),
                },
            );
            r.inflight_gauge.set(r.inflight.len() as i64);
        } else {
            self.ack_upstream(queued.origin);
        }
        true
    }

    /// Hands queued messages to replicas that can take them, in order.
    fn pump(&mut self) {
        let mut i = 0;
        while i < self.queue.len() {
            let max = self.cfg.max_inflight;
            let any_room = self
                .replicas
                .values()
                .any(|r| !r.stalled && r.inflight.len() < max && r.tx.capacity() > 0);
            if !any_room {
                break;
            }
            let topic = self.queue[i].msg.topic.as_str();
            let candidates: Vec<Candidate> = self
                .replicas
                .iter()
                .filter(|(_, r)| !r.stalled && r.inflight.len() < max && r.tx.capacity() > 0)
                .filter(|(_, r)| r.granted(topic).is_some())
                .map(|(&slot, r)| Candidate {
                    slot,
                    inflight: r.inflight.len(),
                })
                .collect();
            let key = strategy::key_of(topic, self.cfg.key_level);
            let pick = if self.cfg.strategy == Strategy::KeyHash {
                // a key belongs to one replica among all that subscribe, busy or not
                let all: Vec<Candidate> = self
                    .replicas
                    .iter()
                    .filter(|(_, r)| r.granted(topic).is_some() && !r.stalled)
                    .map(|(&slot, r)| Candidate {
                        slot,
                        inflight: r.inflight.len(),
                    })
                    .collect();
                strategy::pick(Strategy::KeyHash, &all, 0, key)
                    .filter(|s| candidates.iter().any(|c| c.slot == *s))
            } else {
                strategy::pick(self.cfg.strategy, &candidates, self.turn, key)
            };
            let Some(slot) = pick else {
                i += 1;
                continue;
            };
            self.turn = self.turn.wrapping_add(1);
            let Some(queued) = self.queue.remove(i) else {
                break;
            };
            if !self.deliver(slot, queued.clone()) {
                self.queue.insert(i, queued);
                i += 1;
            }
        }
        self.update_queue_gauge();
    }

    fn on_tick(&mut self) {
        let timeout = self.cfg.ack_timeout;
        let now = Instant::now();
        let late: Vec<u16> = self
            .replicas
            .iter()
            .filter(|(_, r)| {
                r.inflight
                    .values()
                    .any(|i| now.duration_since(i.sent) > timeout)
            })
            .map(|(&s, _)| s)
            .collect();
        for slot in late {
            let Some(r) = self.replicas.get_mut(&slot) else {
                continue;
            };
            r.stalled = true;
            let inflight = std::mem::take(&mut r.inflight);
            r.inflight_gauge.set(0);
            let moved = self.requeue(inflight);
            tracing::warn!(instance = %self.cfg.instance, slot, moved, ?timeout, "replica stopped acknowledging: its messages go to others");
        }
        self.pump();
    }
}
