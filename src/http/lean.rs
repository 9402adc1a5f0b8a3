//! The lean path of the balancer: one task per client connection reads each
//! HTTP/1.1 request head once ([`h1`]), forwards its bytes with the
//! forwarded headers added to a pooled replica connection, and copies the
//! response back with flowgate's headers, bodies byte for byte. No header
//! maps, no second task per replica connection: two reads and two writes per
//! small request, like nginx. A request it does not carry (an upgrade,
//! HTTP/1.0, a chunked request body, `Expect: 100-continue`) hands the rest of
//! the connection to hyper ([`super::serve_hyper`]) with the bytes read so far.
//!
//! Policy, replica choice, retries and metrics are the same as hyper's path
//! ([`super::forward`]): the same [`Pool`] decides.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::backend::{Backend, Pool};
use super::forward::{
    access, keyed, pinned, sticky_cookie, sticky_path, Access, InflightGuard, BLOCKED_TEXT,
    NOT_PUBLISHED_TEXT, REPLICA_HEADER, TOO_LARGE_TEXT,
};
use super::h1::{self, Framing, H1Error, RequestHead};
use super::policy::{self, TryFailure, Verdict};
use super::{Limits, Site};
use crate::config::RequestKey;

/// Room kept free in a read buffer before each read.
const READ_ROOM: usize = 4096;
/// Largest read while copying a body.
const COPY_CHUNK: usize = 64 * 1024;

/// A closing connection's client may go quiet this long before it is closed.
const LINGER_IDLE: Duration = Duration::from_secs(2);
/// ... and is read from this long at most.
const LINGER_MAX: Duration = Duration::from_secs(30);

/// What the connection does after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// How one try at a replica ended.
enum Attempt {
    /// The response went to the client.
    Done(Next),
    /// No response: the policy says what follows.
    Failed(TryFailure),
    /// The client went away or broke the exchange: close.
    ClientGone,
}

/// A failure reading a request head.
enum HeadError {
    TooLarge,
    Bad(H1Error),
    Timeout,
}

/// A deadline on a timer that moves only when it fires: waits whose
/// deadlines only grow (now + a fixed time) re-arm it about once per period
/// instead of once per request.
struct Deadline(Pin<Box<Sleep>>);

impl Deadline {
    fn new(after: Duration) -> Self {
        Self(Box::pin(tokio::time::sleep(after)))
    }

    /// Runs `fut` until `deadline`: `None` when the deadline came first.
    async fn run<F: Future>(
        &mut self,
        deadline: tokio::time::Instant,
        fut: F,
    ) -> Option<F::Output> {
        if self.0.deadline() > deadline {
            self.0.as_mut().reset(deadline);
        }
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Some(r),
                () = self.0.as_mut() => {
                    if tokio::time::Instant::now() >= deadline {
                        return None;
                    }
                    self.0.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// One client connection on the lean path.
struct Conn<S> {
    io: S,
    /// Bytes from the client not consumed yet (pipelined requests included).
    buf: BytesMut,
    /// Bytes from the replica.
    up_buf: BytesMut,
    /// What is written next, to either side.
    out: BytesMut,
    /// The current request as it goes to a replica (head, then body bytes).
    request: BytesMut,
    peer_ip: String,
    proto: &'static str,
    /// Bytes of the current request body still to come from the client.
    body_left: u64,
    /// For request heads (`header_timeout`).
    head_timer: Deadline,
    /// For the replica's answer and both bodies (`timeout`).
    up_timer: Deadline,
    /// Shutdown, polled while idle between requests.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// Serves one client connection until it closes, or `shutdown` between
/// requests; hands it to hyper at the first request the lean path does not
/// carry.
pub async fn serve<S>(
    io: S,
    site: Arc<Site>,
    peer: SocketAddr,
    proto: &'static str,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = Conn {
        io,
        buf: BytesMut::new(),
        up_buf: BytesMut::new(),
        out: BytesMut::new(),
        request: BytesMut::new(),
        peer_ip: peer.ip().to_string(),
        proto,
        body_left: 0,
        head_timer: Deadline::new(limits.header_timeout),
        up_timer: Deadline::new(limits.header_timeout),
        cancelled: Box::pin(shutdown.clone().cancelled_owned()),
    };
    loop {
        let head = match c.read_head(&limits).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(HeadError::TooLarge) => {
                count(&site, "head_too_large");
                c.refuse(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large\n",
                    true,
                )
                .await;
                return;
            }
            Err(HeadError::Bad(e)) => {
                count(&site, "bad_request");
                tracing::debug!(%peer, error = %e, "bad request head");
                c.refuse(400, "Bad Request", "bad request\n", true).await;
                return;
            }
            Err(HeadError::Timeout) => {
                count(&site, "head_timeout");
                tracing::debug!(%peer, "no request head within header_timeout");
                return;
            }
        };
        if !head.lean() {
            let prefix = c.buf.split().freeze();
            super::serve_hyper(
                crate::stream::Prefixed::new(prefix, c.io),
                site,
                peer,
                proto,
                limits,
                shutdown,
            )
            .await;
            return;
        }
        let next = match site.route(head.host.as_deref()) {
            Some(pool) => c.exchange(head, &pool, &shutdown).await,
            None => {
                c.body_left = body_len(&head);
                c.buf.advance(head.len);
                c.refuse(421, "Misdirected Request", "unknown host\n", head.close)
                    .await
            }
        };
        if next == Next::Close || shutdown.is_cancelled() {
            let _ = c.io.shutdown().await;
            return;
        }
        c.trim();
    }
}

fn count(site: &Site, kind: &str) {
    if let Some(m) = site.metrics() {
        m.http_error(kind);
    }
}

fn body_len(head: &RequestHead) -> u64 {
    match head.body {
        Framing::Length(n) => n,
        _ => 0,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Lets go of buffers a large exchange grew, so an idle keep-alive
    /// connection holds a few KiB.
    fn trim(&mut self) {
        const KEEP: usize = 16 << 10;
        for b in [&mut self.up_buf, &mut self.out, &mut self.request] {
            if b.capacity() > KEEP {
                *b = BytesMut::new();
            }
        }
        if self.buf.is_empty() && self.buf.capacity() > KEEP {
            self.buf = BytesMut::new();
        }
    }

    /// The next request head: `None` when the client closed (or shutdown
    /// came) between requests. The whole head, idle wait included, must come
    /// within `header_timeout`.
    async fn read_head(&mut self, limits: &Limits) -> Result<Option<RequestHead>, HeadError> {
        let deadline = tokio::time::Instant::now() + limits.header_timeout;
        loop {
            if !self.buf.is_empty() {
                self.request.clear();
                let fwd = h1::Forwarded {
                    client_ip: &self.peer_ip,
                    proto: self.proto,
                };
                match h1::parse_request(&self.buf, &fwd, &mut self.request) {
                    Ok(Some(h)) if h.len > limits.max_header => return Err(HeadError::TooLarge),
                    Ok(Some(h)) => return Ok(Some(h)),
                    Ok(None) if self.buf.len() >= limits.max_header => {
                        return Err(HeadError::TooLarge)
                    }
                    Ok(None) => {}
                    Err(H1Error::TooManyHeaders) => return Err(HeadError::TooLarge),
                    Err(e) => return Err(HeadError::Bad(e)),
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_ROOM / 4 {
                self.buf.reserve(READ_ROOM);
            }
            let idle = self.buf.is_empty();
            let read = self
                .head_timer
                .run(deadline, self.io.read_buf(&mut self.buf));
            let n = tokio::select! {
                biased;
                r = read => match r {
                    Some(Ok(n)) => n,
                    Some(Err(_)) => return Ok(None),
                    None if idle => return Ok(None),
                    None => return Err(HeadError::Timeout),
                },
                () = self.cancelled.as_mut(), if idle => return Ok(None),
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Answers with a response of flowgate's own. With `close`, or while a
    /// request body is still unread, the connection then closes (after a
    /// short linger so the client reads the answer rather than a reset).
    async fn refuse(&mut self, status: u16, reason: &str, text: &str, close: bool) -> Next {
        // a small unread body is skipped when it is already here
        let here = self.body_left.min(self.buf.len() as u64);
        self.buf.advance(here as usize);
        self.body_left -= here;
        let close = close || self.body_left > 0;
        self.out.clear();
        h1::error_response(status, reason, text, close, &mut self.out);
        if self.io.write_all(&self.out).await.is_err() || self.io.flush().await.is_err() {
            return Next::Close;
        }
        if close {
            self.linger().await;
            return Next::Close;
        }
        Next::KeepAlive
    }

    /// Half-closes, then reads and drops what the client still sends (the
    /// rest of a refused body) until it stops for [`LINGER_IDLE`] or for
    /// [`LINGER_MAX`] in all, so closing does not reset the connection
    /// before the client read the answer (nginx's lingering close).
    async fn linger(&mut self) {
        let _ = self.io.shutdown().await;
        let mut sink = vec![0u8; 16 << 10];
        let _ = tokio::time::timeout(LINGER_MAX, async {
            while let Ok(Ok(n)) = tokio::time::timeout(LINGER_IDLE, self.io.read(&mut sink)).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
    }

    /// One request to `pool`'s instance and its response.
    async fn exchange(
        &mut self,
        head: RequestHead,
        pool: &Arc<Pool>,
        shutdown: &CancellationToken,
    ) -> Next {
        let cfg = &pool.cfg;
        self.body_left = body_len(&head);
        let path = head.path();
        match access(pool, &head.method, path) {
            Access::Pass => {}
            Access::Admin => {
                self.buf.advance(head.len);
                return self
                    .refuse(403, "Forbidden", BLOCKED_TEXT, head.close)
                    .await;
            }
            Access::Unpublished => {
                self.buf.advance(head.len);
                return self
                    .refuse(404, "Not Found", NOT_PUBLISHED_TEXT, head.close)
                    .await;
            }
        }
        if self.body_left > cfg.max_body.bytes() as u64 {
            self.buf.advance(head.len);
            return self
                .refuse(413, "Payload Too Large", TOO_LARGE_TEXT, true)
                .await;
        }
        let sticky_path = sticky_path(pool, path);
        let pinned = pinned(pool, head.cookie.as_deref());
        // key-hash: the key's replica first (before a sticky cookie's)
        let keyed = match &cfg.key {
            Some(key) => {
                let header = match key {
                    RequestKey::Header(name) => h1::header_value(&self.buf[..head.len], name),
                    _ => None,
                };
                keyed(pool, &head.target, header, head.cookie.as_deref())
            }
            None => None,
        };
        let pinned = keyed.or(pinned);

        // the request as it goes out: its head (written when it was read),
        // then what of the body is here
        let mut request = std::mem::take(&mut self.request);
        self.buf.advance(head.len);
        let here = self.body_left.min(self.buf.len() as u64) as usize;
        request.extend_from_slice(&self.buf[..here]);
        self.buf.advance(here);
        self.body_left -= here as u64;
        // the whole request is in `request`: it can be sent again
        let whole = self.body_left == 0;

        pool.count_request();
        let next = self
            .forward(&head, pool, &request, whole, pinned, sticky_path, shutdown)
            .await;
        request.clear();
        self.request = request;
        next
    }

    /// Sends `request` to a replica, another on a failure that allows it.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        head: &RequestHead,
        pool: &Arc<Pool>,
        request: &[u8],
        whole: bool,
        pinned: Option<Arc<Backend>>,
        sticky_path: bool,
        shutdown: &CancellationToken,
    ) -> Next {
        let started = Instant::now();
        let mut tried = Vec::new();
        let mut first = pinned;
        loop {
            let Some(backend) = first.take().or_else(|| pool.pick(&tried)) else {
                let Verdict::Answer {
                    status,
                    reason,
                    text,
                } = policy::NO_REPLICA
                else {
                    return Next::Close;
                };
                return self.refuse(status, reason, text, head.close).await;
            };
            tried.push(backend.index);
            let _guard = InflightGuard::new(backend.clone());
            let attempt = self
                .attempt(
                    pool,
                    &backend,
                    head,
                    request,
                    whole,
                    started,
                    sticky_path,
                    shutdown,
                )
                .await;
            match attempt {
                Attempt::Done(next) => return next,
                // (not sent: no byte of the body left the client's buffer)
                Attempt::Failed(failure) => {
                    let replayable = whole && head.replayable();
                    if let Verdict::Answer {
                        status,
                        reason,
                        text,
                    } = policy::settle(pool, &backend, &failure, replayable)
                    {
                        return self.refuse(status, reason, text, head.close).await;
                    }
                }
                Attempt::ClientGone => return Next::Close,
            }
        }
    }

    /// Sends the request to `backend` and relays its response.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &mut self,
        pool: &Pool,
        backend: &Arc<Backend>,
        head: &RequestHead,
        request: &[u8],
        whole: bool,
        started: Instant,
        sticky_path: bool,
        shutdown: &CancellationToken,
    ) -> Attempt {
        let cfg = &pool.cfg;
        let cookie = sticky_path.then(|| sticky_cookie(&cfg.sticky_cookie, backend.index));
        let answer = h1::Answer {
            replica: cfg
                .replica_header
                .then_some((REPLICA_HEADER, backend.label.as_str())),
            set_cookie: cookie.as_deref(),
            close: head.close || shutdown.is_cancelled(),
        };
        let mut pooled = backend.checkout_raw(cfg.idle_timeout);
        let (up, resp) = loop {
            let reused = pooled.is_some();
            let mut up = match pooled.take() {
                Some(c) => c,
                None => match backend.connect_tcp(cfg.connect_timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        if e.refused() {
                            pool.passive_down(backend);
                        }
                        return Attempt::Failed(TryFailure::NotSent(e.to_string()));
                    }
                },
            };
            if let Err(e) = up.write_all(request).await {
                if reused && whole {
                    continue;
                }
                return if whole {
                    Attempt::Failed(TryFailure::NotSent(format!("write: {e}")))
                } else {
                    Attempt::Failed(TryFailure::Failed(format!("write: {e}")))
                };
            }
            if self.body_left > 0 {
                match self.send_body(&mut up, cfg.timeout).await {
                    Ok(()) => {}
                    Err(Side::Client) => return Attempt::ClientGone,
                    Err(Side::ClientSilent) => {
                        tracing::debug!(instance = %pool.instance, "client silent mid-body: closed");
                        pool.metrics.http_error("body_timeout");
                        return Attempt::ClientGone;
                    }
                    Err(Side::Replica(e)) => {
                        return Attempt::Failed(TryFailure::Failed(format!("body: {e}")))
                    }
                }
            }
            self.up_buf.clear();
            match self
                .read_response(&mut up, &head.method, &answer, cfg.timeout)
                .await
            {
                Ok(r) => break (up, r),
                Err(ReadError::Timeout) => return Attempt::Failed(TryFailure::Timeout),
                // a pooled connection the replica had closed: a fresh one
                // (only for a request that may be sent twice)
                Err(ReadError::Closed) if reused && head.replayable() => {}
                Err(e) => return Attempt::Failed(TryFailure::Failed(e.to_string())),
            }
        };

        let status = resp.status;
        backend.count(status);
        pool.served(backend);
        backend.duration.observe(started.elapsed().as_secs_f64());
        let close = answer.close || resp.body == Framing::Close;
        self.relay(pool, backend, up, &resp, close).await
    }

    /// Relays the response whose head `resp` is read (and rewritten into
    /// `out`) to the client; `up` goes back to the pool when the response
    /// ended cleanly and both sides keep the connection.
    async fn relay(
        &mut self,
        pool: &Pool,
        backend: &Backend,
        mut up: TcpStream,
        resp: &h1::ResponseHead,
        close: bool,
    ) -> Attempt {
        let cfg = &pool.cfg;
        // `out` holds the head as it goes to the client
        self.up_buf.advance(resp.len);
        let relayed = match resp.body {
            Framing::Empty => self.flush_out().await.map(|()| true),
            Framing::Length(n) => self.relay_length(&mut up, n, cfg.timeout).await,
            Framing::Chunked => self.relay_chunked(&mut up, cfg.timeout).await,
            Framing::Close => self
                .relay_to_close(&mut up, cfg.timeout)
                .await
                .map(|()| false),
        };
        match relayed {
            Ok(done) => {
                if done && resp.keep_alive && self.up_buf.is_empty() {
                    backend.checkin_raw(up);
                }
                Attempt::Done(if close { Next::Close } else { Next::KeepAlive })
            }
            Err(Side::Client | Side::ClientSilent) => Attempt::Done(Next::Close),
            Err(Side::Replica(e)) => {
                // the client has part of a response: only closing tells it
                tracing::warn!(instance = %pool.instance, replica = %backend.label, error = %e, "replica failed mid-response");
                pool.metrics.http_error("replica_mid_response");
                Attempt::Done(Next::Close)
            }
        }
    }

    /// Copies the rest of the request body from the client to the replica.
    /// A client silent for `timeout` mid-body is gone (nginx's
    /// `client_body_timeout`).
    async fn send_body(&mut self, up: &mut TcpStream, timeout: Duration) -> Result<(), Side> {
        while self.body_left > 0 {
            if self.buf.is_empty() {
                self.buf
                    .reserve(COPY_CHUNK.min(self.body_left as usize).max(READ_ROOM));
                let deadline = tokio::time::Instant::now() + timeout;
                match self
                    .up_timer
                    .run(deadline, self.io.read_buf(&mut self.buf))
                    .await
                {
                    Some(Ok(0) | Err(_)) => return Err(Side::Client),
                    Some(Ok(_)) => {}
                    None => return Err(Side::ClientSilent),
                }
            }
            let n = self.body_left.min(self.buf.len() as u64) as usize;
            up.write_all(&self.buf[..n])
                .await
                .map_err(|e| Side::Replica(e.to_string()))?;
            self.buf.advance(n);
            self.body_left -= n as u64;
        }
        Ok(())
    }

    /// Reads a response head from `up_buf` and the replica (whole within
    /// `timeout`), and writes it to `out` as it goes to the client; 1xx
    /// informational responses (but 101) go on to the client as they come.
    async fn read_response(
        &mut self,
        up: &mut TcpStream,
        method: &str,
        answer: &h1::Answer<'_>,
        timeout: Duration,
    ) -> Result<h1::ResponseHead, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.up_buf.is_empty() {
                self.out.clear();
                match h1::parse_response(&self.up_buf, method, answer, &mut self.out) {
                    Ok(Some(r)) if r.status == 101 => return Err(ReadError::Unasked),
                    Ok(Some(r)) if r.status < 200 => {
                        self.up_buf.advance(r.len);
                        // a client gone shows on the final response's write
                        let _ = self.flush_out().await;
                        continue;
                    }
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) if self.up_buf.len() > super::MAX_RESPONSE_HEAD => {
                        return Err(ReadError::TooLarge)
                    }
                    Ok(None) => {}
                    Err(e) => return Err(ReadError::Head(e)),
                }
            }
            self.up_buf.reserve(READ_ROOM);
            let read = self.up_timer.run(deadline, up.read_buf(&mut self.up_buf));
            match read.await.ok_or(ReadError::Timeout)? {
                Ok(0) if self.up_buf.is_empty() => return Err(ReadError::Closed),
                Ok(0) => return Err(ReadError::Truncated),
                Ok(_) => {}
                Err(e) if self.up_buf.is_empty() => {
                    tracing::debug!(error = %e, "replica connection failed before answering");
                    return Err(ReadError::Closed);
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Writes `out` to the client.
    async fn flush_out(&mut self) -> Result<(), Side> {
        self.io
            .write_all(&self.out)
            .await
            .map_err(|_| Side::Client)?;
        self.io.flush().await.map_err(|_| Side::Client)?;
        self.out.clear();
        Ok(())
    }

    /// Reads more of the response into `up_buf` (bounded by `timeout`).
    async fn read_up(&mut self, up: &mut TcpStream, timeout: Duration) -> Result<usize, Side> {
        self.up_buf.reserve(COPY_CHUNK);
        let deadline = tokio::time::Instant::now() + timeout;
        match self
            .up_timer
            .run(deadline, up.read_buf(&mut self.up_buf))
            .await
        {
            Some(Ok(n)) => Ok(n),
            Some(Err(e)) => Err(Side::Replica(e.to_string())),
            None => Err(Side::Replica("no body bytes within timeout".into())),
        }
    }

    /// A `content-length` body: `Ok(true)` when it came whole.
    async fn relay_length(
        &mut self,
        up: &mut TcpStream,
        mut left: u64,
        timeout: Duration,
    ) -> Result<bool, Side> {
        loop {
            let n = left.min(self.up_buf.len() as u64) as usize;
            self.out.extend_from_slice(&self.up_buf[..n]);
            self.up_buf.advance(n);
            left -= n as u64;
            self.flush_out().await?;
            if left == 0 {
                return Ok(true);
            }
            if self.read_up(up, timeout).await? == 0 {
                return Err(Side::Replica("closed mid-body".into()));
            }
        }
    }

    /// A chunked body, passed as it came: `Ok(true)` when it ended.
    async fn relay_chunked(&mut self, up: &mut TcpStream, timeout: Duration) -> Result<bool, Side> {
        let mut chunks = h1::Chunked::default();
        loop {
            let n = chunks
                .feed(&self.up_buf)
                .map_err(|e| Side::Replica(e.to_string()))?;
            self.out.extend_from_slice(&self.up_buf[..n]);
            self.up_buf.advance(n);
            self.flush_out().await?;
            if chunks.is_done() {
                return Ok(true);
            }
            if self.read_up(up, timeout).await? == 0 {
                return Err(Side::Replica("closed mid-body".into()));
            }
        }
    }

    /// A body that ends when the replica closes.
    async fn relay_to_close(&mut self, up: &mut TcpStream, timeout: Duration) -> Result<(), Side> {
        loop {
            self.out.extend_from_slice(&self.up_buf);
            self.up_buf.clear();
            self.flush_out().await?;
            if self.read_up(up, timeout).await? == 0 {
                return Ok(());
            }
        }
    }
}

/// Which side failed a relay.
enum Side {
    Client,
    /// The client sent nothing for `timeout` in the middle of its body.
    ClientSilent,
    Replica(String),
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("no response head within timeout")]
    Timeout,
    #[error("replica closed the connection before answering")]
    Closed,
    #[error("replica closed the connection mid-head")]
    Truncated,
    #[error("replica answered 101 to a request without an upgrade")]
    Unasked,
    #[error("response head too large")]
    TooLarge,
    #[error("bad response head: {0}")]
    Head(H1Error),
    #[error("reading the response: {0}")]
    Io(std::io::Error),
}
