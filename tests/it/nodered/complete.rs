//! Completion acknowledgement with real Node-RED 4.1 replicas whose flow is
//! `mqtt in -> delay 1 s -> mqtt out done/<id>`: `mqtt in` acknowledges a
//! job on receipt, so a replica killed with jobs in its delay queue takes
//! them with it, unless flowgate waits for the result (`complete`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;

/// Jobs sent, one every 50 ms (20 a second).
const JOBS: u32 = 60;

/// The flows: jobs on `jobs/<id>`, the result on `done/<id>` one second
/// later, through a delay node (each message on its own timer).
fn flows() -> String {
    r#"[
{"id":"t1","type":"tab","label":"jobs"},
{"id":"b1","type":"mqtt-broker","name":"flowgate","broker":"${MQTT_HOST}","port":"${MQTT_PORT}","clientid":"line1-nodered","autoConnect":true,"usetls":false,"protocolVersion":"4","keepalive":"60","cleansession":true,"autoUnsubscribe":true},
{"id":"in1","type":"mqtt in","z":"t1","name":"jobs","topic":"jobs/#","qos":"1","datatype":"utf8","broker":"b1","nl":false,"rap":false,"rh":0,"inputs":0,"wires":[["f1"]]},
{"id":"f1","type":"function","z":"t1","func":"msg.topic = 'done/' + msg.topic.split('/')[1];\nreturn msg;","outputs":1,"wires":[["d1"]]},
{"id":"d1","type":"delay","z":"t1","pauseType":"delay","timeout":"1","timeoutUnits":"seconds","rate":"1","nbRateUnits":"1","rateUnits":"second","randomFirst":"1","randomLast":"5","randomUnits":"seconds","drop":false,"allowrate":false,"outputs":1,"wires":[["out1"]]},
{"id":"out1","type":"mqtt out","z":"t1","name":"done","topic":"","qos":"1","retain":"false","broker":"b1","wires":[]}
]"#
    .to_string()
}

/// Two replicas, `JOBS` jobs at 20/s, the first replica killed (kill -9)
/// half-way; the ids whose result came within 30 s.
async fn run(complete: bool) -> BTreeSet<u32> {
    init_logs();
    let extra = if complete {
        "complete = { topic = \"done/#\", correlate = \"topic:1\" }\n"
    } else {
        ""
    };
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"embedded\"\n[[instance]]\nname = \"line1\"\n\
         match = {{ client_id = \"line1-nodered\" }}\n{extra}"
    );
    let app = App::start(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("flowgate starts");
    let mqtt = app.mqtt_addr;
    let mut reps = Vec::new();
    for i in 1..=2 {
        reps.push(NodeRed::start_with(&format!("c{i}"), mqtt, free_port(), &flows(), false).await);
    }
    replicas_connected(&app, 2).await;
    let mut observer = Client3::connect(mqtt, "observer", true);
    observer
        .subscribe("done/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let publisher = Client3::connect(mqtt, "publisher", true);
    // the replicas' subscriptions are live once a probe job comes back done
    let start = Instant::now();
    'probing: for probe in 0.. {
        assert!(start.elapsed() < START_DEADLINE, "no probe job was done");
        publisher
            .client
            .publish(
                format!("jobs/p{probe}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                "probe",
            )
            .await
            .expect("queued");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, observer.events.recv()).await {
            if matches!(seen, Seen::Message(_)) {
                break 'probing;
            }
        }
    }
    // both replicas may hold a probe still: drain what is left
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_millis(1500), observer.events.recv()).await
    {}
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for id in 0..JOBS {
        tick.tick().await;
        if id == JOBS / 2 {
            reps[0].kill().await;
        }
        // the flow keeps the payload: the result names its job
        publisher
            .client
            .publish(
                format!("jobs/{id}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                id.to_string(),
            )
            .await
            .expect("queued");
    }
    // until every result came, or none for 5 s (at most 30 s)
    let mut done = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done.len() < JOBS as usize {
        let quiet = (tokio::time::Instant::now() + Duration::from_secs(5)).min(deadline);
        match tokio::time::timeout_at(quiet, observer.events.recv()).await {
            Ok(Some(Seen::Message(p))) => {
                if let Some(id) = std::str::from_utf8(&p).ok().and_then(|t| t.parse().ok()) {
                    done.insert(id);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    app.shutdown(Duration::from_secs(2)).await;
    drop(reps);
    done
}

#[tokio::test]
async fn nodered_jobs_in_a_dead_replicas_delay_queue_are_done_by_another() {
    let _one = ONE_AT_A_TIME.lock().await;
    let without = run(false).await;
    let with = run(true).await;
    let lost = |done: &BTreeSet<u32>| {
        (0..JOBS)
            .filter(|id| !done.contains(id))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "Node-RED mqtt in -> delay 1 s -> mqtt out, {JOBS} jobs at 20/s, one of two replicas killed half-way: \
         never done without complete: {:?}; with complete: {:?}",
        lost(&without),
        lost(&with)
    );
    assert!(
        lost(&with).is_empty(),
        "with complete, never done: {:?}",
        lost(&with)
    );
}
