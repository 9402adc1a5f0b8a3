//! The HTTP balancer byte by byte: raw clients and a scripted replica that
//! answers exactly the bytes a test gives it, to check keep-alive, pipelining,
//! every response framing, the headers flowgate adds and drops, stale pooled
//! connections, and the hand-over to the full HTTP stack mid-connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::http::{balancer, request, Replica};
use crate::support::*;

/// What the scripted replica answers to one request head and body: the
/// response bytes, and whether it then closes the connection.
type Script = dyn Fn(&str, &[u8]) -> (Vec<u8>, bool) + Send + Sync;

/// A replica speaking raw HTTP/1.1 from a script; it records every request
/// head it receives and counts the connections that carried requests
/// (health probes aside).
struct Wire {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    conns: Arc<AtomicUsize>,
    /// Connections it closed after an answer.
    closed: Arc<AtomicUsize>,
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn wire_replica(script: Arc<Script>) -> Wire {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (h, c, d) = (heads.clone(), conns.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (h, c, d, script) = (h.clone(), c.clone(), d.clone(), script.clone());
            tokio::spawn(async move {
                let mut counted = false;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                    let len = content_length(&head);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                    // flowgate's own traffic: the health probe and the flows watch
                    if head.starts_with("GET /flows/state") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        continue;
                    }
                    if head.starts_with("GET /flows ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        continue;
                    }
                    if !counted {
                        counted = true;
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    h.lock().expect("heads").push(head.clone());
                    let (answer, close) = script(&head, &body);
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                    if close {
                        // a moment later, reading nothing more (as a server
                        // whose keep-alive timer ran out between requests)
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        drop(s);
                        d.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    Wire {
        addr,
        heads,
        conns,
        closed,
    }
}

fn wire_balancer_config(addr: SocketAddr, extra: &str) -> String {
    format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"web\"\n\
         match = {{ client_id = \"web\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [\"{addr}\"]\nhealth_interval = \"100ms\"\npublic_paths = [\"/\"]\n{extra}\n"
    )
}

async fn wire_balancer(w: &Wire, extra: &str) -> (flowgate::app::App, SocketAddr) {
    init_logs();
    let cfg = flowgate::config::Config::parse(&wire_balancer_config(w.addr, extra), "test")
        .expect("valid config");
    let app = flowgate::app::App::start(cfg).await.expect("starts");
    let addr = app.http_addrs[0].1;
    (app, addr)
}

/// Reads more of a response into `buf`: how many bytes came (0: closed).
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
        .await
        .expect("response within the deadline")
        .unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// Reads one response from `s` (`buf` keeps what follows it): its head, and
/// its body by content-length, chunked framing or close.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> (String, Vec<u8>) {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        assert!(
            fill(s, buf).await > 0,
            "connection closed before a response head"
        );
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    if head_only {
        return (head, Vec::new());
    }
    let lower = head.to_ascii_lowercase();
    if lower.contains("transfer-encoding: chunked") {
        // the raw chunked bytes, up to and with the last chunk and trailers
        loop {
            let last = buf
                .windows(5)
                .position(|w| w == b"\r\n0\r\n")
                .map(|p| p + 2);
            let last = last.or_else(|| buf.starts_with(b"0\r\n").then_some(0));
            if let Some(end) = last.and_then(|l| {
                buf[l + 1..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| l + 1 + p + 4)
            }) {
                let body: Vec<u8> = buf.drain(..end).collect();
                return (head, body);
            }
            assert!(
                fill(s, buf).await > 0,
                "closed mid-chunked body: {:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }
    if lower.contains("content-length:") {
        let len = content_length(&head);
        while buf.len() < len {
            assert!(fill(s, buf).await > 0, "closed mid-body");
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        return (head, body);
    }
    while fill(s, buf).await > 0 {}
    (head, std::mem::take(buf))
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_reuse_replica_connections() {
    let w = wire_replica(Arc::new(|head: &str, _: &[u8]| {
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        (ok(&path), false)
    }))
    .await;
    let (app, addr) = wire_balancer(&w, "").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    for i in 0..100 {
        s.write_all(format!("GET /n/{i} HTTP/1.1\r\nHost: web.local\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, format!("/n/{i}").as_bytes());
    }
    // three requests in one write: three answers, in order
    s.write_all(
        b"GET /p/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: a\r\n\r\nGET /p/3 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .expect("write");
    for i in 1..=3 {
        let (_, body) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(body, format!("/p/{i}").as_bytes());
    }
    assert!(
        w.conns.load(Ordering::SeqCst) <= 3,
        "103 sequential requests took {} replica connections",
        w.conns.load(Ordering::SeqCst)
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn every_response_framing_passes_byte_for_byte() {
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n";
    let w = wire_replica(Arc::new(move |head: &str, _: &[u8]| {
        match head.split(' ').nth(1).unwrap_or("") {
            "/chunked" => (chunked.to_vec(), false),
            "/head" => (b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec(), false),
            "/none" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
            "/early" => (
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec(),
                false,
            ),
            // no length: the body ends when the replica closes
            "/close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true),
            _ => (ok("plain"), false),
        }
    }))
    .await;
    let (app, addr) = wire_balancer(&w, "").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();

    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{head}");
    assert!(lower.contains("trailer: x-sum"), "{head}");
    assert_eq!(
        body,
        &b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"[..]
    );

    // HEAD: a length and no body; the connection carries on
    s.write_all(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 1000"),
        "{head}"
    );
    s.write_all(b"GET /none HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    assert!(buf.is_empty(), "bytes after a HEAD or 204 answer: {buf:?}");

    // a 1xx goes on to the client before the final answer
    s.write_all(b"GET /early HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 103"), "{head}");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");

    // a body delimited by close: the client is told, then the connection ends
    s.write_all(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, b"until the end");
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn forwarded_headers_are_added_and_hop_by_hop_headers_dropped() {
    let w = wire_replica(Arc::new(|_: &str, _: &[u8]| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nx-flowgate-replica: spoofed\r\n\r\nok"
                .to_vec(),
            false,
        )
    }))
    .await;
    let (app, addr) = wire_balancer(&w, "").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /in?q=1 HTTP/1.1\r\nHost: web.local:8080\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: gopher\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(body, b"ok");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-flowgate-replica: 0\r\n"), "{head}");
    assert!(!lower.contains("spoofed"), "{head}");
    assert!(
        !lower.contains("x-secret") && !lower.contains("keep-alive"),
        "{head}"
    );

    let seen = w
        .heads
        .lock()
        .expect("heads")
        .last()
        .cloned()
        .expect("a request");
    let seen_lower = seen.to_ascii_lowercase();
    assert!(seen.starts_with("POST /in?q=1 HTTP/1.1\r\n"), "{seen}");
    assert!(seen_lower.contains("host: web.local:8080\r\n"), "{seen}");
    assert!(
        seen_lower.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert!(seen_lower.contains("x-forwarded-proto: http\r\n"), "{seen}");
    assert!(!seen_lower.contains("gopher"), "{seen}");
    assert!(
        seen_lower.contains("x-forwarded-host: web.local:8080\r\n"),
        "{seen}"
    );
    assert!(seen_lower.contains("content-length: 5\r\n"), "{seen}");
    for hop in ["connection:", "x-hop:", "keep-alive:", "te:"] {
        assert!(!seen_lower.contains(hop), "{hop} forwarded: {seen}");
    }
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_pooled_connection_the_replica_closed_is_not_a_failed_request() {
    // the replica closes each connection 50 ms after an answer, reading
    // nothing more. A GET sent at once goes on the pooled connection, is met
    // by the close, and is sent again on a fresh one. A POST is never sent
    // twice: it is sent once the close has happened, and flowgate must see
    // that the pooled connection is closed before it uses it.
    let w = wire_replica(Arc::new(|head: &str, _: &[u8]| {
        if head.starts_with("POST") {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nfresh".to_vec(),
                true,
            )
        } else {
            (ok("fresh"), true)
        }
    }))
    .await;
    let (app, addr) = wire_balancer(&w, "").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    for i in 0..20 {
        let req = if i % 4 == 3 {
            let answered = w.conns.load(Ordering::SeqCst);
            eventually("the replica closed its connections", || async {
                w.closed.load(Ordering::SeqCst) == answered
            })
            .await;
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\ndata"
        } else {
            "GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
        };
        s.write_all(req.as_bytes()).await.expect("write");
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert_eq!(body, b"fresh");
    }
    // each request was answered once, each on a connection of its own
    assert_eq!(w.heads.lock().expect("heads").len(), 20);
    assert_eq!(w.conns.load(Ordering::SeqCst), 20);
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_silent_replica_answers_504_after_timeout_and_bad_requests_400() {
    let w = wire_replica(Arc::new(|head: &str, _: &[u8]| {
        if head.contains("/slow") {
            // never answers
            (Vec::new(), false)
        } else {
            (ok("fast"), false)
        }
    }))
    .await;
    let (app, addr) = wire_balancer(&w, "timeout = \"300ms\"").await;
    let started = Instant::now();
    let (status, _, _, _) = request(addr, "GET", "/slow", &[], Bytes::new())
        .await
        .expect("request");
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(250));
    // a request with two framings is refused, never forwarded
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        !w.heads
            .lock()
            .expect("heads")
            .iter()
            .any(|h| h.starts_with("POST")),
        "the ambiguous request reached the replica"
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(&m, "flowgate_http_errors_total", &[("kind", "bad_request")]),
        1.0
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_connection_moves_to_the_full_stack_for_upgrades_http10_and_chunked_bodies() {
    let reps = [Replica::start("r0", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let mut buf = Vec::new();

    // a chunked request body after a plain request on the same connection
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (_, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(body, b"r0");
    s.write_all(
        b"POST /echo-len HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = if head.to_ascii_lowercase().contains("chunked") {
        // "1\r\n7\r\n0\r\n\r\n" from hyper: the digits of the length
        String::from_utf8_lossy(&body)
            .lines()
            .nth(1)
            .unwrap_or("")
            .to_owned()
            .into_bytes()
    } else {
        body
    };
    assert_eq!(body, b"7");

    // then an upgrade on that same connection
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&back, b"ping");

    // HTTP/1.0 on a fresh connection
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /other HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut all))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.0 200") && text.ends_with("r0"),
        "{text}"
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_closes_idle_connections() {
    // one replica taking a request every 100 ms: six queued requests take
    // about 600 ms, so most are in flight when shutdown starts
    let reps = [Replica::start("r0", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    idle.write_all(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (_, body) = read_response(&mut idle, &mut buf, false).await;
    assert_eq!(body, b"r0");
    let inflight: Vec<_> = (0..6)
        .map(|_| tokio::spawn(request(addr, "GET", "/api", &[], Bytes::new())))
        .collect();
    let admin = app.admin_addr;
    eventually("requests in flight", || async {
        let (_, m) = http_get(admin, "/metrics").await;
        metric_sum(
            &m,
            "flowgate_http_inflight_requests",
            &[("instance", "web")],
        ) >= 4.0
    })
    .await;
    let started = Instant::now();
    let stopping = tokio::spawn(app.shutdown(Duration::from_secs(10)));
    // the idle keep-alive connection is closed at once
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, idle.read(&mut rest))
        .await
        .expect("idle connection closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "an idle connection got bytes at shutdown");
    for r in inflight {
        let (status, replica, _, body) = r
            .await
            .expect("task")
            .expect("an in-flight request finished");
        assert_eq!(
            (status, replica.as_str(), &body[..]),
            (200, "0", &b"r0"[..])
        );
    }
    assert!(
        stopping.await.expect("shutdown task"),
        "shutdown did not finish in its grace"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_client_silent_mid_body_is_closed_after_timeout() {
    let w = wire_replica(Arc::new(|_: &str, _: &[u8]| (ok("never"), false))).await;
    let (app, addr) = wire_balancer(&w, "timeout = \"300ms\"").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await
        .expect("write");
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("closed within the deadline")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(
        w.heads.lock().expect("heads").is_empty(),
        "a partial request was answered"
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_http_errors_total",
            &[("kind", "body_timeout")]
        ),
        1.0
    );
    app.shutdown(Duration::from_secs(2)).await;
}
