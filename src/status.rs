//! `flowgate status`: a table of instances and replicas from a running
//! flowgate's `/api/instances`, with rates from the difference between two
//! readings. This module renders text; `main.rs` prints and refreshes it.

use std::fmt::Write as _;
use std::time::Instant;

use crate::client::{InstanceDoc, InstancesDoc};

/// One reading of `/api/instances`.
pub struct Reading {
    pub at: Instant,
    pub doc: InstancesDoc,
}

fn rate(now: u64, before: Option<u64>, secs: f64) -> String {
    match before {
        Some(b) if secs > 0.0 && now >= b => format!("{:.1}", (now - b) as f64 / secs),
        _ => "-".to_string(),
    }
}

fn instance(out: &mut String, inst: &InstanceDoc, prev: Option<&InstanceDoc>, secs: f64) {
    let _ = writeln!(
        out,
        "instance {}  ({} mqtt replicas, {} queued)",
        inst.name,
        inst.replicas.iter().filter(|r| r.accepted).count(),
        inst.queued
    );
    if inst.replicas.is_empty() {
        let _ = writeln!(out, "  mqtt: no replica connected");
    } else {
        let _ = writeln!(
            out,
            "  {:<5} {:<28} {:<22} {:>10} {:>10} {:>9}  state",
            "slot", "client id", "peer", "to/s", "from/s", "in-flight"
        );
        for r in &inst.replicas {
            let before = prev.and_then(|p| p.replicas.iter().find(|x| x.slot == r.slot));
            let _ = writeln!(
                out,
                "  {:<5} {:<28} {:<22} {:>10} {:>10} {:>9}  {}",
                r.slot,
                r.client_id,
                r.peer,
                rate(
                    r.messages_to_replica,
                    before.map(|b| b.messages_to_replica),
                    secs
                ),
                rate(
                    r.messages_from_replica,
                    before.map(|b| b.messages_from_replica),
                    secs
                ),
                r.inflight,
                if r.accepted {
                    "connected"
                } else {
                    "connecting"
                }
            );
        }
    }
    if let Some(last) = inst.failovers.last() {
        let _ = writeln!(
            out,
            "  failovers: {} kept; last: {} {} -> {} ({}), {:.1} ms",
            inst.failovers.len(),
            last.side,
            last.from.as_deref().unwrap_or("-"),
            last.to,
            last.cause,
            last.seconds * 1000.0
        );
    }
    if !inst.http.is_empty() {
        let _ = writeln!(
            out,
            "  {:<5} {:<28} {:>10} {:>9}  health",
            "http", "replica address", "req/s", "in-flight"
        );
        for h in &inst.http {
            let before = prev.and_then(|p| p.http.iter().find(|x| x.replica == h.replica));
            let mut health = match (h.up, h.draining) {
                (true, false) => "up",
                (true, true) => "up, draining",
                (false, false) => "down",
                (false, true) => "down, draining",
            }
            .to_string();
            if h.diverged {
                health.push_str(", flows differ");
            }
            let _ = writeln!(
                out,
                "  {:<5} {:<28} {:>10} {:>9}  {}",
                h.replica,
                h.addr,
                rate(h.requests, before.map(|b| b.requests), secs),
                h.inflight,
                health
            );
        }
    }
}

/// The whole table; rates need a previous reading (`-` without one).
pub fn render(admin: &str, prev: Option<&Reading>, cur: &Reading) -> String {
    let secs = prev.map_or(0.0, |p| cur.at.duration_since(p.at).as_secs_f64());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flowgate {}  node {}  mode {}  upstream {}",
        admin, cur.doc.node_id, cur.doc.mode, cur.doc.upstream
    );
    if cur.doc.instances.is_empty() {
        let _ = writeln!(out, "no instances configured");
    }
    for inst in &cur.doc.instances {
        let before = prev.and_then(|p| p.doc.instances.iter().find(|i| i.name == inst.name));
        out.push('\n');
        instance(&mut out, inst, before, secs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn doc(to: u64, requests: u64) -> InstancesDoc {
        serde_json::from_value(serde_json::json!({
            "node_id": "n1", "mode": "dispatch", "upstream": "embedded",
            "instances": [{
                "name": "line1", "queued": 0, "replicas_connected": 1,
                "replicas": [{"slot": 0, "client_id": "line1-nodered", "upstream_client_id": "x",
                  "peer": "127.0.0.1:5000", "protocol": "v4", "connected_secs": 3, "accepted": true,
                  "messages_to_replica": to, "messages_from_replica": 0, "bytes_to_replica": 0,
                  "bytes_from_replica": 0, "inflight": 2}],
                "http": [{"replica": "0", "addr": "127.0.0.1:1880", "up": true, "draining": false,
                  "inflight": 1, "requests": requests}]
            }]
        }))
        .expect("valid document")
    }

    #[test]
    fn rates_come_from_two_readings() {
        let t0 = Instant::now();
        let a = Reading {
            at: t0,
            doc: doc(100, 10),
        };
        let b = Reading {
            at: t0 + Duration::from_secs(2),
            doc: doc(120, 30),
        };
        let first = render("http://a", None, &a);
        assert!(first.contains("line1-nodered"), "{first}");
        let table = render("http://a", Some(&a), &b);
        assert!(table.contains("10.0"), "{table}");
        assert!(table.contains("127.0.0.1:1880"), "{table}");
        assert!(table.contains("connected"), "{table}");
    }
}
