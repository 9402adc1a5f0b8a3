//! HTTP/1.1 heads and body framing as bytes, no I/O: what the lean path
//! ([`super::lean`]) needs to forward a request and its response without
//! building header maps. A request head is read once into a [`RequestHead`]
//! (routing and policy facts) and copied to the replica with the hop-by-hop
//! headers left out and the forwarded headers added; a response head is copied
//! back the same way. Bodies are never changed: [`Chunked`] only finds where a
//! chunked body ends so its bytes pass as they came.

use bytes::{BufMut, BytesMut};

/// Most headers a head may carry (more is answered 431, like a head too large).
pub const MAX_HEADERS: usize = 100;

/// Headers that belong to one hop, never forwarded (RFC 9110 7.6.1); the lean
/// path keeps a response's `transfer-encoding` and `trailer`: its body passes
/// as it came.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("head has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("bad content-length")]
    BadLength,
    #[error("malformed chunked body")]
    BadChunk,
}

impl From<httparse::Error> for H1Error {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => Self::TooManyHeaders,
            httparse::Error::HeaderName => Self::Malformed("header name"),
            httparse::Error::HeaderValue => Self::Malformed("header value"),
            httparse::Error::NewLine => Self::Malformed("line ending"),
            httparse::Error::Status => Self::Malformed("status"),
            httparse::Error::Token => Self::Malformed("token"),
            httparse::Error::Version => Self::Malformed("version"),
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// The facts of a request head that routing and policy need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, its blank line included.
    pub len: usize,
    pub method: String,
    pub target: String,
    /// HTTP/1.`minor`.
    pub minor: u8,
    pub host: Option<String>,
    pub body: Framing,
    /// `Upgrade` named in `Connection` (WebSocket).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect: bool,
    /// The client wants the connection closed after this exchange.
    pub close: bool,
    /// The `Cookie` headers, joined by `;`.
    pub cookie: Option<String>,
}

impl RequestHead {
    /// The path of the target, without its query; for an absolute-form
    /// target (`http://host/path`), its path.
    pub fn path(&self) -> &str {
        let t = self.target.as_str();
        let t = match t.find("://") {
            Some(i) if !t[..i].contains('/') => {
                t[i + 3..].find('/').map_or("/", |p| &t[i + 3 + p..])
            }
            _ => t,
        };
        t.split(['?', '#']).next().unwrap_or("")
    }

    /// Can the lean path carry it? HTTP/1.1, no upgrade, no `Expect`, a body
    /// of known length. Anything else goes to the full HTTP stack.
    pub fn lean(&self) -> bool {
        self.minor == 1 && !self.upgrade && !self.expect && self.body != Framing::Chunked
    }

    /// May it be sent again after it reached a replica (no body, idempotent)?
    pub fn replayable(&self) -> bool {
        self.body == Framing::Empty && super::policy::idempotent(&self.method)
    }
}

/// Connection tokens of the head's `Connection` headers, lowercased.
fn connection_tokens(headers: &[httparse::Header<'_>]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn hop_by_hop(name: &str, named: &[String], response: bool) -> bool {
    if response
        && (name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("trailer"))
    {
        return false;
    }
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || named.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// The body framing the headers give; `None` when there is no framing header.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Option<Framing>, H1Error> {
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).map_err(|_| H1Error::BadLength)?;
            // chunked must be the last coding; anything after it is read to close
            let last = v.rsplit(',').next().unwrap_or("").trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| H1Error::BadLength)?;
            for part in v.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) || part.len() > 19 {
                    return Err(H1Error::BadLength);
                }
                let n: u64 = part.parse().map_err(|_| H1Error::BadLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::BadLength);
                }
                length = Some(n);
            }
        }
    }
    Ok(match (chunked, length) {
        (Some(true), _) => Some(Framing::Chunked),
        (Some(false), _) => Some(Framing::Close),
        (None, Some(0)) => Some(Framing::Empty),
        (None, Some(n)) => Some(Framing::Length(n)),
        (None, None) => None,
    })
}

/// The first value of header `name` (lowercase) in a whole request head.
pub fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// What the balancer adds to a request on its way to a replica.
pub struct Forwarded<'a> {
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: &'a str,
    /// `http` or `https`.
    pub proto: &'a str,
}

/// Reads a request head from the start of `buf`: `Ok(None)` while it is
/// incomplete. Once it is whole, writes it to `out` as it goes to a replica:
/// HTTP/1.1, hop-by-hop headers left out, `X-Forwarded-For` (the client
/// appended), `-Proto` and `-Host` set.
pub fn parse_request(
    buf: &[u8],
    fwd: &Forwarded<'_>,
    out: &mut BytesMut,
) -> Result<Option<RequestHead>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(H1Error::Malformed("request line"));
    };
    let headers = &*req.headers;
    let body = match framing(headers)? {
        // a request with a coding other than chunked has no length: refused
        Some(Framing::Close) => return Err(H1Error::BadLength),
        Some(f) => f,
        None => Framing::Empty,
    };
    let tokens = connection_tokens(headers);
    let mut host = None;
    let mut upgrade = false;
    let mut expect = false;
    let mut length = false;
    let mut cookie: Option<String> = None;
    out.reserve(len + 96);
    out.put_slice(method.as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let mut xff: Vec<&[u8]> = Vec::new();
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            xff.push(h.value);
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                // two hosts: which instance is meant is ambiguous (RFC 9112 3.2)
                return Err(H1Error::Malformed("more than one host header"));
            }
            host = Some(std::str::from_utf8(h.value).map_err(|_| H1Error::Malformed("host"))?);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expect = h.value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = true;
        } else if name.eq_ignore_ascii_case("cookie") {
            if let Ok(v) = std::str::from_utf8(h.value) {
                match &mut cookie {
                    Some(c) => {
                        c.push_str("; ");
                        c.push_str(v);
                    }
                    None => cookie = Some(v.to_owned()),
                }
            }
        }
        if name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("x-forwarded-host")
            || hop_by_hop(name, &tokens, false)
        {
            continue;
        }
        put_header(out, name.as_bytes(), h.value);
    }
    if body == Framing::Chunked && length {
        // both framings: a smuggling attempt (RFC 9112 6.3)
        return Err(H1Error::BadLength);
    }
    put_forwarded(out, &xff, fwd, host);
    Ok(Some(RequestHead {
        len,
        method: method.to_owned(),
        target: target.to_owned(),
        minor,
        host: host.map(str::to_owned),
        body,
        upgrade: upgrade && tokens.iter().any(|t| t == "upgrade"),
        expect,
        close: if minor == 0 {
            !tokens.iter().any(|t| t == "keep-alive")
        } else {
            tokens.iter().any(|t| t == "close")
        },
        cookie,
    }))
}

/// `X-Forwarded-For` (the client after the `xff` values it sent),
/// `-Proto`, `-Host`, and the head's end.
fn put_forwarded(out: &mut BytesMut, xff: &[&[u8]], fwd: &Forwarded<'_>, host: Option<&str>) {
    out.put_slice(b"x-forwarded-for: ");
    for prev in xff {
        out.put_slice(prev);
        out.put_slice(b", ");
    }
    out.put_slice(fwd.client_ip.as_bytes());
    out.put_slice(b"\r\nx-forwarded-proto: ");
    out.put_slice(fwd.proto.as_bytes());
    out.put_slice(b"\r\n");
    if let Some(h) = host {
        put_header(out, b"x-forwarded-host", h.as_bytes());
    }
    out.put_slice(b"\r\n");
}

fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// The facts of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub body: Framing,
    /// The replica keeps the connection open after this response.
    pub keep_alive: bool,
}

/// What the balancer adds to a response on its way to the client.
pub struct Answer<'a> {
    /// The `x-flowgate-replica` value, if the header is on.
    pub replica: Option<(&'a str, &'a str)>,
    /// A `Set-Cookie` value to add (sticky sessions).
    pub set_cookie: Option<&'a str>,
    /// The connection closes after this response (said to the client; also
    /// said when the body ends with the replica's connection).
    pub close: bool,
}

/// Reads a response head to a request with `method` from the start of
/// `buf`: `Ok(None)` while it is incomplete. Once it is whole, writes it to
/// `out` as it goes to the client: HTTP/1.1, hop-by-hop headers (but the
/// body's own framing) left out, `answer`'s headers added (not to a 1xx).
pub fn parse_response(
    buf: &[u8],
    method: &str,
    answer: &Answer<'_>,
    out: &mut BytesMut,
) -> Result<Option<ResponseHead>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(H1Error::Malformed("status line"));
    };
    let reason = resp.reason.unwrap_or("");
    let headers = &*resp.headers;
    let tokens = connection_tokens(headers);
    let framed = framing(headers)?;
    let informational = (100..200).contains(&status);
    let body = if method == "HEAD" || informational || status == 204 || status == 304 {
        Framing::Empty
    } else {
        framed.unwrap_or(Framing::Close)
    };
    let keep_alive = body != Framing::Close
        && if minor == 0 {
            tokens.iter().any(|t| t == "keep-alive")
        } else {
            !tokens.iter().any(|t| t == "close")
        };
    let replica = answer.replica.filter(|_| !informational);
    out.reserve(len + 128);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(&itoa3(status));
    out.put_u8(b' ');
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    for h in headers {
        if hop_by_hop(h.name, &tokens, true)
            || replica.is_some_and(|(name, _)| h.name.eq_ignore_ascii_case(name))
        {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    if !informational {
        if let Some((name, value)) = replica {
            put_header(out, name.as_bytes(), value.as_bytes());
        }
        if let Some(c) = answer.set_cookie {
            put_header(out, b"set-cookie", c.as_bytes());
        }
        if answer.close || body == Framing::Close {
            out.put_slice(b"connection: close\r\n");
        }
    }
    out.put_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        body,
        keep_alive,
    }))
}

/// A status code as its three digits (httparse guarantees 100..=999).
fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// A whole response of flowgate's own (errors, refusals).
pub fn error_response(status: u16, reason: &str, text: &str, close: bool, out: &mut BytesMut) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(&itoa3(status));
    out.put_u8(b' ');
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\ncontent-type: text/plain\r\ncontent-length: ");
    out.put_slice(text.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
    out.put_slice(text.as_bytes());
}

/// Finds the end of a chunked body in the bytes fed to it, a piece at a
/// time, without changing them.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At the start of a size line.
    #[default]
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataCr,
    DataLf,
    /// In the trailer section, at the start of a line.
    TrailerStart,
    /// In a trailer line.
    Trailer,
    Done,
}

/// Longest size line (digits and extensions) accepted.
const MAX_SIZE_LINE: usize = 4096;

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feeds the next bytes of the body: how many of them belong to it (all
    /// of them unless it ends inside `buf`).
    pub fn feed(&mut self, buf: &[u8]) -> Result<usize, H1Error> {
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        at += n;
                        self.state = ChunkState::TrailerStart;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        at += n;
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) => {
                        if rest.len() > MAX_SIZE_LINE {
                            return Err(H1Error::BadChunk);
                        }
                        // the size line is not whole yet: hold it back
                        return Ok(at);
                    }
                    Err(_) => return Err(H1Error::BadChunk),
                },
                ChunkState::Data(left) => {
                    let take = left.min(rest.len() as u64);
                    at += take as usize;
                    self.state = if take == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataCr => {
                    if rest[0] != b'\r' {
                        return Err(H1Error::BadChunk);
                    }
                    at += 1;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if rest[0] != b'\n' {
                        return Err(H1Error::BadChunk);
                    }
                    at += 1;
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    if rest[0] == b'\r' {
                        if rest.len() < 2 {
                            return Ok(at);
                        }
                        if rest[1] != b'\n' {
                            return Err(H1Error::BadChunk);
                        }
                        at += 2;
                        self.state = ChunkState::Done;
                    } else if rest[0] == b'\n' {
                        at += 1;
                        self.state = ChunkState::Done;
                    } else {
                        self.state = ChunkState::Trailer;
                    }
                }
                ChunkState::Trailer => match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        at += i + 1;
                        self.state = ChunkState::TrailerStart;
                    }
                    None => at = buf.len(),
                },
                ChunkState::Done => return Ok(at),
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FWD: Forwarded<'static> = Forwarded {
        client_ip: "192.0.2.7",
        proto: "http",
    };

    fn req(bytes: &[u8]) -> Result<Option<(RequestHead, String)>, H1Error> {
        let mut out = BytesMut::new();
        Ok(parse_request(bytes, &FWD, &mut out)?
            .map(|h| (h, String::from_utf8_lossy(&out).into_owned())))
    }

    fn resp(bytes: &[u8], method: &str, answer: &Answer<'_>) -> (ResponseHead, String) {
        let mut out = BytesMut::new();
        let head = parse_response(bytes, method, answer, &mut out)
            .expect("valid")
            .expect("whole");
        (head, String::from_utf8_lossy(&out).into_owned())
    }

    const PLAIN: Answer<'static> = Answer {
        replica: None,
        set_cookie: None,
        close: false,
    };

    #[test]
    fn a_request_head_is_forwarded_without_hop_by_hop_headers() {
        let input = b"GET /a?b=1 HTTP/1.1\r\nHost: web:1880\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\nX-Forwarded-Proto: ftp\r\nCookie: a=1\r\nCookie: flowgate_web=r1\r\nAccept: */*\r\n\r\nGET /next";
        let (head, out) = req(input).expect("valid").expect("whole");
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: web:1880\r\nCookie: a=1\r\nCookie: flowgate_web=r1\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: web:1880\r\n\r\n"
        );
        // the bytes after the head (a pipelined request) are not part of it
        assert_eq!(head.len, input.len() - b"GET /next".len());
        assert_eq!(head.path(), "/a");
        assert_eq!(head.host.as_deref(), Some("web:1880"));
        assert_eq!(head.cookie.as_deref(), Some("a=1; flowgate_web=r1"));
        assert_eq!(head.body, Framing::Empty);
        assert!(head.lean() && head.replayable() && !head.close);
    }

    #[test]
    fn the_path_of_every_target_form() {
        let path = |t: &str| {
            req(format!("GET {t} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .expect("valid")
                .expect("whole")
                .0
                .path()
                .to_owned()
        };
        assert_eq!(path("/flows?x"), "/flows");
        assert_eq!(path("http://node-red:1880/flows"), "/flows");
        assert_eq!(path("HTTPS://h/a/b?c"), "/a/b");
        assert_eq!(path("http://h"), "/");
        assert_eq!(path("/a/http://b"), "/a/http://b");
        assert_eq!(path("*"), "*");
        assert!(req(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").is_err());
    }

    #[test]
    fn a_request_head_split_anywhere_reads_the_same() {
        let input = b"POST /in HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let whole = req(input).expect("valid").expect("whole");
        assert_eq!(whole.0.body, Framing::Length(3));
        assert!(!whole.0.replayable());
        for cut in 0..whole.0.len {
            assert_eq!(
                req(&input[..cut]).expect("valid prefix"),
                None,
                "cut at {cut}"
            );
        }
        for cut in whole.0.len..=input.len() {
            assert_eq!(req(&input[..cut]).expect("valid").as_ref(), Some(&whole));
        }
    }

    #[test]
    fn request_framing_and_connection_facts() {
        let facts = |s: &str| req(s.as_bytes()).expect("valid").expect("whole").0;
        let h = facts("GET / HTTP/1.0\r\n\r\n");
        assert!(h.close && !h.lean());
        assert!(!facts("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").close);
        assert!(facts("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").close);
        let h = facts("GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(h.upgrade && !h.lean());
        // Upgrade without Connection: upgrade is no upgrade (and is dropped)
        assert!(!facts("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(
            !facts("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").lean()
        );
        let h = facts("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(h.body == Framing::Chunked && !h.lean());
        assert_eq!(
            facts("POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").body,
            Framing::Length(7)
        );
        assert_eq!(
            facts("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").body,
            Framing::Empty
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(req(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            req(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Err(H1Error::TooManyHeaders)
        );
    }

    #[test]
    fn a_response_head_gets_flowgates_headers_and_keeps_its_framing() {
        let answer = Answer {
            replica: Some(("x-flowgate-replica", "2")),
            set_cookie: Some("flowgate_web=r2; Path=/"),
            close: false,
        };
        let (head, out) = resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: timeout=5\r\nX-Flowgate-Replica: 9\r\n\r\n5\r\nhello",
            "GET",
            &answer,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nx-flowgate-replica: 2\r\nset-cookie: flowgate_web=r2; Path=/\r\n\r\n"
        );
        assert_eq!(head.body, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(head.status, 200);
    }

    #[test]
    fn response_framing_follows_the_method_and_status() {
        let framing = |s: &str, m: &str| resp(s.as_bytes(), m, &PLAIN).0;
        let h = framing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD");
        assert_eq!((h.body, h.keep_alive), (Framing::Empty, true));
        for s in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let h = framing(
                &format!("HTTP/1.1 {s}\r\nContent-Length: 10\r\n\r\n"),
                "GET",
            );
            assert_eq!(h.body, Framing::Empty, "{s}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "GET").body,
            Framing::Length(10)
        );
        let h = framing(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            "GET",
        );
        assert!(!h.keep_alive);
        let h = framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET");
        assert!(!h.keep_alive, "HTTP/1.0 without keep-alive closes");
        // no length: read to close, and the client is told
        let (h, out) = resp(b"HTTP/1.1 200 OK\r\n\r\n", "GET", &PLAIN);
        assert_eq!((h.body, h.keep_alive), (Framing::Close, false));
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        // a 1xx gets none of flowgate's headers
        let answer = Answer {
            replica: Some(("x-flowgate-replica", "0")),
            set_cookie: Some("c=r0"),
            close: true,
        };
        let (_, out) = resp(b"HTTP/1.1 100 Continue\r\n\r\n", "POST", &answer);
        assert_eq!(out, "HTTP/1.1 100 Continue\r\n\r\n");
    }

    fn chunked_end(input: &[u8], step: usize) -> Result<Option<usize>, H1Error> {
        let mut c = Chunked::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut taken = 0;
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let n = c.feed(&pending)?;
            pending.drain(..n);
            taken += n;
            if c.is_done() {
                return Ok(Some(taken));
            }
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_it_ends_fed_in_any_pieces() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for step in 1..=input.len() {
            assert_eq!(
                chunked_end(&input, step),
                Ok(Some(body.len())),
                "step {step}"
            );
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(chunked_end(b"A\r\n0123456789\r\n", 3), Ok(None));
        for bad in [&b"x\r\n"[..], b"5\r\nhelloXX", b"5\r\nhello\rX"] {
            assert!(chunked_end(bad, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let mut out = BytesMut::new();
            let _ = parse_request(&bytes, &FWD, &mut out);
            let _ = parse_response(&bytes, "GET", &PLAIN, &mut out);
            let _ = Chunked::default().feed(&bytes);
        });
    }
}
