//! Handing messages to replicas: one delivery, the queue pump, and the
//! ack-timeout sweep.

use std::time::Instant;

use super::*;

impl Dispatcher {
    /// Sends one message to one replica; hands it back when the replica
    /// cannot take it.
    pub(super) fn deliver(&mut self, slot: u16, queued: Queued) -> Result<(), Queued> {
        let Some(r) = self.replicas.get_mut(&slot) else {
            return Err(queued);
        };
        let Some(granted) = r.granted(&queued.msg.topic) else {
            return Err(queued);
        };
        // the dispatcher is the only sender: room now is room for the send
        if r.tx.capacity() == 0 || r.tx.is_closed() {
            return Err(queued);
        }
        let qos = queued.msg.qos.min(granted);
        if qos == 0 {
            // at most once: the message itself goes, no copy is kept
            let Queued {
                mut msg, origin, ..
            } = queued;
            msg.qos = 0;
            tracing::trace!(slot, topic = %msg.topic, "delivered");
            let _ = r.tx.try_send(Outgoing::Publish {
                msg,
                pkid: 0,
                dup: false,
            });
            r.counters.messages_to.inc();
            self.ack_upstream(origin);
            return Ok(());
        }
        let mut msg = queued.msg.clone();
        msg.qos = qos;
        let pkid = r.alloc_pkid();
        if r.tx
            .try_send(Outgoing::Publish {
                msg,
                pkid,
                dup: false,
            })
            .is_err()
        {
            return Err(queued);
        }
        r.counters.messages_to.inc();
        tracing::trace!(slot, pkid, topic = %queued.msg.topic, "delivered");
        r.inflight.insert(
            pkid,
            Inflight {
                queued,
                sent: Instant::now(),
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

    pub(super) fn on_tick(&mut self) {
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
            // the fault was observable at the first missed deadline
            let deadline = r
                .inflight
                .values()
                .map(|i| i.sent)
                .min()
                .map_or(now, |sent| sent + timeout);
            let inflight = std::mem::take(&mut r.inflight);
            r.inflight_gauge.set(0);
            let moved = self.requeue(inflight);
            tracing::warn!(instance = %self.cfg.instance, slot, moved, ?timeout, "replica stopped acknowledging: its messages go to others");
            self.lose_active(slot, "ack_timeout", deadline);
        }
        self.pump();
    }
}
