//! The dispatcher's I/O: one task per instance that feeds the sans-I/O
//! [`Dispatcher`] its events (replica sessions, the upstream session,
//! retained fetches, the clock) and does the [`Action`]s it returns.
//!
//! Nothing is dropped here. Upstream commands wait in order when the upstream
//! channel is full, and from [`BACKLOG_PAUSE`] waiting the driver stops
//! reading replica events (their sessions stop reading their sockets: TCP
//! back-pressure) while it still reads the broker's, whose acks free room. A
//! replica's packets wait in order when its session's channel is full; a
//! replica that leaves [`REPLICA_BACKLOG_LIMIT`] of them unread is
//! disconnected (its unacknowledged messages go to others, as for any
//! departure) rather than let memory grow.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::{Action, Dispatcher, Event, ReplicaLimits};
use super::upstream::{UpCmd, UpEvent};
use super::wire::{Incoming, Outgoing, Will};
use crate::metrics::{Metrics, ReplicaCounters};

/// Upstream commands waiting beyond the channel at which replicas' events
/// are no longer read (the broker's still are).
const BACKLOG_PAUSE: usize = 4096;

/// Packets for one replica waiting beyond its session's channel at which
/// that replica is disconnected: it has not read its socket for that long.
const REPLICA_BACKLOG_LIMIT: usize = 16_384;

/// What replica sessions tell the dispatcher.
pub enum ReplicaEvent {
    Joined {
        slot: u16,
        /// Where the replica's connection comes from.
        host: std::net::IpAddr,
        tx: mpsc::Sender<Outgoing>,
        will: Option<Will>,
        counters: Arc<ReplicaCounters>,
        limits: ReplicaLimits,
        /// Answered with "session present" before the replica's CONNACK.
        present: Option<oneshot::Sender<bool>>,
    },
    Left {
        slot: u16,
        clean: bool,
        /// MQTT 5: the session expiry interval its DISCONNECT set.
        expiry: Option<u32>,
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

/// A channel and what waits, in order, for room in it: nothing overtakes what
/// waits, and nothing is dropped while the receiver lives. A replica
/// session's packets, the upstream session's commands.
struct Ordered<T> {
    tx: mpsc::Sender<T>,
    waiting: VecDeque<T>,
}

impl<T> Ordered<T> {
    fn new(tx: mpsc::Sender<T>) -> Self {
        Self {
            tx,
            waiting: VecDeque::new(),
        }
    }

    /// Sends behind what waits, or waits when the channel is full. False
    /// when the receiver is gone.
    fn send(&mut self, item: T) -> bool {
        if !self.waiting.is_empty() {
            self.waiting.push_back(item);
            return true;
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.waiting.push_back(item);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Moves what waits into the channel while it has room. False (and
    /// nothing left waiting) when the receiver is gone.
    fn flush(&mut self) -> bool {
        while let Some(item) = self.waiting.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.waiting.push_front(item);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.waiting.clear();
                    return false;
                }
            }
        }
        true
    }
}

/// The upstream session's commands: never dropped (a lost PUBACK or publish
/// would wait for a reconnect), and a log line when they start and stop
/// waiting.
struct UpOutlet {
    out: Ordered<UpCmd>,
    instance: String,
}

impl UpOutlet {
    fn send(&mut self, cmd: UpCmd) {
        let was_behind = !self.out.waiting.is_empty();
        // false: the upstream task is gone, flowgate is stopping
        let _ = self.out.send(cmd);
        if !was_behind && !self.out.waiting.is_empty() {
            tracing::warn!(instance = %self.instance, "the upstream session is behind: its commands wait in order");
        }
    }

    fn flush(&mut self) {
        if self.out.flush() && self.out.waiting.is_empty() {
            tracing::info!(instance = %self.instance, "the upstream session caught up");
        }
    }
}

/// The dispatcher task of one instance.
pub struct Driver {
    core: Dispatcher,
    replicas: HashMap<u16, Ordered<Outgoing>>,
    /// Joins waiting for the dispatcher's "session present".
    present: HashMap<u16, oneshot::Sender<bool>>,
    up: UpOutlet,
    /// Retained fetches in progress (side sessions), stopped with the driver.
    fetches: JoinSet<Option<Event>>,
    /// Some replica has packets waiting beyond its channel.
    replicas_behind: bool,
    metrics: Arc<Metrics>,
}

impl Driver {
    pub fn new(core: Dispatcher, up: mpsc::Sender<UpCmd>, metrics: Arc<Metrics>) -> Self {
        let instance = core.instance().to_owned();
        Self {
            core,
            replicas: HashMap::new(),
            present: HashMap::new(),
            up: UpOutlet {
                out: Ordered::new(up),
                instance,
            },
            fetches: JoinSet::new(),
            replicas_behind: false,
            metrics,
        }
    }

    /// Runs until `shutdown` or until every sender is gone.
    pub async fn run(
        mut self,
        mut replica_rx: mpsc::Receiver<ReplicaEvent>,
        mut up_rx: mpsc::Receiver<UpEvent>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.core.tick_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let up = self.up.out.tx.clone();
        loop {
            let room = self.core.takes_upstream();
            // the upstream session is behind: replicas wait (their sessions
            // stop reading), the broker's events go on (its acks free room)
            let replicas_wait = self.up.out.waiting.len() >= BACKLOG_PAUSE;
            tokio::select! {
                permit = up.reserve(), if !self.up.out.waiting.is_empty() => {
                    if let (Ok(permit), Some(cmd)) = (permit, self.up.out.waiting.pop_front()) {
                        permit.send(cmd);
                        self.up.flush();
                    }
                }
                ev = replica_rx.recv(), if !replicas_wait => match ev {
                    Some(ev) => self.on_replica(ev),
                    None => return,
                },
                ev = up_rx.recv(), if room => match ev {
                    Some(ev) => self.handle(Event::Upstream(ev)),
                    None => return,
                },
                Some(done) = self.fetches.join_next(), if !self.fetches.is_empty() => {
                    if let Ok(Some(ev)) = done {
                        self.handle(ev);
                    }
                }
                _ = tick.tick() => {
                    self.handle(Event::Tick);
                    self.flush_replicas();
                }
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// A replica session's event: its channel and "session present" answer
    /// are the driver's; the rest is the dispatcher's.
    fn on_replica(&mut self, ev: ReplicaEvent) {
        match ev {
            ReplicaEvent::Joined {
                slot,
                host,
                tx,
                will,
                counters,
                limits,
                present,
            } => {
                self.replicas.insert(slot, Ordered::new(tx));
                if let Some(p) = present {
                    self.present.insert(slot, p);
                }
                self.handle(Event::Joined {
                    slot,
                    host,
                    will,
                    counters,
                    limits,
                });
            }
            ReplicaEvent::Left {
                slot,
                clean,
                expiry,
            } => {
                self.replicas.remove(&slot);
                self.present.remove(&slot);
                self.handle(Event::Left {
                    slot,
                    clean,
                    expiry,
                });
            }
            ReplicaEvent::Packet { slot, packet } => self.handle(Event::Packet { slot, packet }),
        }
    }

    /// Feeds the dispatcher one event and does what it decided.
    fn handle(&mut self, ev: Event) {
        let actions = self.core.handle(ev, Instant::now());
        for action in actions {
            match action {
                Action::ToReplica(slot, packet) => {
                    if let Some(o) = self.replicas.get_mut(&slot) {
                        // a closed channel: its Left event is on the way
                        let _ = o.send(packet);
                        self.replicas_behind |= !o.waiting.is_empty();
                    }
                }
                Action::Present(slot, present) => {
                    if let Some(p) = self.present.remove(&slot) {
                        let _ = p.send(present);
                    }
                }
                Action::Up(cmd) => self.up.send(cmd),
                Action::Fetch {
                    slot,
                    generation,
                    fetch,
                } => {
                    let instance = self.up.instance.clone();
                    self.fetches.spawn(async move {
                        match fetch.run().await {
                            Ok(messages) => Some(Event::Fetched {
                                slot,
                                generation,
                                messages,
                            }),
                            Err(e) => {
                                tracing::warn!(%instance, slot, error = %e, "cannot fetch retained messages");
                                None
                            }
                        }
                    });
                }
            }
        }
        if self.replicas_behind {
            self.flush_replicas();
        }
    }

    /// Moves replicas' waiting packets into their channels; disconnects a
    /// replica that leaves too many unread.
    fn flush_replicas(&mut self) {
        if !self.replicas_behind {
            return;
        }
        let mut behind = false;
        let mut gone = Vec::new();
        for (&slot, o) in &mut self.replicas {
            o.flush();
            if o.waiting.len() > REPLICA_BACKLOG_LIMIT {
                gone.push((slot, o.waiting.len()));
            } else {
                behind |= !o.waiting.is_empty();
            }
        }
        for (slot, n) in gone {
            // dropping its channel ends the session; its Left event follows
            self.replicas.remove(&slot);
            let instance = self.up.instance.as_str();
            self.metrics
                .dispatch_dropped
                .with_label_values(&[instance, "replica_backlog"])
                .inc_by(n as u64);
            tracing::warn!(%instance, slot, waiting = n, "replica does not read what it is sent: disconnected");
        }
        self.replicas_behind = behind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkid_of(cmd: &UpCmd) -> u16 {
        match cmd {
            UpCmd::PubAck(p) => *p,
            other => panic!("not a PUBACK: {other:?}"),
        }
    }

    #[test]
    fn upstream_commands_wait_in_order_when_the_channel_is_full() {
        let (tx, mut up_rx) = mpsc::channel(2);
        let mut up = UpOutlet {
            out: Ordered::new(tx),
            instance: "line1".into(),
        };
        for pkid in 1..=5 {
            up.send(UpCmd::PubAck(pkid));
        }
        // two fit, three wait: none dropped
        assert_eq!(up.out.waiting.len(), 3);
        let mut got = Vec::new();
        while got.len() < 5 {
            while let Ok(cmd) = up_rx.try_recv() {
                got.push(pkid_of(&cmd));
            }
            up.flush();
            // a command sent while others wait goes behind them
            if got.len() == 2 {
                up.send(UpCmd::PubAck(6));
            }
        }
        while let Ok(cmd) = up_rx.try_recv() {
            got.push(pkid_of(&cmd));
        }
        up.flush();
        while let Ok(cmd) = up_rx.try_recv() {
            got.push(pkid_of(&cmd));
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
        assert!(up.out.waiting.is_empty());
    }

    #[test]
    fn a_replica_s_packets_wait_in_order_when_its_channel_is_full() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut o = Ordered::new(tx);
        for pkid in 1..=5 {
            assert!(o.send(Outgoing::PubComp(pkid)));
        }
        assert_eq!(o.waiting.len(), 3);
        let mut got = Vec::new();
        while got.len() < 5 {
            while let Ok(Outgoing::PubComp(p)) = rx.try_recv() {
                got.push(p);
            }
            o.flush();
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        drop(rx);
        assert!(!o.send(Outgoing::PubComp(6)), "a closed session");
    }
}
