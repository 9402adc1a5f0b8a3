//! Ties an instance's MQTT and HTTP sides in active-standby, so a flow's web
//! API and its message stream live on the same copy. A replica is known on
//! the MQTT side by the IP address its connection comes from and on the HTTP
//! side by its address's host (or the configured `mqtt_hosts`): the two are
//! tied when they are the same IP. The dispatcher publishes the host of its
//! active replica and the HTTP pool follows it; the pool publishes which hosts
//! fail their health checks and the dispatcher fails over away from them.
//! With `key-hash` on both sides the same tie makes a key value reach the
//! same copy over MQTT and HTTP ([`key_hosts`], [`key_id`]).
//! Shared state and pure functions; no I/O.

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

/// The host an HTTP replica's MQTT connection comes from: the configured
/// `mqtt_hosts` entry, else the host of its address when that is an IP.
pub fn replica_host(addr: &str, configured: Option<IpAddr>) -> Option<IpAddr> {
    configured.or_else(|| {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    })
}

/// The hosts of an instance's HTTP replicas in their order, when each has one
/// and no two share it: MQTT `key-hash` then hashes a replica by the position
/// of its host here, the identity HTTP `key-hash` uses, so one key meets one
/// copy on both sides. Empty when the sides cannot be told apart by host.
pub fn key_hosts(http: &crate::config::HttpConfig) -> Vec<IpAddr> {
    let hosts: Option<Vec<IpAddr>> = http
        .replicas
        .iter()
        .enumerate()
        .map(|(i, addr)| replica_host(addr, http.mqtt_hosts.get(i).copied()))
        .collect();
    let hosts = hosts.unwrap_or_default();
    let distinct: std::collections::HashSet<_> = hosts.iter().collect();
    if distinct.len() == hosts.len() {
        hosts
    } else {
        Vec::new()
    }
}

/// The rendezvous identity of MQTT replica `slot` connected from `host`: its
/// slot when the sides are not tied (`key_hosts` empty); else the position
/// of its host in `key_hosts` (the HTTP replica's index), unless an earlier
/// slot of the same host has it (`taken`), and otherwise one no HTTP replica
/// has.
pub fn key_id(key_hosts: &[IpAddr], host: IpAddr, slot: u16, taken: bool) -> u64 {
    if key_hosts.is_empty() {
        return u64::from(slot);
    }
    match key_hosts.iter().position(|h| *h == host) {
        Some(i) if !taken => i as u64,
        _ => (1 << 32) + u64::from(slot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtt_replica_hashes_as_the_http_replica_on_its_host() {
        let ip = |d: u8| IpAddr::from([127, 0, 0, d]);
        let hosts = [ip(2), ip(3), ip(4)];
        assert_eq!(
            key_id(&hosts, ip(4), 0, false),
            2,
            "slot 0 on HTTP replica 2's host"
        );
        assert_eq!(
            key_id(&hosts, ip(4), 1, true),
            (1 << 32) + 1,
            "a second copy on one host"
        );
        assert_eq!(
            key_id(&hosts, ip(9), 5, false),
            (1 << 32) + 5,
            "a host with no HTTP side"
        );
        assert_eq!(key_id(&[], ip(2), 3, false), 3, "not tied: the slot");
        assert_eq!(
            replica_host("[::1]:1880", None),
            Some(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
        assert_eq!(replica_host("nodered-0:1880", None), None);
        assert_eq!(replica_host("nodered-0:1880", Some(ip(7))), Some(ip(7)));
    }

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
