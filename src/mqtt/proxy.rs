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
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::codec::{
    check_header, connack_refusal, Connect, FrameScanner, PacketType, Protocol,
    MAX_REMAINING_LENGTH,
};
use super::dispatch::{
    self,
    session::{self, Session},
};
use super::error::ConnError;
use super::pump::{pump, Direction, FromReplica, ToReplica};
use super::replicas::{InstanceState, Instances, NewReplica, SlotGuard};
use super::rewrite::ShareRules;
use crate::config::Config;
use crate::metrics::{names, Metrics};

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
    /// Dispatch mode: each instance's dispatcher, by instance name.
    pub dispatchers: HashMap<String, dispatch::Handle>,
}

/// Accepts connections until `shutdown`, spawning one task each on `tracker`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((stream, peer)) =
        crate::listener::accept(&listener, &shutdown, "mqtt", Some(&ctx.metrics)).await
    {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("mqtt", %peer);
        tracker.spawn(
            async move {
                if let Err(e) = handle(&ctx, stream, peer, &shutdown).await {
                    ctx.metrics.error(e.kind());
                    e.log();
                }
            }
            .instrument(span),
        );
    }
}

/// Reads until one whole frame is buffered; returns the buffer and the frame's
/// length (bytes after it are the client's next packets).
async fn read_first_frame(
    stream: &mut TcpStream,
    max: usize,
) -> Result<(BytesMut, usize), ConnError> {
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

async fn connect_upstream(ctx: &ProxyContext, protocol: Protocol) -> Result<TcpStream, ConnError> {
    let timeout = ctx.config.mqtt.upstream_connect_timeout;
    let addr = if protocol.is_v5() {
        &ctx.upstream_v5
    } else {
        &ctx.upstream_v3
    };
    let fail = |reason: String| ConnError::UpstreamConnect {
        addr: addr.clone(),
        reason,
    };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn handle(
    ctx: &ProxyContext,
    mut client: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let _ = client.set_nodelay(true);
    let max = ctx
        .config
        .mqtt
        .max_packet_size
        .bytes()
        .min(MAX_REMAINING_LENGTH);
    let deadline = ctx.config.mqtt.connect_timeout;
    let (mut buf, frame_len) = tokio::select! {
        r = tokio::time::timeout(deadline, read_first_frame(&mut client, max)) => {
            r.map_err(|_| ConnError::ConnectTimeout(deadline))??
        }
        () = shutdown.cancelled() => return Ok(()),
    };
    let connect = Connect::decode(&buf[..frame_len]).map_err(ConnError::ClientCodec)?;

    let Some(instance) = ctx.instances.find(connect.client_id, connect.username) else {
        tracing::debug!(client_id = connect.client_id, "pass-through client");
        let _active = ActiveGuard::new(&ctx.metrics, names::CONN_PASSTHROUGH);
        let mut upstream = connect_upstream(ctx, connect.protocol).await?;
        upstream
            .write_all(&buf)
            .await
            .map_err(ConnError::UpstreamIo)?;
        return tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.map(|_| ()).map_err(ConnError::ClientIo),
            () = shutdown.cancelled() => Ok(()),
        };
    };

    let instance = instance.clone();
    let protocol = connect.protocol;
    let client_id = connect.client_id.to_owned();
    let (guard, new_id) = instance
        .claim(NewReplica {
            client_id: &client_id,
            peer,
            protocol,
            node_id: &ctx.config.node_id,
        })
        .ok_or_else(|| ConnError::NoSlot(instance.config.name.clone()))?;
    if new_id.len() > usize::from(u16::MAX) {
        return Err(ConnError::ClientIdTooLong(new_id.len()));
    }
    let rewritten = connect.encode_with_client_id(&new_id);
    let will = session::will_of(&connect);
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let _ = buf.split_to(frame_len);
    let span = tracing::info_span!("replica", instance = %instance.config.name, slot = guard.slot);
    if let Some(handle) = ctx.dispatchers.get(&instance.config.name) {
        let session = Session {
            protocol,
            keep_alive,
            max_packet: max,
            max_inflight: instance.config.max_inflight,
            guard: &guard,
            handle: handle.clone(),
            will,
            peer,
        };
        return async move {
            tracing::info!(%client_id, session_id = %new_id, ?protocol, "replica connected (dispatch)");
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
        instance: &instance,
        guard: &guard,
        protocol,
        max,
    };
    async move {
        tracing::info!(%client_id, upstream_client_id = %new_id, ?protocol, "replica connected");
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
        mut client: TcpStream,
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
        let (client_rd, client_wr) = client.into_split();
        let (up_rd, mut up_wr) = upstream.into_split();
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
