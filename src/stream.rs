//! One connection whatever carries it: plain TCP, TLS over TCP, or a
//! [`DuplexStream`] fed by a task (MQTT over WebSocket). The MQTT proxy, the
//! dispatch sessions and the upstream sessions read and write a [`Stream`];
//! plain TCP keeps tokio's lock-free split.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How much room the next read of a connection gets: little while it is
/// idle (10,000 idle replicas must not hold 16 KiB each), doubling each time a
/// read fills the room (a busy one reaches [`ReadSize::MAX`] in a few reads).
#[derive(Debug)]
pub struct ReadSize(usize);

impl ReadSize {
    pub const MIN: usize = 1024;
    pub const MAX: usize = 64 * 1024;

    pub fn new() -> Self {
        Self(Self::MIN)
    }

    /// The spare capacity to reserve before the next read.
    pub fn get(&self) -> usize {
        self.0
    }

    /// After a read of `n` bytes into `room` bytes of spare capacity.
    pub fn update(&mut self, n: usize, room: usize) {
        if n >= room {
            self.0 = (self.0 * 2).min(Self::MAX);
        }
    }
}

impl Default for ReadSize {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies `rd` to `wr` until `rd` ends, then shuts `wr` down: reads sized by
/// [`ReadSize`] (an idle connection holds 1 KiB, not a fixed 8 KiB buffer),
/// each read written whole. A failure is `read_err` or `write_err` of the
/// I/O error, so it names the side that failed.
pub async fn copy<R, W, E>(
    mut rd: R,
    mut wr: W,
    read_err: fn(io::Error) -> E,
    write_err: fn(io::Error) -> E,
) -> Result<u64, E>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut size = ReadSize::new();
    let mut buf = bytes::BytesMut::new();
    let mut total = 0u64;
    loop {
        buf.reserve(size.get());
        let room = buf.capacity() - buf.len();
        let n = rd.read_buf(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            wr.shutdown().await.map_err(write_err)?;
            return Ok(total);
        }
        size.update(n, room);
        wr.write_all(&buf).await.map_err(write_err)?;
        total += n as u64;
        buf.clear();
    }
}

/// A client or upstream connection.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// The local end of a pipe a bridging task feeds (WebSocket frames).
    Duplex(DuplexStream),
}

/// The reading half of a [`Stream`].
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Other(tokio::io::ReadHalf<Stream>),
}

/// The writing half of a [`Stream`].
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Other(tokio::io::WriteHalf<Stream>),
}

impl Stream {
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (ReadHalf::Other(r), WriteHalf::Other(w))
            }
        }
    }

    /// What carries it, for logs: `tcp`, `tls` or `ws`.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Tcp(_) => "tcp",
            Self::Tls(_) => "tls",
            Self::Duplex(_) => "ws",
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

/// Runs `$e` with `$s` bound to whichever stream `$self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr, $($variant:path),+) => {
        match $self {
            $($variant($s) => $e,)+
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf), Stream::Tcp, Stream::Tls, Stream::Duplex)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf), Stream::Tcp, Stream::Tls, Stream::Duplex)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx), Stream::Tcp, Stream::Tls, Stream::Duplex)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx), Stream::Tcp, Stream::Tls, Stream::Duplex)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs), Stream::Tcp, Stream::Tls, Stream::Duplex)
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
            Self::Duplex(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf), ReadHalf::Tcp, ReadHalf::Other)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf), WriteHalf::Tcp, WriteHalf::Other)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx), WriteHalf::Tcp, WriteHalf::Other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx), WriteHalf::Tcp, WriteHalf::Other)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs), WriteHalf::Tcp, WriteHalf::Other)
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Other(s) => s.is_write_vectored(),
        }
    }
}

/// A connection some of whose bytes were already read: they are read again
/// first (the lean HTTP path handing a connection to hyper mid-stream).
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.prefix.is_empty() {
            let n = me.prefix.len().min(buf.remaining());
            buf.put_slice(&me.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::ReadSize;

    #[test]
    fn read_size_stays_small_until_reads_fill_it() {
        let mut r = ReadSize::new();
        r.update(2, 1024);
        assert_eq!(r.get(), ReadSize::MIN);
        for _ in 0..10 {
            let room = r.get();
            r.update(room, room);
        }
        assert_eq!(r.get(), ReadSize::MAX);
    }
}
