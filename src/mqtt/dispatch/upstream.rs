//! The instance's one upstream MQTT session (persistent; MQTT 5 when the
//! broker takes it, else 3.1.1): connects and reconnects with back-off,
//! keeps the session alive, keeps within the broker's receive maximum and
//! maximum packet size, writes what the dispatcher asks and reports what the
//! broker sends. It decides nothing about messages.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Secret, UpstreamProtocol};
use crate::stream::Stream;
use crate::tls::{Connector, TlsError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Incoming, Message, QoS, SubRequest, Will, WireError};
use crate::mqtt::codec::Protocol;

/// What the dispatcher asks of the upstream session.
#[derive(Debug)]
pub enum UpCmd {
    Publish {
        msg: Message,
        pkid: u16,
        dup: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubRequest>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    /// Reconnect with this will (the session is kept).
    SetWill(Option<Will>),
}

/// The Receive Maximum of an instance's MQTT 5 upstream session: the QoS
/// 1/2 messages the broker may send unacknowledged (waiting in the queue or
/// in progress at replicas), at most `queue_limit`. The queue then never
/// fills with them, so the session never stops reading the broker for them,
/// which would also stop the acknowledgements behind them (with `complete`,
/// the results' acknowledgements that let jobs finish: a deadlock).
pub fn receive_maximum(queue_limit: usize) -> u16 {
    u16::try_from(queue_limit).unwrap_or(u16::MAX).max(1)
}

/// What the upstream session reports.
#[derive(Debug)]
pub enum UpEvent {
    Up {
        session_present: bool,
        /// The version the broker took: `V5` or `V311`.
        protocol: Protocol,
        /// The broker's in-flight window toward flowgate, when known (MQTT 5:
        /// the Receive Maximum flowgate's CONNECT gave).
        window: Option<usize>,
    },
    Down,
    /// The packets of one read, in order.
    Packets(Vec<Incoming>),
}

pub struct UpstreamSession {
    /// The broker for 3.1.1 sessions.
    pub addr: String,
    /// The broker for MQTT 5 sessions (the embedded broker listens on one
    /// port per version; any other broker takes both on one).
    pub addr_v5: String,
    pub protocol: UpstreamProtocol,
    /// The version in use, for `/api/instances`: 0 not connected yet, 4 or 5.
    pub negotiated: Arc<AtomicU8>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub will: Option<Will>,
    pub login: Login,
    /// MQTT 5: the Receive Maximum flowgate states, the QoS 1/2 messages
    /// the broker may send unacknowledged (see [`receive_maximum`]).
    pub receive_max: u16,
}

/// How flowgate reaches and logs in to the broker for one instance.
#[derive(Clone, Default)]
pub struct Login {
    /// TLS for an `mqtts://` broker.
    pub tls: Option<Arc<Connector>>,
    /// The instance's `upstream_username` / `upstream_password`.
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// Why an upstream session (or a retained fetch) could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] TlsError),
    #[error("cannot encode a packet: {0}")]
    Encode(#[from] rumqttc::mqttbytes::Error),
    #[error("cannot encode a packet: {0}")]
    Encode5(#[from] rumqttc::v5::mqttbytes::Error),
    #[error("broker i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] WireError),
    #[error("broker refused MQTT 5 (code {0:#04x})")]
    RefusedV5(u8),
    #[error("broker refused the session (code {0:#04x})")]
    Refused(u8),
    #[error("expected CONNACK, got {0}")]
    NotConnAck(String),
    #[error("no CONNACK in time")]
    NoConnAck,
    #[error("closed before CONNACK")]
    ClosedBeforeConnAck,
    #[error("MQTT 5: {v5}; 3.1.1: {v311}")]
    NeitherVersion {
        v5: Box<SessionError>,
        v311: Box<SessionError>,
    },
    #[error("broker closed the connection")]
    Closed,
    #[error("broker silent past keep-alive")]
    Silent,
    #[error("broker closed the retained fetch")]
    FetchClosed,
    #[error("no answer to the retained fetch")]
    FetchUnanswered,
    #[error("retained fetch took over {0:?}")]
    FetchTimeout(Duration),
}

fn encode(cmd: &UpCmd, v5: bool, out: &mut BytesMut) -> Result<(), SessionError> {
    if v5 {
        return encode_v5(cmd, out);
    }
    let packet = match cmd {
        UpCmd::Publish { msg, pkid, dup } => {
            let mut p = v4::Publish::from_bytes(&msg.topic, msg.qos.v4(), msg.payload.clone());
            p.pkid = *pkid;
            p.dup = *dup;
            p.retain = msg.retain;
            v4::Packet::Publish(p)
        }
        UpCmd::PubAck(id) => v4::Packet::PubAck(v4::PubAck::new(*id)),
        UpCmd::PubRec(id) => v4::Packet::PubRec(v4::PubRec::new(*id)),
        UpCmd::PubRel(id) => v4::Packet::PubRel(v4::PubRel::new(*id)),
        UpCmd::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(*id)),
        UpCmd::Subscribe { pkid, filters } => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.filter.clone(), f.qos.v4())),
            );
            s.pkid = *pkid;
            v4::Packet::Subscribe(s)
        }
        UpCmd::Unsubscribe { pkid, filters } => {
            let mut u = v4::Unsubscribe::new(filters.first().cloned().unwrap_or_default());
            u.topics = filters.clone();
            u.pkid = *pkid;
            v4::Packet::Unsubscribe(u)
        }
        UpCmd::SetWill(_) => return Ok(()),
    };
    packet.write(out, usize::MAX)?;
    Ok(())
}

/// The same in MQTT 5: every publish property and subscription option kept.
fn encode_v5(cmd: &UpCmd, out: &mut BytesMut) -> Result<(), SessionError> {
    let packet = match cmd {
        UpCmd::Publish { msg, pkid, dup } => {
            let mut p = v5::Publish::new(
                msg.topic.as_str(),
                msg.qos.v5(),
                msg.payload.clone(),
                msg.properties.as_deref().cloned(),
            );
            p.pkid = *pkid;
            p.dup = *dup;
            p.retain = msg.retain;
            v5::Packet::Publish(p)
        }
        UpCmd::PubAck(id) => v5::Packet::PubAck(v5::PubAck::new(*id, None)),
        UpCmd::PubRec(id) => v5::Packet::PubRec(v5::PubRec::new(*id, None)),
        UpCmd::PubRel(id) => v5::Packet::PubRel(v5::PubRel::new(*id, None)),
        UpCmd::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(*id, None)),
        UpCmd::Subscribe { pkid, filters } => {
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|f| {
                    let mut v = v5::Filter::new(f.filter.clone(), f.qos.v5());
                    v.nolocal = f.no_local;
                    v.preserve_retain = f.retain_as_published;
                    v.retain_forward_rule = match f.retain_handling {
                        0 => v5::RetainForwardRule::OnEverySubscribe,
                        1 => v5::RetainForwardRule::OnNewSubscribe,
                        _ => v5::RetainForwardRule::Never,
                    };
                    v
                }),
                None,
            );
            s.pkid = *pkid;
            v5::Packet::Subscribe(s)
        }
        UpCmd::Unsubscribe { pkid, filters } => {
            let mut u = v5::Unsubscribe::new(filters.first().cloned().unwrap_or_default(), None);
            u.filters = filters.clone();
            u.pkid = *pkid;
            v5::Packet::Unsubscribe(u)
        }
        UpCmd::SetWill(_) => return Ok(()),
    };
    packet.write(out, None)?;
    Ok(())
}

/// A will as MQTT 5 carries it: the publish properties a will may have and
/// its delay (the broker waits that long, and publishes nothing if flowgate
/// is back by then).
fn will_properties(will: &Will) -> Option<v5::LastWillProperties> {
    let delay_interval = (will.delay > 0).then_some(will.delay);
    let Some(p) = will.msg.properties.as_deref() else {
        return delay_interval.map(|d| v5::LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
    };
    Some(v5::LastWillProperties {
        delay_interval,
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
    })
}

/// Why a handshake failed: `Version` when the broker would not take MQTT 5
/// (refused with "unsupported protocol version", answered in 3.1.1, or
/// closed before a CONNACK).
#[derive(Debug)]
enum HandshakeError {
    Version(SessionError),
    Other(SessionError),
}

impl From<HandshakeError> for SessionError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Version(e) | HandshakeError::Other(e) => e,
        }
    }
}

/// A session the broker accepted.
struct Connected {
    stream: Stream,
    buf: BytesMut,
    session_present: bool,
    v5: bool,
    /// The broker's receive maximum (v5; 65535 when not given).
    receive_max: usize,
    max_packet: Option<u32>,
}

/// QoS 1/2 publishes sent and not yet acknowledged, within the broker's
/// receive maximum; the rest wait here (MQTT 5 only: a 3.1.1 broker sets no
/// limit).
struct Window {
    max: usize,
    sent: HashSet<u16>,
    held: VecDeque<UpCmd>,
}

impl Window {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            sent: HashSet::new(),
            held: VecDeque::new(),
        }
    }

    /// May `cmd` go now? A QoS 1/2 publish takes a place; `None` holds it.
    fn admit(&mut self, cmd: UpCmd) -> Option<UpCmd> {
        if self.max == usize::MAX {
            return Some(cmd); // no limit (3.1.1): nothing to count
        }
        match &cmd {
            UpCmd::Publish { msg, pkid, .. } if msg.qos > QoS::AtMostOnce => {
                if self.sent.contains(pkid) {
                    return Some(cmd); // a resend: its place is taken already
                }
                if self.sent.len() >= self.max || !self.held.is_empty() {
                    self.held.push_back(cmd);
                    return None;
                }
                self.sent.insert(*pkid);
                Some(cmd)
            }
            _ => Some(cmd),
        }
    }

    /// The broker finished with `packet`'s publish: its place is free.
    fn on_incoming(&mut self, packet: &Incoming) {
        if self.max == usize::MAX {
            return;
        }
        match packet {
            Incoming::PubAck(id, _) | Incoming::PubComp(id) => {
                self.sent.remove(id);
            }
            Incoming::PubRec(id, r) if r.code >= 0x80 => {
                self.sent.remove(id);
            }
            _ => {}
        }
    }

    /// Held publishes that may go now.
    fn release(&mut self) -> Vec<UpCmd> {
        let mut out = Vec::new();
        while self.sent.len() < self.max {
            let Some(cmd) = self.held.pop_front() else {
                break;
            };
            if let UpCmd::Publish { pkid, .. } = &cmd {
                self.sent.insert(*pkid);
            }
            out.push(cmd);
        }
        out
    }
}

impl UpstreamSession {
    fn connect_packet(&self, clean: bool, v5: bool) -> Result<BytesMut, SessionError> {
        let keep_alive = u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX);
        let mut out = BytesMut::new();
        if v5 {
            let mut props = v5::ConnectProperties::new();
            // a persistent session outlives the connection, as 3.1.1's
            // clean session off does
            props.session_expiry_interval = (!clean).then_some(u32::MAX);
            // the broker's in-flight window toward flowgate, said out loud
            // (Mosquitto applies its max_inflight_messages, 20, to a client
            // that says none)
            props.receive_maximum = Some(self.receive_max);
            let c = v5::Connect {
                keep_alive,
                client_id: self.client_id.clone(),
                clean_start: clean,
                properties: Some(props),
            };
            let will = self.will.as_ref().map(|w| {
                v5::LastWill::new(
                    w.msg.topic.clone(),
                    w.msg.payload.to_vec(),
                    w.msg.qos.v5(),
                    w.msg.retain,
                    will_properties(w),
                )
            });
            let login = self.login.username.as_ref().map(|user| {
                let password = self.login.password.as_ref().map_or("", |p| p.expose());
                v5::Login::new(user.clone(), password.to_owned())
            });
            v5::Packet::Connect(c, will, login).write(&mut out, None)?;
            return Ok(out);
        }
        let mut c = v4::Connect::new(self.client_id.clone());
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        if let Some(user) = &self.login.username {
            let password = self.login.password.as_ref().map_or("", |p| p.expose());
            c.set_login(user.clone(), password.to_owned());
        }
        c.last_will =
            self.will.as_ref().map(|w| &w.msg).map(|w| {
                v4::LastWill::new(w.topic.clone(), w.payload.clone(), w.qos.v4(), w.retain)
            });
        v4::Packet::Connect(c).write(&mut out, usize::MAX)?;
        Ok(out)
    }

    /// Runs until `shutdown`: connect, serve, reconnect.
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<UpCmd>,
        events: mpsc::Sender<UpEvent>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let started = tokio::select! {
                r = self.connect() => r,
                () = shutdown.cancelled() => return,
            };
            let connected = match started {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(addr = %self.addr, client_id = %self.client_id, error = %e, retry_in = ?backoff, "upstream session cannot connect");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let protocol = if connected.v5 {
                Protocol::V5
            } else {
                Protocol::V311
            };
            self.negotiated
                .store(if connected.v5 { 5 } else { 4 }, Ordering::Relaxed);
            tracing::info!(addr = %self.addr, client_id = %self.client_id, session_present = connected.session_present, ?protocol, "upstream session up");
            let up = UpEvent::Up {
                session_present: connected.session_present,
                protocol,
                // MQTT 5: flowgate's own Receive Maximum; 3.1.1 says none
                window: connected.v5.then_some(usize::from(self.receive_max)),
            };
            if events.send(up).await.is_err() {
                return;
            }
            let end = self.serve(connected, &mut cmds, &events, &shutdown).await;
            match end {
                Ok(()) => {}
                Err(e) => tracing::warn!(addr = %self.addr, error = %e, "upstream session lost"),
            }
            if events.send(UpEvent::Down).await.is_err() || shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Connects with the version the configuration asks; `auto` tries MQTT 5
    /// first and stays with 3.1.1 once the broker refused 5 and took 3.1.1.
    async fn connect(&mut self) -> Result<Connected, SessionError> {
        let v5 = match self.protocol {
            UpstreamProtocol::V5 => true,
            UpstreamProtocol::V311 => false,
            UpstreamProtocol::Auto => self.negotiated.load(Ordering::Relaxed) != 4,
        };
        match self.handshake(false, v5).await {
            Ok(c) => Ok(c),
            Err(HandshakeError::Version(e)) if v5 && self.protocol == UpstreamProtocol::Auto => {
                let c = match self.handshake(false, false).await {
                    Ok(c) => c,
                    Err(e3) => {
                        return Err(SessionError::NeitherVersion {
                            v5: Box::new(e),
                            v311: Box::new(e3.into()),
                        })
                    }
                };
                tracing::warn!(addr = %self.addr, client_id = %self.client_id, error = %e, "the broker does not take MQTT 5: the upstream session is 3.1.1, MQTT 5 properties are not carried");
                Ok(c)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn handshake(&self, clean: bool, v5: bool) -> Result<Connected, HandshakeError> {
        let addr = if v5 { &self.addr_v5 } else { &self.addr };
        let other = |e: SessionError| HandshakeError::Other(e);
        let mut stream = crate::tls::connect(addr, self.connect_timeout, self.login.tls.as_deref())
            .await
            .map_err(|e| other(e.into()))?;
        stream
            .write_all(&self.connect_packet(clean, v5).map_err(other)?)
            .await
            .map_err(|e| other(e.into()))?;
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        let version = |e: SessionError| {
            if v5 {
                HandshakeError::Version(e)
            } else {
                HandshakeError::Other(e)
            }
        };
        let mut buf = BytesMut::with_capacity(4096);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            match wire::decode(protocol, &mut buf, usize::MAX).map_err(|e| version(e.into()))? {
                Some(Incoming::ConnAck {
                    accepted: true,
                    session_present,
                    receive_max,
                    max_packet,
                    ..
                }) => {
                    return Ok(Connected {
                        stream,
                        buf,
                        session_present,
                        v5,
                        receive_max: usize::from(receive_max.unwrap_or(u16::MAX)),
                        max_packet,
                    })
                }
                // 0x84: unsupported protocol version; 0x01: a 3.1.1 broker's refusal
                Some(Incoming::ConnAck { code, .. }) if v5 && (code == 0x84 || code == 0x01) => {
                    return Err(version(SessionError::RefusedV5(code)))
                }
                Some(Incoming::ConnAck { code, .. }) => {
                    return Err(other(SessionError::Refused(code)))
                }
                Some(p) => return Err(other(SessionError::NotConnAck(format!("{p:?}")))),
                None => {}
            }
            let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
                .await
                .map_err(|_| other(SessionError::NoConnAck))?
                .map_err(|e| other(e.into()))?;
            if n == 0 {
                return Err(version(SessionError::ClosedBeforeConnAck));
            }
        }
    }

    /// One connected period. Returns `Ok` when asked to reconnect or stop.
    async fn serve(
        &mut self,
        connected: Connected,
        cmds: &mut mpsc::Receiver<UpCmd>,
        events: &mpsc::Sender<UpEvent>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let Connected {
            stream,
            mut buf,
            v5,
            receive_max,
            max_packet,
            ..
        } = connected;
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        let mut window = Window::new(if v5 { receive_max } else { usize::MAX });
        let mut refused = Vec::new();
        let (mut rd, mut wr) = stream.split();
        let mut ping = tokio::time::interval(self.keep_alive / 2);
        ping.tick().await;
        let mut last_read = tokio::time::Instant::now();
        loop {
            // everything one read brought goes to the dispatcher in one event
            let mut batch = std::mem::take(&mut refused);
            for p in &batch {
                window.on_incoming(p);
            }
            while let Some(p) = wire::decode(protocol, &mut buf, usize::MAX)? {
                window.on_incoming(&p);
                if p != Incoming::PingResp {
                    batch.push(p);
                }
            }
            // publishes the broker's window has room for again
            loop {
                let freed = window.release();
                if freed.is_empty() {
                    break;
                }
                let mut out = BytesMut::new();
                let mut newly = Vec::new();
                for cmd in &freed {
                    self.encode_checked(cmd, v5, max_packet, &mut out, &mut newly)?;
                }
                wr.write_all(&out).await?;
                for p in &newly {
                    window.on_incoming(p);
                }
                batch.extend(newly);
            }
            if !batch.is_empty() && events.send(UpEvent::Packets(batch)).await.is_err() {
                return Ok(());
            }
            buf.reserve(16 * 1024);
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if r? == 0 {
                        return Err(SessionError::Closed);
                    }
                    last_read = tokio::time::Instant::now();
                }
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    let mut out = BytesMut::new();
                    let mut next = Some(cmd);
                    // coalesce what is already queued into one write
                    while let Some(cmd) = next.take() {
                        if let UpCmd::SetWill(will) = cmd {
                            self.will = will;
                            let _ = wr.write_all(&out).await;
                            let _ = wr.write_all(&[0xe0, 0x00]).await;
                            await_close(&mut rd).await;
                            return Ok(());
                        }
                        if let Some(cmd) = window.admit(cmd) {
                            self.encode_checked(&cmd, v5, max_packet, &mut out, &mut refused)?;
                        }
                        if out.len() < 64 * 1024 {
                            next = cmds.try_recv().ok();
                        }
                    }
                    wr.write_all(&out).await?;
                }
                _ = ping.tick() => {
                    if last_read.elapsed() > self.keep_alive * 3 / 2 {
                        return Err(SessionError::Silent);
                    }
                    wr.write_all(&[0xc0, 0x00]).await?;
                }
                () = shutdown.cancelled() => {
                    // a clean DISCONNECT: the broker keeps the session, drops the will
                    let _ = wr.write_all(&[0xe0, 0x00]).await;
                    return Ok(());
                }
            }
        }
    }

    /// Encodes `cmd` unless it is a publish larger than the broker takes
    /// (its maximum packet size): that one is refused as the broker would
    /// (a PUBACK/PUBREC with "unspecified error" in `refused`), logged.
    fn encode_checked(
        &self,
        cmd: &UpCmd,
        v5: bool,
        max_packet: Option<u32>,
        out: &mut BytesMut,
        refused: &mut Vec<Incoming>,
    ) -> Result<(), SessionError> {
        let before = out.len();
        encode(cmd, v5, out)?;
        let Some(max) = max_packet else {
            return Ok(());
        };
        if out.len() - before <= max as usize {
            return Ok(());
        }
        out.truncate(before);
        if let UpCmd::Publish { msg, pkid, .. } = cmd {
            tracing::warn!(client_id = %self.client_id, topic = %msg.topic, max, "publish larger than the broker's maximum packet size: refused");
            match msg.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => refused.push(Incoming::PubAck(*pkid, 0x80.into())),
                QoS::ExactlyOnce => refused.push(Incoming::PubRec(*pkid, 0x80.into())),
            }
        }
        Ok(())
    }
}

/// After our DISCONNECT, waits (bounded) until the broker has closed the
/// connection, so that the reconnect with a new will is not taken for the old
/// connection's end. rumqttd 0.20 looks up the will of a connection that
/// ended by client id, after the fact: a new session with the same id that
/// registers first has its own will published at once.
async fn await_close(rd: &mut crate::stream::ReadHalf) {
    let mut scratch = BytesMut::with_capacity(4096);
    let closed = async {
        loop {
            scratch.clear();
            match rd.read_buf(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    if tokio::time::timeout(CLOSE_WAIT, closed).await.is_err() {
        tracing::debug!("broker kept the connection open after DISCONNECT");
    }
    // the broker's own clean-up of the old connection runs after its close
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// How long a will change waits for the broker to close the old connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A short-lived clean session that subscribes to filters and collects the
/// retained messages the broker sends for them, for one replica.
pub struct RetainedFetch {
    pub addr: String,
    /// MQTT 5 (at this address) or 3.1.1, as the main session.
    pub v5: bool,
    pub client_id: String,
    pub filters: Vec<String>,
    /// Upper bound on the whole fetch.
    pub timeout: Duration,
    pub login: Login,
}

/// After the PINGRESP (behind the retained messages of brokers that queue
/// them in order), the fetch ends once no retained message came for this
/// long: some brokers (rumqttd) send retained messages from another thread.
/// Live messages on the same filters do not count, or a steady stream would
/// keep the side session (and a second copy of the stream) going.
const RETAINED_QUIET: Duration = Duration::from_millis(150);

impl RetainedFetch {
    pub async fn run(self) -> Result<Vec<Message>, SessionError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let session = UpstreamSession {
            addr: self.addr.clone(),
            addr_v5: self.addr.clone(),
            protocol: if self.v5 {
                UpstreamProtocol::V5
            } else {
                UpstreamProtocol::V311
            },
            negotiated: Arc::default(),
            client_id: self.client_id.clone(),
            keep_alive: Duration::from_secs(30),
            connect_timeout: self.timeout,
            will: None,
            login: self.login.clone(),
            // it reads every retained message into memory anyway
            receive_max: u16::MAX,
        };
        let fetch = async {
            let Connected {
                stream, mut buf, ..
            } = session.handshake(true, self.v5).await?;
            let (mut rd, mut wr) = stream.split();
            let mut out = BytesMut::new();
            let sub = UpCmd::Subscribe {
                pkid: 1,
                filters: self
                    .filters
                    .iter()
                    // at QoS 2: each comes at its own QoS, which the
                    // replica's subscription may lower
                    .map(|f| SubRequest::new(f.clone(), QoS::ExactlyOnce))
                    .collect(),
            };
            encode(&sub, self.v5, &mut out)?;
            out.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
            wr.write_all(&out).await?;
            let mut messages = Vec::new();
            // until the PINGRESP: the whole fetch's deadline; then quiet
            // (of retained messages) for RETAINED_QUIET
            let mut until = deadline;
            let mut answered = false;
            loop {
                let protocol = if self.v5 {
                    Protocol::V5
                } else {
                    Protocol::V311
                };
                out.clear();
                while let Some(p) = wire::decode(protocol, &mut buf, usize::MAX)? {
                    let now = tokio::time::Instant::now();
                    // acknowledged, or the broker holds back the rest
                    match &p {
                        Incoming::Publish { msg, pkid, .. } if msg.qos == QoS::AtLeastOnce => {
                            encode(&UpCmd::PubAck(*pkid), self.v5, &mut out)?;
                        }
                        Incoming::Publish { pkid, .. } if *pkid != 0 => {
                            encode(&UpCmd::PubRec(*pkid), self.v5, &mut out)?;
                        }
                        Incoming::PubRel(pkid) => {
                            encode(&UpCmd::PubComp(*pkid), self.v5, &mut out)?;
                        }
                        _ => {}
                    }
                    match p {
                        Incoming::Publish { msg, .. } if msg.retain => {
                            messages.push(msg);
                            if answered {
                                until = now + RETAINED_QUIET;
                            }
                        }
                        Incoming::PingResp if !answered => {
                            answered = true;
                            until = now + RETAINED_QUIET;
                        }
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    wr.write_all(&out).await?;
                }
                match tokio::time::timeout_at(until, rd.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => return Err(SessionError::FetchClosed),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) if answered => break,
                    Err(_) => return Err(SessionError::FetchUnanswered),
                }
            }
            let _ = wr.write_all(&[0xe0, 0x00]).await;
            Ok(messages)
        };
        tokio::time::timeout_at(deadline, fetch)
            .await
            .map_err(|_| SessionError::FetchTimeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, qos: u8) -> UpCmd {
        UpCmd::Publish {
            msg: Message {
                topic: "t".into(),
                payload: bytes::Bytes::new(),
                qos: QoS::from_bits(qos),
                retain: false,
                properties: None,
            },
            pkid,
            dup: false,
        }
    }

    fn pkid(cmd: &UpCmd) -> u16 {
        match cmd {
            UpCmd::Publish { pkid, .. } => *pkid,
            _ => 0,
        }
    }

    #[test]
    fn the_window_holds_publishes_past_the_brokers_receive_maximum_in_order() {
        let mut w = Window::new(2);
        assert!(w.admit(publish(1, 1)).is_some());
        assert!(w.admit(publish(0, 0)).is_some(), "QoS 0 takes no place");
        assert!(w.admit(publish(2, 2)).is_some());
        assert!(w.admit(publish(3, 1)).is_none());
        assert!(w.admit(publish(4, 1)).is_none());
        assert!(w.admit(UpCmd::PubAck(9)).is_some(), "acks always go");
        assert!(w.admit(publish(1, 1)).is_some(), "a resend keeps its place");
        assert!(w.release().is_empty());
        w.on_incoming(&Incoming::PubRec(2, 0.into()));
        assert!(
            w.release().is_empty(),
            "QoS 2 holds its place until PUBCOMP"
        );
        w.on_incoming(&Incoming::PubComp(2));
        let out: Vec<u16> = w.release().iter().map(pkid).collect();
        assert_eq!(out, [3]);
        w.on_incoming(&Incoming::PubAck(1, 0x10.into()));
        let out: Vec<u16> = w.release().iter().map(pkid).collect();
        assert_eq!(out, [4]);
        // a refused QoS 2 publish ends at its PUBREC
        w.on_incoming(&Incoming::PubRec(3, 0x87.into()));
        assert!(w.admit(publish(5, 2)).is_some());
    }

    #[test]
    fn v5_subscribe_keeps_the_options() {
        let mut out = BytesMut::new();
        let cmd = UpCmd::Subscribe {
            pkid: 4,
            filters: vec![SubRequest {
                no_local: true,
                ..SubRequest::new("chat/#", QoS::AtLeastOnce)
            }],
        };
        encode(&cmd, true, &mut out).expect("encode");
        // ... "chat/#", options: QoS 1 | no local (0b0000_0101)
        assert_eq!(&out[out.len() - 9..], b"\x00\x06chat/#\x05");
        let mut v4 = BytesMut::new();
        encode(&cmd, false, &mut v4).expect("encode");
        assert_eq!(&v4[v4.len() - 9..], b"\x00\x06chat/#\x01");
    }
}
