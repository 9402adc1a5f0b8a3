//! What the upstream session tells the dispatcher: up and down, messages,
//! acknowledgements of the replicas' publishes, SUBACKs.

use super::*;

impl Dispatcher {
    pub(super) fn on_upstream(&mut self, ev: UpEvent) {
        match ev {
            UpEvent::Up {
                session_present,
                protocol,
                window,
            } => {
                self.upstream_up = true;
                self.upstream_window = window;
                if window.is_none() && self.cfg.complete.is_some() {
                    tracing::warn!(instance = %self.cfg.instance, "an MQTT 3.1.1 upstream session: the broker's own limit on unacknowledged messages (Mosquitto: max_inflight_messages, 20 by default) caps this instance's jobs in progress; raise it, or let flowgate speak MQTT 5 upstream (upstream_protocol = \"auto\" or \"5\"), whose Receive Maximum lifts it");
                }
                self.window_gauge
                    .set(window.map_or(0, |w| i64::try_from(w).unwrap_or(i64::MAX)));
                self.upstream_v5 = protocol.is_v5();
                let unsent = std::mem::take(&mut self.unsent);
                let sent = if session_present {
                    // the broker kept the session's subscriptions
                    self.subscribe_up(unsent)
                } else {
                    self.held.clear();
                    self.ack_order.clear();
                    let all: Vec<(String, QoS)> =
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
                self.sub_filters.clear();
            }
            UpEvent::Packets(ps) => {
                for p in ps {
                    self.on_upstream_packet(p);
                }
            }
        }
    }

    pub(super) fn on_upstream_packet(&mut self, packet: Incoming) {
        match packet {
            Incoming::Publish { msg, pkid, .. } => self.on_upstream_publish(msg, pkid),
            Incoming::PubRel(pkid) => {
                self.held.remove(&pkid);
                self.send_up(UpCmd::PubComp(pkid));
            }
            Incoming::PubAck(pkid, code) => {
                // the broker's reason (v5: no matching subscribers, not
                // authorized...) goes on to the replica
                if let Some(o) = self.out.remove(&pkid) {
                    let stored = code.code < 0x80;
                    if !o.answered {
                        self.send_replica(o.slot, Outgoing::PubAck(o.replica_pkid, code));
                    }
                    self.result_stored(o.completes, stored);
                }
            }
            Incoming::PubRec(pkid, code) if code.code >= 0x80 => {
                // refused: the QoS 2 exchange ends here, no PUBREL
                if let Some(o) = self.out.remove(&pkid) {
                    if !o.answered {
                        self.send_replica(o.slot, Outgoing::PubRec(o.replica_pkid, code));
                    }
                    self.result_stored(o.completes, false);
                }
            }
            Incoming::PubRec(pkid, code) => {
                if let Some(o) = self.out.get_mut(&pkid) {
                    o.received = true;
                    let (slot, rp, answered) = (o.slot, o.replica_pkid, o.answered);
                    self.send_up(UpCmd::PubRel(pkid));
                    if !answered {
                        self.send_replica(slot, Outgoing::PubRec(rp, code));
                    }
                }
            }
            Incoming::PubComp(pkid) => {
                if let Some(o) = self.out.remove(&pkid) {
                    self.result_stored(o.completes, true);
                }
            }
            Incoming::SubAck(pkid, codes, props) => self.on_upstream_suback(pkid, &codes, &props),
            _ => {}
        }
    }

    /// Completion acknowledgement: the broker has the result of `job` (its
    /// job is acknowledged upstream, in order) or refused it (the job is
    /// handed on, to be done again).
    fn result_stored(&mut self, job: Option<Queued>, stored: bool) {
        let Some(mut job) = job else {
            return;
        };
        if stored {
            self.ack_upstream(job.origin);
        } else {
            tracing::warn!(instance = %self.cfg.instance, topic = %job.msg.topic, "the broker refused a result: its job is done again");
            job.redelivery = true;
            self.queue.push_front(job);
            self.pump();
        }
    }

    /// The broker's answer to a SUBSCRIBE: a filter it refused is refused to
    /// the replicas that asked (with its reason), a lower QoS is what they get;
    /// what else it says (v5 reason string, user properties) goes with it.
    fn on_upstream_suback(&mut self, pkid: u16, codes: &[u8], props: &AckProps) {
        let filters = self.sub_filters.remove(&pkid).unwrap_or_default();
        let answer: HashMap<String, u8> = filters.into_iter().zip(codes.iter().copied()).collect();
        for (f, code) in &answer {
            if *code >= 0x80 {
                tracing::warn!(instance = %self.cfg.instance, filter = %f, code, "the broker refused a subscription");
                self.forget_filter(f);
            }
        }
        for mut ack in self.pending_subacks.remove(&pkid).unwrap_or_default() {
            if !props.is_empty() {
                ack.props = props.clone();
            }
            for (i, f) in ack.filters.iter().enumerate() {
                let Some(&code) = answer.get(f) else { continue };
                let Some(g) = ack.granted.get_mut(i) else {
                    continue;
                };
                if *g > 2 {
                    continue;
                }
                if code >= 0x80 {
                    *g = code;
                    ack.fetch.retain(|x| x != f);
                    if let Some(r) = self.replicas.get_mut(&ack.slot) {
                        r.subs.retain(|s| s.filter.as_str() != f);
                    }
                } else {
                    *g = (*g).min(code);
                }
            }
            self.finish_subscribe(ack);
        }
    }

    pub(super) fn on_upstream_publish(&mut self, msg: Message, pkid: u16) {
        tracing::trace!(pkid, qos = msg.qos as u8, topic = %msg.topic, "upstream publish");
        let origin = if msg.qos > QoS::AtMostOnce {
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
        if msg.retain && !self.rap.iter().any(|r| r.matches(&msg.topic)) {
            // sent because the main session (re)subscribed: replicas get
            // retained messages from a side session when they subscribe
            // (with retain as published upstream, retain handling 2 keeps
            // those away: a retained message there is a live one)
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
            arrived: self.now,
            on_subscribe: false,
            not_to: None,
        });
        self.pump();
    }

    /// A copy to each of `slots`, acknowledged upstream at once.
    pub(super) fn fan_out(&mut self, msg: &Message, slots: &[u16]) {
        for &slot in slots {
            let queued = Queued {
                msg: msg.clone(),
                origin: Origin::None,
                redelivery: false,
                arrived: self.now,
                on_subscribe: false,
                not_to: None,
            };
            if self.deliver(slot, queued).is_err() {
                self.metrics
                    .dispatch_dropped
                    .with_label_values(&[self.cfg.instance.as_str(), "replica_backlog"])
                    .inc();
                tracing::warn!(instance = %self.cfg.instance, slot, "broadcast copy dropped: replica backlog full");
            }
        }
    }
}
