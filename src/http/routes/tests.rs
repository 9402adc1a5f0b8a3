//! Route matching as Express 4 matches (each case checked against
//! path-to-regexp 0.1.13, the version Node-RED 4.1 runs), and the flows
//! read as Node-RED reads them.

use serde_json::json;

use super::*;

fn http_in(id: &str, method: &str, url: &str) -> Value {
    json!({"id": id, "type": "http in", "z": "tab1", "url": url, "method": method})
}

fn routes(nodes: Vec<Value>) -> PublicRoutes {
    let (r, skipped) = PublicRoutes::from_flows(&Value::Array(nodes), "/", &[]);
    assert!(skipped.is_empty(), "{skipped:?}");
    r
}

fn check(pattern: &str, cases: &[(&str, bool)]) {
    let r = routes(vec![http_in("n1", "get", pattern)]);
    for (path, want) in cases {
        assert_eq!(r.allows("GET", path), *want, "{pattern} vs {path}");
    }
}

#[test]
fn a_fixed_path_matches_as_express_does() {
    check(
        "/hello",
        &[
            ("/hello", true),
            ("/hello/", true),
            ("/HELLO", true),
            ("/hello/x", false),
            ("/hellox", false),
            ("/hell%6F", false),
            ("/hello;", false),
            ("//hello", false),
            ("/hello//", false),
        ],
    );
}

#[test]
fn parameters_take_one_raw_segment() {
    check(
        "/user/:id",
        &[
            ("/user/42", true),
            ("/user/42/", true),
            ("/user", false),
            ("/user/", false),
            ("/user/42/x", false),
            ("/USER/a%2Fb", true),
        ],
    );
    check(
        "/user/:id?",
        &[("/user", true), ("/user/5", true), ("/user/5/6", false)],
    );
    check(
        "/file.:ext",
        &[("/file.txt", true), ("/fileXtxt", false), ("/file.", false)],
    );
    check(
        "/:a-:b",
        &[("/x-y", true), ("/x-y-z", true), ("/xy", false)],
    );
    check(
        "/api/v1/:dev/data",
        &[("/api/v1/d1/data", true), ("/api/v1//data", false)],
    );
    check("/n/:id(\\d+)", &[("/n/12", true), ("/n/ab", false)]);
}

#[test]
fn wildcards_take_the_rest() {
    check(
        "/files/*",
        &[
            ("/files/a/b", true),
            ("/files/", true),
            ("/files", false),
            ("/filesx", false),
        ],
    );
    check("/a/:b*", &[("/a/x", true), ("/a/x/y/z", true)]);
}

#[test]
fn dot_segments_never_pass_even_under_a_published_route() {
    let r = routes(vec![
        http_in("n1", "get", "/hello/:name"),
        http_in("n2", "get", "/files/*"),
    ]);
    assert!(r.allows("GET", "/hello/world"));
    for p in [
        "/hello/..",
        "/hello/.",
        "/hello/%2e%2e",
        "/hello/%2E%2e%2Fred%2Fmain.min.js",
        "/hello/..%2Fred%2Fmain.min.js",
        "/files/a/../../red/main.min.js",
        "/files/%2e%2e/%2e%2e/flows",
        "/files/a/%00",
        "/files/..\\red",
    ] {
        assert!(!r.allows("GET", p), "{p}");
    }
    // a dot inside a segment is no dot segment
    assert!(r.allows("GET", "/files/a.b/..c"));
}

#[test]
fn methods_are_those_the_node_names() {
    let r = routes(vec![
        http_in("n1", "get", "/g"),
        http_in("n2", "post", "/p"),
        http_in("n3", "put", "/u"),
        http_in("n4", "delete", "/d"),
        http_in("n5", "patch", "/a"),
    ]);
    assert!(r.allows("GET", "/g") && r.allows("HEAD", "/g") && r.allows("OPTIONS", "/g"));
    assert!(!r.allows("POST", "/g"));
    assert!(r.allows("POST", "/p") && !r.allows("GET", "/p") && !r.allows("HEAD", "/p"));
    assert!(r.allows("PUT", "/u") && !r.allows("DELETE", "/u"));
    assert!(r.allows("DELETE", "/d") && r.allows("PATCH", "/a"));
    assert!(!r.allows("PROPFIND", "/g"));
    assert!(!r.allows("GET", "*") && !r.allows("OPTIONS", "*"));
}

#[test]
fn nothing_else_passes_an_admin_root_at_slash() {
    let r = routes(vec![
        http_in("n1", "get", "/hello"),
        http_in("n2", "post", "hook"),
    ]);
    assert!(r.allows("POST", "/hook"));
    for (m, p) in [
        ("POST", "/inject/abc"),
        ("GET", "/comms"),
        ("GET", "/"),
        ("GET", "/flows"),
        ("GET", "/settings"),
        ("GET", "/plugins"),
        ("GET", "/theme"),
        ("GET", "/locales/editor"),
        ("GET", "/red/main.min.js"),
        ("GET", "/debug/view/view.html"),
        ("GET", "/icons/node-red/inject.svg"),
        ("POST", "/auth/token"),
        ("GET", "/context/global"),
    ] {
        assert!(!r.allows(m, p), "{m} {p}");
    }
}

#[test]
fn disabled_nodes_and_flows_publish_nothing() {
    let nodes = vec![
        json!({"id": "t2", "type": "tab", "disabled": true}),
        json!({"id": "a", "type": "http in", "z": "t2", "url": "/off-tab", "method": "get"}),
        json!({"id": "b", "type": "http in", "z": "tab1", "d": true, "url": "/off", "method": "get"}),
        http_in("c", "get", "/on"),
    ];
    let r = routes(nodes);
    assert!(r.allows("GET", "/on"));
    assert!(!r.allows("GET", "/off") && !r.allows("GET", "/off-tab"));
}

#[test]
fn the_node_root_prefixes_every_route() {
    let flows = json!([
        http_in("n1", "get", "/hello"),
        {"id": "u", "type": "ui-base", "path": "/dash"},
        {"id": "w", "type": "websocket-listener", "path": "/ws/live"},
    ]);
    let (r, skipped) = PublicRoutes::from_flows(&flows, "/api/", &[]);
    assert!(skipped.is_empty());
    assert!(r.allows("GET", "/api/hello") && r.allows("GET", "/API/hello/"));
    assert!(
        r.allows("GET", "/api//hello"),
        "Express's mount takes a doubled slash"
    );
    assert!(!r.allows("GET", "/hello") && !r.allows("GET", "/apihello"));
    assert!(r.allows("GET", "/api/dash") && r.allows("POST", "/api/dash/socket.io/?EIO=4"));
    assert!(r.allows("GET", "/api/ws/live") && !r.allows("GET", "/ws/live"));
}

#[test]
fn dashboards_publish_their_base_path() {
    let r = routes(vec![
        json!({"id": "u", "type": "ui-base", "path": "/dashboard"}),
        json!({"id": "t", "type": "ui-text", "z": "tab1"}),
    ]);
    for p in [
        "/dashboard",
        "/dashboard/",
        "/dashboard/page1",
        "/dashboard/assets/index-abc.js",
        "/dashboard/socket.io/",
        "/dashboard/_setup",
        "/dashboard/manifest.webmanifest",
    ] {
        assert!(r.allows("GET", p), "{p}");
    }
    assert!(r.allows("POST", "/dashboard/socket.io/"));
    assert!(!r.allows("GET", "/dashboardx") && !r.allows("GET", "/ui"));
    assert!(!r.allows("GET", "/dashboard/../red/main.min.js"));

    let r1 = routes(vec![json!({"id": "g", "type": "ui_gauge", "z": "tab1"})]);
    assert!(r1.allows("GET", "/ui/") && r1.allows("GET", "/ui/socket.io/x"));
    assert!(!r1.allows("GET", "/dashboard"));
}

#[test]
fn public_paths_pass_any_method_and_nothing_else_without_flows() {
    let r = PublicRoutes::only(&["/static".into(), "/favicon.ico".into()]);
    assert!(r.allows("GET", "/static/app.js") && r.allows("POST", "/Static"));
    assert!(r.allows("GET", "/favicon.ico"));
    assert!(!r.allows("GET", "/staticx") && !r.allows("GET", "/"));
    assert!(!r.allows("GET", "/static/../flows"));
    let none = PublicRoutes::default();
    assert!(!none.allows("GET", "/"));
}

#[test]
fn patterns_flowgate_cannot_read_stay_closed_and_are_reported() {
    let flows = json!([
        http_in("a", "get", "/:from-to-:to"),
        http_in("b", "get", "/x/${PATH}"),
        http_in("c", "get", "/bad/(unclosed"),
        http_in("d", "get", "/ok"),
    ]);
    let (r, skipped) = PublicRoutes::from_flows(&flows, "/", &[]);
    let ids: Vec<&str> = skipped.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert!(r.allows("GET", "/ok"));
    assert!(!r.allows("GET", "/a-to-b"));
}

#[test]
fn the_union_of_two_revisions_publishes_both() {
    let old = json!([http_in("a", "get", "/old")]);
    let new = json!([http_in("a", "get", "/new")]);
    let (r, _) = PublicRoutes::union(&[(&old, "/"), (&new, "/")], &[]);
    assert!(r.allows("GET", "/old") && r.allows("GET", "/new"));
}

#[test]
fn express_regex_is_path_to_regexp_0_1() {
    // the sources path-to-regexp 0.1.13 gives, with `\/` written `/`
    for (pattern, source) in [
        ("/hello", "/hello/?$"),
        ("/user/:id", "/user(?:/([^/]+?))/?$"),
        ("/user/:id?", "/user(?:/([^/]+?))?/?$"),
        ("/files/*", "/files/(.*)/?$"),
        ("/file.:ext", "/file(?:\\.([^/\\.]+?))/?$"),
        ("/a/:b*", "/a(?:/([^/]+?)((?:[/].+?)?))/?$"),
        ("/n/:id(\\d+)", "/n(?:/(\\d+))/?$"),
        ("/end/", "/end/?$"),
    ] {
        assert_eq!(express_regex(pattern).as_deref(), Ok(source), "{pattern}");
    }
}

proptest::proptest! {
    #[test]
    fn any_path_is_answered_without_panic(path in "\\PC{0,64}", method in "[A-Z]{1,8}") {
        let r = routes(vec![http_in("a", "get", "/x/:y"), http_in("b", "post", "/files/*")]);
        let _ = r.allows(&method, &path);
    }

    #[test]
    fn any_url_in_a_flow_is_read_without_panic(url in "\\PC{0,40}") {
        let flows = json!([http_in("a", "get", &url)]);
        let (r, _) = PublicRoutes::from_flows(&flows, "/", &[]);
        let _ = r.allows("GET", &url);
    }
}
