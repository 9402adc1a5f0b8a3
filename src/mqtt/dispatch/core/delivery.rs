//! Handing messages to replicas: one delivery, the queue pump, and the
//! ack-timeout sweep.

use std::time::Instant;

use super::*;

impl Dispatcher {
    /// Sends one message to one replica; hands it back when the replica
    /// cannot take it.
    pub(super) fn deliver(&mut self, slot: u16, queued: Queued) -> Result<(), Queued> {
        let (granted, props, too_large, retain) = {
            let Some(r) = self.replicas.get(&slot) else {
                return Err(queued);
            };
            let Some(granted) = r.granted(&queued.msg.topic) else {
                return Err(queued);
            };
            let props = for_replica(r, &queued, self.now);
            let too_large = match (&props, r.limits.max_packet) {
                (Some(p), Some(max)) => publish_len(&queued.msg, p.as_deref()) > max as usize,
                _ => false,
            };
            // live messages: the retain flag only for retain as published
            let retain =
                queued.on_subscribe || (queued.msg.retain && r.keeps_retain(&queued.msg.topic));
            (granted, props, too_large, retain)
        };
        let Some(props) = props else {
            // expired while it waited: dropped as a broker drops it
            self.drop_message(slot, &queued.msg.topic, "expired");
            self.ack_upstream(queued.origin);
            return Ok(());
        };
        if too_large {
            // larger than the replica takes: MQTT 5 says discard it, as if delivered
            self.drop_message(slot, &queued.msg.topic, "too_large");
            self.ack_upstream(queued.origin);
            return Ok(());
        }
        let Some(r) = self.replicas.get_mut(&slot) else {
            return Err(queued);
        };
        let qos = queued.msg.qos.min(granted);
        if qos == QoS::AtMostOnce {
            // at most once: the message itself goes, no copy is kept
            let Queued {
                mut msg, origin, ..
            } = queued;
            msg.qos = QoS::AtMostOnce;
            msg.retain = retain;
            msg.properties = props;
            tracing::trace!(slot, topic = %msg.topic, "delivered");
            r.counters.messages_to.inc();
            self.actions.push(Action::ToReplica(
                slot,
                Outgoing::Publish {
                    msg,
                    pkid: 0,
                    dup: false,
                },
            ));
            self.ack_upstream(origin);
            return Ok(());
        }
        // a copy for the wire; `queued` stays for a re-delivery
        let msg = Message {
            topic: queued.msg.topic.clone(),
            payload: queued.msg.payload.clone(),
            qos,
            retain,
            properties: props,
        };
        let pkid = r.alloc_pkid();
        self.actions.push(Action::ToReplica(
            slot,
            Outgoing::Publish {
                msg,
                pkid,
                dup: false,
            },
        ));
        r.counters.messages_to.inc();
        tracing::trace!(slot, pkid, topic = %queued.msg.topic, "delivered");
        // completion acknowledgement: a job from the broker is done when its
        // result comes; one without a key is done on receipt
        let key = match (&self.cfg.complete, queued.origin) {
            (Some(c), Origin::Upstream { .. }) => {
                let key = crate::mqtt::dispatch::complete::key(&c.correlate, &queued.msg);
                if key.is_none() && !queued.redelivery {
                    self.uncorrelated.inc();
                    tracing::debug!(instance = %self.cfg.instance, topic = %queued.msg.topic, "job without a key: done on receipt");
                }
                key
            }
            _ => None,
        };
        r.inflight.insert(
            pkid,
            Inflight {
                queued,
                sent: self.now,
                key,
                acked: false,
            },
        );
        r.inflight_gauge.set(r.inflight.len() as i64);
        Ok(())
    }

    /// Hands queued messages to replicas that can take them, in order.
    pub(super) fn pump(&mut self) {
        let active = if self.cfg.strategy == Strategy::ActiveStandby {
            self.active()
        } else {
            None
        };
        self.pump_retained();
        let mut i = 0;
        while i < self.queue.len() {
            let any_room = self.replicas.values().any(Replica::has_room);
            if !any_room {
                break;
            }
            let topic = self.queue[i].msg.topic.as_str();
            // a job its replica did not finish goes to another, if another
            // subscribes (busy or not)
            let avoid = self.queue[i].not_to.filter(|&a| {
                self.replicas
                    .iter()
                    .any(|(&s, r)| s != a && r.granted(topic).is_some())
            });
            let candidates: Vec<Candidate> = self
                .replicas
                .iter()
                .filter(|(&s, r)| r.has_room() && Some(s) != avoid)
                .filter(|(_, r)| r.granted(topic).is_some())
                .map(|(&slot, r)| Candidate {
                    slot,
                    inflight: r.inflight.len(),
                })
                .collect();
            let key = strategy::key_of(topic, self.cfg.key_level);
            let pick = if self.cfg.strategy == Strategy::KeyHash {
                // a key belongs to one replica among all that subscribe, busy
                // or not; each known by its HTTP twin's index where it has one
                let tied = !self.cfg.key_hosts.is_empty();
                let mut hosts = Vec::new();
                let all: Vec<(u16, u64)> = self
                    .replicas
                    .iter()
                    .filter(|(&s, r)| r.granted(topic).is_some() && !r.stalled && Some(s) != avoid)
                    .map(|(&slot, r)| {
                        // (only tied sides need to know who came first)
                        let taken = tied && hosts.contains(&r.host);
                        if tied {
                            hosts.push(r.host);
                        }
                        (
                            slot,
                            crate::tie::key_id(&self.cfg.key_hosts, r.host, slot, taken),
                        )
                    })
                    .collect();
                strategy::pick_keyed(key, &all).filter(|s| candidates.iter().any(|c| c.slot == *s))
            } else if let Some(a) = active.filter(|a| {
                self.replicas
                    .get(a)
                    .is_some_and(|r| r.granted(topic).is_some())
            }) {
                // only the active replica, and in order: when it has no room
                // the message waits for it
                candidates.iter().any(|c| c.slot == a).then_some(a)
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
            match self.deliver(slot, queued) {
                Ok(()) => self.served(slot),
                Err(queued) => {
                    self.queue.insert(i, queued);
                    i += 1;
                }
            }
        }
        self.update_queue_gauge();
    }

    /// Retained messages fetched for a replica go first, as its window
    /// allows.
    fn pump_retained(&mut self) {
        let waiting: Vec<u16> = self
            .replicas
            .iter()
            .filter(|(_, r)| !r.retained.is_empty())
            .map(|(&s, _)| s)
            .collect();
        for slot in waiting {
            while let Some(r) = self.replicas.get_mut(&slot).filter(|r| r.has_room()) {
                let Some(q) = r.retained.pop_front() else {
                    break;
                };
                if r.granted(&q.msg.topic).is_none() {
                    continue; // unsubscribed since
                }
                if let Err(q) = self.deliver(slot, q) {
                    if let Some(r) = self.replicas.get_mut(&slot) {
                        r.retained.push_front(q);
                    }
                    break;
                }
            }
        }
    }

    /// A message not delivered to `slot` (expired, too large): counted,
    /// logged; its upstream acknowledgement goes on.
    fn drop_message(&self, slot: u16, topic: &str, reason: &'static str) {
        self.metrics
            .dispatch_dropped
            .with_label_values(&[self.cfg.instance.as_str(), reason])
            .inc();
        tracing::info!(instance = %self.cfg.instance, slot, topic, reason, "message not delivered");
    }

    pub(super) fn on_tick(&mut self) {
        let timeout = self.cfg.ack_timeout;
        let now = self.now;
        if self.will_due.is_some_and(|due| now >= due) {
            self.will_due = None;
            self.publish_will();
        }
        let late: Vec<u16> = self
            .replicas
            .iter()
            .filter(|(_, r)| {
                // a job whose receipt was acknowledged waits for its result
                // under complete.timeout, below
                r.inflight
                    .values()
                    .any(|i| !i.acked && now.duration_since(i.sent) > timeout)
            })
            .map(|(&s, _)| s)
            .collect();
        for slot in late {
            let Some(r) = self.replicas.get_mut(&slot) else {
                continue;
            };
            r.stalled = true;
            // the fault was observable at the first missed deadline
            let deadline = r
                .inflight
                .values()
                .filter(|i| !i.acked)
                .map(|i| i.sent)
                .min()
                .map_or(now, |sent| sent + timeout);
            let inflight = std::mem::take(&mut r.inflight);
            r.inflight_gauge.set(0);
            let moved = self.requeue(inflight);
            tracing::warn!(instance = %self.cfg.instance, slot, moved, ?timeout, "replica stopped acknowledging: its messages go to others");
            self.lose_active(slot, "ack_timeout", deadline);
        }
        self.sweep_jobs(now);
        self.pump();
    }

    /// Completion acknowledgement: a job not done within `complete.timeout`
    /// of its delivery goes to another replica (the one that has it may
    /// still finish it: a duplicate, as at-least-once allows); the jobs in
    /// progress and the oldest one's age are published.
    pub(super) fn sweep_jobs(&mut self, now: Instant) {
        let Some(timeout) = self.cfg.complete.as_ref().map(|c| c.timeout) else {
            return;
        };
        let mut overdue = Vec::new();
        let (mut count, mut oldest) = (0i64, Duration::ZERO);
        for (&slot, r) in &self.replicas {
            for (&pkid, i) in &r.inflight {
                if i.key.is_none() {
                    continue;
                }
                let age = now.duration_since(i.sent);
                if i.acked && age > timeout {
                    overdue.push((slot, pkid));
                } else {
                    count += 1;
                    oldest = oldest.max(age);
                }
            }
        }
        for (slot, pkid) in overdue {
            let Some(r) = self.replicas.get_mut(&slot) else {
                continue;
            };
            let Some(job) = r.inflight.remove(&pkid) else {
                continue;
            };
            r.inflight_gauge.set(r.inflight.len() as i64);
            tracing::warn!(instance = %self.cfg.instance, slot, topic = %job.queued.msg.topic, ?timeout, "job not done within complete.timeout: handed to another replica");
            let mut q = job.queued;
            q.redelivery = true;
            q.not_to = Some(slot);
            self.queue.push_front(q);
            self.redeliveries.inc();
            count += 1;
        }
        self.in_progress.set(count);
        self.oldest_job.set(oldest.as_secs_f64());
    }
}

/// The MQTT 5 properties `queued`'s message carries to replica `r`: the
/// expiry counted down by the time it waited in flowgate, the replica's own
/// subscription identifiers (the broker's are flowgate's). `None` when it
/// expired; `Some(None)` when it carries none.
#[allow(clippy::option_option)]
fn for_replica(
    r: &Replica,
    queued: &Queued,
    now: Instant,
) -> Option<Option<Box<rumqttc::v5::mqttbytes::v5::PublishProperties>>> {
    let expiry = queued
        .msg
        .properties
        .as_deref()
        .and_then(|p| p.message_expiry_interval);
    let left = match expiry {
        Some(expiry) => {
            let waited = now.saturating_duration_since(queued.arrived).as_secs();
            if waited >= u64::from(expiry) {
                return None;
            }
            Some(expiry - waited as u32)
        }
        None => None,
    };
    if !r.limits.v5 {
        // 3.x carries no properties: nothing to copy
        return Some(None);
    }
    let mut props = queued.msg.properties.clone();
    if let Some(p) = props.as_deref_mut() {
        p.message_expiry_interval = left;
        p.subscription_identifiers.clear();
    }
    let ids = r.sub_ids(&queued.msg.topic);
    if !ids.is_empty() {
        props
            .get_or_insert_with(Default::default)
            .subscription_identifiers = ids;
    }
    Some(props.filter(|p| **p != Default::default()))
}

/// The size of a PUBLISH of `msg` with `props` as a replica would get it
/// (MQTT 5; an upper bound for 3.x).
fn publish_len(
    msg: &Message,
    props: Option<&rumqttc::v5::mqttbytes::v5::PublishProperties>,
) -> usize {
    let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
        msg.topic.as_str(),
        msg.qos.v5(),
        msg.payload.clone(),
        props.cloned(),
    );
    p.pkid = 1;
    let mut out = bytes::BytesMut::new();
    rumqttc::v5::mqttbytes::v5::Packet::Publish(p)
        .write(&mut out, None)
        .map_or(usize::MAX, |n| n)
}
