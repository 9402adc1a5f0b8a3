//! What the bundled broker keeps across a restart: its retained messages and
//! its persistent sessions, in `{data_dir}/broker.redb` (redb: crash-safe
//! commits, checksummed pages).
//!
//! The router reports each change of its retained set (the `persist` hook of
//! the vendored rumqttd) to a [`Sink`]; a writer thread commits what has
//! arrived in one transaction (one fsync per batch, so a burst costs one), and
//! the next batch waits for that commit. Within a batch only a topic's last
//! change is written, and the router's thread does no more than hand the
//! change over (the writer encodes). A change is on disk one commit after
//! the router made it: the window after a crash is the time of one commit
//! (`flowgate_broker_store_commit_seconds`). [`Store::flush`] waits until every
//! reported change is on disk (a clean stop).
//!
//! Each record is the message as an MQTT 5 PUBLISH (rumqttd's own codec, so
//! every property is kept) and the time it was stored, so a message expiry
//! interval goes on counting across the restart.
//!
//! Persistent sessions (subscriptions, where each is in its filter's log,
//! the messages still to deliver, QoS 2 exchanges half done) are a snapshot
//! the router hands over every [`SNAPSHOT_EVERY`] while anything happens, and
//! at a clean stop ([`Store::flush`] asks for one); each snapshot replaces
//! the last in the same kind of commit. After a crash, what changed since
//! the last snapshot is lost: the window is [`SNAPSHOT_EVERY`] plus a commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use prometheus::{Histogram, IntCounter, IntGauge};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use rumqttd::persist::{
    RetainedChange, RetainedSink, RetainedStore, SavedLog, SavedRequest, SavedSession, SessionSink,
    SessionStore, SessionsSnapshot,
};
use rumqttd::protocol::{v5::V5, Packet, Protocol, Publish, PublishProperties};

use crate::metrics::Metrics;

/// Topic -> (stored at, unix ms; the message as an MQTT 5 PUBLISH).
const RETAINED: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("retained");

/// Client id -> the session (JSON of a [`SessionRecord`]).
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (filter, position in its log) -> (stored at, unix ms; the message as an
/// MQTT 5 PUBLISH): what persistent sessions have still to get, each message
/// once per filter. A snapshot adds the messages new since the last and
/// removes those every session is past: its cost is what changed.
const SESSION_LOGS: TableDefinition<(&str, u64), (u64, &[u8])> =
    TableDefinition::new("session_logs");
/// (client id, position) -> an incoming QoS 2 PUBLISH waiting for its PUBREL.
const SESSION_QOS2: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("session_qos2");

/// How often the router hands over its persistent sessions while anything
/// happens (the crash window of a queued message).
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// A persistent session as stored (its messages are in the other tables).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SessionRecord {
    subscriptions: Vec<String>,
    requests: Vec<SavedRequest>,
    unacked_pubrels: Vec<u16>,
}

/// What the writer is handed.
enum Work {
    Retained(RetainedChange),
    Sessions(SessionsSnapshot),
}

/// The store's file in `data_dir`.
pub const FILE_NAME: &str = "broker.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("the bundled broker's store {0} is in use by another process (another flowgate with this data_dir?)")]
    InUse(PathBuf),
    #[error(
        "cannot open the bundled broker's store {0}: {1} (nothing was restored; the file is left \
         as it is: move it away to start with an empty broker)"
    )]
    Open(PathBuf, String),
    #[error(
        "the bundled broker's store {path} has {bad} unreadable {what} of {total} \
         ({first}); nothing was restored and the file is left as it is: move it away to start \
         with an empty broker"
    )]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        bad: usize,
        total: usize,
        first: String,
    },
}

/// Where the router's changes go: counted, then handed to the writer.
struct Sink {
    tx: mpsc::Sender<Work>,
    reported: Arc<AtomicU64>,
    snapshots: Arc<AtomicU64>,
    pending: IntGauge,
}

impl Sink {
    /// On the router's thread: counted and handed over as it is (payloads
    /// are shared, not copied); the writer encodes.
    fn hand_over(&self, work: Work) {
        self.reported.fetch_add(1, Ordering::Release);
        self.pending.inc();
        // the writer lives as long as the process: a send cannot fail
        let _ = self.tx.send(work);
    }
}

impl RetainedSink for Sink {
    fn changed(&self, change: RetainedChange) {
        self.hand_over(Work::Retained(change));
    }
}

impl SessionSink for Sink {
    fn snapshot(&self, snapshot: SessionsSnapshot) {
        self.hand_over(Work::Sessions(snapshot));
        self.snapshots.fetch_add(1, Ordering::Release);
    }
}

/// The open store: what to hand the router, and a way to wait for the disk.
pub struct Store {
    pub path: PathBuf,
    /// For `RouterConfig::retained_store`.
    pub router: RetainedStore,
    /// For `RouterConfig::session_store`.
    pub sessions: SessionStore,
    reported: Arc<AtomicU64>,
    snapshots: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The store's metrics, resolved once.
struct Meters {
    changes: IntCounter,
    commits: IntCounter,
    errors: IntCounter,
    pending: IntGauge,
    commit_seconds: Histogram,
    snapshots: IntCounter,
    queued: IntGauge,
}

impl Store {
    /// Opens (or creates) `data_dir/broker.redb` and reads what it keeps.
    /// Refuses a store it cannot read whole: never a silently empty broker.
    pub fn open(data_dir: &Path, metrics: &Metrics) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Dir(data_dir.into(), e))?;
        let path = data_dir.join(FILE_NAME);
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open(path.clone(), e.to_string());
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.clone()),
            e => open_err(&e),
        })?;
        let restore = read_retained(&db, &path, now_ms())?;
        let sessions = read_sessions(&db, &path, now_ms())?;
        let queued: usize = sessions.logs.iter().map(|l| l.messages.len()).sum();
        tracing::info!(path = %path.display(), retained = restore.len(), sessions = sessions.sessions.len(), queued, "bundled broker's store opened");
        let meters = Meters {
            changes: metrics.broker_store_changes.clone(),
            commits: metrics.broker_store_commits.clone(),
            errors: metrics.broker_store_errors.clone(),
            pending: metrics.broker_store_pending.clone(),
            commit_seconds: metrics.broker_store_commit_seconds.clone(),
            snapshots: metrics.broker_session_snapshots.clone(),
            queued: metrics.broker_queued_stored.clone(),
        };
        metrics.broker_retained_restored.set(restore.len() as i64);
        metrics
            .broker_sessions_restored
            .set(sessions.sessions.len() as i64);
        metrics.broker_queued_restored.set(queued as i64);
        let (tx, rx) = mpsc::channel();
        let reported = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(AtomicU64::new(0));
        let snapshots = Arc::new(AtomicU64::new(0));
        let sink = Arc::new(Sink {
            tx,
            reported: reported.clone(),
            snapshots: snapshots.clone(),
            pending: meters.pending.clone(),
        });
        let done = committed.clone();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("broker-store".into())
            .spawn(move || write_loop(&db, &writer_path, &rx, &done, &meters))
            .map_err(|e| open_err(&e))?;
        Ok(Self {
            path,
            router: RetainedStore {
                restore: Arc::new(restore),
                sink: sink.clone(),
            },
            sessions: SessionStore::new(sessions, sink, SNAPSHOT_EVERY),
            reported,
            committed,
            snapshots,
        })
    }

    /// Asks the router for a last snapshot of its sessions, then waits up
    /// to `limit` until it and every change reported before it are on disk.
    /// Returns whether they are.
    pub async fn flush(&self, limit: Duration) -> bool {
        let start = Instant::now();
        let before = self.snapshots.load(Ordering::Acquire);
        if self.sessions.save_now() {
            while self.snapshots.load(Ordering::Acquire) == before {
                if start.elapsed() > limit {
                    tracing::error!(path = %self.path.display(), "bundled broker's store: no snapshot of the sessions at stop");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let target = self.reported.load(Ordering::Acquire);
        while self.committed.load(Ordering::Acquire) < target {
            if start.elapsed() > limit {
                tracing::error!(path = %self.path.display(), waiting = target - self.committed.load(Ordering::Acquire), "bundled broker's store: changes not on disk at stop");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The record of a retained message: stored-at time, then the PUBLISH.
fn encode(publish: Publish, properties: Option<PublishProperties>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    // rumqttd's own encoder of what its own decoder accepted: cannot fail
    let _ = V5.write(Packet::Publish(publish, properties), &mut buf);
    buf.to_vec()
}

/// Decodes one record; `None` if it is not a whole PUBLISH.
fn decode(frame: &[u8]) -> Option<(Publish, Option<PublishProperties>)> {
    let mut buf = BytesMut::from(frame);
    match V5.read_mut(&mut buf, usize::MAX) {
        Ok(Packet::Publish(p, props)) if buf.is_empty() => Some((p, props)),
        _ => None,
    }
}

/// What a stored message restores as at `now_ms`: its expiry interval less
/// the time it was stored, or nothing if that has run out.
fn restored(
    stored_ms: u64,
    now_ms: u64,
    (publish, mut props): (Publish, Option<PublishProperties>),
) -> Option<(Publish, Option<PublishProperties>)> {
    if let Some(expiry) = props
        .as_mut()
        .and_then(|p| p.message_expiry_interval.as_mut())
    {
        let waited = u32::try_from(now_ms.saturating_sub(stored_ms) / 1000).unwrap_or(u32::MAX);
        if waited >= *expiry {
            return None;
        }
        *expiry -= waited;
    }
    Some((publish, props))
}

type Restore = Vec<(Publish, Option<PublishProperties>)>;

/// The retained messages the store keeps, less those whose expiry ran out
/// while flowgate was down (removed from the file as well).
fn read_retained(db: &Database, path: &Path, now: u64) -> Result<Restore, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open(path.into(), e.to_string());
    let rtx = db.begin_read().map_err(|e| open_err(&e))?;
    let Some(table) = existing(rtx.open_table(RETAINED)).map_err(|e| open_err(&e))? else {
        return Ok(Vec::new());
    };
    let (mut kept, mut expired) = (Vec::new(), Vec::new());
    let mut un = Unreadable::default();
    for entry in table.iter().map_err(|e| open_err(&e))? {
        let Some((topic, value)) = un.read(entry) else {
            continue;
        };
        let (topic, (stored_ms, frame)) = (topic.value(), value.value());
        let m = decode(frame).ok_or_else(|| format!("topic {topic:?}: not a PUBLISH"));
        if let Some(m) = un.read(m) {
            match restored(stored_ms, now, m) {
                Some(m) => kept.push(m),
                None => expired.push(topic.to_owned()),
            }
        }
    }
    if un.bad > 0 {
        return Err(StoreError::Corrupt {
            path: path.into(),
            what: "retained message(s)",
            bad: un.bad,
            total: un.total,
            first: un.first.unwrap_or_default(),
        });
    }
    drop((table, rtx));
    if !expired.is_empty() {
        let removed = (|| -> Result<(), redb::Error> {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(RETAINED)?;
                for topic in &expired {
                    table.remove(topic.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), expired = expired.len(), "expired retained messages removed from the store")
            }
            // they stay in the file and expire again at the next start
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove expired retained messages from the store")
            }
        }
    }
    Ok(kept)
}

/// A table, or `None` when the store has none of that name yet.
fn existing<T>(table: Result<T, redb::TableError>) -> Result<Option<T>, redb::TableError> {
    match table {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Counts what could not be read, naming the first.
#[derive(Default)]
struct Unreadable {
    bad: usize,
    total: usize,
    first: Option<String>,
}

impl Unreadable {
    fn read<T>(&mut self, what: Result<T, impl std::fmt::Display>) -> Option<T> {
        self.total += 1;
        match what {
            Ok(v) => Some(v),
            Err(e) => {
                self.bad += 1;
                self.first.get_or_insert_with(|| e.to_string());
                None
            }
        }
    }
}

/// The persistent sessions as the last snapshot left them. A queued message
/// whose expiry ran out while flowgate was down is restored with an expiry
/// of 0: the broker drops it when it comes to it.
fn read_sessions(db: &Database, path: &Path, now: u64) -> Result<SessionsSnapshot, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open(path.into(), e.to_string());
    let rtx = db.begin_read().map_err(|e| open_err(&e))?;
    let mut snapshot = SessionsSnapshot::default();
    let mut un = Unreadable::default();
    if let Some(table) = existing(rtx.open_table(SESSION_LOGS)).map_err(|e| open_err(&e))? {
        for entry in table.iter().map_err(|e| open_err(&e))? {
            let Some((key, value)) = un.read(entry) else {
                continue;
            };
            let ((filter, at), (stored_ms, frame)) = (key.value(), value.value());
            let Some(m) = un.read(decode(frame).ok_or("a queued message is not a PUBLISH")) else {
                continue;
            };
            let (p, props) = restored(stored_ms, now, m.clone()).unwrap_or_else(|| expired(m));
            match snapshot.logs.last_mut().filter(|l| l.filter == filter) {
                Some(log) => log.messages.push((at, p, props)),
                None => snapshot.logs.push(SavedLog {
                    filter: filter.to_owned(),
                    first: at,
                    messages: vec![(at, p, props)],
                }),
            }
        }
    }
    let mut recorded: HashMap<String, Vec<(Publish, Option<PublishProperties>)>> = HashMap::new();
    if let Some(table) = existing(rtx.open_table(SESSION_QOS2)).map_err(|e| open_err(&e))? {
        for entry in table.iter().map_err(|e| open_err(&e))? {
            let Some((key, value)) = un.read(entry) else {
                continue;
            };
            let (client, _) = key.value();
            let m = decode(value.value()).ok_or("a QoS 2 message is not a PUBLISH");
            if let Some(m) = un.read(m) {
                recorded.entry(client.to_owned()).or_default().push(m);
            }
        }
    }
    if let Some(table) = existing(rtx.open_table(SESSIONS)).map_err(|e| open_err(&e))? {
        for entry in table.iter().map_err(|e| open_err(&e))? {
            let Some((key, value)) = un.read(entry) else {
                continue;
            };
            let client_id = key.value().to_owned();
            let Some(r) = un.read(serde_json::from_slice::<SessionRecord>(value.value())) else {
                continue;
            };
            snapshot.sessions.push(SavedSession {
                recorded: recorded.remove(&client_id).unwrap_or_default(),
                client_id,
                subscriptions: r.subscriptions,
                requests: r.requests,
                unacked_pubrels: r.unacked_pubrels,
            });
        }
    }
    if un.bad > 0 {
        return Err(StoreError::Corrupt {
            path: path.into(),
            what: "session record(s)",
            bad: un.bad,
            total: un.total,
            first: un.first.unwrap_or_default(),
        });
    }
    Ok(snapshot)
}

/// A message whose expiry ran out: kept, expiring at once.
fn expired(
    (publish, mut props): (Publish, Option<PublishProperties>),
) -> (Publish, Option<PublishProperties>) {
    if let Some(p) = props.as_mut() {
        p.message_expiry_interval = Some(0);
    }
    (publish, props)
}

/// A snapshot as it goes to disk.
struct EncodedSessions {
    full: bool,
    sessions: Vec<(String, Vec<u8>)>,
    logs: Vec<EncodedLog>,
    qos2: Vec<(String, Vec<Vec<u8>>)>,
}

/// One session log's difference as it goes to disk.
struct EncodedLog {
    filter: String,
    /// The first position still needed.
    first: u64,
    /// New messages: (position, PUBLISH).
    frames: Vec<(u64, Vec<u8>)>,
}

fn encode_sessions(snapshot: SessionsSnapshot) -> EncodedSessions {
    let mut out = EncodedSessions {
        full: snapshot.full,
        sessions: Vec::new(),
        logs: Vec::new(),
        qos2: Vec::new(),
    };
    for log in snapshot.logs {
        let frames = log
            .messages
            .into_iter()
            .map(|(at, p, props)| (at, encode(p, props)));
        out.logs.push(EncodedLog {
            filter: log.filter,
            first: log.first,
            frames: frames.collect(),
        });
    }
    for s in snapshot.sessions {
        let record = SessionRecord {
            subscriptions: s.subscriptions,
            requests: s.requests,
            unacked_pubrels: s.unacked_pubrels,
        };
        // plain strings and numbers: JSON cannot refuse them
        let json = serde_json::to_vec(&record).unwrap_or_default();
        if !s.recorded.is_empty() {
            let frames = s.recorded.into_iter().map(|(p, props)| encode(p, props));
            out.qos2.push((s.client_id.clone(), frames.collect()));
        }
        out.sessions.push((s.client_id, json));
    }
    out
}

/// What a batch leaves each topic with: the last change wins (`None`:
/// cleared), in the order the topics first changed.
fn coalesce(changes: Vec<RetainedChange>) -> Vec<(String, Option<Vec<u8>>)> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for change in changes {
        let (topic, record) = match change {
            RetainedChange::Set {
                topic,
                publish,
                properties,
            } => (topic, Some((publish, properties))),
            RetainedChange::Clear { topic } => (topic, None),
        };
        let record = record.map(|(p, props)| encode(p, props));
        match at.get(&topic) {
            Some(&i) => out[i].1 = record,
            None => {
                at.insert(topic.clone(), out.len());
                out.push((topic, record));
            }
        }
    }
    out
}

/// Commits what has arrived, batch by batch, until the process ends. A
/// failed commit (disk full) is logged, counted and retried with the same
/// batch: nothing is dropped.
fn write_loop(
    db: &Database,
    path: &Path,
    rx: &mpsc::Receiver<Work>,
    committed: &AtomicU64,
    m: &Meters,
) {
    let mut work: Vec<Work> = Vec::new();
    // the session logs on disk and how many messages each holds (known
    // from the first snapshot, which is whole)
    let mut on_disk: HashMap<String, u64> = HashMap::new();
    loop {
        match rx.recv() {
            Ok(w) => work.push(w),
            Err(_) => return,
        }
        work.extend(rx.try_iter());
        let n = work.len() as u64;
        // snapshots are differences: each one applies, in order
        let (mut changes, mut snapshots) = (Vec::new(), Vec::new());
        for w in work.drain(..) {
            match w {
                Work::Retained(c) => changes.push(c),
                Work::Sessions(s) => snapshots.push(encode_sessions(s)),
            }
        }
        let batch = coalesce(changes);
        let count = snapshots.len() as u64;
        loop {
            let started = Instant::now();
            let mut logs = on_disk.clone();
            match commit(db, &batch, &snapshots, &mut logs) {
                Ok(()) => {
                    on_disk = logs;
                    m.commit_seconds.observe(started.elapsed().as_secs_f64());
                    m.commits.inc();
                    m.snapshots.inc_by(count);
                    if count > 0 {
                        m.queued.set(on_disk.values().sum::<u64>() as i64);
                    }
                    m.changes.inc_by(n - count);
                    m.pending.sub(n as i64);
                    committed.fetch_add(n, Ordering::Release);
                    break;
                }
                Err(e) => {
                    m.errors.inc();
                    tracing::error!(path = %path.display(), error = %e, waiting = n, "bundled broker's store: commit failed; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// One transaction: the retained changes, then each session snapshot in
/// order. `logs`: the session logs on disk and their message counts,
/// updated as the snapshots apply.
fn commit(
    db: &Database,
    batch: &[(String, Option<Vec<u8>>)],
    snapshots: &[EncodedSessions],
    logs: &mut HashMap<String, u64>,
) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    let at = now_ms();
    for s in snapshots {
        // sessions and held QoS 2 messages are small: written whole
        tx.delete_table(SESSIONS)?;
        tx.delete_table(SESSION_QOS2)?;
        let mut table = tx.open_table(SESSIONS)?;
        for (client, json) in &s.sessions {
            table.insert(client.as_str(), json.as_slice())?;
        }
        let mut table = tx.open_table(SESSION_QOS2)?;
        for (client, frames) in &s.qos2 {
            for (i, f) in frames.iter().enumerate() {
                table.insert((client.as_str(), i as u64), f.as_slice())?;
            }
        }
        if s.full {
            tx.delete_table(SESSION_LOGS)?;
            logs.clear();
        }
        let mut table = tx.open_table(SESSION_LOGS)?;
        let listed: std::collections::HashSet<&str> =
            s.logs.iter().map(|l| l.filter.as_str()).collect();
        for gone in logs.keys().filter(|f| !listed.contains(f.as_str())) {
            table.retain_in((gone.as_str(), 0)..=(gone.as_str(), u64::MAX), |_, _| false)?;
        }
        logs.retain(|f, _| listed.contains(f.as_str()));
        for EncodedLog {
            filter,
            first,
            frames,
        } in &s.logs
        {
            let f = filter.as_str();
            let mut dropped = 0u64;
            table.retain_in((f, 0)..(f, *first), |_, _| {
                dropped += 1;
                false
            })?;
            for (pos, frame) in frames {
                table.insert((f, *pos), (at, frame.as_slice()))?;
            }
            let held = logs.entry(filter.clone()).or_insert(0);
            *held = (*held + frames.len() as u64).saturating_sub(dropped);
        }
    }
    {
        let mut table = tx.open_table(RETAINED)?;
        let at = now_ms();
        for (topic, record) in batch {
            match record {
                Some(r) => {
                    table.insert(topic.as_str(), (at, r.as_slice()))?;
                }
                None => {
                    table.remove(topic.as_str())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(expiry: Option<u32>) -> (Publish, Option<PublishProperties>) {
        let mut frame = BytesMut::new();
        let props = expiry.map(|e| PublishProperties {
            message_expiry_interval: Some(e),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        });
        let publish = Publish::new("status/line1", "up", true);
        let _ = V5.write(Packet::Publish(publish, props), &mut frame);
        decode(&frame).expect("a whole PUBLISH")
    }

    #[test]
    fn a_record_is_the_publish_with_every_property() {
        let (p, props) = message(Some(60));
        let record = encode(p.clone(), props.clone());
        let (back, back_props) = decode(&record).expect("decodes");
        assert_eq!(back, p);
        assert_eq!(back_props, props);
        assert!(
            decode(&record[..record.len() - 1]).is_none(),
            "a cut record"
        );
        assert!(decode(b"\x30").is_none());
    }

    #[test]
    fn a_batch_keeps_each_topics_last_change() {
        let set = |t: &str, v: &'static str| RetainedChange::Set {
            topic: t.into(),
            publish: Publish::new(t.to_string(), v.to_string(), true),
            properties: None,
        };
        let clear = |t: &str| RetainedChange::Clear { topic: t.into() };
        let out = coalesce(vec![
            set("a", "1"),
            set("b", "1"),
            set("a", "2"),
            clear("b"),
            set("c", "1"),
        ]);
        let topics: Vec<_> = out.iter().map(|(t, r)| (t.as_str(), r.is_some())).collect();
        assert_eq!(topics, [("a", true), ("b", false), ("c", true)]);
        let (p, _) = decode(out[0].1.as_deref().expect("set")).expect("a PUBLISH");
        assert_eq!(&p.payload[..], b"2");
    }

    #[test]
    fn session_snapshots_apply_as_differences_and_read_back_whole() {
        let dir = std::env::temp_dir().join(format!("flowgate-store-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).expect("db");
        let live = message(None);
        let short = message(Some(1));
        let at = |pos: u64, (p, props): (Publish, Option<PublishProperties>)| (pos, p, props);
        let request = |from| SavedRequest {
            filter: "jobs/#".into(),
            qos: 1,
            forward_retained: false,
            from,
        };
        let session = |id: &str, from| SavedSession {
            client_id: id.into(),
            subscriptions: vec!["jobs/#".into()],
            requests: vec![request(from)],
            ..Default::default()
        };
        let mut a = session("a", 10);
        a.unacked_pubrels = vec![3];
        a.recorded = vec![live.clone()];
        let first = SessionsSnapshot {
            full: true,
            sessions: vec![a, session("b", 12)],
            logs: vec![SavedLog {
                filter: "jobs/#".into(),
                first: 10,
                messages: vec![at(10, live.clone()), at(11, short), at(12, live.clone())],
            }],
        };
        let mut logs = HashMap::new();
        commit(&db, &[], &[encode_sessions(first)], &mut logs).expect("commit");
        assert_eq!(logs.get("jobs/#"), Some(&3));
        // two seconds later: the 1 s message has expired (it goes at once)
        let back = read_sessions(&db, &path, now_ms() + 2_000).expect("reads");
        assert_eq!(back.logs.len(), 1);
        let kept: Vec<_> = back.logs[0]
            .messages
            .iter()
            .map(|(pos, _, p)| (*pos, p.as_ref().and_then(|p| p.message_expiry_interval)))
            .collect();
        assert_eq!(kept, [(10, None), (11, Some(0)), (12, None)]);
        let mut sessions = back.sessions;
        sessions.sort_by(|x, y| x.client_id.cmp(&y.client_id));
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions[0].requests, [request(10)]);
        assert_eq!(sessions[0].unacked_pubrels, [3]);
        assert_eq!(sessions[0].recorded, std::slice::from_ref(&live));
        assert_eq!(sessions[1].requests, [request(12)]);
        assert!(sessions[1].recorded.is_empty());
        // a difference: both sessions are past 11, one message is new; a log
        // no session reads any more is gone
        let next = SessionsSnapshot {
            full: false,
            sessions: vec![session("a", 12), session("b", 13)],
            logs: vec![SavedLog {
                filter: "jobs/#".into(),
                first: 12,
                messages: vec![at(13, live.clone())],
            }],
        };
        commit(&db, &[], &[encode_sessions(next)], &mut logs).expect("commit");
        assert_eq!(logs.get("jobs/#"), Some(&2));
        let back = read_sessions(&db, &path, now_ms()).expect("reads");
        let kept: Vec<u64> = back.logs[0].messages.iter().map(|m| m.0).collect();
        assert_eq!(kept, [12, 13]);
        assert!(back.sessions.iter().all(|s| s.recorded.is_empty()));
        let gone = SessionsSnapshot::default();
        commit(&db, &[], &[encode_sessions(gone)], &mut logs).expect("commit");
        let back = read_sessions(&db, &path, now_ms()).expect("reads");
        assert!(back.sessions.is_empty() && back.logs.is_empty());
        assert!(logs.is_empty());
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_expired_retained_message_is_not_restored_and_leaves_the_file() {
        let dir = std::env::temp_dir().join(format!("flowgate-store-exp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).expect("db");
        let (p, props) = message(Some(1));
        let batch = vec![
            ("status/short".to_string(), Some(encode(p.clone(), props))),
            ("status/long".to_string(), Some(encode(p, None))),
        ];
        commit(&db, &batch, &[], &mut HashMap::new()).expect("commit");
        let kept = read_retained(&db, &path, now_ms() + 2_000).expect("reads");
        assert_eq!(kept.len(), 1, "the 1 s message expired");
        let rtx = db.begin_read().expect("read");
        let table = rtx.open_table(RETAINED).expect("table");
        assert!(table.get("status/short").expect("get").is_none(), "removed");
        assert!(table.get("status/long").expect("get").is_some());
        drop((table, rtx, db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_expiry_interval_counts_the_time_stored() {
        let m = message(Some(60));
        let (_, props) = restored(1_000, 21_500, m.clone()).expect("20 s of 60 passed");
        assert_eq!(props.and_then(|p| p.message_expiry_interval), Some(40));
        assert!(restored(1_000, 61_000, m).is_none(), "60 s of 60: expired");
        let none = message(None);
        assert!(restored(0, u64::MAX, none).is_some(), "no expiry: kept");
    }
}
