//! The instance's one upstream MQTT session (3.1.1, persistent): connects and
//! reconnects with back-off, keeps the session alive, writes what the
//! dispatcher asks and reports what the broker sends. It decides nothing.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Secret;
use crate::stream::Stream;
use crate::tls::Connector;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, qos4, Incoming, Message};
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
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    /// Reconnect with this will (the session is kept).
    SetWill(Option<Message>),
}

/// What the upstream session reports.
#[derive(Debug)]
pub enum UpEvent {
    Up {
        session_present: bool,
    },
    Down,
    /// The packets of one read, in order.
    Packets(Vec<Incoming>),
}

pub struct UpstreamSession {
    pub addr: String,
    pub client_id: String,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub will: Option<Message>,
    pub login: Login,
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

fn encode(cmd: &UpCmd, out: &mut BytesMut) -> Result<(), String> {
    let packet = match cmd {
        UpCmd::Publish { msg, pkid, dup } => {
            let mut p = v4::Publish::from_bytes(&msg.topic, qos4(msg.qos), msg.payload.clone());
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
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), qos4(*q))),
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
    packet
        .write(out, usize::MAX)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl UpstreamSession {
    fn connect_packet(&self, clean: bool) -> Result<BytesMut, String> {
        let mut c = v4::Connect::new(self.client_id.clone());
        c.clean_session = clean;
        c.keep_alive = u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX);
        if let Some(user) = &self.login.username {
            let password = self.login.password.as_ref().map_or("", |p| p.expose());
            c.set_login(user.clone(), password.to_owned());
        }
        c.last_will = self
            .will
            .as_ref()
            .map(|w| v4::LastWill::new(w.topic.clone(), w.payload.clone(), qos4(w.qos), w.retain));
        let mut out = BytesMut::new();
        v4::Packet::Connect(c)
            .write(&mut out, usize::MAX)
            .map_err(|e| e.to_string())?;
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
            let (stream, buf, session_present) = match started {
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
            tracing::info!(addr = %self.addr, client_id = %self.client_id, session_present, "upstream session up");
            if events.send(UpEvent::Up { session_present }).await.is_err() {
                return;
            }
            let end = self.serve(stream, buf, &mut cmds, &events, &shutdown).await;
            match end {
                Ok(()) => {}
                Err(e) => tracing::warn!(addr = %self.addr, error = %e, "upstream session lost"),
            }
            if events.send(UpEvent::Down).await.is_err() || shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn connect(&self) -> Result<(Stream, BytesMut, bool), String> {
        self.handshake(false).await
    }

    /// A clean session, for short-lived side sessions.
    async fn connect_clean(&self) -> Result<(Stream, BytesMut, bool), String> {
        self.handshake(true).await
    }

    async fn handshake(&self, clean: bool) -> Result<(Stream, BytesMut, bool), String> {
        let mut stream =
            crate::tls::connect(&self.addr, self.connect_timeout, self.login.tls.as_deref())
                .await?;
        stream
            .write_all(&self.connect_packet(clean)?)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(4096);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            match wire::decode(Protocol::V311, &mut buf, usize::MAX).map_err(|e| e.to_string())? {
                Some(Incoming::ConnAck {
                    accepted: true,
                    session_present,
                    ..
                }) => return Ok((stream, buf, session_present)),
                Some(Incoming::ConnAck { code, .. }) => {
                    return Err(format!("broker refused the session (code {code})"))
                }
                Some(other) => return Err(format!("expected CONNACK, got {other:?}")),
                None => {}
            }
            let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
                .await
                .map_err(|_| "no CONNACK in time".to_owned())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before CONNACK".into());
            }
        }
    }

    /// One connected period. Returns `Ok` when asked to reconnect or stop.
    async fn serve(
        &mut self,
        stream: Stream,
        mut buf: BytesMut,
        cmds: &mut mpsc::Receiver<UpCmd>,
        events: &mpsc::Sender<UpEvent>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let (mut rd, mut wr) = stream.split();
        let mut ping = tokio::time::interval(self.keep_alive / 2);
        ping.tick().await;
        let mut last_read = tokio::time::Instant::now();
        loop {
            // everything one read brought goes to the dispatcher in one event
            let mut batch = Vec::new();
            while let Some(p) =
                wire::decode(Protocol::V311, &mut buf, usize::MAX).map_err(|e| e.to_string())?
            {
                if p != Incoming::PingResp {
                    batch.push(p);
                }
            }
            if !batch.is_empty() && events.send(UpEvent::Packets(batch)).await.is_err() {
                return Ok(());
            }
            buf.reserve(16 * 1024);
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if r.map_err(|e| e.to_string())? == 0 {
                        return Err("broker closed the connection".into());
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
                        encode(&cmd, &mut out)?;
                        if out.len() < 64 * 1024 {
                            next = cmds.try_recv().ok();
                        }
                    }
                    wr.write_all(&out).await.map_err(|e| e.to_string())?;
                }
                _ = ping.tick() => {
                    if last_read.elapsed() > self.keep_alive * 3 / 2 {
                        return Err("broker silent past keep-alive".into());
                    }
                    wr.write_all(&[0xc0, 0x00]).await.map_err(|e| e.to_string())?;
                }
                () = shutdown.cancelled() => {
                    // a clean DISCONNECT: the broker keeps the session, drops the will
                    let _ = wr.write_all(&[0xe0, 0x00]).await;
                    return Ok(());
                }
            }
        }
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
    pub async fn run(self) -> Result<Vec<Message>, String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let session = UpstreamSession {
            addr: self.addr.clone(),
            client_id: self.client_id.clone(),
            keep_alive: Duration::from_secs(30),
            connect_timeout: self.timeout,
            will: None,
            login: self.login.clone(),
        };
        let fetch = async {
            let (stream, mut buf, _) = session.connect_clean().await?;
            let (mut rd, mut wr) = stream.split();
            let mut out = BytesMut::new();
            let sub = UpCmd::Subscribe {
                pkid: 1,
                filters: self.filters.iter().map(|f| (f.clone(), 0)).collect(),
            };
            encode(&sub, &mut out)?;
            out.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut messages = Vec::new();
            // until the PINGRESP: the whole fetch's deadline; then quiet
            // (of retained messages) for RETAINED_QUIET
            let mut until = deadline;
            let mut answered = false;
            loop {
                while let Some(p) =
                    wire::decode(Protocol::V311, &mut buf, usize::MAX).map_err(|e| e.to_string())?
                {
                    let now = tokio::time::Instant::now();
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
                match tokio::time::timeout_at(until, rd.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => return Err("broker closed the retained fetch".to_owned()),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) if answered => break,
                    Err(_) => return Err("no answer to the retained fetch".to_owned()),
                }
            }
            let _ = wr.write_all(&[0xe0, 0x00]).await;
            Ok(messages)
        };
        tokio::time::timeout_at(deadline, fetch)
            .await
            .map_err(|_| format!("retained fetch took over {:?}", self.timeout))?
    }
}
