//! Ties an instance's MQTT and HTTP sides in active-standby, so a flow's web
//! API and its message stream live on the same copy. A replica is known on
//! the MQTT side by the IP address its connection comes from and on the HTTP
//! side by its address's host (or the configured `mqtt_hosts`): the two are
//! tied when they are the same IP. The dispatcher publishes the host of its
//! active replica and the HTTP pool follows it; the pool publishes which hosts
//! fail their health checks and the dispatcher fails over away from them.
//! Shared state only; no I/O, no decisions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

#[derive(Debug, Default)]
struct State {
    mqtt_active: Option<IpAddr>,
    /// Hosts whose HTTP replica is down, and since when.
    unhealthy: HashMap<IpAddr, Instant>,
}

/// One instance's tie, shared by its dispatcher and its HTTP pool.
#[derive(Debug, Default)]
pub struct Tie {
    state: Mutex<State>,
}

impl Tie {
    fn lock(&self) -> MutexGuard<'_, State> {
        // every critical section is a single assignment: a poisoned lock is consistent
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host of the MQTT side's active replica.
    pub fn mqtt_active(&self) -> Option<IpAddr> {
        self.lock().mqtt_active
    }

    pub fn set_mqtt_active(&self, host: Option<IpAddr>) {
        self.lock().mqtt_active = host;
    }

    /// Since when `host`'s HTTP replica has been down, if it is.
    pub fn unhealthy_since(&self, host: IpAddr) -> Option<Instant> {
        self.lock().unhealthy.get(&host).copied()
    }

    /// The HTTP replica on `host` went down (`since`: when it was first seen
    /// failing) or came back (`None`).
    pub fn set_unhealthy(&self, host: IpAddr, since: Option<Instant>) {
        let mut s = self.lock();
        match since {
            Some(t) => {
                s.unhealthy.entry(host).or_insert(t);
            }
            None => {
                s.unhealthy.remove(&host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_active_and_unhealthy_hosts() {
        let tie = Tie::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(tie.mqtt_active(), None);
        tie.set_mqtt_active(Some(a));
        assert_eq!(tie.mqtt_active(), Some(a));
        let t = Instant::now();
        tie.set_unhealthy(a, Some(t));
        tie.set_unhealthy(a, Some(Instant::now()));
        assert_eq!(tie.unhealthy_since(a), Some(t), "the first failure is kept");
        tie.set_unhealthy(a, None);
        assert_eq!(tie.unhealthy_since(a), None);
    }
}
