//! Active-standby (`strategy = "active-standby"`): which replica is active,
//! when it loses the role, and the failover record once a new active replica
//! was handed its first message.

use std::time::Instant;

use super::*;
use crate::metrics::names::SIDE_MQTT;
use crate::metrics::Failover;

/// The active replica was lost; the failover ends with the next delivery to
/// another replica.
pub(super) struct Lost {
    pub cause: &'static str,
    /// When the fault became observable.
    pub since: Instant,
    pub slot: u16,
    pub generation: u64,
}

impl Dispatcher {
    /// The active replica: kept while it is connected, subscribed and
    /// acknowledging; otherwise the lowest slot that is (and, with
    /// `failback`, a lower slot takes the role back).
    pub(super) fn active(&mut self) -> Option<u16> {
        let tie = self.cfg.tie.clone();
        let unhealthy = |r: &Replica| tie.as_ref().and_then(|t| t.unhealthy_since(r.host));
        // the active replica's HTTP side failed its health check
        if let Some(a) = self.active {
            if let Some(since) = self.replicas.get(&a).and_then(unhealthy) {
                self.lose_active(a, "health", since);
            }
        }
        let eligible = |r: &Replica| !r.stalled && !r.subs.is_empty() && unhealthy(r).is_none();
        let lowest = self
            .replicas
            .iter()
            .find(|(_, r)| eligible(r))
            .map(|(&s, _)| s);
        let current = self
            .active
            .filter(|a| self.replicas.get(a).is_some_and(eligible));
        let next = match current {
            Some(a) if self.cfg.failback && lowest.is_some_and(|l| l < a) => {
                self.lose_active(a, "failback", self.now);
                lowest
            }
            Some(a) => Some(a),
            None => lowest,
        };
        if next != self.active {
            if let Some(slot) = next {
                tracing::info!(instance = %self.cfg.instance, slot, "active replica");
            }
            self.active = next;
            if let Some(t) = &self.cfg.tie {
                t.set_mqtt_active(next.and_then(|s| self.replicas.get(&s)).map(|r| r.host));
            }
        }
        self.active
    }

    /// The active replica `slot` failed (or yields the role): remembered
    /// until another replica is served.
    pub(super) fn lose_active(&mut self, slot: u16, cause: &'static str, since: Instant) {
        if self.cfg.strategy != Strategy::ActiveStandby || self.active != Some(slot) {
            return;
        }
        tracing::warn!(instance = %self.cfg.instance, slot, cause, "active replica lost");
        let generation = self.replicas.get(&slot).map_or(0, |r| r.generation);
        if self.lost.is_none() {
            self.lost = Some(Lost {
                cause,
                since,
                slot,
                generation,
            });
        }
        self.active = None;
    }

    /// A message was handed to `slot`: ends a failover if `slot` is not the
    /// replica that was lost.
    pub(super) fn served(&mut self, slot: u16) {
        let Some(lost) = &self.lost else {
            return;
        };
        let generation = self.replicas.get(&slot).map_or(0, |r| r.generation);
        if lost.slot == slot && lost.generation == generation {
            return;
        }
        let f = Failover::now(
            &self.cfg.instance,
            SIDE_MQTT,
            lost.cause,
            Some(lost.slot.to_string()),
            slot.to_string(),
            lost.since,
        );
        self.lost = None;
        self.metrics.failover(f);
    }
}
