//! A replica's MQTT session, terminated by flowgate (dispatch mode): answers
//! CONNECT, PINGREQ and keep-alive itself, passes every other packet to the
//! dispatcher, and writes what the dispatcher sends, coalescing writes.

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use rumqttc::v5::mqttbytes::v5;

use super::core::ReplicaLimits;
use super::driver::{Handle, ReplicaEvent};
use super::wire::{self, Incoming, Message, Outgoing, Will};
use crate::mqtt::codec::{check_flags, check_header, Connect, Protocol};
use crate::mqtt::error::ConnError;
use crate::mqtt::limit::RateLimit;
use crate::mqtt::replicas::SlotGuard;
use crate::stream::Stream;

/// Capacity of a replica's outgoing channel beyond its in-flight window.
const OUT_SLACK: usize = 256;

/// The will of a CONNECT as a message (with its MQTT 5 properties), and
/// what an MQTT 5 CONNECT asks of the messages the replica gets. `frame` is
/// the CONNECT's bytes.
pub fn connect_facts(connect: &Connect<'_>, frame: &[u8]) -> (Option<Will>, ReplicaLimits) {
    let mut will = connect.will.as_ref().map(|w| Will {
        msg: Message {
            topic: w.topic.to_owned(),
            payload: bytes::Bytes::copy_from_slice(w.payload),
            qos: w.qos,
            retain: w.retain,
            properties: None,
        },
        delay: 0,
    });
    let mut limits = ReplicaLimits {
        clean_start: connect.clean_start(),
        ..Default::default()
    };
    if !connect.protocol.is_v5() {
        // 3.x: clean session off keeps the session
        limits.keep = (!limits.clean_start).then_some(Duration::MAX);
        return (will, limits);
    }
    limits.v5 = true;
    // the codec checked the frame; rumqttc's reads its properties
    if let Ok(v5::Packet::Connect(c, last_will, _)) =
        v5::Packet::read(&mut BytesMut::from(frame), None)
    {
        if let Some(p) = c.properties {
            limits.receive_max = p.receive_maximum;
            limits.max_packet = p.max_packet_size;
            // MQTT 5: the session outlives the connection for its expiry
            // interval (0 or none: it ends with it; 0xFFFFFFFF: never)
            limits.keep = match p.session_expiry_interval {
                None | Some(0) => None,
                Some(u32::MAX) => Some(Duration::MAX),
                Some(s) => Some(Duration::from_secs(u64::from(s))),
            };
        }
        if let (Some(w), Some(p)) = (will.as_mut(), last_will.and_then(|l| l.properties)) {
            w.delay = p.delay_interval.unwrap_or(0);
            w.msg.properties = Some(Box::new(v5::PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
                content_type: p.content_type,
                ..Default::default()
            }))
            .filter(|p| **p != v5::PublishProperties::default());
        }
    }
    (will, limits)
}

pub struct Session<'a> {
    pub protocol: Protocol,
    pub keep_alive: Duration,
    pub max_packet: usize,
    pub max_inflight: usize,
    pub guard: &'a SlotGuard,
    pub handle: Handle,
    pub will: Option<Will>,
    pub limits: ReplicaLimits,
    pub peer: std::net::SocketAddr,
    /// `mqtt.max_publish_rate`: PUBLISH packets a second.
    pub publish_rate: Option<u32>,
    /// Counts the pauses that rate forces.
    pub throttled: prometheus::IntCounter,
}

impl Session<'_> {
    /// Serves the replica until it disconnects; always tells the dispatcher
    /// it left, and whether cleanly.
    pub async fn run(
        self,
        stream: Stream,
        inbuf: BytesMut,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let (tx, rx) = mpsc::channel(self.max_inflight + OUT_SLACK);
        let slot = self.guard.slot;
        let (present_tx, present_rx) = tokio::sync::oneshot::channel();
        let joined = ReplicaEvent::Joined {
            slot,
            host: self.peer.ip(),
            tx,
            will: self.will.clone(),
            counters: self.guard.counters.clone(),
            limits: self.limits,
            present: Some(present_tx),
        };
        if self.handle.tx.send(joined).await.is_err() {
            return Ok(());
        }
        // the dispatcher says whether the slot's session is resumed
        let present = present_rx.await.unwrap_or(false);
        let mut end = (false, None);
        let result = self
            .serve(stream, inbuf, rx, present, &mut end, shutdown)
            .await;
        let (clean, expiry) = end;
        let _ = self
            .handle
            .tx
            .send(ReplicaEvent::Left {
                slot,
                clean,
                expiry,
            })
            .await;
        result
    }

    async fn serve(
        &self,
        stream: Stream,
        mut inbuf: BytesMut,
        mut rx: mpsc::Receiver<Outgoing>,
        present: bool,
        end: &mut (bool, Option<u32>),
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let (mut rd, mut wr) = stream.split();
        let mut st = Reading {
            limit: self.publish_rate.map(RateLimit::new),
            paused: None,
            aliases: HashMap::new(),
        };
        let counters = &self.guard.counters;
        let mut out = BytesMut::new();
        let mut read_size = crate::stream::ReadSize::new();
        wire::encode(self.protocol, &Outgoing::ConnAck(present), &mut out)
            .map_err(|e| ConnError::Internal(e.0))?;
        wr.write_all(&out).await.map_err(ConnError::ClientIo)?;
        counters.bytes_to.inc_by(out.len() as u64);
        self.guard.mark_accepted();
        // MQTT: the server may close after 1.5 x keep-alive of silence
        let silence = if self.keep_alive.is_zero() {
            Duration::from_secs(u64::from(u32::MAX))
        } else {
            self.keep_alive * 3 / 2
        };
        let mut deadline = tokio::time::Instant::now() + silence;
        loop {
            // everything complete in the buffer goes to the dispatcher first
            if let Some(ended) = self.take_buffered(&mut inbuf, &mut wr, &mut st, end).await {
                return ended;
            }
            inbuf.reserve(read_size.get());
            let room = inbuf.capacity() - inbuf.len();
            tokio::select! {
                r = rd.read_buf(&mut inbuf), if st.paused.is_none() => {
                    let n = r.map_err(ConnError::ClientIo)?;
                    if n == 0 {
                        return Ok(());
                    }
                    read_size.update(n, room);
                    deadline = tokio::time::Instant::now() + silence;
                }
                () = tokio::time::sleep_until(st.paused.unwrap_or(deadline)), if st.paused.is_some() => {
                    st.paused = None;
                    // a paused replica is not silent: it was not read
                    deadline = tokio::time::Instant::now() + silence;
                }
                first = rx.recv() => {
                    let Some(first) = first else { return Ok(()) };
                    out.clear();
                    let mut next = Some(first);
                    while let Some(p) = next.take() {
                        wire::encode(self.protocol, &p, &mut out).map_err(|e| ConnError::Internal(e.0))?;
                        if out.len() < 64 * 1024 {
                            next = rx.try_recv().ok();
                        }
                    }
                    counters.bytes_to.inc_by(out.len() as u64);
                    wr.write_all(&out).await.map_err(ConnError::ClientIo)?;
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.farewell(&mut wr, DISCONNECT_KEEP_ALIVE).await;
                    return Err(ConnError::KeepAliveTimeout(silence));
                }
                () = shutdown.cancelled() => {
                    // flowgate stopping is no death of the instance: no will
                    end.0 = true;
                    return Ok(());
                }
            }
        }
    }
}

/// What reading a replica's packets keeps between reads.
struct Reading {
    limit: Option<RateLimit>,
    /// Over the publish rate: nothing more is read (or decoded) until then.
    paused: Option<tokio::time::Instant>,
    /// The MQTT 5 topic aliases the replica set on this connection.
    aliases: HashMap<u16, String>,
}

/// MQTT 5 DISCONNECT reason codes flowgate closes a replica's session with.
const DISCONNECT_MALFORMED: u8 = 0x81;
const DISCONNECT_KEEP_ALIVE: u8 = 0x8D;
const DISCONNECT_TOPIC_ALIAS_INVALID: u8 = 0x94;
const DISCONNECT_TOO_LARGE: u8 = 0x95;

impl Session<'_> {
    /// Tells an MQTT 5 replica why its session ends (a DISCONNECT with a
    /// reason code, as a broker does); nothing for 3.x, which has none.
    /// Hands every packet complete in `inbuf` to the dispatcher (PINGREQ
    /// answered here), until the publish rate pauses reading; `Some` when
    /// the session ends.
    async fn take_buffered(
        &self,
        inbuf: &mut BytesMut,
        wr: &mut crate::stream::WriteHalf,
        st: &mut Reading,
        end: &mut (bool, Option<u32>),
    ) -> Option<Result<(), ConnError>> {
        let counters = &self.guard.counters;
        while st.paused.is_none() {
            let before = inbuf.len();
            // the size limit holds from the fixed header, before the body is buffered
            let header = check_header(inbuf, self.max_packet)
                .and_then(|h| h.map(|_| check_flags(inbuf[0])).transpose());
            if let Err(e) = header {
                let reason = if matches!(e, crate::mqtt::codec::CodecError::TooLarge { .. }) {
                    DISCONNECT_TOO_LARGE
                } else {
                    DISCONNECT_MALFORMED
                };
                self.farewell(wr, reason).await;
                return Some(Err(ConnError::ClientCodec(e)));
            }
            let packet = match wire::decode(self.protocol, inbuf, self.max_packet) {
                Ok(p) => p,
                Err(e) => {
                    self.farewell(wr, DISCONNECT_MALFORMED).await;
                    return Some(Err(ConnError::ClientWire(e.0)));
                }
            };
            let Some(packet) = packet else { break };
            counters.bytes_from.inc_by((before - inbuf.len()) as u64);
            match packet {
                Incoming::PingReq => {
                    // PINGRESP: two bytes in every version
                    if let Err(e) = wr.write_all(&[0xd0, 0x00]).await {
                        return Some(Err(ConnError::ClientIo(e)));
                    }
                }
                Incoming::Disconnect { expiry, will } => {
                    // MQTT 5 reason 0x04 asks for the will all the same
                    *end = (!will, expiry);
                    return Some(Ok(()));
                }
                Incoming::Ignored => {}
                mut packet => {
                    if let Incoming::Publish { msg, .. } = &mut packet {
                        counters.messages_from.inc();
                        if let Err(e) = resolve_alias(&mut st.aliases, msg) {
                            self.farewell(wr, DISCONNECT_TOPIC_ALIAS_INVALID).await;
                            return Some(Err(e));
                        }
                        if let Some(wait) = st.limit.as_mut().and_then(|l| l.take(1)) {
                            self.throttled.inc();
                            st.paused = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                    let ev = ReplicaEvent::Packet {
                        slot: self.guard.slot,
                        packet,
                    };
                    if self.handle.tx.send(ev).await.is_err() {
                        return Some(Ok(()));
                    }
                }
            }
        }
        None
    }

    async fn farewell(&self, wr: &mut crate::stream::WriteHalf, reason: u8) {
        if self.protocol.is_v5() {
            let _ = wr.write_all(&[0xe0, 0x01, reason]).await;
            let _ = wr.flush().await;
        }
    }
}

/// Most topic aliases a replica may set (MQTT 5 allows 65535; a bound keeps
/// a hostile client from growing the map).
const MAX_ALIASES: usize = 1024;

/// Replaces a v5 topic alias by its topic (recording a new one), so the
/// message goes on with its full topic and no alias.
fn resolve_alias(aliases: &mut HashMap<u16, String>, msg: &mut Message) -> Result<(), ConnError> {
    let Some(alias) = msg.properties.as_mut().and_then(|p| p.topic_alias.take()) else {
        return Ok(());
    };
    if alias == 0 {
        return Err(ConnError::ClientWire("topic alias 0".into()));
    }
    if msg.topic.is_empty() {
        msg.topic = aliases
            .get(&alias)
            .cloned()
            .ok_or_else(|| ConnError::ClientWire(format!("unknown topic alias {alias}")))?;
    } else if aliases.len() < MAX_ALIASES || aliases.contains_key(&alias) {
        aliases.insert(alias, msg.topic.clone());
    } else {
        return Err(ConnError::ClientWire(format!(
            "more than {MAX_ALIASES} topic aliases"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    fn msg(topic: &str, alias: Option<u16>) -> Message {
        Message {
            topic: topic.into(),
            payload: bytes::Bytes::new(),
            qos: wire::QoS::AtMostOnce,
            retain: false,
            properties: Some(Box::new(PublishProperties {
                topic_alias: alias,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn topic_aliases_are_resolved_and_stripped() {
        let mut aliases = HashMap::new();
        let mut first = msg("jobs/7", Some(3));
        resolve_alias(&mut aliases, &mut first).expect("sets alias");
        assert_eq!(first.properties.as_ref().and_then(|p| p.topic_alias), None);
        let mut second = msg("", Some(3));
        resolve_alias(&mut aliases, &mut second).expect("uses alias");
        assert_eq!(second.topic, "jobs/7");
        assert!(resolve_alias(&mut aliases, &mut msg("", Some(4))).is_err());
        assert!(resolve_alias(&mut aliases, &mut msg("x", Some(0))).is_err());
    }
}
