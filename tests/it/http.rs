//! The HTTP balancer in front of real HTTP servers standing in for Node-RED
//! replicas, each capped at 10 requests/s like seed 002's bottleneck.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate::app::App;
use flowgate::config::Config;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::support::*;

/// A stand-in replica: `/api` answers its name, one request per 100 ms at
/// most; `/flows/state` answers 200; `/echo-len` answers the body's length;
/// a WebSocket handshake gets a real WebSocket echoing each message; any
/// other Upgrade request is answered 101 and echoed byte for byte.
pub(crate) struct Replica {
    pub(crate) addr: SocketAddr,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

async fn serve_replica(name: String, listener: TcpListener, tasks: Arc<Mutex<JoinSet<()>>>) {
    let next_slot = Arc::new(Mutex::new(Instant::now()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let name = name.clone();
        let next_slot = next_slot.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let name = name.clone();
            let next_slot = next_slot.clone();
            async move {
                let path = req.uri().path().to_owned();
                let body = match path.as_str() {
                    "/api" => {
                        let slot = {
                            let mut next = next_slot.lock().expect("slot lock");
                            let slot = (*next).max(Instant::now());
                            *next = slot + Duration::from_millis(100);
                            slot
                        };
                        tokio::time::sleep_until(slot.into()).await;
                        name.clone()
                    }
                    "/echo-len" => {
                        let mut n = 0usize;
                        let body = req.body_mut();
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame.map(|f| f.into_data().unwrap_or_default()) {
                                n += data.len();
                            }
                        }
                        n.to_string()
                    }
                    _ if req.headers().contains_key("sec-websocket-key") => {
                        return Ok(websocket_echo(&mut req));
                    }
                    _ if req.headers().contains_key(hyper::header::UPGRADE) => {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        r.headers_mut()
                            .insert("upgrade", "websocket".parse().expect("header"));
                        r.headers_mut()
                            .insert("connection", "upgrade".parse().expect("header"));
                        return Ok::<_, std::convert::Infallible>(r);
                    }
                    _ => name.clone(),
                };
                Ok(Response::new(Full::new(Bytes::from(body))))
            }
        });
        tasks.lock().expect("tasks lock").spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// An RFC 6455 server handshake, then every data message echoed (tungstenite
/// answers pings and the closing handshake itself).
fn websocket_echo(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role};
    let accept = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(up),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().expect("header"));
    h.insert("connection", "Upgrade".parse().expect("header"));
    h.insert("sec-websocket-accept", accept.parse().expect("header"));
    r
}

impl Replica {
    pub(crate) async fn start(name: &str, port: u16) -> Self {
        Self::start_at(name, [127, 0, 0, 1], port).await
    }

    /// On one loopback address of 127.0.0.0/8 (a host of its own).
    pub(crate) async fn start_at(name: &str, ip: [u8; 4], port: u16) -> Self {
        let listener = TcpListener::bind((std::net::Ipv4Addr::from(ip), port))
            .await
            .expect("replica binds");
        let addr = listener.local_addr().expect("addr");
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let t = tasks.clone();
        let name = name.to_owned();
        tasks
            .lock()
            .expect("tasks lock")
            .spawn(serve_replica(name, listener, t));
        Self { addr, tasks }
    }

    /// Stops abruptly: listener and every connection gone at once.
    pub(crate) fn kill(&self) {
        self.tasks.lock().expect("tasks lock").abort_all();
    }
}

pub(crate) async fn balancer(replicas: &[&Replica], extra: &str) -> (App, SocketAddr) {
    init_logs();
    let list: Vec<String> = replicas.iter().map(|r| format!("\"{}\"", r.addr)).collect();
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"web\"\n\
         match = {{ client_id = \"web\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [{}]\n\
         health_interval = \"100ms\"\npublic_paths = [\"/\"]\n{extra}\n",
        list.join(", ")
    );
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("starts");
    let addr = app.http_addrs[0].1;
    (app, addr)
}

/// One request on a fresh connection: (status, replica header, set-cookie, body).
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, String, String, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.local");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (replica, cookie) = (h("x-flowgate-replica"), h("set-cookie"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, replica, cookie, body))
}

/// Waits until `flowgate_http_replica_up` of replica `replica` of `web` is `up`.
pub(crate) async fn replica_up(app: &App, replica: &str, up: bool) {
    let what = format!("replica {replica} up = {up}");
    eventually(&what, || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        let labels = [("instance", "web"), ("replica", replica)];
        metric_sum(&m, "flowgate_http_replica_up", &labels) == f64::from(u8::from(up))
    })
    .await;
}

/// Closed-loop load on `/api` for `secs`: every response's (status, replica).
pub(crate) async fn load(
    addr: SocketAddr,
    workers: usize,
    secs: f64,
) -> Vec<Result<(u16, String), String>> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for _ in 0..workers {
        set.spawn(async move {
            let mut got = Vec::new();
            while Instant::now() < deadline {
                let r = request(addr, "GET", "/api", &[], Bytes::new()).await;
                if Instant::now() <= deadline {
                    got.push(r.map(|(s, rep, _, _)| (s, rep)));
                }
            }
            got
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("worker"));
    }
    all
}

#[tokio::test]
async fn one_two_and_four_capped_replicas_give_n_times_the_throughput() {
    for n in [1usize, 2, 4] {
        let mut reps = Vec::new();
        for i in 0..n {
            reps.push(Replica::start(&format!("r{i}"), 0).await);
        }
        let refs: Vec<&Replica> = reps.iter().collect();
        let (app, addr) = balancer(&refs, "").await;
        let secs = 3.0;
        let results = load(addr, 6 * n, secs).await;
        let ok = results.iter().filter(|r| matches!(r, Ok((200, _)))).count();
        assert_eq!(
            ok,
            results.len(),
            "{n} replicas: failed requests {:?}",
            results
                .iter()
                .filter(|r| !matches!(r, Ok((200, _))))
                .take(3)
                .collect::<Vec<_>>()
        );
        let rate = ok as f64 / secs;
        assert!(
            rate >= 0.95 * 10.0 * n as f64,
            "{n} replicas: {rate:.1} req/s"
        );
        for i in 0..n {
            let share = results
                .iter()
                .filter(|r| matches!(r, Ok((_, rep)) if *rep == i.to_string()))
                .count();
            assert!(
                share as f64 >= 0.8 * ok as f64 / n as f64,
                "{n} replicas: replica {i} served {share} of {ok}"
            );
        }
        app.shutdown(Duration::from_secs(5)).await;
        for r in &reps {
            r.kill();
        }
    }
}

#[tokio::test]
async fn a_replica_killed_under_load_fails_no_request_and_comes_back_after_rise() {
    let reps = [
        Replica::start("r0", 0).await,
        Replica::start("r1", 0).await,
        Replica::start("r2", 0).await,
    ];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let killed_port = reps[0].addr.port();
    let loader = tokio::spawn(load(addr, 12, 2.5));
    tokio::time::sleep(Duration::from_millis(700)).await;
    reps[0].kill();
    let results = loader.await.expect("load task");
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok((200, _))))
        .collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_http_replica_up",
            &[("instance", "web"), ("replica", "0")]
        ),
        0.0
    );
    // back on the same port: traffic again after two good probes
    let _back = Replica::start("r0", killed_port).await;
    replica_up(&app, "0", true).await;
    let results = load(addr, 12, 1.0).await;
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Ok((200, rep)) if rep == "0")),
        "replica 0 got no traffic after coming back"
    );
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sticky_cookie_keeps_a_long_poll_session_on_one_replica() {
    let reps = [Replica::start("r0", 0).await, Replica::start("r1", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let (status, replica, cookie, _) = request(
        addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        Bytes::new(),
    )
    .await
    .expect("first poll");
    assert_eq!(status, 200);
    assert!(
        cookie.starts_with(&format!("flowgate_web=r{replica}")),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("cookie pair").to_owned();
    for _ in 0..20 {
        let (_, r, _, _) = request(
            addr,
            "GET",
            "/socket.io/?EIO=4&transport=polling",
            &[("cookie", &pair)],
            Bytes::new(),
        )
        .await
        .expect("poll");
        assert_eq!(r, replica, "the session moved");
    }
    // a path outside the sticky list gets no cookie
    let (_, _, cookie, _) = request(addr, "GET", "/api", &[], Bytes::new())
        .await
        .expect("api");
    assert!(cookie.is_empty());
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_upgraded_connection_is_spliced_both_ways() {
    let reps = [Replica::start("r0", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(!head.contains("set-cookie"), "no cookie on a 101");
    for msg in [&b"hello"[..], b"over the splice", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
            .await
            .expect("echo")
            .expect("read");
        assert_eq!(back, msg);
    }
    app.shutdown(Duration::from_secs(5)).await;
}

/// Until the WebSocket is closed (a close frame, an error or its end).
async fn ends<S>(ws: &mut S)
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_websocket_echoes_through_the_balancer_and_closes_when_its_replica_goes_down() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let reps = [Replica::start("r0", 0).await, Replica::start("r1", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "").await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut ws, resp) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async("ws://web.local/ui/ws", tcp),
    )
    .await
    .expect("handshake in time")
    .expect("RFC 6455 handshake through the balancer");
    assert_eq!(resp.status().as_u16(), 101);
    let served_by: usize = resp
        .headers()
        .get("x-flowgate-replica")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("the 101 names its replica");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sent = [
        Message::text("hello"),
        Message::binary(big),
        Message::text("é, ü and 水"),
    ];
    for msg in sent {
        ws.send(msg.clone()).await.expect("send");
        let back = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("a frame");
        assert_eq!(back, msg);
    }
    ws.send(Message::Ping(Bytes::from_static(b"p1")))
        .await
        .expect("ping");
    match tokio::time::timeout(DEADLINE, ws.next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"p1"),
        other => panic!("expected the pong, got {other:?}"),
    }
    // its replica dies: flowgate closes the spliced connection once the probe
    // marks it down, though the replica's own socket would linger
    reps[served_by].kill();
    let closed = tokio::time::timeout(DEADLINE, ends(&mut ws)).await;
    assert!(
        closed.is_ok(),
        "the WebSocket stayed open after its replica went down"
    );
    // a new one goes to the survivor
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://web.local/ui/ws", tcp)
        .await
        .expect("handshake to the survivor");
    assert_eq!(
        resp.headers()
            .get("x-flowgate-replica")
            .and_then(|v| v.to_str().ok()),
        Some((1 - served_by).to_string().as_str())
    );
    ws.send(Message::text("still here")).await.expect("send");
    let back = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("a frame");
    assert_eq!(back, Message::text("still here"));
    // flowgate shuts down with it open: the spliced connection closes, and
    // no task is left to wait the grace period out
    let shutting = std::time::Instant::now();
    assert!(
        app.shutdown(Duration::from_secs(5)).await,
        "tasks still running after the grace period"
    );
    assert!(shutting.elapsed() < Duration::from_secs(3));
    let closed = tokio::time::timeout(DEADLINE, ends(&mut ws)).await;
    assert!(closed.is_ok(), "the WebSocket stayed open after shutdown");
}

#[tokio::test]
async fn bodies_stream_and_policies_answer_as_documented() {
    let reps = [Replica::start("r0", 0).await, Replica::start("r1", 0).await];
    let (app, addr) = balancer(&reps.iter().collect::<Vec<_>>(), "max_body = \"16MiB\"").await;
    let big = Bytes::from(vec![7u8; 8 << 20]);
    let (status, _, _, body) = request(addr, "POST", "/echo-len", &[], big)
        .await
        .expect("post");
    assert_eq!(
        (status, body),
        (200, Bytes::from((8usize << 20).to_string()))
    );
    let too_big = Bytes::from(vec![0u8; 17 << 20]);
    assert_eq!(
        request(addr, "POST", "/echo-len", &[], too_big)
            .await
            .expect("post")
            .0,
        413
    );
    for blocked in [
        "/flows",
        "/flows/state",
        "/nodes",
        "/settings",
        "/",
        // Express routes ignore case; an absolute-form target has the same path
        "/FLOWS",
        "/Settings/x",
        "http://web.local/flows",
    ] {
        assert_eq!(
            request(addr, "GET", blocked, &[], Bytes::new())
                .await
                .expect("get")
                .0,
            403,
            "{blocked}"
        );
    }
    // drain replica 0 through the admin API: everything goes to replica 1
    let mut s = TcpStream::connect(app.admin_addr).await.expect("admin");
    s.write_all(b"POST /api/instances/web/replicas/0/drain HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read");
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    for _ in 0..10 {
        let (_, r, _, _) = request(addr, "GET", "/other", &[], Bytes::new())
            .await
            .expect("get");
        assert_eq!(r, "1");
    }
    app.shutdown(Duration::from_secs(5)).await;
}

/// A replica that is no Node-RED (its `/flows` is no flows document): the
/// public listener cannot learn what is published and lets through only
/// `public_paths`, saying so in `/api/instances` and the metric; with
/// `block_admin = false` everything passes.
#[tokio::test]
async fn without_readable_flows_only_public_paths_pass() {
    init_logs();
    let r0 = Replica::start("r0", 0).await;
    let config = |extra: &str| {
        format!(
            "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"web\"\n\
             match = {{ client_id = \"web\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
             replicas = [\"{}\"]\nhealth_interval = \"100ms\"\nrev_interval = \"100ms\"\n{extra}\n",
            r0.addr
        )
    };
    let app = App::start(
        Config::parse(&config("public_paths = [\"/static\"]"), "test").expect("valid config"),
    )
    .await
    .expect("starts");
    let addr = app.http_addrs[0].1;
    // a few reads of the flows have failed by then
    eventually("the admin API shows the routes not read", || async {
        let (_, body) = http_get(app.admin_addr, "/api/instances").await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        doc["instances"][0]["public"]["read"] == false
            && doc["instances"][0]["public"]["routes"][0] == "* /static"
    })
    .await;
    for (path, want) in [
        ("/static/app.js", 200),
        ("/STATIC", 200),
        ("/api", 404),
        ("/staticx", 404),
    ] {
        let got = request(addr, "GET", path, &[], Bytes::new())
            .await
            .expect("get")
            .0;
        assert_eq!(got, want, "{path}");
    }
    assert_eq!(
        request(addr, "GET", "/flows", &[], Bytes::new())
            .await
            .expect("get")
            .0,
        403
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(&m, "flowgate_http_denied_total", &[("instance", "web")]),
        3.0
    );
    app.shutdown(Duration::from_secs(2)).await;

    // block_admin = false: the old pass-through, admin paths included
    let app =
        App::start(Config::parse(&config("block_admin = false"), "test").expect("valid config"))
            .await
            .expect("starts");
    let addr = app.http_addrs[0].1;
    for path in ["/api", "/flows", "/anything"] {
        let got = request(addr, "GET", path, &[], Bytes::new())
            .await
            .expect("get")
            .0;
        assert_eq!(got, 200, "{path}");
    }
    let (_, body) = http_get(app.admin_addr, "/api/instances").await;
    assert!(!body.contains("\"public\""), "{body}");
    app.shutdown(Duration::from_secs(2)).await;
}

/// The replica each of `keys` goes to, `how` putting the key in a request
/// (path, headers); every request must succeed.
async fn replica_of_keys(
    addr: SocketAddr,
    keys: &[String],
    how: impl Fn(&str) -> (String, Vec<(String, String)>),
) -> Vec<String> {
    let mut out = Vec::new();
    for k in keys {
        let (path, headers) = how(k);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let r = request(addr, "GET", &path, &headers, Bytes::new()).await;
        match r {
            Ok((200, replica, _, _)) => out.push(replica),
            other => panic!("{k}: {other:?}"),
        }
    }
    out
}

/// One HTTP/1.0 request on a raw connection (the hyper path): its
/// `x-flowgate-replica`.
async fn replica_over_http10(addr: SocketAddr, head: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connects");
    s.write_all(head.as_bytes()).await.expect("writes");
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .expect("answered")
        .expect("reads");
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 200") || text.starts_with("http/1.0 200"),
        "{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("x-flowgate-replica: "))
        .unwrap_or_else(|| panic!("no replica header: {text}"))
        .trim()
        .to_owned()
}

/// Issue 16: `balance = "key-hash"`: every key on one replica, a fair share
/// each; a replica killed moves only its own keys (no request fails); back,
/// it takes back only its own. The same key through a header, a path level
/// and a query parameter, over either HTTP path, lands on the same replica.
#[tokio::test]
async fn key_hash_keeps_each_key_on_one_replica_and_moves_only_a_leavers_keys() {
    let reps = [
        Replica::start("r0", 0).await,
        Replica::start("r1", 0).await,
        Replica::start("r2", 0).await,
    ];
    let refs: Vec<&Replica> = reps.iter().collect();
    let (app, addr) = balancer(&refs, "balance = \"key-hash\"\nkey = \"header:x-device\"").await;
    let keys: Vec<String> = (0..300).map(|k| format!("device-{k}")).collect();
    let by_header = |k: &str| {
        (
            "/devices/state".to_string(),
            vec![("x-device".to_string(), k.to_string())],
        )
    };
    let first = replica_of_keys(addr, &keys, by_header).await;
    assert_eq!(
        replica_of_keys(addr, &keys, by_header).await,
        first,
        "a key moved"
    );
    for r in ["0", "1", "2"] {
        let share = first.iter().filter(|x| *x == r).count();
        assert!(
            (60..=141).contains(&share),
            "replica {r}: {share} of 300 keys"
        );
    }
    // the hyper path (HTTP/1.0) agrees with the lean one
    for k in keys.iter().take(20) {
        let head =
            format!("GET /devices/state HTTP/1.0\r\nHost: web.local\r\nX-Device: {k}\r\n\r\n");
        let i = keys.iter().position(|x| x == k).expect("key");
        assert_eq!(
            replica_over_http10(addr, &head).await,
            first[i],
            "{k} over HTTP/1.0"
        );
    }
    // a request without the key goes by least-inflight, counted
    let r = request(addr, "GET", "/devices/state", &[], Bytes::new()).await;
    assert!(matches!(r, Ok((200, _, _, _))), "{r:?}");
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    let keyless = [("instance", "web")];
    assert_eq!(
        metric_sum(&m, "flowgate_http_keyless_requests_total", &keyless),
        1.0
    );
    // a key header near the head limit is a key like any other; over it, 431
    for (kib, want) in [(60usize, 200u16), (70, 431)] {
        let key = "k".repeat(kib << 10);
        let headers = [("x-device", key.as_str())];
        let r = request(addr, "GET", "/devices/state", &headers, Bytes::new()).await;
        assert!(
            matches!(r, Ok((s, _, _, _)) if s == want),
            "{kib} KiB key: {r:?}"
        );
    }

    // replica 0 dies: at once (before its probes fail) and after, no request
    // fails; only its keys move, and they spread over both others
    let killed_port = reps[0].addr.port();
    reps[0].kill();
    let during = replica_of_keys(addr, &keys, by_header).await;
    assert!(!during.contains(&"0".to_string()));
    replica_up(&app, "0", false).await;
    let after = replica_of_keys(addr, &keys, by_header).await;
    for (i, k) in keys.iter().enumerate() {
        if first[i] != "0" {
            assert_eq!(after[i], first[i], "{k} moved though its replica stayed");
        }
    }
    for r in ["1", "2"] {
        let took = (0..300)
            .filter(|&i| first[i] == "0" && after[i] == r)
            .count();
        assert!(took > 0, "replica {r} took none of replica 0's keys");
    }
    assert_eq!(
        replica_of_keys(addr, &keys, by_header).await,
        after,
        "a key moved twice"
    );

    // back on its port: it takes back its own keys, and only those
    let _back = Replica::start("r0", killed_port).await;
    replica_up(&app, "0", true).await;
    assert_eq!(replica_of_keys(addr, &keys, by_header).await, first);
    app.shutdown(Duration::from_secs(5)).await;

    // the key in a path level or a query parameter: the same replica per key
    for (key, how) in [
        (
            "path:1",
            Box::new(|k: &str| (format!("/devices/{k}/state"), vec![])) as Box<dyn Fn(&str) -> _>,
        ),
        (
            "query:id",
            Box::new(|k: &str| (format!("/devices/state?x=1&id={k}"), vec![])),
        ),
    ] {
        let (app, addr) = balancer(
            &refs[1..],
            &format!("balance = \"key-hash\"\nkey = \"{key}\""),
        )
        .await;
        let (app0, addr0) = balancer(
            &refs[1..],
            "balance = \"key-hash\"\nkey = \"header:x-device\"",
        )
        .await;
        let via_key = replica_of_keys(addr, &keys[..100], &how).await;
        let via_header = replica_of_keys(addr0, &keys[..100], by_header).await;
        assert_eq!(via_key, via_header, "{key}");
        app.shutdown(Duration::from_secs(2)).await;
        app0.shutdown(Duration::from_secs(2)).await;
    }
}
