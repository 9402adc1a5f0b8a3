//! What replica sessions tell the dispatcher: joins, departures, acks,
//! publishes, subscriptions.

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::*;
use crate::mqtt::dispatch::wire::{self, QoS};

impl Dispatcher {
    /// A replica session started: it resumes the slot's saved session unless
    /// it starts clean.
    pub(super) fn on_joined(
        &mut self,
        slot: u16,
        host: std::net::IpAddr,
        will: Option<Will>,
        counters: Arc<ReplicaCounters>,
        limits: ReplicaLimits,
    ) {
        let inflight_gauge = self
            .metrics
            .replica_inflight
            .with_label_values(&[self.cfg.instance.as_str(), &slot.to_string()]);
        inflight_gauge.set(0);
        self.joins += 1;
        // a session the slot's last replica left behind: resumed
        // unless this one starts clean
        let saved = self
            .sessions
            .remove(&slot)
            .filter(|s| !limits.clean_start && s.until.is_none_or(|t| self.now < t));
        let resumed = saved.is_some();
        let subs = saved.map(|s| s.subs).unwrap_or_default();
        self.actions.push(Action::Present(slot, resumed));
        self.replicas.insert(
            slot,
            Replica {
                subs,
                window: limits.receive_max.map_or(self.cfg.max_inflight, |m| {
                    self.cfg.max_inflight.min(usize::from(m.max(1)))
                }),
                limits,
                inflight: BTreeMap::new(),
                released: HashSet::new(),
                next_pkid: 0,
                stalled: false,
                generation: self.joins,
                host,
                counters,
                inflight_gauge,
                retained: VecDeque::new(),
            },
        );
        if self.will_due.take().is_some() {
            tracing::info!(instance = %self.cfg.instance, slot, "a replica is back within the will delay: no will");
        }
        if will.is_some() && will != self.will {
            self.will = will;
            self.send_up(UpCmd::SetWill(self.will.clone()));
        }
        if resumed {
            tracing::info!(instance = %self.cfg.instance, slot, "replica resumes its session");
            self.pump();
        }
    }

    pub(super) fn on_left(&mut self, slot: u16, clean: bool, expiry: Option<u32>) {
        self.lose_active(slot, "disconnect", self.now);
        let Some(mut replica) = self.replicas.remove(&slot) else {
            return;
        };
        replica.inflight_gauge.set(0);
        // a DISCONNECT's session expiry replaces the CONNECT's
        let keep = match expiry {
            None => replica.limits.keep,
            Some(0) => None,
            Some(u32::MAX) => Some(Duration::MAX),
            Some(s) => Some(Duration::from_secs(u64::from(s))),
        };
        if let Some(keep) = keep {
            // its subscriptions wait for the next replica that resumes the slot
            self.sessions.insert(
                slot,
                SavedSession {
                    subs: std::mem::take(&mut replica.subs),
                    until: self.now.checked_add(keep),
                },
            );
        }
        let moved = self.requeue(replica.inflight);
        if moved > 0 {
            tracing::info!(instance = %self.cfg.instance, slot, moved, "unacknowledged messages of a departed replica go to others");
        }
        if !clean && self.replicas.is_empty() {
            if let Some(delay) = self.will.as_ref().map(|w| w.delay) {
                // MQTT 5: the will waits for its delay or the end of the
                // session, whichever comes first; a replica back in time
                // (any of the instance's) cancels it
                let wait = Duration::from_secs(u64::from(delay)).min(keep.unwrap_or_default());
                if wait.is_zero() {
                    self.publish_will();
                } else {
                    tracing::info!(instance = %self.cfg.instance, ?wait, "last replica gone without DISCONNECT: the instance's will waits for its delay");
                    self.will_due = self.now.checked_add(wait);
                }
            }
        }
        self.pump();
    }

    /// Publishes the instance's will upstream: its last replica went away
    /// uncleanly (and its will delay passed).
    pub(super) fn publish_will(&mut self) {
        let Some(Will { msg: will, .. }) = self.will.clone() else {
            return;
        };
        tracing::info!(instance = %self.cfg.instance, topic = %will.topic, "last replica gone without DISCONNECT: publishing the instance's will");
        let pkid = if will.qos > QoS::AtMostOnce {
            self.alloc_up_pkid()
        } else {
            0
        };
        if will.qos > QoS::AtMostOnce {
            self.out.insert(
                pkid,
                OutPub {
                    slot: u16::MAX,
                    replica_pkid: 0,
                    msg: will.clone(),
                    received: false,
                    answered: false,
                    completes: None,
                },
            );
        }
        self.send_up(UpCmd::Publish {
            msg: will,
            pkid,
            dup: false,
        });
    }

    /// Puts unacknowledged messages back at the front of the queue, oldest
    /// first. Returns how many.
    pub(super) fn requeue(&mut self, inflight: BTreeMap<u16, Inflight>) -> usize {
        // a retained message sent on subscribe was that replica's alone
        let mut items: Vec<Inflight> = inflight
            .into_values()
            .filter(|i| !i.queued.on_subscribe)
            .collect();
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

    pub(super) fn on_replica_packet(&mut self, slot: u16, packet: Incoming) {
        match packet {
            Incoming::PubAck(pkid, _) => self.on_replica_ack(slot, pkid, false),
            // a refusal (v5 reason 0x80 and up) ends a QoS 2 delivery at PUBREC
            Incoming::PubRec(pkid, r) => self.on_replica_ack(slot, pkid, r.code < 0x80),
            Incoming::PubComp(pkid) => {
                if let Some(r) = self.replicas.get_mut(&slot) {
                    r.released.remove(&pkid);
                }
            }
            Incoming::Publish { msg, pkid, .. } => self.on_replica_publish(slot, msg, pkid),
            Incoming::PubRel(pkid) => {
                // QoS 2 from the replica: our PUBREC followed the broker's, so
                // the message is already upstream
                self.send_replica(slot, Outgoing::PubComp(pkid));
            }
            Incoming::Subscribe { pkid, filters, id } => self.on_subscribe(slot, pkid, filters, id),
            Incoming::Unsubscribe { pkid, filters } => self.on_unsubscribe(slot, pkid, filters),
            _ => {}
        }
    }

    pub(super) fn on_replica_ack(&mut self, slot: u16, pkid: u16, qos2: bool) {
        let Some(r) = self.replicas.get_mut(&slot) else {
            return;
        };
        if r.stalled {
            tracing::info!(instance = %self.cfg.instance, slot, "stalled replica acknowledges again");
            r.stalled = false;
        }
        let Some(entry) = r.inflight.get_mut(&pkid) else {
            return; // already moved to another replica
        };
        if qos2 {
            r.released.insert(pkid);
            self.actions
                .push(Action::ToReplica(slot, Outgoing::PubRel(pkid)));
        }
        if entry.key.is_some() {
            // received, not done: it waits for its result (and still
            // counts against the replica's window)
            entry.acked = true;
            return;
        }
        let Some(done) = r.inflight.remove(&pkid) else {
            return;
        };
        r.inflight_gauge.set(r.inflight.len() as i64);
        self.ack_upstream(done.queued.origin);
        self.pump();
    }

    fn denied(&self, slot: u16, action: &'static str, topic: &str) {
        tracing::warn!(instance = %self.cfg.instance, slot, action, topic, "refused by the instance's acl");
        self.metrics
            .acl_denied
            .with_label_values(&[self.cfg.instance.as_str(), action])
            .inc();
    }

    pub(super) fn on_replica_publish(&mut self, slot: u16, msg: Message, replica_pkid: u16) {
        if self
            .cfg
            .acl
            .as_ref()
            .is_some_and(|a| !a.may_publish(&msg.topic))
        {
            self.denied(slot, "publish", &msg.topic);
            match msg.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.send_replica(
                        slot,
                        Outgoing::PubAck(replica_pkid, wire::NOT_AUTHORIZED.into()),
                    );
                }
                QoS::ExactlyOnce => {
                    self.send_replica(
                        slot,
                        Outgoing::PubRec(replica_pkid, wire::NOT_AUTHORIZED.into()),
                    );
                }
            }
            return;
        }
        if msg.qos == QoS::AtMostOnce {
            let completes = self.job_done_by(slot, &msg);
            self.send_up(UpCmd::Publish {
                msg,
                pkid: 0,
                dup: false,
            });
            // written before the job's acknowledgement, on one connection
            if let Some(job) = completes {
                self.ack_upstream(job.origin);
            }
            return;
        }
        if self
            .out
            .values()
            .any(|o| o.slot == slot && o.replica_pkid == replica_pkid && !o.received && !o.answered)
        {
            return; // a DUP of a publish already on its way
        }
        let completes = self.job_done_by(slot, &msg);
        // a result is acknowledged to its replica at once, not when the
        // broker has it: its job stays unacknowledged upstream until then
        // (and is done again if the broker refuses it or flowgate dies), so
        // nothing is lost; and a replica never waits for the broker's ack of
        // a result while flowgate, its queue full, is not reading the broker
        // (a deadlock: the windows hold jobs whose results cannot go)
        let answered = completes.is_some();
        if answered {
            let ack = if msg.qos == QoS::AtLeastOnce {
                Outgoing::PubAck(replica_pkid, wire::SUCCESS.into())
            } else {
                Outgoing::PubRec(replica_pkid, wire::SUCCESS.into())
            };
            self.send_replica(slot, ack);
        }
        let pkid = self.alloc_up_pkid();
        self.out.insert(
            pkid,
            OutPub {
                slot,
                replica_pkid,
                msg: msg.clone(),
                received: false,
                answered,
                completes,
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

    /// Completion acknowledgement: the job of `slot` that the result `msg`
    /// finishes (the oldest with its key), taken out of the replica's
    /// window. `None` when `msg` is no result, or names no job of that
    /// replica (counted: `flowgate_dispatch_unmatched_results_total`).
    fn job_done_by(&mut self, slot: u16, msg: &Message) -> Option<Queued> {
        let c = self.cfg.complete.as_ref()?;
        if !c.topic.iter().any(|f| f.matches(&msg.topic)) {
            return None;
        }
        let key = crate::mqtt::dispatch::complete::key(&c.correlate, msg);
        let r = self.replicas.get_mut(&slot)?;
        let found = key.as_ref().and_then(|k| {
            r.inflight
                .iter()
                .filter(|(_, i)| i.key.as_ref() == Some(k))
                .min_by_key(|(_, i)| i.sent)
                .map(|(&pkid, _)| pkid)
        });
        let Some(job) = found.and_then(|pkid| r.inflight.remove(&pkid)) else {
            self.unmatched.inc();
            tracing::debug!(instance = %self.cfg.instance, slot, topic = %msg.topic, "result names no job of its replica");
            return None;
        };
        r.inflight_gauge.set(r.inflight.len() as i64);
        // room in its window
        self.pump();
        Some(job.queued)
    }

    pub(super) fn on_subscribe(
        &mut self,
        slot: u16,
        pkid: u16,
        requests: Vec<wire::SubRequest>,
        id: Option<usize>,
    ) {
        let mut granted = Vec::with_capacity(requests.len());
        let mut filters = Vec::with_capacity(requests.len());
        let mut new_up = Vec::new();
        let mut fetch = Vec::new();
        for req in requests {
            let text = req.filter;
            filters.push(text.clone());
            let Ok(filter) = TopicFilter::new(&text) else {
                granted.push(wire::SUB_FAILURE);
                continue;
            };
            if text.starts_with("$share/") {
                // dispatch mode shares by itself; a shared filter is refused
                granted.push(wire::SUB_SHARED_NOT_SUPPORTED);
                continue;
            }
            if self
                .cfg
                .acl
                .as_ref()
                .is_some_and(|a| !a.may_subscribe(&text))
            {
                self.denied(slot, "subscribe", &text);
                granted.push(wire::SUB_NOT_AUTHORIZED);
                continue;
            }
            let qos = req.qos;
            granted.push(qos as u8);
            let mut had = false;
            if let Some(r) = self.replicas.get_mut(&slot) {
                had = r.subs.iter().any(|s| s.filter.as_str() == text);
                r.subs.retain(|s| s.filter.as_str() != text);
                r.subs.push(Sub {
                    filter: filter.clone(),
                    qos,
                    id,
                    rap: req.retain_as_published,
                });
            }
            // the latest subscription's no local is the instance's: a
            // change subscribes again upstream (a SUBSCRIBE replaces options)
            let no_local_changes = req.no_local != self.no_local.contains(&text);
            // retain as published upstream once a replica asks for it (the
            // others get the retain flag off from flowgate)
            let rap_new = req.retain_as_published
                && self.cfg.retain_options
                && !self.rap.iter().any(|r| r.as_str() == text);
            if rap_new {
                self.rap.push(filter);
            }
            if self.filters.get(&text).is_none_or(|&q| q < qos) || no_local_changes || rap_new {
                if req.no_local {
                    self.no_local.insert(text.clone());
                } else {
                    self.no_local.remove(&text);
                }
                let up_qos = self.filters.get(&text).map_or(qos, |&q| q.max(qos));
                self.filters.insert(text.clone(), up_qos);
                new_up.push((text.clone(), up_qos));
            }
            // retain handling: 0 always, 1 for a new subscription, 2 never
            if req.retain_handling == 0 || (req.retain_handling == 1 && !had) {
                fetch.push(text);
            }
        }
        let ack = SubAckLater {
            slot,
            pkid,
            granted,
            filters,
            fetch,
            props: AckProps::default(),
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
    pub(super) fn finish_subscribe(&mut self, ack: SubAckLater) {
        let SubAckLater {
            slot,
            pkid,
            granted,
            fetch,
            props,
            ..
        } = ack;
        let suback = Outgoing::SubAck {
            pkid,
            granted,
            props,
        };
        if !self.send_replica(slot, suback) || fetch.is_empty() {
            return;
        }
        let Some(r) = self.replicas.get(&slot) else {
            return;
        };
        self.fetches = self.fetches.wrapping_add(1);
        let fetcher = RetainedFetch {
            addr: if self.upstream_v5 {
                self.cfg.upstream_addr_v5.clone()
            } else {
                self.cfg.upstream_addr.clone()
            },
            v5: self.upstream_v5,
            client_id: format!("{}-r{}", self.cfg.upstream_client_id, self.fetches),
            filters: fetch,
            timeout: self.cfg.retained_timeout,
            login: self.cfg.upstream_login.clone(),
        };
        let generation = r.generation;
        self.actions.push(Action::Fetch {
            slot,
            generation,
            fetch: fetcher,
        });
    }

    /// Retained messages fetched for a replica's subscription: they wait
    /// for room in its window, then go at their QoS (at most the
    /// subscription's), with its subscription identifiers.
    pub(super) fn on_fetched(&mut self, slot: u16, generation: u64, messages: Vec<Message>) {
        let now = self.now;
        let Some(r) = self
            .replicas
            .get_mut(&slot)
            .filter(|r| r.generation == generation)
        else {
            return; // that connection is gone
        };
        r.retained.extend(messages.into_iter().map(|msg| Queued {
            msg,
            origin: Origin::None,
            redelivery: false,
            arrived: now,
            on_subscribe: true,
            not_to: None,
        }));
        self.pump();
    }

    pub(super) fn on_unsubscribe(&mut self, slot: u16, pkid: u16, filters: Vec<String>) {
        let count = filters.len();
        if let Some(r) = self.replicas.get_mut(&slot) {
            r.subs
                .retain(|s| !filters.iter().any(|t| t == s.filter.as_str()));
        }
        let unused: Vec<String> = filters
            .into_iter()
            .filter(|f| {
                self.filters.contains_key(f)
                    && !self
                        .replicas
                        .values()
                        .map(|r| &r.subs)
                        .chain(self.sessions.values().map(|s| &s.subs))
                        .any(|subs| subs.iter().any(|s| s.filter.as_str() == f))
            })
            .collect();
        for f in &unused {
            self.forget_filter(f);
        }
        if !unused.is_empty() && self.upstream_up {
            let up_pkid = self.alloc_up_pkid();
            let filters = unused.iter().map(|f| self.upstream_filter(f)).collect();
            self.send_up(UpCmd::Unsubscribe {
                pkid: up_pkid,
                filters,
            });
        }
        self.send_replica(slot, Outgoing::UnsubAck { pkid, count });
    }
}
