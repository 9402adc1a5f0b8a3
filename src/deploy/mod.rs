//! Rolling flow deploys: new flows to an instance's Node-RED replicas one at a
//! time, so the line never stops. Preflight (at least two healthy replicas, all
//! on the same flow `rev`, current flows saved for rollback), then per replica:
//! drain its HTTP traffic and wait for its requests in flight, `POST /flows`
//! (a full deploy, API v2 with `rev`), wait until it reports the new `rev`, its
//! flows run, it answers its health check and the instance has as many MQTT
//! replicas connected as before, put it back. On failure that replica gets its
//! old flows back, stays drained, and the deploy stops saying why.
//!
//! MQTT needs no drain step: a full deploy stops Node-RED's MQTT broker node,
//! which disconnects cleanly, and in dispatch mode flowgate hands what that
//! replica had not acknowledged to the others; it reconnects and subscribes
//! again when its flows start.

pub mod nodered;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::http::backend::{Backend, Pool};
use crate::metrics::Metrics;
use nodered::NodeRed;

/// What `GET /api/instances/{name}/deploy` shows.
#[derive(Debug, Clone, Serialize)]
pub struct DeployStatus {
    pub instance: String,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    pub started_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// Where the flows found on each replica before the deploy were saved.
    pub backup_dir: Option<String>,
    pub replicas: Vec<ReplicaStep>,
    /// What happened, in order.
    pub log: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStep {
    pub replica: String,
    pub addr: String,
    pub from_rev: Option<String>,
    pub to_rev: Option<String>,
    /// `waiting`, `draining`, `deploying`, `starting`, `done`, `failed`, `restored`.
    pub state: &'static str,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A deploy in progress, shared with the admin API that reports it.
pub struct Deploy {
    pub status: Arc<Mutex<DeployStatus>>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    flows: Value,
    /// How long each wait (drain, start) may take.
    step_timeout: Duration,
}

/// Accepts `[...]` (a flows file) or `{"flows": [...]}`.
pub fn flows_of(body: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match v {
        Value::Array(_) => Ok(v),
        Value::Object(mut o) => match o.remove("flows") {
            Some(f @ Value::Array(_)) => Ok(f),
            _ => Err("expected a flows array, or an object with one under \"flows\"".into()),
        },
        _ => Err("expected a flows array".into()),
    }
}

impl Deploy {
    pub fn new(
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        flows: Value,
        step_timeout: Duration,
    ) -> Self {
        let status = DeployStatus {
            instance: pool.instance.clone(),
            state: "running",
            started_unix_ms: unix_ms(),
            finished_unix_ms: None,
            backup_dir: None,
            replicas: pool
                .backends
                .iter()
                .map(|b| ReplicaStep {
                    replica: b.label.clone(),
                    addr: b.addr.clone(),
                    from_rev: None,
                    to_rev: None,
                    state: "waiting",
                })
                .collect(),
            log: Vec::new(),
            error: None,
        };
        Self {
            status: Arc::new(Mutex::new(status)),
            pool,
            metrics,
            flows,
            step_timeout,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut DeployStatus) -> R) -> R {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn log(&self, line: String) {
        tracing::info!(instance = %self.pool.instance, "deploy: {line}");
        self.with(|s| s.log.push(line));
    }

    fn step(&self, i: usize, state: &'static str) {
        self.with(|s| s.replicas[i].state = state);
    }

    /// Runs the deploy to the end; the outcome is in `status`.
    pub async fn run(self) {
        let result = self.rolling().await;
        // done or not, replicas' flows changed: the public routes follow
        self.pool.public.flows_changed();
        let instance = self.pool.instance.clone();
        let outcome = if result.is_ok() { "done" } else { "failed" };
        self.metrics
            .deploys
            .with_label_values(&[instance.as_str(), outcome])
            .inc();
        match result {
            Ok(()) => self.log("deploy done: every replica runs the new flows".into()),
            Err(e) => {
                tracing::warn!(%instance, error = %e, "deploy failed");
                self.with(|s| s.error = Some(e.clone()));
                self.log(format!("deploy stopped: {e}"));
            }
        }
        self.with(|s| {
            s.state = outcome;
            s.finished_unix_ms = Some(unix_ms());
        });
    }

    fn mqtt_sessions(&self) -> u64 {
        self.metrics
            .replica_sessions
            .with_label_values(&[self.pool.instance.as_str()])
            .get()
    }

    fn mqtt_connected(&self) -> i64 {
        self.metrics
            .instance_replicas
            .with_label_values(&[self.pool.instance.as_str()])
            .get()
    }

    async fn rolling(&self) -> Result<(), String> {
        // preflight
        let healthy = self
            .pool
            .backends
            .iter()
            .filter(|b| b.is_up() && !b.is_draining())
            .count();
        if healthy < 2 {
            return Err(format!(
                "preflight: {healthy} healthy replica(s); a rolling deploy needs at least 2"
            ));
        }
        let mut current = Vec::new();
        for b in &self.pool.backends {
            let f = NodeRed::new(&b.addr)
                .flows()
                .await
                .map_err(|e| format!("preflight: replica {} ({}): {e}", b.label, b.addr))?;
            current.push(f);
        }
        let revs: Vec<&str> = current.iter().map(|f| f.rev.as_str()).collect();
        if revs.iter().any(|r| *r != revs[0]) {
            return Err(format!(
                "preflight: replicas run different flows (revs {revs:?}): deploy to one set first"
            ));
        }
        let dir = std::env::temp_dir().join(format!(
            "flowgate-deploy-{}-{}",
            self.pool.instance,
            unix_ms()
        ));
        save_backups(&dir, &current).map_err(|e| format!("preflight: {e}"))?;
        self.with(|s| {
            s.backup_dir = Some(dir.display().to_string());
            for (step, f) in s.replicas.iter_mut().zip(&current) {
                step.from_rev = Some(f.rev.clone());
            }
        });
        self.log(format!(
            "preflight ok: {} replicas on rev {}; flows saved in {}",
            current.len(),
            revs[0],
            dir.display()
        ));
        let mqtt_before = self.mqtt_connected();
        for (i, b) in self.pool.backends.iter().enumerate() {
            self.one(i, b, &current[i].rev, &current[i].flows, mqtt_before)
                .await?;
        }
        Ok(())
    }

    async fn one(
        &self,
        i: usize,
        b: &Arc<Backend>,
        old_rev: &str,
        old_flows: &Value,
        mqtt_before: i64,
    ) -> Result<(), String> {
        let replica = NodeRed::new(&b.addr);
        self.step(i, "draining");
        b.set_draining(true);
        wait(self.step_timeout, || async {
            b.inflight.load(Ordering::Relaxed) == 0
        })
        .await
        .map_err(|_| {
            format!(
                "replica {}: requests still in flight after {:?}",
                b.label, self.step_timeout
            )
        })?;
        self.log(format!("replica {} drained", b.label));
        self.step(i, "deploying");
        let sessions_before = self.mqtt_sessions();
        let new_rev = match replica.deploy(&self.flows, old_rev).await {
            Ok(rev) => rev,
            Err(e) => {
                self.step(i, "failed");
                // nothing changed on it: flows are as before; it stays drained
                return Err(format!(
                    "replica {} refused the flows: {e}; it keeps its flows (rev {old_rev}) and stays drained",
                    b.label
                ));
            }
        };
        self.with(|s| s.replicas[i].to_rev = Some(new_rev.clone()));
        self.step(i, "starting");
        let started = self
            .started(&replica, &new_rev, mqtt_before, sessions_before)
            .await;
        if let Err(e) = started {
            self.step(i, "failed");
            let restored = match replica.deploy(old_flows, &new_rev).await {
                Ok(rev) => format!("its old flows are back (rev {rev})"),
                Err(r) => format!("restoring its old flows failed too: {r}"),
            };
            self.step(i, "restored");
            return Err(format!(
                "replica {}: {e}; {restored}; it stays drained",
                b.label
            ));
        }
        b.set_draining(false);
        self.step(i, "done");
        self.log(format!(
            "replica {} runs rev {new_rev} and takes traffic again",
            b.label
        ));
        Ok(())
    }

    /// The replica reports `rev`, its flows run, and (when the instance has
    /// MQTT replicas) it connected again, so the instance has them all back.
    async fn started(
        &self,
        replica: &NodeRed,
        rev: &str,
        mqtt_before: i64,
        sessions_before: u64,
    ) -> Result<(), String> {
        let running = || async {
            let mqtt_back = mqtt_before == 0
                || (self.mqtt_sessions() > sessions_before && self.mqtt_connected() >= mqtt_before);
            mqtt_back
                && matches!(replica.flows().await, Ok(f) if f.rev == rev)
                && matches!(replica.state().await.as_deref(), Ok("start"))
        };
        wait(self.step_timeout, running).await.map_err(|()| {
            format!(
                "the new flows did not start within {:?} (rev {rev}, MQTT replicas {} of {mqtt_before})",
                self.step_timeout,
                self.mqtt_connected()
            )
        })
    }
}

fn save_backups(dir: &PathBuf, flows: &[nodered::Flows]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (i, f) in flows.iter().enumerate() {
        let path = dir.join(format!("replica-{i}-{}.json", f.rev));
        let text = serde_json::to_string_pretty(&f.flows).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

async fn wait<F, Fut>(timeout: Duration, mut cond: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > timeout {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_come_as_an_array_or_under_flows() {
        assert!(flows_of(b"[{\"id\":\"a\"}]").is_ok());
        assert!(flows_of(b"{\"flows\":[],\"rev\":\"x\"}").is_ok());
        assert!(flows_of(b"{\"oops\":1}").is_err());
        assert!(flows_of(b"nope").is_err());
    }
}
