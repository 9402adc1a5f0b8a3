//! The dispatcher's decisions, driven without sockets: events in, commands
//! and deliveries out through its channels.

use super::*;

fn settings() -> DispatchSettings {
    DispatchSettings {
        instance: "line1".into(),
        strategy: Strategy::LeastInflight,
        key_level: None,
        broadcast: Vec::new(),
        ack_timeout: Duration::from_secs(10),
        max_inflight: 16,
        failback: false,
        tie: None,
        acl: None,
        queue_limit: 1000,
        upstream_share: false,
        upstream_addr: "127.0.0.1:1".into(),
        upstream_addr_v5: "127.0.0.1:1".into(),
        upstream_client_id: "flowgate-test-line1".into(),
        retained_timeout: Duration::from_secs(1),
        upstream_login: super::super::upstream::Login::default(),
        retain_options: true,
    }
}

fn pkid_of(cmd: &UpCmd) -> u16 {
    match cmd {
        UpCmd::PubAck(p) => *p,
        other => panic!("not a PUBACK: {other:?}"),
    }
}

#[test]
fn upstream_commands_wait_in_order_when_the_channel_is_full() {
    let (up, mut up_rx) = mpsc::channel(2);
    let mut d = Dispatcher::new(settings(), up, Arc::new(Metrics::new()));
    for pkid in 1..=5 {
        d.send_up(UpCmd::PubAck(pkid));
    }
    // two fit, three wait: none dropped
    assert_eq!(d.backlog.len(), 3);
    let mut got = Vec::new();
    while got.len() < 5 {
        while let Ok(cmd) = up_rx.try_recv() {
            got.push(pkid_of(&cmd));
        }
        d.flush_backlog();
        // a command sent while others wait goes behind them
        if got.len() == 2 {
            d.send_up(UpCmd::PubAck(6));
        }
    }
    while let Ok(cmd) = up_rx.try_recv() {
        got.push(pkid_of(&cmd));
    }
    d.flush_backlog();
    while let Ok(cmd) = up_rx.try_recv() {
        got.push(pkid_of(&cmd));
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    assert!(d.backlog.is_empty());
}
