//! `flowgate loadtest mqtt`: PUBLISH on the ramp's schedule to a broker (or to
//! flowgate in front of one). An operation finishes when the broker
//! acknowledges it (QoS 1/2), when it is written (QoS 0), or, with
//! `--reply-topic`, when a replica answers on that topic. Replicas are named
//! by their answers (`{"seq": N, "replica": "..."}`) or, with `--admin`, by
//! flowgate's `/api/instances` counters sampled every second.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::record::Outcome;
use super::report::{Input, Replicas, Report, Snapshot};
use super::{drive, Progress, Ramp, Recorder};
use crate::client;

#[derive(Debug, Clone)]
pub struct MqttLoad {
    /// `host:port`.
    pub broker: String,
    /// Topic to publish on; `{seq}` is replaced by the operation number.
    pub topic: String,
    pub qos: u8,
    /// Payload size in bytes (at least the JSON header).
    pub size: usize,
    pub client_id: String,
    /// Where replicas answer (`{"seq": N, "replica": "name"}`).
    pub reply_topic: Option<String>,
    /// flowgate's admin URL, to read per-replica deliveries.
    pub admin: Option<String>,
    /// The instance whose replicas to read (default: the only one).
    pub instance: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttLoadError {
    #[error("--broker {0:?}: expected host:port")]
    Broker(String),
    #[error("--qos {0}: expected 0, 1 or 2")]
    Qos(u8),
    #[error("cannot connect to {broker}: {reason}")]
    Connect { broker: String, reason: String },
    #[error("--admin: {0}")]
    Admin(#[from] client::ClientError),
    #[error("--admin: {0}")]
    Instance(String),
}

/// Operations in flight: due time by sequence number, and how to find the
/// sequence number of a broker acknowledgement.
#[derive(Default)]
struct Pending {
    due: HashMap<u64, Instant>,
    /// Sequence numbers in the order the client was asked to publish them
    /// (the order it writes them).
    order: VecDeque<u64>,
    by_pkid: HashMap<u16, u64>,
    /// Sequence numbers answered on the reply topic, to count duplicates.
    answered: HashSet<u64>,
    duplicates: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    recorder: Arc<Recorder>,
    reply: bool,
    qos: QoS,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, seq: u64, outcome: Outcome) {
        let due = self.lock().due.remove(&seq);
        if let Some(due) = due {
            self.recorder.finish(due, outcome);
        }
    }

    fn on_event(&self, event: Event, reply_topic: Option<&str>) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let seq = self.lock().order.pop_front();
                let Some(seq) = seq else { return };
                if self.qos == QoS::AtMostOnce {
                    if !self.reply {
                        self.finish(
                            seq,
                            Outcome::Ok {
                                replica: None,
                                timed: false,
                            },
                        );
                    }
                } else {
                    self.lock().by_pkid.insert(pkid, seq);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => self.acked(ack.pkid),
            Event::Incoming(Packet::PubComp(comp)) => self.acked(comp.pkid),
            Event::Incoming(Packet::Publish(p))
                if Some(p.topic.as_ref()) == reply_topic.map(str::as_bytes) =>
            {
                self.reply(&p.payload)
            }
            _ => {}
        }
    }

    fn acked(&self, pkid: u16) {
        let seq = self.lock().by_pkid.remove(&pkid);
        if let (Some(seq), false) = (seq, self.reply) {
            self.finish(
                seq,
                Outcome::Ok {
                    replica: None,
                    timed: true,
                },
            );
        }
    }

    /// A replica's answer: a JSON object with `seq` and, optionally, `replica`.
    fn reply(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            tracing::debug!("reply is not JSON: ignored");
            return;
        };
        let Some(seq) = v.get("seq").and_then(serde_json::Value::as_u64) else {
            tracing::debug!("reply without a numeric seq: ignored");
            return;
        };
        let replica = match v.get("replica") {
            Some(serde_json::Value::String(s)) => Some(self.recorder.replica(s)),
            Some(other @ serde_json::Value::Number(_)) => {
                Some(self.recorder.replica(&other.to_string()))
            }
            _ => None,
        };
        {
            let mut p = self.lock();
            if !p.answered.insert(seq) {
                p.duplicates += 1;
                return;
            }
        }
        self.finish(
            seq,
            Outcome::Ok {
                replica,
                timed: true,
            },
        );
    }

    /// Fails every operation due more than `timeout` ago.
    fn expire(&self, timeout: Duration) {
        let now = Instant::now();
        let expired: Vec<(u64, Instant)> = {
            let mut p = self.lock();
            let old: Vec<(u64, Instant)> = p
                .due
                .iter()
                .filter(|(_, due)| **due + timeout <= now)
                .map(|(s, d)| (*s, *d))
                .collect();
            for (seq, _) in &old {
                p.due.remove(seq);
            }
            old
        };
        for (_, due) in expired {
            self.recorder.finish(due, Outcome::Err("timeout"));
        }
    }
}

fn qos(q: u8) -> Result<QoS, MqttLoadError> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(MqttLoadError::Qos(other)),
    }
}

/// Per-slot deliveries of one instance, from flowgate's admin API.
async fn admin_counts(
    base: &str,
    instance: Option<&str>,
) -> Result<BTreeMap<String, u64>, MqttLoadError> {
    let doc = client::instances(base).await?;
    let inst = match instance {
        Some(name) => doc.instances.iter().find(|i| i.name == name),
        None if doc.instances.len() == 1 => doc.instances.first(),
        None => {
            return Err(MqttLoadError::Instance(format!(
                "{} instances: name one with --instance",
                doc.instances.len()
            )))
        }
    };
    let Some(inst) = inst else {
        return Err(MqttLoadError::Instance(format!(
            "no instance {:?}",
            instance.unwrap_or_default()
        )));
    };
    Ok(inst
        .replicas
        .iter()
        .map(|r| (r.slot.to_string(), r.messages_to_replica))
        .collect())
}

fn payload(seq: u64, size: usize) -> Vec<u8> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut body = format!("{{\"seq\":{seq},\"ts\":{ts}");
    let pad = size.saturating_sub(body.len() + 10);
    if pad > 0 {
        body.push_str(",\"pad\":\"");
        body.extend(std::iter::repeat_n('x', pad));
        body.push('"');
    }
    body.push('}');
    body.into_bytes()
}

/// Connected (and subscribed to the reply topic) before the clock starts.
async fn connect(load: &MqttLoad) -> Result<(AsyncClient, rumqttc::EventLoop), MqttLoadError> {
    let (host, port) = load
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| MqttLoadError::Broker(load.broker.clone()))?;
    let mut opts = MqttOptions::new(load.client_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    // connect before the clock starts, and subscribe for replies
    let connect_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(connect_deadline, eventloop.poll())
            .await
            .map_err(|_| MqttLoadError::Connect {
                broker: load.broker.clone(),
                reason: "no CONNACK in 10s".into(),
            })?;
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(MqttLoadError::Connect {
                    broker: load.broker.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    if let Some(reply) = &load.reply_topic {
        let failed = |reason: String| MqttLoadError::Connect {
            broker: load.broker.clone(),
            reason,
        };
        client
            .subscribe(reply.as_str(), QoS::AtLeastOnce)
            .await
            .map_err(|e| failed(e.to_string()))?;
        loop {
            let ev = tokio::time::timeout_at(connect_deadline, eventloop.poll())
                .await
                .map_err(|_| failed(format!("no SUBACK for {reply} in 10s")))?;
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
        }
    }
    Ok((client, eventloop))
}

/// Reads the replicas' counts from flowgate's admin API each second until
/// `stop`.
async fn poll_admin(
    base: &str,
    instance: Option<&str>,
    snapshots: &Mutex<Vec<Snapshot>>,
    recorder: &Recorder,
    stop: &CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match admin_counts(base, instance).await {
            Ok(counts) => {
                let t = recorder.secs(Instant::now());
                snapshots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t, counts));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read flowgate's admin API"),
        }
    }
}

/// Runs the ramp and builds the report.
pub async fn run(
    load: &MqttLoad,
    ramp: &Ramp,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, MqttLoadError> {
    let qos = qos(load.qos)?;
    let (client, mut eventloop) = connect(load).await?;
    if let Some(base) = &load.admin {
        admin_counts(base, load.instance.as_deref()).await?;
    }

    let recorder = Arc::new(Recorder::new(ramp));
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        recorder: recorder.clone(),
        reply: load.reply_topic.is_some(),
        qos,
    });
    let stop = CancellationToken::new();
    // the broker connection's pump and the admin poller, until `stop`
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (shared, stop, reply) = (shared.clone(), stop.clone(), load.reply_topic.clone());
        let timeout = load.timeout;
        tasks.spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = sweep.tick() => shared.expire(timeout),
                    ev = eventloop.poll() => match ev {
                        Ok(ev) => shared.on_event(ev, reply.as_deref()),
                        Err(e) => {
                            tracing::warn!(error = %e, "loadtest connection to the broker failed; reconnecting");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                }
            }
        });
    }
    let snapshots = Arc::new(Mutex::new(Vec::<Snapshot>::new()));
    if let Some(base) = load.admin.clone() {
        let (snapshots, recorder, stop) = (snapshots.clone(), recorder.clone(), stop.clone());
        let instance = load.instance.clone();
        tasks.spawn(async move {
            poll_admin(&base, instance.as_deref(), &snapshots, &recorder, &stop).await;
        });
    }

    drive(ramp, &recorder, progress, |seq, due| {
        recorder.begin();
        let topic = load.topic.replace("{seq}", &seq.to_string());
        let mut p = shared.lock();
        p.due.insert(seq, due);
        match client.try_publish(topic, qos, false, payload(seq, load.size)) {
            Ok(()) => p.order.push_back(seq),
            Err(_) => {
                p.due.remove(&seq);
                drop(p);
                recorder.finish(due, Outcome::Err("backlog"));
            }
        }
    })
    .await;
    super::drain(
        &recorder,
        Instant::now() + load.timeout + Duration::from_millis(200),
    )
    .await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    // whatever is still pending now never finished
    shared.expire(Duration::ZERO);
    let _ = client.try_disconnect();

    let duplicates = shared.lock().duplicates;
    let (samples, names) = recorder.take();
    let snapshots = std::mem::take(&mut *snapshots.lock().unwrap_or_else(|p| p.into_inner()));
    let (replicas, source) = match (&load.reply_topic, &load.admin) {
        (Some(topic), _) => (Replicas::Samples(&names), format!("reply:{topic}")),
        (None, Some(base)) => (Replicas::Snapshots(&snapshots), format!("admin:{base}")),
        (None, None) => (Replicas::Samples(&names), "none".to_string()),
    };
    Ok(Input {
        kind: "mqtt",
        target: format!("{}/{}", load.broker, load.topic),
        replica_source: source,
        ramp,
        samples: &samples,
        replicas,
        duplicates,
    }
    .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_asked_size() {
        let p = payload(7, 200);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v["seq"], 7);
        assert!((190..=210).contains(&p.len()), "{}", p.len());
        assert!(payload(1, 0).len() < 40);
    }
}
