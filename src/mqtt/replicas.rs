//! The replica table: which slots of each instance are taken on this node, and
//! what the admin API shows about each replica. Slots are the lowest free
//! number, handed back when the connection ends, so a replica that reconnects
//! takes its slot (and its upstream session) back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use super::codec::Protocol;
use crate::config::InstanceConfig;
use crate::metrics::{Metrics, ReplicaCounters};

/// Every configured instance, in config order (the first match wins).
pub struct Instances {
    list: Vec<Arc<InstanceState>>,
}

/// One instance and its connected replicas.
pub struct InstanceState {
    pub config: InstanceConfig,
    /// Dispatch mode: the MQTT version of the upstream session (0 before it
    /// first connected, 4 for 3.1.1, 5), set by that session.
    pub upstream_protocol: Arc<std::sync::atomic::AtomicU8>,
    replicas: Mutex<BTreeMap<u16, ReplicaInfo>>,
    metrics: Arc<Metrics>,
}

struct ReplicaInfo {
    client_id: String,
    upstream_client_id: String,
    peer: SocketAddr,
    protocol: Protocol,
    since: SystemTime,
    accepted: bool,
    counters: Arc<ReplicaCounters>,
}

/// Holds a slot while its connection lives; frees it on drop.
pub struct SlotGuard {
    instance: Arc<InstanceState>,
    pub slot: u16,
    pub counters: Arc<ReplicaCounters>,
}

/// What `/api/instances` shows.
#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub name: String,
    pub replicas_connected: usize,
    /// Messages waiting for a replica (dispatch mode).
    pub queued: i64,
    /// Dispatch mode: the upstream session's MQTT version, once connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<Protocol>,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub slot: u16,
    pub client_id: String,
    pub upstream_client_id: String,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub connected_secs: u64,
    /// Whether the broker accepted the session (CONNACK success).
    pub accepted: bool,
    pub messages_to_replica: u64,
    pub messages_from_replica: u64,
    pub bytes_to_replica: u64,
    pub bytes_from_replica: u64,
    /// Messages delivered and not yet acknowledged (dispatch mode; 0 in share mode).
    pub inflight: i64,
}

impl Instances {
    pub fn new(configs: &[InstanceConfig], metrics: &Arc<Metrics>) -> Self {
        let list = configs
            .iter()
            .map(|config| {
                metrics.declare_instance(&config.name);
                Arc::new(InstanceState {
                    config: config.clone(),
                    upstream_protocol: Arc::default(),
                    replicas: Mutex::new(BTreeMap::new()),
                    metrics: metrics.clone(),
                })
            })
            .collect();
        Self { list }
    }

    /// The first instance whose match rule accepts this CONNECT.
    pub fn find(&self, client_id: &str, username: Option<&str>) -> Option<&Arc<InstanceState>> {
        self.list
            .iter()
            .find(|i| i.config.match_rule.matches(client_id, username))
    }

    /// The instance named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<InstanceState>> {
        self.list.iter().find(|i| i.config.name == name)
    }

    pub fn views(&self) -> Vec<InstanceView> {
        self.list.iter().map(|i| i.view()).collect()
    }
}

/// The details a new replica connection registers with.
pub struct NewReplica<'a> {
    pub client_id: &'a str,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub node_id: &'a str,
}

impl InstanceState {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u16, ReplicaInfo>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (each update is a single insert or remove), so a poisoned lock is
        // still safe to use.
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the lowest free slot; `None` when `max_replicas` (or all 65536)
    /// are taken. Returns the guard and the client id the replica gets upstream.
    pub fn claim(self: &Arc<Self>, new: NewReplica<'_>) -> Option<(SlotGuard, String)> {
        let mut replicas = self.lock();
        if self
            .config
            .max_replicas
            .is_some_and(|m| replicas.len() >= m)
        {
            return None;
        }
        let slot = (0..=u16::MAX).find(|s| !replicas.contains_key(s))?;
        let upstream_client_id =
            super::rewrite::replica_client_id(new.client_id, &self.config.name, new.node_id, slot);
        let counters = Arc::new(self.metrics.replica(&self.config.name, slot));
        replicas.insert(
            slot,
            ReplicaInfo {
                client_id: new.client_id.to_owned(),
                upstream_client_id: upstream_client_id.clone(),
                peer: new.peer,
                protocol: new.protocol,
                since: SystemTime::now(),
                accepted: false,
                counters: counters.clone(),
            },
        );
        Some((
            SlotGuard {
                instance: self.clone(),
                slot,
                counters,
            },
            upstream_client_id,
        ))
    }

    fn view(&self) -> InstanceView {
        let replicas: Vec<ReplicaView> = self
            .lock()
            .iter()
            .map(|(&slot, r)| ReplicaView {
                slot,
                client_id: r.client_id.clone(),
                upstream_client_id: r.upstream_client_id.clone(),
                peer: r.peer,
                protocol: r.protocol,
                connected_secs: r.since.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                accepted: r.accepted,
                messages_to_replica: r.counters.messages_to.get(),
                messages_from_replica: r.counters.messages_from.get(),
                bytes_to_replica: r.counters.bytes_to.get(),
                bytes_from_replica: r.counters.bytes_from.get(),
                inflight: self
                    .metrics
                    .replica_inflight
                    .with_label_values(&[&self.config.name, &slot.to_string()])
                    .get(),
            })
            .collect();
        InstanceView {
            name: self.config.name.clone(),
            replicas_connected: replicas.iter().filter(|r| r.accepted).count(),
            queued: self
                .metrics
                .dispatch_queued
                .with_label_values(&[&self.config.name])
                .get(),
            upstream_protocol: match self
                .upstream_protocol
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                4 => Some(Protocol::V311),
                5 => Some(Protocol::V5),
                _ => None,
            },
            replicas,
        }
    }
}

impl SlotGuard {
    pub fn instance(&self) -> &InstanceState {
        &self.instance
    }

    /// The broker accepted the session: the replica counts as connected.
    pub fn mark_accepted(&self) {
        let mut replicas = self.instance.lock();
        if let Some(r) = replicas.get_mut(&self.slot) {
            if !r.accepted {
                r.accepted = true;
                self.instance
                    .metrics
                    .replica_sessions
                    .with_label_values(&[&self.instance.config.name])
                    .inc();
                self.instance
                    .metrics
                    .instance_replicas
                    .with_label_values(&[&self.instance.config.name])
                    .inc();
            }
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut replicas = self.instance.lock();
        if let Some(r) = replicas.remove(&self.slot) {
            if r.accepted {
                self.instance
                    .metrics
                    .instance_replicas
                    .with_label_values(&[&self.instance.config.name])
                    .dec();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances() -> (Instances, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::parse(
            "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"nr\" }\n",
            "t",
        )
        .expect("valid config")
        .instances
        .remove(0);
        (Instances::new(&[config], &metrics), metrics)
    }

    fn new_replica() -> NewReplica<'static> {
        NewReplica {
            client_id: "nr",
            peer: ([127, 0, 0, 1], 5000).into(),
            protocol: Protocol::V311,
            node_id: "fg1",
        }
    }

    #[test]
    fn lowest_free_slot_is_taken_and_reused() {
        let (instances, _) = instances();
        let inst = instances.find("nr", None).expect("match").clone();
        let (a, id_a) = inst.claim(new_replica()).expect("slot");
        let (b, id_b) = inst.claim(new_replica()).expect("slot");
        assert_eq!((a.slot, b.slot), (0, 1));
        assert_eq!((id_a.as_str(), id_b.as_str()), ("nr-fg1-0", "nr-fg1-1"));
        drop(a);
        let (c, _) = inst.claim(new_replica()).expect("slot");
        assert_eq!(c.slot, 0);
    }

    #[test]
    fn connected_gauge_follows_accepted_sessions() {
        let (instances, metrics) = instances();
        let inst = instances.find("nr", None).expect("match").clone();
        let gauge = || {
            metrics
                .instance_replicas
                .with_label_values(&["line1"])
                .get()
        };
        let (a, _) = inst.claim(new_replica()).expect("slot");
        assert_eq!(gauge(), 0);
        a.mark_accepted();
        a.mark_accepted();
        assert_eq!(gauge(), 1);
        assert_eq!(instances.views()[0].replicas_connected, 1);
        drop(a);
        assert_eq!(gauge(), 0);
        assert!(instances.views()[0].replicas.is_empty());
    }
}
