//! The dispatcher of one instance: all dispatch state and decisions, and no
//! I/O. [`Dispatcher::handle`] takes one [`Event`] (from a replica, the
//! upstream session, a retained fetch, the clock) with the time it happened
//! and returns the [`Action`]s it decided, in order; the driver
//! (`super::driver`) owns the channels and tasks and does them. No tokio, no
//! channel, no clock read in here: every promise is testable by feeding
//! events (`tests.rs`).
//!
//! The state is here; the handlers are split by side: `replica_side` (what
//! replicas send), `upstream_side` (what the broker sends), `delivery`
//! (handing queued messages to replicas, ack timeouts).

mod delivery;
mod replica_side;
mod standby;
#[cfg(test)]
mod tests;
mod upstream_side;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use super::strategy::{self, Candidate, Strategy};
use super::upstream::{RetainedFetch, UpCmd, UpEvent};
use super::wire::{AckProps, Incoming, Message, Outgoing, QoS, SubRequest, Will};
use crate::metrics::{Metrics, ReplicaCounters};
use crate::topic::TopicFilter;

/// Per-instance dispatch settings, from the config.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub instance: String,
    pub strategy: Strategy,
    pub key_level: Option<usize>,
    pub broadcast: Vec<TopicFilter>,
    pub ack_timeout: Duration,
    pub max_inflight: usize,
    /// Active-standby: a lower slot takes the active role back.
    pub failback: bool,
    /// Active-standby: shared with the instance's HTTP pool.
    pub tie: Option<Arc<crate::tie::Tie>>,
    /// `key-hash`: the hosts of the instance's HTTP replicas (see
    /// `tie::key_hosts`); a replica from one of them hashes as that HTTP
    /// replica does.
    pub key_hosts: Vec<std::net::IpAddr>,
    /// What replicas may publish and subscribe to.
    pub acl: Option<crate::config::Acl>,
    pub queue_limit: usize,
    /// Subscribe upstream as `$share/{instance}/{filter}` (several nodes).
    pub upstream_share: bool,
    /// The broker, for side sessions fetching retained messages (3.1.1).
    pub upstream_addr: String,
    /// The same for MQTT 5 side sessions.
    pub upstream_addr_v5: String,
    /// The main upstream session's client id (side sessions derive theirs).
    pub upstream_client_id: String,
    /// How long a side session waits for retained messages.
    pub retained_timeout: Duration,
    /// TLS and credentials for side sessions.
    pub upstream_login: super::upstream::Login,
    /// The broker honours the MQTT 5 retain as published and retain handling
    /// options (Mosquitto, EMQX, HiveMQ; not the embedded rumqttd 0.20).
    pub retain_options: bool,
    /// Completion acknowledgement: a job is acknowledged upstream once its
    /// result is published, not on receipt.
    pub complete: Option<crate::config::Complete>,
}

/// What the dispatcher is told.
pub enum Event {
    /// A replica's session started (its CONNECT was accepted).
    Joined {
        slot: u16,
        /// Where the replica's connection comes from.
        host: std::net::IpAddr,
        will: Option<Will>,
        counters: Arc<ReplicaCounters>,
        limits: ReplicaLimits,
    },
    /// A replica's session ended.
    Left {
        slot: u16,
        clean: bool,
        /// MQTT 5: the session expiry interval its DISCONNECT set.
        expiry: Option<u32>,
    },
    /// A packet from a replica.
    Packet { slot: u16, packet: Incoming },
    /// The upstream session: up, down, packets from the broker.
    Upstream(UpEvent),
    /// Retained messages a side session fetched for one join of a replica
    /// (asked by [`Action::Fetch`]).
    Fetched {
        slot: u16,
        generation: u64,
        messages: Vec<Message>,
    },
    /// Time passed: ack deadlines, the will delay, jobs overdue.
    Tick,
}

/// What the dispatcher decided; the driver does each, in order.
pub enum Action {
    /// A packet for a replica's session.
    ToReplica(u16, Outgoing),
    /// Whether the slot's earlier session is resumed (the replica's CONNACK
    /// says "session present").
    Present(u16, bool),
    /// A command for the upstream session: never dropped, sent in order.
    Up(UpCmd),
    /// Fetch retained messages for one join of a replica on a side session;
    /// the answer is [`Event::Fetched`] with the same slot and generation.
    Fetch {
        slot: u16,
        generation: u64,
        fetch: RetainedFetch,
    },
}

/// What a replica's MQTT 5 CONNECT asks of the messages it gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaLimits {
    /// Receive maximum: QoS 1/2 messages unacknowledged at once.
    pub receive_max: Option<u16>,
    /// Maximum packet size it takes.
    pub max_packet: Option<u32>,
    /// It speaks MQTT 5 (subscription identifiers, reason codes).
    pub v5: bool,
    /// Clean start (3.x clean session): an earlier session is not resumed.
    pub clean_start: bool,
    /// How long its session (subscriptions) outlives the connection: 3.x
    /// clean session off keeps it, MQTT 5 for its session expiry interval.
    pub keep: Option<Duration>,
}

/// Where a message delivered to a replica came from, so its ack can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// An upstream QoS 1/2 message with this packet id and QoS.
    Upstream { pkid: u16, qos: QoS },
    /// Nothing to acknowledge upstream.
    None,
}

#[derive(Debug, Clone)]
struct Queued {
    msg: Message,
    origin: Origin,
    redelivery: bool,
    /// When flowgate received it: its MQTT 5 expiry counts from here.
    arrived: Instant,
    /// A retained message sent because its replica subscribed (retain flag
    /// on, that replica's alone); otherwise a live one.
    on_subscribe: bool,
    /// A job handed on because this replica did not finish it in time: to
    /// another replica when there is one.
    not_to: Option<u16>,
}

/// The subscriptions of a replica that left with its session kept, for the
/// next replica in its slot that resumes it.
struct SavedSession {
    subs: Vec<Sub>,
    until: Option<Instant>,
}

/// One subscription of a replica.
struct Sub {
    filter: TopicFilter,
    qos: QoS,
    /// MQTT 5 subscription identifier, carried by the messages it matches.
    id: Option<usize>,
    /// MQTT 5 retain as published: live messages keep their retain flag.
    rap: bool,
}

struct Inflight {
    queued: Queued,
    sent: Instant,
    /// Completion acknowledgement: the key its result must carry (`None`:
    /// done on receipt, as without `complete`).
    key: Option<Vec<u8>>,
    /// The replica acknowledged receipt; a job with a key waits for its
    /// result.
    acked: bool,
}

struct Replica {
    subs: Vec<Sub>,
    /// At most this many unacknowledged (max_inflight, or less when the
    /// replica's receive maximum is lower).
    window: usize,
    limits: ReplicaLimits,
    inflight: BTreeMap<u16, Inflight>,
    /// QoS 2 deliveries past PUBREC, waiting for PUBCOMP.
    released: HashSet<u16>,
    next_pkid: u16,
    stalled: bool,
    /// Which join this is (slots are reused; generations are not).
    generation: u64,
    host: std::net::IpAddr,
    counters: Arc<ReplicaCounters>,
    inflight_gauge: IntGauge,
    /// Retained messages fetched for its subscriptions, waiting for room in
    /// its window (they go at their QoS, as a broker sends them).
    retained: VecDeque<Queued>,
}

impl Replica {
    /// The QoS granted to this replica for `topic`, if any filter matches.
    fn granted(&self, topic: &str) -> Option<QoS> {
        self.subs
            .iter()
            .filter(|s| s.filter.matches(topic))
            .map(|s| s.qos)
            .max()
    }

    /// Does a subscription matching `topic` ask for retain as published?
    fn keeps_retain(&self, topic: &str) -> bool {
        self.subs.iter().any(|s| s.rap && s.filter.matches(topic))
    }

    /// The subscription identifiers of its subscriptions matching `topic`.
    fn sub_ids(&self, topic: &str) -> Vec<usize> {
        self.subs
            .iter()
            .filter(|s| s.filter.matches(topic))
            .filter_map(|s| s.id)
            .collect()
    }

    /// Room for one more unacknowledged message?
    fn has_room(&self) -> bool {
        !self.stalled && self.inflight.len() < self.window
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
    /// The replica already has its PUBACK/PUBREC (a result: see
    /// `on_replica_publish`); the broker's goes nowhere.
    answered: bool,
    /// A result: the job it finishes, acknowledged upstream once the broker
    /// has the result (handed on if the broker refuses it).
    completes: Option<Queued>,
}

struct PendingAck {
    pkid: u16,
    qos: QoS,
    ready: bool,
}

/// A replica's SUBACK waiting for the broker's.
struct SubAckLater {
    slot: u16,
    pkid: u16,
    granted: Vec<u8>,
    /// The filter of each entry of `granted` (a refusal's too).
    filters: Vec<String>,
    /// Filters whose retained messages the replica gets after its SUBACK.
    fetch: Vec<String>,
    /// What the broker's SUBACK said besides its codes.
    props: AckProps,
}

pub struct Dispatcher {
    cfg: DispatchSettings,
    replicas: BTreeMap<u16, Replica>,
    queue: VecDeque<Queued>,
    turn: usize,
    upstream_up: bool,
    /// Filters subscribed upstream, with the QoS asked.
    filters: BTreeMap<String, QoS>,
    /// Filters the replicas subscribed with MQTT 5 no local: upstream too, so
    /// the instance does not get its own publishes back.
    no_local: HashSet<String>,
    /// Filters a replica subscribed with MQTT 5 retain as published: upstream
    /// with it (and retain handling 2, so that a retained message on the main
    /// session is a live one), when the broker honours both.
    rap: Vec<TopicFilter>,
    /// Filters asked for while the upstream session was down.
    unsent: Vec<(String, QoS)>,
    /// The filters of each SUBSCRIBE sent upstream, until its SUBACK.
    sub_filters: HashMap<u16, Vec<String>>,
    /// The upstream session speaks MQTT 5.
    upstream_v5: bool,
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
    will: Option<Will>,
    /// MQTT 5 will delay: when the will goes out unless a replica is back.
    will_due: Option<Instant>,
    metrics: Arc<Metrics>,
    queued_gauge: IntGauge,
    redeliveries: IntCounter,
    /// Completion acknowledgement: jobs without a key, results without a job.
    uncorrelated: IntCounter,
    unmatched: IntCounter,
    in_progress: IntGauge,
    oldest_job: prometheus::Gauge,
    /// Sessions of replicas that left with clean start off, by slot.
    sessions: HashMap<u16, SavedSession>,
    /// Active-standby: the replica that gets every message.
    active: Option<u16>,
    lost: Option<standby::Lost>,
    joins: u64,
    /// The broker's in-flight window for the upstream session, when known.
    upstream_window: Option<usize>,
    /// It holds back messages replicas have room for (since when).
    window_full: bool,
    window_warned: Option<Instant>,
    window_gauge: IntGauge,
    window_full_total: IntCounter,
    /// When the event being handled happened.
    now: Instant,
    /// What the event being handled decided.
    actions: Vec<Action>,
}

impl Dispatcher {
    pub fn new(cfg: DispatchSettings, metrics: Arc<Metrics>, now: Instant) -> Self {
        let queued_gauge = metrics
            .dispatch_queued
            .with_label_values(&[cfg.instance.as_str()]);
        let redeliveries = metrics
            .dispatch_redeliveries
            .with_label_values(&[cfg.instance.as_str()]);
        let instance = [cfg.instance.as_str()];
        let uncorrelated = metrics.dispatch_uncorrelated.with_label_values(&instance);
        let unmatched = metrics.dispatch_unmatched.with_label_values(&instance);
        let in_progress = metrics.dispatch_in_progress.with_label_values(&instance);
        let oldest_job = metrics.dispatch_oldest_job.with_label_values(&instance);
        let window_gauge = metrics.dispatch_window.with_label_values(&instance);
        let window_full_total = metrics.dispatch_window_full.with_label_values(&instance);
        Self {
            cfg,
            replicas: BTreeMap::new(),
            queue: VecDeque::new(),
            turn: 0,
            upstream_up: false,
            filters: BTreeMap::new(),
            no_local: HashSet::new(),
            rap: Vec::new(),
            unsent: Vec::new(),
            sub_filters: HashMap::new(),
            upstream_v5: false,
            next_up_pkid: 0,
            held: HashSet::new(),
            ack_order: VecDeque::new(),
            out: HashMap::new(),
            pending_subacks: HashMap::new(),
            waiting_for_up: Vec::new(),
            fetches: 0,
            will: None,
            will_due: None,
            metrics,
            queued_gauge,
            redeliveries,
            uncorrelated,
            unmatched,
            in_progress,
            oldest_job,
            sessions: HashMap::new(),
            active: None,
            lost: None,
            joins: 0,
            upstream_window: None,
            window_full: false,
            window_warned: None,
            window_gauge,
            window_full_total,
            now,
            actions: Vec::new(),
        }
    }

    /// Handles one event that happened at `now`: what to do, in order.
    pub fn handle(&mut self, ev: Event, now: Instant) -> std::vec::Drain<'_, Action> {
        self.now = now;
        match ev {
            Event::Joined {
                slot,
                host,
                will,
                counters,
                limits,
            } => self.on_joined(slot, host, will, counters, limits),
            Event::Left {
                slot,
                clean,
                expiry,
            } => self.on_left(slot, clean, expiry),
            Event::Packet { slot, packet } => self.on_replica_packet(slot, packet),
            Event::Upstream(ev) => self.on_upstream(ev),
            Event::Fetched {
                slot,
                generation,
                messages,
            } => self.on_fetched(slot, generation, messages),
            Event::Tick => self.on_tick(),
        }
        self.watch_window();
        self.actions.drain(..)
    }

    /// The broker sends the session no more unacknowledged QoS 1/2 messages
    /// than its in-flight window: when all of it is held (jobs in progress,
    /// with `complete`) while a replica has room and nothing waits, the
    /// window is what limits the instance. Counted each time; logged at most
    /// once a minute.
    fn watch_window(&mut self) {
        let Some(window) = self.upstream_window else {
            return;
        };
        let full = self.ack_order.len() >= window
            && self.queue.is_empty()
            && self
                .replicas
                .values()
                .any(|r| r.has_room() && !r.subs.is_empty());
        if full && !self.window_full {
            self.window_full_total.inc();
            let quiet = self
                .window_warned
                .is_some_and(|t| self.now.saturating_duration_since(t) < Duration::from_secs(60));
            if !quiet {
                self.window_warned = Some(self.now);
                tracing::warn!(instance = %self.cfg.instance, window, "the broker's in-flight window is full (messages not yet acknowledged upstream) while replicas have room: it limits the instance; raise the broker's window (Mosquitto: max_inflight_messages)");
            }
        }
        self.window_full = full;
    }

    /// Takes messages from the broker: false once `queue_limit` are waiting
    /// (back-pressure: the broker holds the rest).
    pub fn takes_upstream(&self) -> bool {
        self.queue.len() < self.cfg.queue_limit
    }

    /// How often [`Event::Tick`] should come: a missed ack deadline is seen
    /// within 50 ms.
    pub fn tick_period(&self) -> Duration {
        (self.cfg.ack_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(50))
    }

    /// The instance this dispatcher serves.
    pub fn instance(&self) -> &str {
        &self.cfg.instance
    }

    /// A command for the upstream session (in order; the driver never
    /// drops one).
    fn send_up(&mut self, cmd: UpCmd) {
        self.actions.push(Action::Up(cmd));
    }

    fn alloc_up_pkid(&mut self) -> u16 {
        loop {
            self.next_up_pkid = self.next_up_pkid.checked_add(1).unwrap_or(1);
            if !self.out.contains_key(&self.next_up_pkid)
                && !self.sub_filters.contains_key(&self.next_up_pkid)
            {
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
    fn subscribe_up(&mut self, filters: Vec<(String, QoS)>) -> Option<u16> {
        if !self.upstream_up {
            // sent when the session is up again
            self.unsent.extend(filters);
            return None;
        }
        if filters.is_empty() {
            return None;
        }
        let pkid = self.alloc_up_pkid();
        let up: Vec<SubRequest> = filters
            .iter()
            .map(|(f, q)| {
                let rap = self.rap.iter().any(|r| r.as_str() == f);
                SubRequest {
                    no_local: self.no_local.contains(f),
                    retain_as_published: rap,
                    retain_handling: if rap { 2 } else { 0 },
                    ..SubRequest::new(self.upstream_filter(f), *q)
                }
            })
            .collect();
        self.sub_filters
            .insert(pkid, filters.into_iter().map(|(f, _)| f).collect());
        self.send_up(UpCmd::Subscribe { pkid, filters: up });
        Some(pkid)
    }

    /// Forgets what the instance asked of a filter it no longer subscribes.
    fn forget_filter(&mut self, filter: &str) {
        self.filters.remove(filter);
        self.no_local.remove(filter);
        self.rap.retain(|r| r.as_str() != filter);
    }

    fn is_broadcast(&self, topic: &str) -> bool {
        self.cfg.broadcast.iter().any(|b| b.matches(topic))
    }

    /// A packet for a connected replica; false when `slot` has none.
    fn send_replica(&mut self, slot: u16, packet: Outgoing) -> bool {
        if !self.replicas.contains_key(&slot) {
            return false;
        }
        self.actions.push(Action::ToReplica(slot, packet));
        true
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
            if p.qos == QoS::ExactlyOnce {
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
}
