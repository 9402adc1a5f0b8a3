//! What the bundled broker keeps across a restart: its retained messages, in
//! `{data_dir}/broker.redb` (redb: crash-safe commits, checksummed pages).
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use prometheus::{Histogram, IntCounter, IntGauge};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use rumqttd::persist::{RetainedChange, RetainedSink, RetainedStore};
use rumqttd::protocol::{v5::V5, Packet, Protocol, Publish, PublishProperties};

use crate::metrics::Metrics;

/// Topic -> (stored at, unix ms; the message as an MQTT 5 PUBLISH).
const RETAINED: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("retained");

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
        "the bundled broker's store {path} has {bad} unreadable retained message(s) of {total} \
         ({first}); nothing was restored and the file is left as it is: move it away to start \
         with an empty broker"
    )]
    Corrupt {
        path: PathBuf,
        bad: usize,
        total: usize,
        first: String,
    },
}

/// Where the router's changes go: counted, then handed to the writer.
struct Sink {
    tx: mpsc::Sender<RetainedChange>,
    reported: Arc<AtomicU64>,
    pending: IntGauge,
}

impl RetainedSink for Sink {
    /// On the router's thread: counted and handed over as it is (the
    /// payload is shared, not copied); the writer encodes.
    fn changed(&self, change: RetainedChange) {
        self.reported.fetch_add(1, Ordering::Release);
        self.pending.inc();
        // the writer lives as long as the process: a send cannot fail
        let _ = self.tx.send(change);
    }
}

/// The open store: what to hand the router, and a way to wait for the disk.
pub struct Store {
    pub path: PathBuf,
    /// For `RouterConfig::retained_store`.
    pub router: RetainedStore,
    reported: Arc<AtomicU64>,
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
        tracing::info!(path = %path.display(), retained = restore.len(), "bundled broker's store opened");
        let meters = Meters {
            changes: metrics.broker_store_changes.clone(),
            commits: metrics.broker_store_commits.clone(),
            errors: metrics.broker_store_errors.clone(),
            pending: metrics.broker_store_pending.clone(),
            commit_seconds: metrics.broker_store_commit_seconds.clone(),
        };
        metrics.broker_retained_restored.set(restore.len() as i64);
        let (tx, rx) = mpsc::channel();
        let reported = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(AtomicU64::new(0));
        let sink = Sink {
            tx,
            reported: reported.clone(),
            pending: meters.pending.clone(),
        };
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
                sink: Arc::new(sink),
            },
            reported,
            committed,
        })
    }

    /// Waits up to `limit` until every change the router reported so far is
    /// on disk. Returns whether it is.
    pub async fn flush(&self, limit: Duration) -> bool {
        let target = self.reported.load(Ordering::Acquire);
        let start = Instant::now();
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

fn read_retained(db: &Database, path: &Path, now: u64) -> Result<Restore, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open(path.into(), e.to_string());
    let rtx = db.begin_read().map_err(|e| open_err(&e))?;
    let table = match rtx.open_table(RETAINED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(open_err(&e)),
    };
    let (mut kept, mut bad, mut total, mut first) = (Vec::new(), 0, 0, None);
    for entry in table.iter().map_err(|e| open_err(&e))? {
        total += 1;
        let (topic, value) = match entry {
            Ok(kv) => kv,
            Err(e) => {
                bad += 1;
                first.get_or_insert_with(|| e.to_string());
                continue;
            }
        };
        let (topic, (stored_ms, frame)) = (topic.value(), value.value());
        match decode(frame) {
            Some(m) => kept.extend(restored(stored_ms, now, m)),
            None => {
                bad += 1;
                first.get_or_insert_with(|| format!("topic {topic:?}: not a PUBLISH"));
            }
        }
    }
    if bad > 0 {
        return Err(StoreError::Corrupt {
            path: path.into(),
            bad,
            total,
            first: first.unwrap_or_default(),
        });
    }
    Ok(kept)
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
    rx: &mpsc::Receiver<RetainedChange>,
    committed: &AtomicU64,
    m: &Meters,
) {
    let mut changes: Vec<RetainedChange> = Vec::new();
    loop {
        match rx.recv() {
            Ok(c) => changes.push(c),
            Err(_) => return,
        }
        changes.extend(rx.try_iter());
        let n = changes.len() as u64;
        let batch = coalesce(std::mem::take(&mut changes));
        loop {
            let started = Instant::now();
            match commit(db, &batch) {
                Ok(()) => {
                    m.commit_seconds.observe(started.elapsed().as_secs_f64());
                    m.commits.inc();
                    m.changes.inc_by(n);
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

fn commit(db: &Database, batch: &[(String, Option<Vec<u8>>)]) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
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
    fn the_expiry_interval_counts_the_time_stored() {
        let m = message(Some(60));
        let (_, props) = restored(1_000, 21_500, m.clone()).expect("20 s of 60 passed");
        assert_eq!(props.and_then(|p| p.message_expiry_interval), Some(40));
        assert!(restored(1_000, 61_000, m).is_none(), "60 s of 60: expired");
        let none = message(None);
        assert!(restored(0, u64::MAX, none).is_some(), "no expiry: kept");
    }
}
