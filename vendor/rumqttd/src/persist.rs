//! flowgate patch: a hook that lets the embedder keep retained messages
//! across restarts. The router reports every change of its retained set to a
//! [`RetainedStore`]'s sink, and starts with the messages the embedder restored.
//! How and where they are kept is the embedder's business.

use std::fmt;
use std::sync::Arc;

use crate::protocol::{Publish, PublishProperties};

/// One change of the retained set, in the order the router made them.
#[derive(Debug, Clone)]
pub enum RetainedChange {
    /// `topic` now retains this message.
    Set {
        topic: String,
        publish: Publish,
        properties: Option<PublishProperties>,
    },
    /// `topic` retains nothing any more.
    Clear { topic: String },
}

/// Receives the router's retained changes. Called on the router's thread:
/// must not block (hand the change to a writer of its own).
pub trait RetainedSink: Send + Sync {
    fn changed(&self, change: RetainedChange);
}

/// What the router starts with and whom it tells (in `RouterConfig`).
#[derive(Clone)]
pub struct RetainedStore {
    /// Retained messages the router starts with (topic in the publish).
    pub restore: Arc<Vec<(Publish, Option<PublishProperties>)>>,
    pub sink: Arc<dyn RetainedSink>,
}

impl fmt::Debug for RetainedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedStore")
            .field("restore", &self.restore.len())
            .finish_non_exhaustive()
    }
}

/// flowgate patch: persistent sessions across restarts. The router hands a
/// [`SessionsSnapshot`] of every persistent session (connected or not) to a
/// [`SessionSink`] every `every` while anything happens, and when asked
/// ([`SessionStore::save_now`], a clean stop); it starts with the snapshot the
/// embedder restored.
///
/// A session is its subscriptions and, per subscription, where it is in the
/// subscription's log; the logs hold every message some persistent session
/// has still to get (from the first one not acknowledged), so a message
/// shared by several sessions is kept once. A message is known by its
/// position in its log, which only grows: a snapshot carries the messages
/// appended since the one before (all of them when `full`), and where each
/// log now starts; the embedder keeps the difference.
#[derive(Debug, Clone, Default)]
pub struct SessionsSnapshot {
    /// The first snapshot of this router: what the embedder kept of an
    /// earlier one is replaced, not added to.
    pub full: bool,
    /// Every persistent session.
    pub sessions: Vec<SavedSession>,
    /// Every log a persistent session reads; a log not listed is needed no
    /// more.
    pub logs: Vec<SavedLog>,
}

/// One subscription filter's log: the messages before `first` are needed
/// no more; `messages` (position, message) are new since the last snapshot.
/// At restore: every message kept, in order.
#[derive(Debug, Clone)]
pub struct SavedLog {
    pub filter: String,
    pub first: u64,
    pub messages: Vec<(u64, Publish, Option<PublishProperties>)>,
}

/// One persistent session.
#[derive(Debug, Clone, Default)]
pub struct SavedSession {
    pub client_id: String,
    pub subscriptions: Vec<String>,
    pub requests: Vec<SavedRequest>,
    /// Packet ids of outgoing QoS 2 messages released (PUBREL sent), not
    /// yet completed.
    pub unacked_pubrels: Vec<u16>,
    /// Incoming QoS 2 messages received (PUBREC sent), not yet released.
    pub recorded: Vec<(Publish, Option<PublishProperties>)>,
}

/// Where a session is in one filter's log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRequest {
    pub filter: String,
    pub qos: u8,
    pub forward_retained: bool,
    /// Position in the filter's log of the first message the session has
    /// still to get.
    pub from: u64,
}

/// Receives the router's snapshots. Called on the router's thread: must not
/// block (hand it to a writer of its own).
pub trait SessionSink: Send + Sync {
    fn snapshot(&self, snapshot: SessionsSnapshot);
}

/// What the router starts with and whom it tells (in `RouterConfig`).
#[derive(Clone)]
pub struct SessionStore {
    /// The sessions the router starts with (taken once).
    pub restore: Arc<std::sync::Mutex<Option<SessionsSnapshot>>>,
    pub sink: Arc<dyn SessionSink>,
    /// A snapshot at most this often, and only after something happened.
    pub every: std::time::Duration,
    /// The router's own link, set when it starts.
    pub(crate) link: Arc<std::sync::OnceLock<flume::Sender<(crate::ConnectionId, crate::router::Event)>>>,
}

impl SessionStore {
    pub fn new(
        restore: SessionsSnapshot,
        sink: Arc<dyn SessionSink>,
        every: std::time::Duration,
    ) -> Self {
        Self {
            restore: Arc::new(std::sync::Mutex::new(Some(restore))),
            sink,
            every,
            link: Arc::default(),
        }
    }

    /// Asks the router for a snapshot now. False if it is not running.
    pub fn save_now(&self) -> bool {
        self.link
            .get()
            .is_some_and(|tx| tx.try_send((0, crate::router::Event::SaveSessions)).is_ok())
    }
}

impl fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStore")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// flowgate patch: a listening socket handed to a server (in
/// `ServerSettings::bound`), taken by the server that starts first with it.
#[derive(Clone, Default)]
pub struct BoundListener(Arc<std::sync::Mutex<Option<std::net::TcpListener>>>);

impl BoundListener {
    pub fn new(listener: std::net::TcpListener) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(listener))))
    }

    /// The listener, once.
    pub fn take(&self) -> Option<std::net::TcpListener> {
        match self.0.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

impl fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoundListener")
    }
}
