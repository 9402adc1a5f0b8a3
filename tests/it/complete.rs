//! Completion acknowledgement (`complete`): a job a replica took and had not
//! finished when it died is done by another. Two replicas that acknowledge
//! on receipt (as Node-RED's `mqtt in` does) and publish the result 1 s
//! later; one is killed mid-stream; every job must be done.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use flowgate::app::App;
use flowgate::config::Config;

use crate::dispatch::{start, Upstream};
use crate::support::*;

/// Jobs sent, one every 50 ms (20 a second).
const JOBS: u32 = 60;
/// How long a replica works on a job before it publishes the result.
const WORK: Duration = Duration::from_secs(1);

/// How a job and its result carry the key.
#[derive(Clone, Copy, Debug)]
enum Form {
    Topic,
    Json,
    CorrelationData,
}

impl Form {
    fn config(self) -> &'static str {
        match self {
            Form::Topic => "complete = { topic = \"done/#\", correlate = \"topic:1\" }",
            Form::Json => "complete = { topic = \"done\", correlate = \"json:id\" }",
            Form::CorrelationData => {
                "complete = { topic = \"done\", correlate = \"correlation-data\" }"
            }
        }
    }

    fn job(self, id: u32) -> (String, String, Option<PublishProperties>) {
        match self {
            Form::Topic => (format!("jobs/{id}"), String::new(), None),
            Form::Json => ("jobs".into(), format!("{{\"id\": {id}}}"), None),
            Form::CorrelationData => (
                "jobs".into(),
                String::new(),
                Some(PublishProperties {
                    correlation_data: Some(Bytes::from(format!("c{id}"))),
                    response_topic: Some("done".into()),
                    ..Default::default()
                }),
            ),
        }
    }

    /// The job's id, from what a replica got or an observer saw.
    fn id_of(self, topic: &str, payload: &[u8], props: Option<&PublishProperties>) -> Option<u32> {
        match self {
            Form::Topic => topic.rsplit('/').next()?.parse().ok(),
            Form::Json => {
                let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
                u32::try_from(v.get("id")?.as_u64()?).ok()
            }
            Form::CorrelationData => {
                let c = props?.correlation_data.as_ref()?;
                std::str::from_utf8(c.strip_prefix(b"c")?)
                    .ok()?
                    .parse()
                    .ok()
            }
        }
    }

    /// The result of job `id`, as the replica publishes it.
    fn result(
        self,
        id: u32,
        props: Option<PublishProperties>,
    ) -> (String, String, Option<PublishProperties>) {
        match self {
            Form::Topic => (format!("done/{id}"), "ok".into(), None),
            Form::Json => ("done".into(), format!("{{\"id\": \"{id}\"}}"), None),
            Form::CorrelationData => (
                "done".into(),
                "ok".into(),
                Some(PublishProperties {
                    correlation_data: props.and_then(|p| p.correlation_data),
                    ..Default::default()
                }),
            ),
        }
    }
}

/// A replica: acknowledges each job on receipt (rumqttc does), publishes its
/// result `WORK` later. Aborting its task kills it (no DISCONNECT).
fn worker(
    addr: std::net::SocketAddr,
    form: Form,
    subscribed: tokio::sync::mpsc::UnboundedSender<()>,
) -> tokio::task::JoinHandle<()> {
    worker_with(addr, form, subscribed, None)
}

/// [`worker`] with at most `outgoing` of its results unacknowledged.
fn worker_with(
    addr: std::net::SocketAddr,
    form: Form,
    subscribed: tokio::sync::mpsc::UnboundedSender<()>,
    outgoing: Option<u16>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut opts = MqttOptions::new("line1-nodered", addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some(n) = outgoing {
            opts.set_outgoing_inflight_upper_limit(n);
        }
        let (client, mut el) = AsyncClient::new(opts, 1000);
        let mut work = tokio::task::JoinSet::new();
        loop {
            match el.poll().await {
                // (again after a reconnect: a clean session)
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // "jobs/#" covers "jobs" too
                    let _ = client.try_subscribe_many([Filter::new("jobs/#", QoS::AtLeastOnce)]);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let Some(id) = form.id_of(&topic, &p.payload, p.properties.as_ref()) else {
                        continue;
                    };
                    let client = client.clone();
                    let props = p.properties.clone();
                    work.spawn(async move {
                        tokio::time::sleep(WORK).await;
                        let (topic, payload, props) = form.result(id, props);
                        let _ = match props {
                            Some(props) => {
                                client
                                    .publish_with_properties(
                                        topic,
                                        QoS::AtLeastOnce,
                                        false,
                                        payload,
                                        props,
                                    )
                                    .await
                            }
                            None => {
                                client
                                    .publish(topic, QoS::AtLeastOnce, false, payload)
                                    .await
                            }
                        };
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}

/// A result the observer saw: topic, payload, properties.
type Seen = (String, Bytes, Option<PublishProperties>);

/// Polls the observer's connection: each PUBLISH it gets to the returned
/// channel, each SUBACK to `subacks`.
fn observe(
    mut el: rumqttc::v5::EventLoop,
    subacks: tokio::sync::mpsc::UnboundedSender<()>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let _ = tx.send((topic, p.payload, p.properties));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subacks.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    (task, rx)
}

/// Sends `JOBS` jobs at 20 a second, kills the replica `kill` half-way, and
/// returns the ids whose result an observer saw.
async fn run(upstream: &Upstream, form: Form) -> BTreeSet<u32> {
    let app = start(upstream, form.config()).await;
    let addr = app.mqtt_addr;
    // the observer of results, and the job publisher: plain clients
    let mut opts = MqttOptions::new(unique_id("observer"), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (observer, observer_el) = AsyncClient::new(opts, 1000);
    observer
        .subscribe_many([Filter::new("done/#", QoS::AtLeastOnce)])
        .await
        .expect("queued");
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel();
    let (observing, mut done_rx) = observe(observer_el, sub_tx.clone());
    // a replica's SUBACK comes once the instance's subscription is live
    // upstream: from then on no job is lost at the broker
    let workers = [
        worker(addr, form, sub_tx.clone()),
        worker(addr, form, sub_tx),
    ];
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
            .await
            .expect("the SUBACKs of the replicas and the observer")
            .expect("replica alive");
    }
    let mut opts = MqttOptions::new(unique_id("publisher"), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut publisher_el) = AsyncClient::new(opts, 1000);
    let publishing = tokio::spawn(async move { while publisher_el.poll().await.is_ok() {} });
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for id in 0..JOBS {
        tick.tick().await;
        if id == JOBS / 2 {
            workers[0].abort();
        }
        let (topic, payload, props) = form.job(id);
        match props {
            Some(p) => publisher
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, p)
                .await
                .expect("queued"),
            None => publisher
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queued"),
        }
    }
    let mut done = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done.len() < JOBS as usize {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((topic, payload, props))) => {
                if let Some(id) = result_id(form, &topic, &payload, props.as_ref()) {
                    done.insert(id);
                }
            }
            _ => break,
        }
    }
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    eprintln!(
        "{} {form:?}: {} of {JOBS} done; uncorrelated {}, redelivered {}",
        upstream.name(),
        done.len(),
        metric_sum(
            &m,
            "flowgate_dispatch_uncorrelated_total",
            &[("instance", "line1")]
        ),
        metric_sum(
            &m,
            "flowgate_dispatch_redeliveries_total",
            &[("instance", "line1")]
        ),
    );
    for w in workers {
        w.abort();
    }
    observing.abort();
    publishing.abort();
    app.shutdown(Duration::from_secs(2)).await;
    done
}

/// The id a result names.
fn result_id(
    form: Form,
    topic: &str,
    payload: &[u8],
    props: Option<&PublishProperties>,
) -> Option<u32> {
    match form {
        Form::Json => {
            let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
            v.get("id")?.as_str()?.parse().ok()
        }
        _ => form.id_of(topic, payload, props),
    }
}

#[tokio::test]
async fn every_job_is_done_when_a_replica_dies_holding_jobs_in_progress() {
    let embedded = Upstream::Embedded;
    for form in [Form::Topic, Form::Json, Form::CorrelationData] {
        let done = run(&embedded, form).await;
        let missing: Vec<u32> = (0..JOBS).filter(|id| !done.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "embedded {form:?}: never done: {missing:?}"
        );
    }
    let mosquitto = Upstream::Mosquitto(Mosquitto::start().await);
    let done = run(&mosquitto, Form::Topic).await;
    let missing: Vec<u32> = (0..JOBS).filter(|id| !done.contains(id)).collect();
    assert!(missing.is_empty(), "mosquitto: never done: {missing:?}");
}

/// What one burst of jobs showed about the broker's in-flight window.
struct WindowRun {
    /// The window flowgate learned (`flowgate_dispatch_upstream_window`).
    window: f64,
    /// The most jobs in progress seen at once.
    most_in_progress: f64,
    /// `flowgate_dispatch_upstream_window_full_total` after the burst.
    full: f64,
    /// Time from the first job to the last result.
    took: Duration,
}

/// 60 jobs at once to two replicas (each takes 1 s per job, all in
/// parallel, and a window of 100), with `complete`, through `broker` with
/// flowgate's upstream session speaking `protocol`: every job done; how many
/// were in progress at most.
async fn burst(broker: &Mosquitto, protocol: &str) -> WindowRun {
    burst_with(broker, protocol, ("", ""), None).await
}

/// [`burst`] with more `[mqtt]` and `[[instance]]` settings, and replicas
/// that leave at most `outgoing` results unacknowledged.
async fn burst_with(
    broker: &Mosquitto,
    protocol: &str,
    (mqtt, instance): (&str, &str),
    outgoing: Option<u16>,
) -> WindowRun {
    let form = Form::Topic;
    let app = flowgate(
        broker.addr,
        "dispatch",
        &format!("upstream_protocol = \"{protocol}\"\n{mqtt}"),
        &format!(
            "[[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"line1-nodered\" }}\n{}\n{instance}\n",
            form.config()
        ),
    )
    .await;
    let addr = app.mqtt_addr;
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel();
    let workers = [
        worker_with(addr, form, sub_tx.clone(), outgoing),
        worker_with(addr, form, sub_tx.clone(), outgoing),
    ];
    let mut opts = MqttOptions::new(unique_id("observer"), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (observer, observer_el) = AsyncClient::new(opts, 1000);
    observer
        .subscribe_many([Filter::new("done/#", QoS::AtLeastOnce)])
        .await
        .expect("queued");
    let (observing, mut done_rx) = observe(observer_el, sub_tx);
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
            .await
            .expect("the SUBACKs of the replicas and the observer")
            .expect("alive");
    }
    let mut opts = MqttOptions::new(unique_id("publisher"), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut publisher_el) = AsyncClient::new(opts, 1000);
    let publishing = tokio::spawn(async move { while publisher_el.poll().await.is_ok() {} });
    let started = tokio::time::Instant::now();
    for id in 0..JOBS {
        let (topic, payload, _) = form.job(id);
        publisher
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    let mut done = BTreeSet::new();
    let mut most_in_progress = 0f64;
    let deadline = started + Duration::from_secs(20);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    while done.len() < JOBS as usize {
        tokio::select! {
            got = done_rx.recv() => {
                if let Some(id) = got.and_then(|(t, ..)| form.id_of(&t, b"", None)) {
                    done.insert(id);
                }
            }
            _ = poll.tick() => {
                let (_, m) = http_get(app.admin_addr, "/metrics").await;
                let now = metric_sum(&m, "flowgate_dispatch_jobs_in_progress", &[("instance", "line1")]);
                most_in_progress = most_in_progress.max(now);
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let took = started.elapsed();
    assert_eq!(done.len(), JOBS as usize, "{protocol}: every job done");
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    let line1 = [("instance", "line1")];
    let run = WindowRun {
        window: metric_sum(&m, "flowgate_dispatch_upstream_window", &line1),
        most_in_progress,
        full: metric_sum(&m, "flowgate_dispatch_upstream_window_full_total", &line1),
        took,
    };
    eprintln!(
        "upstream {protocol}: window {}, at most {} of {JOBS} jobs in progress, window full {} time(s), all done in {:?}",
        run.window,
        run.most_in_progress,
        run.full,
        run.took
    );
    for w in workers {
        w.abort();
    }
    observing.abort();
    publishing.abort();
    app.shutdown(Duration::from_secs(2)).await;
    run
}

#[tokio::test]
async fn the_brokers_in_flight_limit_holds_jobs_back_unless_flowgate_states_its_receive_maximum() {
    // Mosquitto's max_inflight_messages (here 10) for a client that states
    // no Receive Maximum (3.1.1 cannot): a burst of 60 jobs of 1 s each
    // starts with the first 10 alone and needs a second round
    let broker = Mosquitto::start_with("max_inflight_messages 10").await;
    let capped = burst(&broker, "3.1.1").await;
    let wide = burst(&broker, "5").await;
    assert_eq!(capped.window, 0.0, "unknown to a 3.1.1 session");
    assert!(
        capped.took >= 2 * WORK && capped.most_in_progress < f64::from(JOBS),
        "3.1.1: {} at most in progress, all done in {:?}",
        capped.most_in_progress,
        capped.took
    );
    // MQTT 5: flowgate states Receive Maximum = queue_limit (10,000), the
    // window: all 60 in progress at once, done in one round
    assert_eq!(wide.window, 10_000.0);
    assert_eq!(wide.most_in_progress, f64::from(JOBS));
    assert!(wide.took < 2 * WORK, "MQTT 5: all done in {:?}", wide.took);
    assert_eq!(wide.full, 0.0);
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    Broker,
    Flowgate,
}

/// flowgate on a fixed port (replicas reconnect to it after a restart).
async fn start_on(broker: std::net::SocketAddr, port: u16) -> App {
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"mqtt://{broker}\"\nmode = \"dispatch\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n{}\n",
        Form::Topic.config()
    );
    init_logs();
    App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts")
}

/// A plain client of the broker itself with a persistent session.
fn persistent(broker: std::net::SocketAddr, id: &str) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    AsyncClient::new(opts, 1000)
}

/// 40 jobs at 20/s through flowgate to two replicas (1 s each), the broker a
/// Mosquitto with persistence; once the broker has them all, with about 20
/// in progress, the broker or flowgate restarts. Returns the ids done and
/// the results seen in all (duplicates included).
async fn through_a_restart(restart: Restart) -> (BTreeSet<u32>, usize) {
    const N: u32 = 40;
    let form = Form::Topic;
    let mut broker = Mosquitto::start_persistent("persist").await;
    let port = free_port();
    let mut app = start_on(broker.addr, port).await;
    let addr = app.mqtt_addr;
    // results: on the broker itself, a session that outlives its restart
    let (observer, observer_el) = persistent(broker.addr, &unique_id("observer"));
    observer
        .subscribe_many([Filter::new("done/#", QoS::AtLeastOnce)])
        .await
        .expect("queued");
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel();
    let (observing, mut done_rx) = observe(observer_el, sub_tx.clone());
    let mut workers = vec![
        worker(addr, form, sub_tx.clone()),
        worker(addr, form, sub_tx.clone()),
    ];
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
            .await
            .expect("the SUBACKs of the replicas and the observer")
            .expect("alive");
    }
    // jobs: on the broker itself, every one acknowledged by it
    let (publisher, mut publisher_el) = persistent(broker.addr, &unique_id("publisher"));
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let publishing = tokio::spawn(async move {
        loop {
            match publisher_el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = acked_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for id in 0..N {
        tick.tick().await;
        let (topic, payload, _) = form.job(id);
        publisher
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    for _ in 0..N {
        tokio::time::timeout(DEADLINE, acked_rx.recv())
            .await
            .expect("the broker acknowledges every job")
            .expect("publisher alive");
    }
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    let in_progress = metric_sum(
        &m,
        "flowgate_dispatch_jobs_in_progress",
        &[("instance", "line1")],
    );
    match restart {
        Restart::Broker => broker.restart().await,
        Restart::Flowgate => {
            // the replicas go down with it (as pods of one node might): the
            // jobs they held are done only if the broker delivers them again
            for w in workers.drain(..) {
                w.abort();
            }
            app.shutdown(Duration::from_secs(2)).await;
            app = start_on(broker.addr, port).await;
            workers.push(worker(addr, form, sub_tx.clone()));
            workers.push(worker(addr, form, sub_tx));
        }
    }
    let mut done = BTreeSet::new();
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done.len() < N as usize {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((topic, ..))) => {
                seen += 1;
                if let Some(id) = form.id_of(&topic, b"", None) {
                    done.insert(id);
                }
            }
            _ => break,
        }
    }
    // what else comes within a second: duplicates
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), done_rx.recv()).await {
        seen += 1;
    }
    eprintln!(
        "{restart:?} restart with {in_progress} jobs in progress: {} of {N} done, {} results ({} duplicates)",
        done.len(),
        seen,
        seen.saturating_sub(done.len())
    );
    for w in workers {
        w.abort();
    }
    observing.abort();
    publishing.abort();
    app.shutdown(Duration::from_secs(2)).await;
    let missing: Vec<u32> = (0..N).filter(|id| !done.contains(id)).collect();
    assert!(missing.is_empty(), "{restart:?}: never done: {missing:?}");
    assert!(in_progress > 0.0, "no job was in progress at the restart");
    assert!(
        seen - done.len() <= in_progress as usize,
        "{restart:?}: more duplicates than jobs in progress"
    );
    (done, seen)
}

#[tokio::test]
async fn a_broker_restart_with_jobs_in_progress_loses_none() {
    through_a_restart(Restart::Broker).await;
}

#[tokio::test]
async fn a_flowgate_restart_with_jobs_in_progress_loses_none() {
    through_a_restart(Restart::Flowgate).await;
}

#[tokio::test]
async fn jobs_finish_when_the_queue_and_the_replicas_windows_are_full() {
    // 60 jobs of 1 s for 2 replicas of 5 each that leave at most 2 results
    // unacknowledged, and a queue of 20. Mosquitto 2.0 sends past the
    // Receive Maximum (20) once the client publishes too (36 held measured),
    // the queue fills and flowgate stops reading the broker. Before: the
    // replicas' results waited for the broker's acknowledgements behind the
    // jobs, the replicas stopped sending results, no job finished (8 of 60
    // in 20 s). Now a result is acknowledged to its replica at once.
    let broker = Mosquitto::start().await;
    let run = burst_with(
        &broker,
        "5",
        ("queue_limit = 20", "max_inflight = 5"),
        Some(2),
    )
    .await;
    assert_eq!(run.window, 20.0);
    assert!(run.most_in_progress <= 10.0, "{}", run.most_in_progress);
}
