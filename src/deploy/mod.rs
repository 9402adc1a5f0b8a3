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
//!
//! Two kinds of change take this road: a flows file (`flowgate deploy`, the
//! admin API; a failure stops at the replica that failed) and the editor's own
//! `POST /flows` (the editor listener; a failure gives every replica already
//! changed its old flows back, and the editor waits for the outcome).

/// Moved to [`crate::nodered`] (the balancer reads flows too; kept here for old paths).
pub use crate::nodered;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::http::backend::{Backend, Pool};
use crate::metrics::Metrics;
use nodered::{NodeRed, NodeRedError};

/// Where a deploy is (`running`, `done`, `failed` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployState {
    Running,
    Done,
    Failed,
}

impl DeployState {
    /// The metric label (the JSON name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// Where one replica is in a deploy (lowercase in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Waiting,
    Draining,
    Deploying,
    Starting,
    Done,
    Failed,
    Restored,
}

/// What `GET /api/instances/{name}/deploy` shows.
#[derive(Debug, Clone, Serialize)]
pub struct DeployStatus {
    pub instance: String,
    pub state: DeployState,
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
    pub state: ReplicaState,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a deploy brings to every replica.
pub enum Change {
    /// A flows file: a full deploy of these flows (API v2, over each
    /// replica's own `rev`).
    Flows(Value),
    /// The editor's `POST /flows`, sent to each replica as the editor sent it.
    Editor(EditorPost),
}

/// The editor's `POST /flows`: its body and the headers that give it meaning.
pub struct EditorPost {
    pub body: Bytes,
    /// `Node-RED-API-Version` (`v1` when absent, as Node-RED reads it).
    pub api_v2: bool,
    /// `Node-RED-Deployment-Type`: `full` (the default), `nodes`, `flows`,
    /// `reload`.
    pub kind: String,
    /// The `rev` the editor's flows are based on (API v2).
    pub rev: Option<String>,
    /// The node types the new flows use.
    pub types: Vec<String>,
}

impl EditorPost {
    /// Reads the editor's request; `Err` is the answer to give it (400).
    pub fn parse(
        body: Bytes,
        version: Option<&str>,
        kind: Option<&str>,
    ) -> Result<Self, FlowsError> {
        let api_v2 = version.is_some_and(|v| v.eq_ignore_ascii_case("v2"));
        let kind = kind.unwrap_or("full").to_ascii_lowercase();
        if !matches!(kind.as_str(), "full" | "nodes" | "flows" | "reload") {
            return Err(FlowsError::UnknownType(kind));
        }
        if kind == "reload" {
            // the body is not read: the replicas restart the flows they have
            return Ok(Self {
                body,
                api_v2,
                kind,
                rev: None,
                types: Vec::new(),
            });
        }
        let v: Value = serde_json::from_slice(&body).map_err(FlowsError::NotJson)?;
        let (flows, rev) = match &v {
            Value::Array(_) if !api_v2 => (&v, None),
            Value::Object(o) if api_v2 => (
                o.get("flows")
                    .ok_or(FlowsError::Shape("no \"flows\" in the body (API v2)"))?,
                o.get("rev").and_then(Value::as_str).map(str::to_string),
            ),
            _ if api_v2 => {
                return Err(FlowsError::Shape(
                    "expected {\"flows\": [...], \"rev\": ...} (API v2)",
                ))
            }
            _ => return Err(FlowsError::Shape("expected a flows array (API v1)")),
        };
        let Value::Array(nodes) = flows else {
            return Err(FlowsError::Shape("\"flows\" is not an array"));
        };
        let mut types: Vec<String> = nodes
            .iter()
            .filter_map(|n| n.get("type").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        types.sort();
        types.dedup();
        Ok(Self {
            body,
            api_v2,
            kind,
            rev,
            types,
        })
    }

    /// Does this deploy restart every node (so each MQTT connection too)?
    fn restarts_all(&self) -> bool {
        matches!(self.kind.as_str(), "full" | "reload")
    }
}

/// Node types no module registers: the editor's own structure.
pub fn builtin_type(t: &str) -> bool {
    matches!(t, "tab" | "subflow" | "group" | "junction") || t.starts_with("subflow:")
}

/// Flows given to deploy that cannot be read (the answer is 400).
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("unknown Node-RED-Deployment-Type {0:?}")]
    UnknownType(String),
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, not of the shape expected (what was).
    #[error("{0}")]
    Shape(&'static str),
}

/// Why one replica's step of a rolling deploy failed (the deploy says what
/// each replica runs after it).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("replica {replica}: requests still in flight after {after:?}")]
    NotDrained { replica: String, after: Duration },
    #[error("replica {replica} refused the flows: {source}; it keeps its flows (rev {rev})")]
    Refused {
        replica: String,
        source: NodeRedError,
        rev: String,
    },
    #[error("replica {replica}: {why}; {}", restored_text(restored))]
    NotStarted {
        replica: String,
        why: NotStarted,
        /// Putting its old flows back: the rev they run under.
        restored: Result<String, NodeRedError>,
    },
}

fn restored_text(restored: &Result<String, NodeRedError>) -> String {
    match restored {
        Ok(rev) => format!("its old flows are back (rev {rev})"),
        Err(r) => format!("restoring its old flows failed too: {r}"),
    }
}

/// The new flows did not start in time.
#[derive(Debug, thiserror::Error)]
#[error("the new flows did not start within {within:?} (rev {rev}, MQTT replicas {connected} of {before})")]
struct NotStarted {
    within: Duration,
    rev: String,
    connected: i64,
    before: i64,
}

/// The flows read before a deploy could not be saved.
#[derive(Debug, thiserror::Error)]
enum BackupError {
    #[error("cannot create {}: {source}", dir.display())]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Json(serde_json::Error),
}

/// Why a deploy did not happen or did not finish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeployError {
    /// The replicas run other flows than those the change is based on.
    #[error("{0}")]
    Conflict(String),
    /// Nothing changed: a replica could not be read or the flows cannot run.
    #[error("{0}")]
    Preflight(String),
    /// It went wrong part way; what each replica runs is in the message.
    #[error("{0}")]
    Failed(String),
}

/// The deploy of each instance, the last one kept: one at a time per
/// instance, whoever starts it (the admin API or the editor).
#[derive(Default)]
pub struct Registry {
    by_instance: Mutex<std::collections::HashMap<String, Arc<Mutex<DeployStatus>>>>,
}

impl Registry {
    /// Records `status` as the instance's deploy; `false` (nothing recorded)
    /// while another one runs.
    pub fn begin(&self, instance: &str, status: Arc<Mutex<DeployStatus>>) -> bool {
        let mut all = self.by_instance.lock().unwrap_or_else(|p| p.into_inner());
        let running = all.get(instance).is_some_and(|s| {
            s.lock().unwrap_or_else(|p| p.into_inner()).state == DeployState::Running
        });
        if !running {
            all.insert(instance.to_string(), status);
        }
        !running
    }

    /// The instance's last deploy, as it stands.
    pub fn get(&self, instance: &str) -> Option<DeployStatus> {
        let all = self.by_instance.lock().unwrap_or_else(|p| p.into_inner());
        all.get(instance)
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A deploy in progress, shared with the admin API that reports it.
pub struct Deploy {
    pub status: Arc<Mutex<DeployStatus>>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    change: Change,
    /// How long each wait (drain, start) may take.
    step_timeout: Duration,
}

/// Accepts `[...]` (a flows file) or `{"flows": [...]}`.
pub fn flows_of(body: &[u8]) -> Result<Value, FlowsError> {
    let v: Value = serde_json::from_slice(body).map_err(FlowsError::NotJson)?;
    match v {
        Value::Array(_) => Ok(v),
        Value::Object(mut o) => match o.remove("flows") {
            Some(f @ Value::Array(_)) => Ok(f),
            _ => Err(FlowsError::Shape(
                "expected a flows array, or an object with one under \"flows\"",
            )),
        },
        _ => Err(FlowsError::Shape("expected a flows array")),
    }
}

impl Deploy {
    pub fn new(
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        flows: Value,
        step_timeout: Duration,
    ) -> Self {
        Self::of(pool, metrics, Change::Flows(flows), step_timeout)
    }

    pub fn of(
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        change: Change,
        step_timeout: Duration,
    ) -> Self {
        let status = DeployStatus {
            instance: pool.instance.clone(),
            state: DeployState::Running,
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
                    state: ReplicaState::Waiting,
                })
                .collect(),
            log: Vec::new(),
            error: None,
        };
        Self {
            status: Arc::new(Mutex::new(status)),
            pool,
            metrics,
            change,
            step_timeout,
        }
    }

    fn editor(&self) -> Option<&EditorPost> {
        match &self.change {
            Change::Editor(e) => Some(e),
            Change::Flows(_) => None,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut DeployStatus) -> R) -> R {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn log(&self, line: String) {
        tracing::info!(instance = %self.pool.instance, "deploy: {line}");
        self.with(|s| s.log.push(line));
    }

    fn step(&self, i: usize, state: ReplicaState) {
        self.with(|s| s.replicas[i].state = state);
    }

    /// Runs the deploy to the end: the rev every replica runs, or why not.
    /// The outcome is in `status` too.
    pub async fn run(self) -> Result<String, DeployError> {
        let result = self.rolling().await;
        // done or not, replicas' flows changed: the public routes follow
        self.pool.public.flows_changed();
        let instance = self.pool.instance.clone();
        let outcome = if result.is_ok() {
            DeployState::Done
        } else {
            DeployState::Failed
        };
        // a stale editor (409) is not a deploy that failed
        if !matches!(result, Err(DeployError::Conflict(_))) {
            self.metrics
                .deploys
                .with_label_values(&[instance.as_str(), outcome.as_str()])
                .inc();
        }
        if self.editor().is_some() {
            let label = match &result {
                Ok(_) => "done",
                Err(DeployError::Conflict(_)) => "conflict",
                Err(DeployError::Preflight(_)) => "refused",
                Err(DeployError::Failed(_)) => "failed",
            };
            self.metrics
                .editor_deploys
                .with_label_values(&[instance.as_str(), label])
                .inc();
        }
        match &result {
            Ok(_) => self.log("deploy done: every replica runs the new flows".into()),
            Err(e) => {
                tracing::warn!(%instance, error = %e, "deploy failed");
                self.with(|s| s.error = Some(e.to_string()));
                self.log(format!("deploy stopped: {e}"));
            }
        }
        self.with(|s| {
            s.state = outcome;
            s.finished_unix_ms = Some(unix_ms());
        });
        result
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

    async fn rolling(&self) -> Result<String, DeployError> {
        // preflight: nothing changes on any replica if it fails
        let editor = self.editor();
        // the editor deploys to one replica as Node-RED would; a flows file
        // is a rolling deploy or nothing
        let needed = if editor.is_some() { 1 } else { 2 };
        let healthy = self
            .pool
            .backends
            .iter()
            .filter(|b| b.is_up() && !b.is_draining())
            .count();
        if healthy < needed {
            return Err(DeployError::Preflight(format!(
                "preflight: {healthy} healthy replica(s); a rolling deploy needs at least {needed}"
            )));
        }
        let mut current = Vec::new();
        for b in &self.pool.backends {
            let f = NodeRed::new(&b.addr).flows().await.map_err(|e| {
                DeployError::Preflight(format!(
                    "preflight: replica {} ({}): {e}; no replica changed",
                    b.label, b.addr
                ))
            })?;
            current.push(f);
        }
        let revs: Vec<&str> = current.iter().map(|f| f.rev.as_str()).collect();
        if revs.iter().any(|r| *r != revs[0]) {
            return Err(DeployError::Preflight(format!(
                "preflight: replicas run different flows (revs {revs:?}): deploy to one set first"
            )));
        }
        if let Some(post) = editor {
            self.editor_preflight(post, revs[0]).await?;
        }
        let dir = std::env::temp_dir().join(format!(
            "flowgate-deploy-{}-{}",
            self.pool.instance,
            unix_ms()
        ));
        save_backups(&dir, &current)
            .map_err(|e| DeployError::Preflight(format!("preflight: {e}")))?;
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
        let mut rev = revs[0].to_string();
        for (i, b) in self.pool.backends.iter().enumerate() {
            match self.one(i, b, &current[i], mqtt_before).await {
                Ok(r) => rev = r,
                Err(e) if editor.is_some() => {
                    let undone = self.undo(i, &current).await;
                    return Err(DeployError::Failed(format!("{e}; {undone}")));
                }
                Err(e) => return Err(DeployError::Failed(format!("{e}; it stays drained"))),
            }
        }
        Ok(rev)
    }

    /// The editor's flows are based on what the replicas run (else 409, as
    /// Node-RED answers a stale `rev`) and use only node types the replicas
    /// have (Node-RED would take them and then wait for the missing types).
    async fn editor_preflight(&self, post: &EditorPost, rev: &str) -> Result<(), DeployError> {
        if post.rev.as_deref().is_some_and(|r| r != rev) {
            return Err(DeployError::Conflict(format!(
                "the flows were changed since the editor read them (rev {} now, the editor had {})",
                rev,
                post.rev.as_deref().unwrap_or("")
            )));
        }
        for b in &self.pool.backends {
            let known = NodeRed::new(&b.addr).types().await.map_err(|e| {
                DeployError::Preflight(format!("preflight: replica {} ({}): {e}", b.label, b.addr))
            })?;
            let missing: Vec<&str> = post
                .types
                .iter()
                .filter(|t| !builtin_type(t) && !known.contains(t))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(DeployError::Preflight(format!(
                    "replica {} does not have the node type(s) {}: install them on every replica first; no replica changed",
                    b.label,
                    missing.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// After replica `failed` failed: every replica before it gets its old
    /// flows back, and every replica takes traffic again. What each runs.
    async fn undo(&self, failed: usize, current: &[nodered::Flows]) -> String {
        let mut said = Vec::new();
        for (i, b) in self.pool.backends.iter().enumerate().take(failed) {
            let replica = NodeRed::new(&b.addr);
            let old = &current[i].rev;
            let back = match replica.restore(&current[i].raw).await {
                Ok(rev) => {
                    let running =
                        || async { matches!(replica.state().await.as_deref(), Ok("start")) };
                    let _ = wait(self.step_timeout, running).await;
                    rev
                }
                Err(e) => {
                    said.push(format!(
                        "replica {} could not get its old flows back: {e}",
                        b.label
                    ));
                    continue;
                }
            };
            self.step(i, ReplicaState::Restored);
            said.push(if back == *old {
                format!("replica {} is back on rev {old}", b.label)
            } else {
                format!(
                    "replica {} runs its old flows under rev {back} (was {old})",
                    b.label
                )
            });
        }
        for b in &self.pool.backends {
            b.set_draining(false);
        }
        if said.is_empty() {
            "no other replica had changed".into()
        } else {
            said.join("; ")
        }
    }

    /// One replica: drain, deploy, wait until it runs; the rev it runs.
    async fn one(
        &self,
        i: usize,
        b: &Arc<Backend>,
        old: &nodered::Flows,
        mqtt_before: i64,
    ) -> Result<String, StepError> {
        let replica = NodeRed::new(&b.addr);
        self.step(i, ReplicaState::Draining);
        b.set_draining(true);
        wait(self.step_timeout, || async {
            b.inflight.load(Ordering::Relaxed) == 0
        })
        .await
        .map_err(|()| StepError::NotDrained {
            replica: b.label.clone(),
            after: self.step_timeout,
        })?;
        self.log(format!("replica {} drained", b.label));
        self.step(i, ReplicaState::Deploying);
        let sessions_before = self.mqtt_sessions();
        let posted = match &self.change {
            Change::Flows(flows) => replica.deploy(flows, &old.rev).await,
            Change::Editor(post) => match replica
                .post_editor(&post.kind, post.api_v2, post.body.clone())
                .await
            {
                Ok(Some(rev)) => Ok(rev),
                Ok(None) => replica.flows().await.map(|f| f.rev),
                Err(e) => Err(e),
            },
        };
        let posted_at = Instant::now();
        let new_rev = match posted {
            Ok(rev) => rev,
            Err(source) => {
                self.step(i, ReplicaState::Failed);
                // nothing changed on it: flows are as before; it stays drained
                return Err(StepError::Refused {
                    replica: b.label.clone(),
                    source,
                    rev: old.rev.clone(),
                });
            }
        };
        self.with(|s| s.replicas[i].to_rev = Some(new_rev.clone()));
        self.step(i, ReplicaState::Starting);
        let restarts_all = self.editor().is_none_or(EditorPost::restarts_all);
        let started = self
            .started(
                &replica,
                &new_rev,
                mqtt_before,
                sessions_before,
                restarts_all,
                posted_at,
            )
            .await;
        if let Err(why) = started {
            self.step(i, ReplicaState::Failed);
            let restored = replica.restore(&old.raw).await;
            self.step(i, ReplicaState::Restored);
            return Err(StepError::NotStarted {
                replica: b.label.clone(),
                why,
                restored,
            });
        }
        b.set_draining(false);
        self.step(i, ReplicaState::Done);
        self.log(format!(
            "replica {} runs rev {new_rev} and takes traffic again",
            b.label
        ));
        Ok(new_rev)
    }

    /// The replica reports `rev`, its flows run, and (when the instance has
    /// MQTT replicas) it connected again, so the instance has them all back.
    /// A deploy of changed nodes only may leave its MQTT connection alone: then
    /// the replicas must still all be connected a moment after the answer.
    async fn started(
        &self,
        replica: &NodeRed,
        rev: &str,
        mqtt_before: i64,
        sessions_before: u64,
        restarts_all: bool,
        posted_at: Instant,
    ) -> Result<(), NotStarted> {
        let running = || async {
            // a replica that died meanwhile does not come back by this deploy
            let lost = self.pool.backends.iter().filter(|b| !b.is_up()).count();
            let all_back = self.mqtt_connected() >= mqtt_before - lost as i64;
            let reconnected = self.mqtt_sessions() > sessions_before;
            let untouched = !restarts_all && posted_at.elapsed() >= SETTLE;
            let mqtt_back = mqtt_before == 0 || (all_back && (reconnected || untouched));
            mqtt_back
                && matches!(replica.flows().await, Ok(f) if f.rev == rev)
                && matches!(replica.state().await.as_deref(), Ok("start"))
        };
        wait(self.step_timeout, running)
            .await
            .map_err(|()| NotStarted {
                within: self.step_timeout,
                rev: rev.to_owned(),
                connected: self.mqtt_connected(),
                before: mqtt_before,
            })
    }
}

/// How long after a partial deploy's answer the instance must still have all
/// its MQTT replicas connected when the replica did not reconnect (Node-RED
/// closes the connections it restarts before it answers).
const SETTLE: Duration = Duration::from_millis(500);

fn save_backups(dir: &PathBuf, flows: &[nodered::Flows]) -> Result<(), BackupError> {
    std::fs::create_dir_all(dir).map_err(|source| BackupError::Create {
        dir: dir.clone(),
        source,
    })?;
    for (i, f) in flows.iter().enumerate() {
        let path = dir.join(format!("replica-{i}-{}.json", f.rev));
        let text = serde_json::to_string_pretty(&f.flows).map_err(BackupError::Json)?;
        std::fs::write(&path, text).map_err(|source| BackupError::Write { path, source })?;
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
    fn the_editors_deploy_is_read_as_node_red_reads_it() {
        let v2 = EditorPost::parse(
            Bytes::from_static(br#"{"flows":[{"id":"t","type":"tab"},{"id":"a","type":"inject"},{"id":"b","type":"inject"},{"id":"s","type":"subflow:x"}],"rev":"r1"}"#),
            Some("v2"),
            Some("nodes"),
        )
        .expect("v2 body");
        assert!(v2.api_v2);
        assert_eq!(v2.kind, "nodes");
        assert_eq!(v2.rev.as_deref(), Some("r1"));
        assert_eq!(v2.types, ["inject", "subflow:x", "tab"]);
        assert!(!v2.restarts_all());
        let v1 = EditorPost::parse(
            Bytes::from_static(br#"[{"id":"a","type":"debug"}]"#),
            None,
            None,
        )
        .expect("v1 body");
        assert!(!v1.api_v2 && v1.rev.is_none() && v1.restarts_all());
        assert_eq!(v1.kind, "full");
        // reload: the body is not read
        assert!(EditorPost::parse(Bytes::new(), Some("v2"), Some("reload")).is_ok());
        for (body, version, kind) in [
            (&b"{not json"[..], Some("v2"), None),
            (br#"[{"id":"a"}]"#, Some("v2"), None),
            (br#"{"flows":[]}"#, None, None),
            (br#"{"flows":{}}"#, Some("v2"), None),
            (br#"[]"#, None, Some("everything")),
        ] {
            assert!(
                EditorPost::parse(Bytes::copy_from_slice(body), version, kind).is_err(),
                "{:?} {version:?} {kind:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(builtin_type("tab") && builtin_type("subflow:abc") && builtin_type("junction"));
        assert!(!builtin_type("inject"));
    }

    #[test]
    fn one_deploy_at_a_time_per_instance() {
        let status = |state: DeployState| {
            Arc::new(Mutex::new(DeployStatus {
                instance: "a".into(),
                state,
                started_unix_ms: 0,
                finished_unix_ms: None,
                backup_dir: None,
                replicas: Vec::new(),
                log: Vec::new(),
                error: None,
            }))
        };
        let r = Registry::default();
        let running = status(DeployState::Running);
        assert!(r.begin("a", running.clone()));
        assert!(
            !r.begin("a", status(DeployState::Running)),
            "a second one while it runs"
        );
        assert!(
            r.begin("b", status(DeployState::Running)),
            "another instance"
        );
        running.lock().expect("lock").state = DeployState::Done;
        assert!(r.begin("a", status(DeployState::Running)), "after it ended");
        assert_eq!(r.get("a").map(|s| s.state), Some(DeployState::Running));
        assert!(r.get("c").is_none());
    }

    #[test]
    fn flows_come_as_an_array_or_under_flows() {
        assert!(flows_of(b"[{\"id\":\"a\"}]").is_ok());
        assert!(flows_of(b"{\"flows\":[],\"rev\":\"x\"}").is_ok());
        assert!(flows_of(b"{\"oops\":1}").is_err());
        assert!(flows_of(b"nope").is_err());
    }
}
