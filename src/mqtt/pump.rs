//! One direction of a replica's proxied connection: read, frame, let a
//! [`Handler`] see frame starts and rewrite whole frames, write. Bytes nobody
//! rewrites move from the read buffer to the write buffer without a copy
//! (`BytesMut::unsplit` of contiguous halves), and everything read in one go is
//! written in one go, so small frames are coalesced.

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::codec::{
    CodecError, ConnectReturn, FrameScanner, PacketType, Protocol, Scan, Subscribe, Unsubscribe,
};
use super::error::ConnError;
use super::limit::RateLimit;
use super::replicas::SlotGuard;
use super::rewrite::ShareRules;
use crate::metrics::Metrics;

/// What a direction does with frames.
pub trait Handler {
    /// Should a frame of this type be handed over whole?
    fn wants_whole(&self, packet: PacketType) -> bool;
    /// A frame of this type starts passing through unchanged.
    fn on_start(&mut self, packet: PacketType);
    /// A whole frame asked for: append what to send in its place to `out`.
    fn on_whole(
        &mut self,
        packet: PacketType,
        frame: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), ConnError>;
    /// After a batch is written: how long to stop reading (a rate limit).
    fn pause(&mut self) -> Option<std::time::Duration> {
        None
    }
}

/// How one direction frames and counts its bytes.
pub struct Direction<'a> {
    pub scanner: FrameScanner,
    /// Bytes written by this direction.
    pub bytes: &'a IntCounter,
    /// Whether the reader is the client's socket (so errors name the side
    /// that failed).
    pub from_client: bool,
}

type IoError = fn(std::io::Error) -> ConnError;

/// Moves bytes from `rd` to `wr` until `rd` ends (then shuts `wr` down), an
/// error, or `shutdown`. `inbuf` holds bytes already read.
pub async fn pump<R, W, H>(
    mut rd: R,
    mut wr: W,
    mut inbuf: BytesMut,
    dir: Direction<'_>,
    handler: &mut H,
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    H: Handler,
{
    let Direction {
        mut scanner,
        bytes,
        from_client,
    } = dir;
    // which side failed picks the log level and the metric label
    let (read_err, write_err): (IoError, IoError) = if from_client {
        (ConnError::ClientIo, ConnError::UpstreamIo)
    } else {
        (ConnError::UpstreamIo, ConnError::ClientIo)
    };
    let mut read_size = crate::stream::ReadSize::new();
    loop {
        let mut out = BytesMut::new();
        loop {
            match scanner.scan(&inbuf, |p| handler.wants_whole(p)) {
                Ok(Scan::NeedMore) => break,
                Ok(Scan::Forward { len, start }) => {
                    if let Some(packet) = start {
                        handler.on_start(packet);
                    }
                    out.unsplit(inbuf.split_to(len));
                }
                Ok(Scan::Whole { len, packet }) => {
                    let frame = inbuf.split_to(len);
                    handler.on_whole(packet, frame, &mut out)?;
                }
                Err(e) => {
                    // forward what came before the bad frame, then fail
                    if !out.is_empty() {
                        let _ = wr.write_all(&out).await;
                    }
                    return Err(if from_client {
                        ConnError::ClientCodec(e)
                    } else {
                        ConnError::UpstreamCodec(e)
                    });
                }
            }
        }
        if !out.is_empty() {
            bytes.inc_by(out.len() as u64);
            wr.write_all(&out).await.map_err(write_err)?;
        }
        drop(out);
        if let Some(wait) = handler.pause() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
        inbuf.reserve(read_size.get());
        let room = inbuf.capacity() - inbuf.len();
        let n = tokio::select! {
            r = rd.read_buf(&mut inbuf) => r.map_err(read_err)?,
            () = shutdown.cancelled() => return Ok(()),
        };
        read_size.update(n, room);
        if n == 0 {
            if !scanner.at_boundary() || !inbuf.is_empty() {
                let e = CodecError::Truncated {
                    field: "packet (connection closed mid-packet)",
                };
                tracing::debug!(error = %e, "peer closed mid-packet");
            }
            let _ = wr.shutdown().await;
            return Ok(());
        }
    }
}

/// Replica to broker: counts publishes, rewrites SUBSCRIBE and UNSUBSCRIBE
/// filters (share mode), refuses a second CONNECT.
pub struct FromReplica<'a> {
    pub rules: ShareRules<'a>,
    pub protocol: Protocol,
    pub guard: &'a SlotGuard,
    pub metrics: &'a Metrics,
    /// `mqtt.max_publish_rate`, and the publishes seen since the last batch.
    pub limit: Option<RateLimit>,
    pub publishes: u32,
}

impl Handler for FromReplica<'_> {
    fn wants_whole(&self, packet: PacketType) -> bool {
        matches!(
            packet,
            PacketType::Subscribe | PacketType::Unsubscribe | PacketType::Connect
        )
    }

    fn on_start(&mut self, packet: PacketType) {
        if packet == PacketType::Publish {
            self.guard.counters.messages_from.inc();
            self.publishes += 1;
        }
    }

    fn pause(&mut self) -> Option<std::time::Duration> {
        let n = std::mem::take(&mut self.publishes);
        let wait = self.limit.as_mut()?.take(n)?;
        self.metrics
            .mqtt_throttled
            .with_label_values(&[self.rules.instance])
            .inc();
        Some(wait)
    }

    fn on_whole(
        &mut self,
        packet: PacketType,
        frame: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), ConnError> {
        let rewritten = match packet {
            PacketType::Subscribe => {
                let sub =
                    Subscribe::decode(&frame, self.protocol).map_err(ConnError::ClientCodec)?;
                self.rules
                    .subscribe(&sub, self.protocol)
                    .map(|r| (r, "subscribe"))
            }
            PacketType::Unsubscribe => {
                let unsub =
                    Unsubscribe::decode(&frame, self.protocol).map_err(ConnError::ClientCodec)?;
                self.rules.unsubscribe(&unsub).map(|r| (r, "unsubscribe"))
            }
            _ => return Err(ConnError::SecondConnect),
        };
        match rewritten {
            Some(((bytes, count), kind)) => {
                self.metrics
                    .mqtt_rewrites
                    .with_label_values(&[self.rules.instance, kind])
                    .inc_by(count as u64);
                out.extend_from_slice(&bytes);
            }
            None => out.unsplit(frame),
        }
        Ok(())
    }
}

/// Broker to replica: counts publishes, watches the CONNACK to count the
/// replica as connected.
pub struct ToReplica<'a> {
    pub guard: &'a SlotGuard,
    pub awaiting_connack: bool,
}

impl Handler for ToReplica<'_> {
    fn wants_whole(&self, packet: PacketType) -> bool {
        self.awaiting_connack && packet == PacketType::Connack
    }

    fn on_start(&mut self, packet: PacketType) {
        if packet == PacketType::Publish {
            self.guard.counters.messages_to.inc();
        }
    }

    fn on_whole(
        &mut self,
        _packet: PacketType,
        frame: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), ConnError> {
        self.awaiting_connack = false;
        match ConnectReturn::decode(&frame) {
            Ok(ConnectReturn::Accepted) => self.guard.mark_accepted(),
            Ok(ConnectReturn::Refused(code)) => {
                tracing::info!(code, "broker refused the replica's session");
            }
            Err(e) => return Err(ConnError::UpstreamCodec(e)),
        }
        out.unsplit(frame);
        Ok(())
    }
}
