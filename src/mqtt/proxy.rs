//! The MQTT listener and the per-connection proxy task (share mode and
//! unmatched clients).
//!
//! Each connection: read the CONNECT (with a deadline, size-checked), match it
//! against the instances; an unmatched client is connected upstream and its
//! bytes copied both ways untouched, CONNECT included; a replica gets a slot, a
//! rewritten client id, and two [`pump`]s that rewrite its filters and count
//! its traffic. One connection failing never touches another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::auth::{PasswordFile, Verdict};
use super::codec::{
    check_header, connack_refusal, Connect, Credentials, FrameScanner, PacketType, Protocol,
    Refusal, MAX_REMAINING_LENGTH,
};
use super::dispatch::{
    self,
    session::{self, Session},
};
use super::error::ConnError;
use super::limit::RateLimit;
use super::pump::{pump, Direction, FromReplica, ToReplica};
use super::replicas::{InstanceState, Instances, NewReplica, SlotGuard};
use super::rewrite::ShareRules;
use crate::config::Config;
use crate::metrics::{names, Metrics};
use crate::stream::Stream;
use crate::tls::{Acceptor, Connector};

/// After one direction of a connection ends, how long the other may go on.
const LINGER: Duration = Duration::from_secs(5);

/// What every connection task shares.
pub struct ProxyContext {
    pub config: Arc<Config>,
    pub instances: Arc<Instances>,
    pub metrics: Arc<Metrics>,
    /// `host:port` of the broker for 3.x clients.
    pub upstream_v3: String,
    /// `host:port` of the broker for 5.0 clients (the embedded broker has
    /// one listener per version).
    pub upstream_v5: String,
    /// TLS to an `mqtts://` broker.
    pub upstream_tls: Option<Arc<Connector>>,
    /// Dispatch mode: each instance's dispatcher, by instance name.
    pub dispatchers: HashMap<String, dispatch::Handle>,
    /// `mqtt.password_file`, for every client.
    pub passwords: Option<Arc<PasswordFile>>,
    /// Each instance's own `password_file`, by instance name.
    pub instance_passwords: HashMap<String, Arc<PasswordFile>>,
    /// Client connections open on every MQTT listener.
    pub connections: AtomicUsize,
}

/// What a listener speaks before MQTT: TLS, then a WebSocket upgrade on
/// `websocket`'s path, each when given.
#[derive(Default)]
pub struct Transport {
    pub tls: Option<Arc<Acceptor>>,
    pub websocket: Option<String>,
}

impl Transport {
    fn name(&self) -> &'static str {
        match (self.tls.is_some(), self.websocket.is_some()) {
            (false, false) => "mqtt",
            (true, false) => "mqtts",
            (false, true) => "ws",
            (true, true) => "wss",
        }
    }
}

/// Accepts connections until `shutdown`, spawning one task each on `tracker`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    transport: Transport,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let transport = Arc::new(transport);
    while let Some((stream, peer)) =
        crate::listener::accept(&listener, &shutdown, transport.name(), Some(&ctx.metrics)).await
    {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let transport = transport.clone();
        let tasks = tracker.clone();
        let span = tracing::debug_span!("mqtt", %peer, listener = transport.name());
        tracker.spawn(
            async move {
                let open = ctx.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let result = match open_transport(&ctx, &transport, stream, &tasks).await {
                    Ok(stream) => handle(&ctx, stream, peer, open, &shutdown).await,
                    Err(e) => Err(e),
                };
                ctx.connections.fetch_sub(1, Ordering::Relaxed);
                if let Err(e) = result {
                    ctx.metrics.error(e.kind());
                    e.log();
                }
            }
            .instrument(span),
        );
    }
}

/// The TLS handshake and WebSocket upgrade a listener asks for, within the
/// CONNECT deadline.
async fn open_transport(
    ctx: &ProxyContext,
    transport: &Transport,
    tcp: TcpStream,
    tasks: &TaskTracker,
) -> Result<Stream, ConnError> {
    let deadline = ctx.config.mqtt.connect_timeout;
    let max = ctx.config.mqtt.max_packet_size.bytes();
    let open = async {
        let stream = crate::tls::accept(transport.tls.as_deref(), tcp, deadline)
            .await
            .map_err(|e| e.to_string())?;
        match &transport.websocket {
            Some(path) => super::ws::accept(stream, path, max, tasks)
                .await
                .map_err(|e| e.to_string()),
            None => Ok(stream),
        }
    };
    tokio::time::timeout(deadline, open)
        .await
        .map_err(|_| ConnError::Handshake(format!("no handshake within {deadline:?}")))?
        .map_err(ConnError::Handshake)
}

/// Reads until one whole frame is buffered; returns the buffer and the frame's
/// length (bytes after it are the client's next packets).
async fn read_first_frame(stream: &mut Stream, max: usize) -> Result<(BytesMut, usize), ConnError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(header) = check_header(&buf, max).map_err(ConnError::ClientCodec)? {
            let packet = header.packet_type().map_err(ConnError::ClientCodec)?;
            if packet != PacketType::Connect {
                return Err(ConnError::NotConnect(packet));
            }
            if buf.len() >= header.frame_len() {
                return Ok((buf, header.frame_len()));
            }
            buf.reserve(header.frame_len() - buf.len());
        }
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(ConnError::ClientIo)?
            == 0
        {
            return Err(ConnError::ClosedBeforeConnect);
        }
    }
}

async fn connect_upstream(ctx: &ProxyContext, protocol: Protocol) -> Result<Stream, ConnError> {
    let addr = if protocol.is_v5() {
        &ctx.upstream_v5
    } else {
        &ctx.upstream_v3
    };
    crate::tls::connect(
        addr,
        ctx.config.mqtt.upstream_connect_timeout,
        ctx.upstream_tls.as_deref(),
    )
    .await
    .map_err(|reason| ConnError::UpstreamConnect {
        addr: addr.clone(),
        reason,
    })
}

/// Answers a CONNECT with a refusal and ends the connection with an error
/// naming why.
async fn refuse(
    ctx: &ProxyContext,
    client: &mut Stream,
    connect: &Connect<'_>,
    refusal: Refusal,
    kind: &'static str,
    reason: String,
) -> ConnError {
    ctx.metrics.mqtt_refused.with_label_values(&[kind]).inc();
    let _ = client.write_all(&refusal.frame(connect.protocol)).await;
    let _ = client.shutdown().await;
    ConnError::Refused {
        client_id: connect.client_id.to_owned(),
        reason,
        kind,
    }
}

/// Checks a CONNECT's credentials against `file` on a blocking thread.
async fn check_login(file: &Arc<PasswordFile>, connect: &Connect<'_>) -> Verdict {
    let file = file.clone();
    let user = connect.username.map(str::to_owned);
    let password = connect.password.map(<[u8]>::to_vec);
    tokio::task::spawn_blocking(move || file.check(user.as_deref(), password.as_deref()))
        .await
        .unwrap_or(Verdict::NoCredentials)
}

async fn handle(
    ctx: &ProxyContext,
    mut client: Stream,
    peer: SocketAddr,
    open: usize,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let max = ctx
        .config
        .mqtt
        .max_packet_size
        .bytes()
        .min(MAX_REMAINING_LENGTH);
    let deadline = ctx.config.mqtt.connect_timeout;
    let (buf, frame_len) = tokio::select! {
        r = tokio::time::timeout(deadline, read_first_frame(&mut client, max)) => {
            r.map_err(|_| ConnError::ConnectTimeout(deadline))??
        }
        () = shutdown.cancelled() => return Ok(()),
    };
    let connect = Connect::decode(&buf[..frame_len]).map_err(ConnError::ClientCodec)?;
    let instance = admit(ctx, &mut client, &connect, open).await?;
    let protocol = connect.protocol;
    match instance {
        None => {
            tracing::debug!(client_id = connect.client_id, "pass-through client");
            pass_through(ctx, client, &buf, protocol, shutdown).await
        }
        Some(instance) => {
            let first = FirstFrame {
                buf,
                frame_len,
                max,
            };
            serve_replica(ctx, client, first, &instance, peer, shutdown).await
        }
    }
}

/// The CONNECT a connection began with, and the bytes read after it.
struct FirstFrame {
    buf: BytesMut,
    frame_len: usize,
    /// The largest packet either side may send.
    max: usize,
}

/// Lets the client in or refuses it (`max_connections`, the password file of
/// its instance or of the listener); its instance, if it is a replica.
async fn admit(
    ctx: &ProxyContext,
    client: &mut Stream,
    connect: &Connect<'_>,
    open: usize,
) -> Result<Option<Arc<InstanceState>>, ConnError> {
    if let Some(limit) = ctx.config.mqtt.max_connections.filter(|m| open > *m) {
        let reason = format!("{open} connections open, mqtt.max_connections is {limit}");
        return Err(refuse(
            ctx,
            client,
            connect,
            Refusal::Busy,
            "max_connections",
            reason,
        )
        .await);
    }
    let instance = ctx.instances.find(connect.client_id, connect.username);
    let passwords = instance
        .and_then(|i| ctx.instance_passwords.get(&i.config.name))
        .or(ctx.passwords.as_ref());
    if let Some(file) = passwords {
        let verdict = check_login(file, connect).await;
        let name = instance.map_or("", |i| i.config.name.as_str());
        ctx.metrics
            .mqtt_auth
            .with_label_values(&[name, verdict.label()])
            .inc();
        let refusal = match verdict {
            Verdict::Accepted => None,
            Verdict::NoCredentials => Some((Refusal::NotAuthorized, "not_authorized")),
            Verdict::UnknownUser | Verdict::BadPassword => {
                Some((Refusal::BadCredentials, "bad_credentials"))
            }
        };
        if let Some((refusal, kind)) = refusal {
            let reason = format!(
                "{} (user {:?}, {})",
                verdict.label(),
                connect.username.unwrap_or(""),
                file.path.display()
            );
            return Err(refuse(ctx, client, connect, refusal, kind, reason).await);
        }
    }
    Ok(instance.cloned())
}

/// A client of no instance: its bytes to the broker and back, as they are.
async fn pass_through(
    ctx: &ProxyContext,
    client: Stream,
    buf: &[u8],
    protocol: Protocol,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let _active = ActiveGuard::new(&ctx.metrics, names::CONN_PASSTHROUGH);
    let mut upstream = connect_upstream(ctx, protocol).await?;
    upstream
        .write_all(buf)
        .await
        .map_err(ConnError::UpstreamIo)?;
    let (client_rd, client_wr) = client.split();
    let (upstream_rd, upstream_wr) = upstream.split();
    let up = crate::stream::copy(
        client_rd,
        upstream_wr,
        ConnError::ClientIo,
        ConnError::UpstreamIo,
    );
    let down = crate::stream::copy(
        upstream_rd,
        client_wr,
        ConnError::UpstreamIo,
        ConnError::ClientIo,
    );
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        () = shutdown.cancelled() => Ok(()),
    }
}

/// A replica: its slot and session id, then its session (dispatch mode, or
/// relayed to the broker in share mode).
async fn serve_replica(
    ctx: &ProxyContext,
    mut client: Stream,
    FirstFrame {
        mut buf,
        frame_len,
        max,
    }: FirstFrame,
    instance: &Arc<InstanceState>,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    // decoded again: the first decode borrowed the buffer this one consumes
    let connect = Connect::decode(&buf[..frame_len]).map_err(ConnError::ClientCodec)?;
    let protocol = connect.protocol;
    let client_id = connect.client_id.to_owned();
    let Some((guard, new_id)) = instance.claim(NewReplica {
        client_id: &client_id,
        peer,
        protocol,
        node_id: &ctx.config.node_id,
    }) else {
        let reason = format!(
            "instance {} has max_replicas = {} connected",
            instance.config.name,
            instance
                .config
                .max_replicas
                .unwrap_or(usize::from(u16::MAX))
        );
        return Err(refuse(
            ctx,
            &mut client,
            &connect,
            Refusal::Busy,
            "max_replicas",
            reason,
        )
        .await);
    };
    if new_id.len() > usize::from(u16::MAX) {
        return Err(ConnError::ClientIdTooLong(new_id.len()));
    }
    let credentials = instance
        .config
        .upstream_username
        .as_deref()
        .map(|username| Credentials {
            username,
            password: instance
                .config
                .upstream_password
                .as_ref()
                .map(|p| p.expose().as_bytes()),
        });
    let rewritten = connect.encode_with(&new_id, credentials);
    let (will, limits) = session::connect_facts(&connect, &buf[..frame_len]);
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let _ = buf.split_to(frame_len);
    let span = tracing::info_span!("replica", instance = %instance.config.name, slot = guard.slot);
    let transport = client.transport();
    if let Some(handle) = ctx.dispatchers.get(&instance.config.name) {
        let session = Session {
            protocol,
            keep_alive,
            max_packet: max,
            max_inflight: instance.config.max_inflight,
            guard: &guard,
            handle: handle.clone(),
            will,
            limits,
            peer,
            publish_rate: ctx.config.mqtt.max_publish_rate,
            throttled: ctx
                .metrics
                .mqtt_throttled
                .with_label_values(&[instance.config.name.as_str()]),
        };
        return async move {
            tracing::info!(%client_id, session_id = %new_id, ?protocol, transport, "replica connected (dispatch)");
            let _active = ActiveGuard::new(&ctx.metrics, names::CONN_REPLICA);
            let result = session.run(client, buf, shutdown).await;
            tracing::info!("replica disconnected");
            result
        }
        .instrument(span)
        .await;
    }
    let replica = Replica {
        ctx,
        instance,
        guard: &guard,
        protocol,
        max,
    };
    async move {
        tracing::info!(%client_id, upstream_client_id = %new_id, ?protocol, transport, "replica connected");
        let result = replica.run(client, buf, rewritten, shutdown).await;
        tracing::info!("replica disconnected");
        result
    }
    .instrument(span)
    .await
}

/// A replica's connection once its slot is taken.
struct Replica<'a> {
    ctx: &'a ProxyContext,
    instance: &'a InstanceState,
    guard: &'a SlotGuard,
    protocol: Protocol,
    max: usize,
}

impl Replica<'_> {
    async fn run(
        self,
        mut client: Stream,
        buf: BytesMut,
        rewritten: Vec<u8>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let ctx = self.ctx;
        let guard = self.guard;
        let name = self.instance.config.name.as_str();
        let _active = ActiveGuard::new(&ctx.metrics, names::CONN_REPLICA);
        ctx.metrics
            .mqtt_rewrites
            .with_label_values(&[name, "client_id"])
            .inc();
        let upstream = match connect_upstream(ctx, self.protocol).await {
            Ok(s) => s,
            Err(e) => {
                let _ = client.write_all(connack_refusal(self.protocol)).await;
                return Err(e);
            }
        };
        let (client_rd, client_wr) = client.split();
        let (up_rd, mut up_wr) = upstream.split();
        up_wr
            .write_all(&rewritten)
            .await
            .map_err(ConnError::UpstreamIo)?;
        guard.counters.bytes_from.inc_by(rewritten.len() as u64);

        let mut from = FromReplica {
            rules: ShareRules {
                instance: name,
                broadcast: &self.instance.config.broadcast,
            },
            protocol: self.protocol,
            guard,
            metrics: &ctx.metrics,
            limit: ctx.config.mqtt.max_publish_rate.map(RateLimit::new),
            publishes: 0,
        };
        let mut to = ToReplica {
            guard,
            awaiting_connack: true,
        };
        let counters = &guard.counters;
        let up = pump(
            client_rd,
            up_wr,
            buf,
            Direction {
                scanner: FrameScanner::new(self.max),
                bytes: &counters.bytes_from,
                from_client: true,
            },
            &mut from,
            shutdown,
        );
        let down = pump(
            up_rd,
            client_wr,
            BytesMut::new(),
            Direction {
                scanner: FrameScanner::new(MAX_REMAINING_LENGTH),
                bytes: &counters.bytes_to,
                from_client: false,
            },
            &mut to,
            shutdown,
        );
        join_directions(up, down).await
    }
}

/// Runs both directions; the first error ends both, and after a clean end of
/// one the other gets [`LINGER`] to finish.
async fn join_directions(
    a: impl std::future::Future<Output = Result<(), ConnError>>,
    b: impl std::future::Future<Output = Result<(), ConnError>>,
) -> Result<(), ConnError> {
    tokio::pin!(a, b);
    let rest = tokio::select! {
        r = &mut a => { r?; tokio::time::timeout(LINGER, &mut b).await }
        r = &mut b => { r?; tokio::time::timeout(LINGER, &mut a).await }
    };
    rest.unwrap_or(Ok(()))
}

/// Keeps the active-connections gauge right whatever way a task ends.
struct ActiveGuard(prometheus::IntGauge);

impl ActiveGuard {
    fn new(metrics: &Metrics, kind: &str) -> Self {
        let gauge = metrics.connection_gauge(kind);
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
