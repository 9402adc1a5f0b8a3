//! The public listener in front of a real Node-RED 4.1 replica whose admin
//! API is at `/` (Node-RED's default, the root of its `http in` routes too):
//! only what the flows publish passes; the editor's routes (the inject
//! button, `/comms`, its assets) do not, whatever the spelling of the path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Flows that publish a few routes, an inject node whose button counts in
/// global context (read back on `GET /count`), and a Dashboard 2.0 page.
fn flows(extra_route: bool) -> String {
    let route = |id: &str, method: &str, url: &str, payload: &str| {
        format!(
            r#"{{"id":"{id}","type":"http in","z":"t1","url":"{url}","method":"{method}","wires":[["{id}f"]]}},
{{"id":"{id}f","type":"function","z":"t1","func":"{payload}\nreturn msg;","outputs":1,"wires":[["{id}r"]]}},
{{"id":"{id}r","type":"http response","z":"t1","statusCode":"","headers":{{}},"wires":[]}}"#
        )
    };
    let mut nodes = vec![
        r#"{"id":"t1","type":"tab","label":"public"}"#.to_string(),
        route("h1", "get", "/hello", "msg.payload = 'hello';"),
        route("h2", "get", "/device/:id", "msg.payload = 'device ' + msg.req.params.id;"),
        route("h3", "post", "/hook", "msg.payload = 'hooked';"),
        route("h4", "put", "/item/:id", "msg.payload = 'put ' + msg.req.params.id;"),
        route("h5", "delete", "/item/:id", "msg.payload = 'deleted ' + msg.req.params.id;"),
        route("h6", "get", "/count", "msg.payload = String(global.get('injected') || 0);"),
        r#"{"id":"inj1","type":"inject","z":"t1","props":[],"repeat":"","once":false,"wires":[["injf"]]},
{"id":"injf","type":"function","z":"t1","func":"global.set('injected', (global.get('injected') || 0) + 1);\nreturn msg;","outputs":1,"wires":[[]]}"#
            .to_string(),
        r##"{"id":"ub1","type":"ui-base","name":"UI","path":"/dashboard","includeClientData":true,"acceptsClientConfig":["ui-notification","ui-control"],"showPathInSidebar":false,"navigationStyle":"default","titleBarStyle":"default"},
{"id":"uth","type":"ui-theme","name":"Default","colors":{"surface":"#ffffff","primary":"#0094CE","bgPage":"#eeeeee","groupBg":"#ffffff","groupOutline":"#cccccc"},"sizes":{"density":"default","pagePadding":"12px","groupGap":"12px","groupBorderRadius":"4px","widgetGap":"12px"}},
{"id":"up1","type":"ui-page","name":"Home","ui":"ub1","path":"/home","icon":"home","layout":"grid","theme":"uth","order":1,"className":"","visible":"true","disabled":"false"},
{"id":"ug1","type":"ui-group","name":"G","page":"up1","width":"6","height":"1","order":1,"showTitle":true,"className":"","visible":"true","disabled":"false","groupType":"default"},
{"id":"ux1","type":"ui-text","z":"t1","group":"ug1","order":1,"width":0,"height":0,"name":"","label":"value","format":"{{msg.payload}}","layout":"row-spread","style":false,"font":"","fontSize":16,"color":"#717171","className":"","wires":[]}"##
            .to_string(),
    ];
    if extra_route {
        nodes.push(route(
            "h7",
            "get",
            "/added/:n",
            "msg.payload = 'added ' + msg.req.params.n;",
        ));
    }
    format!("[{}]", nodes.join(",\n"))
}

/// Sends `head` as it is (no normalisation by a client library) and reads
/// the answer to its end: (status, body).
async fn raw(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

async fn call(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    raw(
        addr,
        &format!("{method} {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
    )
    .await
}

/// Deploys `flows` to the replica itself (its own port, as an editor on it
/// would), over the rev it runs.
async fn deploy_direct(r: &NodeRed, flows: &str) {
    let rev = rev_of(r).await;
    let body = format!("{{\"rev\":\"{rev}\",\"flows\":{flows}}}");
    let (status, text) = raw(
        r.addr(),
        &format!(
            "POST /flows HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             Node-RED-API-Version: v2\r\nNode-RED-Deployment-Type: full\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "deploy to the replica: {text}");
}

#[tokio::test]
async fn the_public_listener_serves_only_what_the_flows_publish() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rep = NodeRed::start_with(
        "pub1",
        "127.0.0.1:1".parse().expect("addr"),
        free_port(),
        &flows(false),
        true,
    )
    .await;
    init_logs();
    let rev_interval = Duration::from_millis(300);
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://127.0.0.1:1\"\nmode = \"share\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n[instance.http]\nlisten = \"127.0.0.1:0\"\n\
         replicas = [\"{}\"]\nhealth_interval = \"200ms\"\nrev_interval = \"300ms\"\n",
        rep.addr()
    );
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    public_routes_read(&app).await;
    let fg = app.http_addrs[0].1;

    // what the flows publish answers as before, each method on its route
    for (method, target, want) in [
        ("GET", "/hello", "hello"),
        ("HEAD", "/hello", ""),
        ("GET", "/Hello/", "hello"),
        ("GET", "/hello?x=1", "hello"),
        ("GET", "/device/d42", "device d42"),
        ("GET", "/device/a%20b", "device a b"),
        ("POST", "/hook", "hooked"),
        ("PUT", "/item/7", "put 7"),
        ("DELETE", "/item/7", "deleted 7"),
        ("GET", "http://x/hello", "hello"),
    ] {
        let (status, body) = call(fg, method, target).await;
        assert_eq!(status, 200, "{method} {target}: {body}");
        assert!(body.contains(want), "{method} {target}: {body}");
    }
    // a method the node does not name
    assert_eq!(call(fg, "POST", "/hello").await.0, 404);

    // the inject button: refused through flowgate, and the flow did not run
    assert_eq!(call(fg, "POST", "/inject/inj1").await.0, 404);
    assert_eq!(call(fg, "GET", "/count").await.1, "0");
    // (the same call on the replica itself does run it: the check can fail)
    assert_eq!(call(rep.addr(), "POST", "/inject/inj1").await.0, 200);
    eventually("the inject on the replica counted", || async {
        call(fg, "GET", "/count").await.1 == "1"
    })
    .await;

    // the editor's live channel is not upgraded
    let (status, _) = raw(
        fg,
        "GET /comms HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_ne!(status, 101, "/comms was upgraded");
    assert_eq!(status, 404);

    // the replica itself serves the editor's code on a published route's
    // path with encoded dot segments (its static handler resolves them)
    let (direct, body) = call(rep.addr(), "GET", "/device/..%2Fred%2Fmain.min.js").await;
    assert!(
        direct == 200 && !body.contains("device"),
        "the traversal no longer reaches the editor: {direct} {body:.200}"
    );

    // the admin surface and odd spellings of it: nothing answers 200
    for (method, target) in [
        ("GET", "/device/..%2Fred%2Fmain.min.js"),
        ("GET", "/device/%2E%2E%2Fdebug%2Fview%2Fview.html"),
        ("GET", "/"),
        ("GET", "/flows"),
        ("GET", "/settings"),
        ("GET", "/nodes"),
        ("GET", "/context/global"),
        ("GET", "/plugins"),
        ("GET", "/theme"),
        ("GET", "/locales/editor"),
        ("GET", "/red/main.min.js"),
        ("GET", "/debug/view/view.html"),
        ("POST", "/auth/login"),
        ("GET", "/auth/login"),
        ("GET", "/icons/node-red/inject.svg"),
        ("GET", "/FLOWS"),
        ("GET", "//flows"),
        ("GET", "/./flows"),
        ("GET", "/hello/../flows"),
        ("GET", "/hello/..%2fflows"),
        ("GET", "/device/..%2F..%2Fred%2Fmain.min.js"),
        ("GET", "/device/%2e%2e"),
        ("GET", "/dashboard/../red/main.min.js"),
        ("GET", "/dashboard/%2e%2e/debug/view/view.html"),
        ("GET", "/hello;"),
        ("GET", "/%66lows"),
        ("GET", "http://x/flows"),
        ("GET", "http://x/red/../flows"),
        ("POST", "/inject/inj1?x"),
    ] {
        let (status, body) = call(fg, method, target).await;
        assert!(
            status == 404 || status == 403,
            "{method} {target} answered {status}: {body:.200}"
        );
    }
    // Dashboard 2.0: its page and its socket.io
    let (status, body) = call(fg, "GET", "/dashboard/home").await;
    assert_eq!(status, 200, "dashboard page: {body:.300}");
    let (status, body) = call(fg, "GET", "/dashboard/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 200, "dashboard socket.io: {body:.300}");
    assert!(body.contains("\"sid\""), "socket.io handshake: {body:.300}");

    // refusals are counted
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert!(metric_sum(&m, "flowgate_http_denied_total", &[("instance", "line1")]) >= 30.0);

    // a deploy that adds a route opens it within a rev_interval (plus the
    // read itself); one that removes it closes it
    assert_eq!(call(fg, "GET", "/added/1").await.0, 404);
    deploy_direct(&rep, &flows(true)).await;
    let deployed = Instant::now();
    eventually("the added route opens", || async {
        call(fg, "GET", "/added/1").await == (200, "added 1".into())
    })
    .await;
    let opened = deployed.elapsed();
    eprintln!("route opened {opened:?} after the deploy answered");
    assert!(opened < rev_interval + Duration::from_secs(2), "{opened:?}");
    deploy_direct(&rep, &flows(false)).await;
    // a full deploy restarts every node: for a moment the replica itself
    // answers 404 for every route, so wait for flowgate's own 404 (its body)
    // and for the kept route to answer again
    eventually("the removed route closes at flowgate", || async {
        call(fg, "GET", "/added/1").await == (404, "not found\n".into())
    })
    .await;
    eventually("the kept route answers again", || async {
        call(fg, "GET", "/hello").await.0 == 200
    })
    .await;
    assert_eq!(
        call(fg, "GET", "/added/1").await,
        (404, "not found\n".into())
    );

    app.shutdown(Duration::from_secs(2)).await;
    drop(rep);
}
