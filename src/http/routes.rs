//! What the public listener lets through: the routes the flows publish.
//!
//! Pure: built from an instance's flows (Node-RED's `GET /flows`), its
//! `httpNodeRoot` and the configured `public_paths`; asked about one method
//! and path at a time. No I/O here (the flows watch in `watch.rs` reads the
//! flows and swaps the set).
//!
//! Published are: the route of every enabled `http in` node (its method and
//! path pattern under `httpNodeRoot`), the path of every `websocket-listener`,
//! the base path of each Dashboard 2.0 `ui-base` (its pages, assets and
//! socket.io), Dashboard 1's `/ui` when the flows have its nodes, and the
//! configured `public_paths` (prefixes, any method).
//!
//! Paths are matched as Node-RED's Express 4 router matches them: the raw
//! path (percent-encoding kept), case-insensitive, an optional trailing slash,
//! `:param` segments as path-to-regexp 0.1 turns them into a regular
//! expression. One rule is stricter than Express: a path with a `.` or `..`
//! segment, also percent-encoded, never passes, because Node-RED's static file
//! handlers (the editor's among them) decode and resolve such segments and
//! would serve a file outside the published route.

use std::sync::OnceLock;

use regex::{Regex, RegexSet};
use serde_json::Value;

/// Methods a published path admits (bits).
const GET: u8 = 1;
const HEAD: u8 = 1 << 1;
const POST: u8 = 1 << 2;
const PUT: u8 = 1 << 3;
const DELETE: u8 = 1 << 4;
const PATCH: u8 = 1 << 5;
const ANY: u8 = u8::MAX;

/// A route the flows publish that flowgate cannot translate, so it stays
/// closed (logged by the watch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} node {id}: path {path:?} not opened: {why}")]
pub struct Skipped {
    pub kind: String,
    pub id: String,
    pub path: String,
    pub why: String,
}

/// The set of requests the public listener lets through.
#[derive(Debug, Clone)]
pub struct PublicRoutes {
    /// For each method (see [`method_index`]), the patterns that admit it:
    /// one `is_match` per request.
    by_method: Vec<RegexSet>,
    /// What was published, for logs and `/api/instances`: "GET /hello".
    pub published: Vec<String>,
}

/// Request methods the route sets tell apart; anything else is `OTHER`.
const METHODS: [(&str, u8); 7] = [
    ("GET", GET),
    ("HEAD", HEAD | GET),
    ("POST", POST),
    ("PUT", PUT),
    ("DELETE", DELETE),
    ("PATCH", PATCH),
    // Express answers OPTIONS for any route on the path (and httpNodeCors
    // preflights): every published path admits it
    ("OPTIONS", ANY),
];
const OTHER: usize = METHODS.len();

fn method_index(method: &str) -> usize {
    METHODS
        .iter()
        .position(|(m, _)| *m == method)
        .unwrap_or(OTHER)
}

impl Default for PublicRoutes {
    fn default() -> Self {
        Self {
            by_method: vec![RegexSet::empty(); OTHER + 1],
            published: Vec::new(),
        }
    }
}

/// Collects patterns and their methods.
#[derive(Default)]
struct Builder {
    patterns: Vec<String>,
    methods: Vec<u8>,
    published: Vec<String>,
}

impl Builder {
    fn add(&mut self, regex: String, methods: u8, label: String) {
        self.patterns.push(regex);
        self.methods.push(methods);
        self.published.push(label);
    }

    /// A prefix any method may use: the path itself and everything under it.
    fn prefix(&mut self, root: &str, prefix: &str, label: &str) {
        let p = prefix.trim_end_matches('/');
        let re = format!("{}{}(?:/.*)?$", mount(root), regex::escape(p));
        self.add(re, ANY, format!("* {label}"));
    }

    fn build(self) -> Result<PublicRoutes, regex::Error> {
        let mut by_method = Vec::with_capacity(OTHER + 1);
        for i in 0..=OTHER {
            let want = METHODS.get(i).map_or(0, |(_, bits)| *bits);
            let patterns = self
                .patterns
                .iter()
                .zip(&self.methods)
                .filter(|(_, m)| **m == ANY || **m & want != 0)
                .map(|(p, _)| p);
            by_method.push(RegexSet::new(patterns)?);
        }
        Ok(PublicRoutes {
            by_method,
            published: self.published,
        })
    }
}

impl PublicRoutes {
    /// Only the configured `public_paths` (the flows could not be read).
    pub fn only(public_paths: &[String]) -> Self {
        Self::from_flows(&Value::Array(Vec::new()), "/", public_paths).0
    }

    /// The routes `flows` (the `flows` array of `GET /flows`) publish under
    /// `node_root` (`httpNodeRoot`), and `public_paths`; with the routes
    /// that could not be translated (they stay closed).
    pub fn from_flows(
        flows: &Value,
        node_root: &str,
        public_paths: &[String],
    ) -> (Self, Vec<Skipped>) {
        Self::union(&[(flows, node_root)], public_paths)
    }

    /// The routes any of several flows publish (replicas whose flows differ,
    /// as in the middle of a rolling deploy), and `public_paths`.
    pub fn union(flows: &[(&Value, &str)], public_paths: &[String]) -> (Self, Vec<Skipped>) {
        let mut b = Builder::default();
        let mut skipped = Vec::new();
        for p in public_paths {
            b.prefix("/", p, p);
        }
        for (flows, root) in flows {
            published(flows, root, &mut b, &mut skipped);
        }
        // every pattern compiled alone in `published`; a failure of the set
        // as a whole (size limit) leaves the public paths only
        let labels = b.published.clone();
        match b.build() {
            Ok(r) => (r, skipped),
            Err(e) => {
                skipped.push(Skipped {
                    kind: "flows".into(),
                    id: "-".into(),
                    path: format!("{} routes", labels.len()),
                    why: e.to_string(),
                });
                let mut only = Builder::default();
                for p in public_paths {
                    only.prefix("/", p, p);
                }
                (only.build().unwrap_or_default(), skipped)
            }
        }
    }

    /// May a `method` request for `path` (the target's path, query removed)
    /// pass?
    pub fn allows(&self, method: &str, path: &str) -> bool {
        if !path.starts_with('/') || has_dot_segment(path) {
            return false;
        }
        self.by_method
            .get(method_index(method))
            .is_some_and(|set| set.is_match(path))
    }
}

/// The regular expression (start) of Express's mount of the node app at
/// `root` (`app.use(httpNodeRoot, httpNode)`): `/api/` takes `/api/x` and
/// `/api//x` alike.
fn mount(root: &str) -> String {
    let r = root.trim_end_matches('/');
    if r.is_empty() {
        "(?i)^".into()
    } else {
        format!("(?i)^{}/?", regex::escape(r))
    }
}

/// `httpNodeRoot` as Node-RED formats it: a leading and a trailing slash.
fn format_root(root: &str) -> String {
    let mut r = String::from("/");
    r.push_str(root.trim_matches('/'));
    if r.len() > 1 {
        r.push('/');
    }
    r
}

/// Adds what one flows array publishes.
fn published(flows: &Value, root: &str, b: &mut Builder, skipped: &mut Vec<Skipped>) {
    let Some(nodes) = flows.as_array() else {
        return;
    };
    let root = format_root(root);
    let disabled_tabs: Vec<&str> = nodes
        .iter()
        .filter(|n| n["type"] == "tab" && n["disabled"] == true)
        .filter_map(|n| n["id"].as_str())
        .collect();
    let mut dashboard1 = false;
    for n in nodes {
        let kind = n["type"].as_str().unwrap_or("");
        let off = n["d"] == true || n["z"].as_str().is_some_and(|z| disabled_tabs.contains(&z));
        let skip = |path: &str, why: &str| Skipped {
            kind: kind.into(),
            id: n["id"].as_str().unwrap_or("?").into(),
            path: path.into(),
            why: why.into(),
        };
        match kind {
            "http in" if !off => {
                let url = n["url"].as_str().unwrap_or("");
                let url = if url.starts_with('/') {
                    url.to_owned()
                } else {
                    format!("/{url}")
                };
                let method = match n["method"].as_str().unwrap_or("get") {
                    "get" => GET,
                    "post" => POST,
                    "put" => PUT,
                    "delete" => DELETE,
                    "patch" => PATCH,
                    other => {
                        skipped.push(skip(&url, &format!("unknown method {other:?}")));
                        continue;
                    }
                };
                if url.contains("${") {
                    skipped.push(skip(&url, "an environment variable in the path"));
                    continue;
                }
                match express_regex(&url) {
                    Ok(body) => {
                        let re = format!("{}{body}", mount(&root));
                        if Regex::new(&re).is_err() {
                            skipped.push(skip(&url, "a pattern flowgate cannot read"));
                            continue;
                        }
                        let name = n["method"].as_str().unwrap_or("get").to_ascii_uppercase();
                        b.add(
                            re,
                            method,
                            format!("{name} {}{}", root.trim_end_matches('/'), url),
                        );
                    }
                    Err(why) => skipped.push(skip(&url, why)),
                }
            }
            "websocket-listener" => {
                // served on the node root, matched exactly (ws node)
                let p = n["path"].as_str().unwrap_or("");
                let full = format!("{}{}", root, p.trim_start_matches('/'));
                let re = format!("^{}$", regex::escape(&full));
                b.add(re, GET, format!("GET {full} (websocket)"));
            }
            "ui-base" => {
                let p = n["path"].as_str().unwrap_or("").trim_matches('/');
                let p = if p.is_empty() { "dashboard" } else { p };
                b.prefix(&root, &format!("/{p}"), &format!("{root}{p} (dashboard)"));
                b.add(
                    format!("{}dashboard/manifest\\.webmanifest/?$", mount(&root)),
                    GET,
                    format!("GET {root}dashboard/manifest.webmanifest"),
                );
            }
            k if k.starts_with("ui_") => dashboard1 = true,
            _ => {}
        }
    }
    if dashboard1 {
        b.prefix(&root, "/ui", &format!("{root}ui (dashboard 1)"));
    }
}

/// The tokens path-to-regexp 0.1 rewrites (its own expression, with `\w`
/// as JavaScript reads it).
fn tokens() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\\.|(/)?(\.)?:([A-Za-z0-9_]+)(\(.*?\))?(\*)?(\?)?|[.*]|/\(")
            .expect("a constant expression that compiles")
    })
}

/// The body of the regular expression Express 4 (path-to-regexp 0.1.13,
/// `end`, not `strict`, case-insensitive) makes of a route path, without
/// its leading `^`; a port of that function for the forms it knows. The one
/// form Rust's `regex` has no word for (a lookahead after literal text
/// longer than one character, as in `/:a-to-:b`) is refused.
pub fn express_regex(path: &str) -> Result<String, &'static str> {
    let mut out = String::new();
    let mut backtrack = String::new();
    let mut pos = 0usize;
    let mut last = 0usize;
    for caps in tokens().captures_iter(path) {
        let Some(m) = caps.get(0) else { continue };
        out.push_str(&path[last..m.start()]);
        last = m.end();
        let text = m.as_str();
        if text.starts_with('\\') {
            backtrack.push_str(text);
            pos += 2;
            out.push_str(text);
            continue;
        }
        if text == "." {
            backtrack.push_str("\\.");
            pos += 1;
            out.push_str("\\.");
            continue;
        }
        let slash = caps.get(1).is_some();
        let format = caps.get(2).is_some();
        if slash || format {
            backtrack.clear();
        } else {
            backtrack.push_str(path.get(pos..m.start()).unwrap_or(""));
        }
        pos = m.end();
        if text == "*" {
            backtrack.clear();
            out.push_str("(.*)");
            continue;
        }
        if text == "/(" {
            backtrack.push('/');
            out.push_str("/(?:");
            continue;
        }
        let fmt = if format { "\\." } else { "" };
        let capture = match caps.get(4) {
            Some(c) => {
                let c = c.as_str();
                // the first escape or star: a star becomes `(.*)`
                match c.char_indices().find(|(_, ch)| *ch == '\\' || *ch == '*') {
                    Some((i, '*')) => format!("{}(.*){}", &c[..i], &c[i + 1..]),
                    _ => c.to_owned(),
                }
            }
            None if !backtrack.is_empty() => {
                let one = match backtrack.strip_prefix('\\') {
                    Some(rest) if rest.chars().count() == 1 => rest,
                    Some(_) => "",
                    None if backtrack.chars().count() == 1 => backtrack.as_str(),
                    None => "",
                };
                if one.is_empty() {
                    return Err("a parameter after literal text (needs a lookahead)");
                }
                format!("([^/{}]+?)", regex::escape(one))
            }
            None => format!("([^/{fmt}]+?)"),
        };
        let star = if caps.get(5).is_some() {
            format!("((?:[/{fmt}].+?)?)")
        } else {
            String::new()
        };
        let optional = caps.get(6).map_or("", |m| m.as_str());
        let slash = if slash { "/" } else { "" };
        out.push_str(&format!("(?:{fmt}{slash}{capture}{star}){optional}"));
        backtrack.clear();
    }
    out.push_str(&path[last..]);
    out.push_str(if out.ends_with('/') { "?" } else { "/?" });
    out.push('$');
    Ok(out)
}

/// Does `path`, percent-decoded, have a `.` or `..` segment (or a NUL)?
/// Static file handlers resolve those; a published route never needs them.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    // the common case, no dot and no escape at all, without decoding
    if !bytes.iter().any(|b| matches!(b, b'.' | b'%' | 0)) {
        return false;
    }
    let decoded = super::balancer::percent_decoded(path, false);
    decoded.contains(&0)
        || decoded
            .split(|b| *b == b'/' || *b == b'\\')
            .any(|seg| seg == b"." || seg == b"..")
}

#[cfg(test)]
mod tests;
