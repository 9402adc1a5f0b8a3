//! The flows watch: every `rev_interval` (and after each rolling deploy)
//! flowgate reads each replica's flows (`GET /flows`, API v2) to count the
//! replicas whose flows differ (divergence) and to learn what the flows
//! publish on the public listener ([`routes`](super::routes)). Owns the
//! public route set of a pool; the matching itself is pure and lives in
//! `routes`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::IntCounter;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, Pool};
use super::routes::PublicRoutes;
use crate::nodered::{Flows, NodeRed, NodeRedError};

/// How often the routes are read when the divergence watch is off.
const ROUTES_INTERVAL: Duration = Duration::from_secs(10);
/// How soon to try again while the flows have never been read.
const FIRST_READ_RETRY: Duration = Duration::from_secs(1);

/// What the public listener lets through, as last read from the flows.
pub struct PublicSide {
    routes: RwLock<Arc<PublicRoutes>>,
    /// The revs the routes were built from (sorted), `None` before the
    /// flows were first read.
    from_revs: RwLock<Option<Vec<String>>>,
    /// The "flows not read" warning was logged for the current outage.
    warned: AtomicBool,
    /// Poked after a rolling deploy: read the flows now.
    changed: Notify,
    pub denied: IntCounter,
}

impl PublicSide {
    pub fn new(public_paths: &[String], denied: IntCounter) -> Self {
        Self {
            routes: RwLock::new(Arc::new(PublicRoutes::only(public_paths))),
            from_revs: RwLock::new(None),
            warned: AtomicBool::new(false),
            changed: Notify::new(),
            denied,
        }
    }

    /// The current route set (cheap: one reference count).
    pub fn routes(&self) -> Arc<PublicRoutes> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// May a `method` request for `path` pass (the routes as last read)?
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(method, path)
    }

    /// Have the flows been read at least once?
    pub fn read(&self) -> bool {
        self.from_revs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Reads the flows again at once (after a deploy changed them).
    pub fn flows_changed(&self) {
        self.changed.notify_one();
    }
}

impl Pool {
    /// Reads every replica's flows each `rev_interval` (each 10 s when that
    /// is 0 and the public side needs them; every second until the first
    /// read succeeds): counts the replicas whose `rev` differs from most
    /// replicas' (a replica whose admin API does not answer has no rev and
    /// is not counted) and rebuilds the public routes when the revs change.
    pub async fn rev_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let divergence = !self.cfg.rev_interval.is_zero();
        let routes = self.cfg.block_admin;
        if !divergence && !routes {
            return;
        }
        let period = if divergence {
            self.cfg.rev_interval
        } else {
            ROUTES_INTERVAL
        };
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.public.changed.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let mut read = Vec::with_capacity(self.backends.len());
            for b in &self.backends {
                read.push(NodeRed::new(&b.addr).flows().await);
            }
            if divergence {
                self.divergence(&read);
            }
            if routes {
                self.update_routes(&read).await;
            }
            wait = if routes && !self.public.read() {
                period.min(FIRST_READ_RETRY)
            } else {
                period
            };
        }
    }

    fn divergence(&self, read: &[Result<Flows, NodeRedError>]) {
        let revs: Vec<Option<&str>> = read
            .iter()
            .map(|r| r.as_ref().ok().map(|f| f.rev.as_str()))
            .collect();
        let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for r in revs.iter().flatten() {
            *counts.entry(r).or_default() += 1;
        }
        let most = counts
            .iter()
            .max_by_key(|(r, n)| (**n, *r))
            .map(|(r, _)| *r);
        let mut diverged = 0;
        for (b, rev) in self.backends.iter().zip(&revs) {
            let differs = matches!((rev, most), (Some(r), Some(m)) if *r != m);
            if differs {
                diverged += 1;
            }
            if b.set_rev(rev.map(str::to_owned), differs) != differs {
                if differs {
                    tracing::warn!(instance = %self.instance, replica = %b.label, rev = ?rev, most = ?most, "replica's flows differ from the others'");
                } else {
                    tracing::info!(instance = %self.instance, replica = %b.label, "replica's flows match the others' again");
                }
            }
        }
        self.metrics
            .flows_diverged
            .with_label_values(&[self.instance.as_str()])
            .set(diverged);
    }

    /// Rebuilds the public routes from the flows of every distinct rev the
    /// replicas run (their union: in the middle of a rolling deploy both the
    /// old and the new flows' routes pass).
    async fn update_routes(&self, read: &[Result<Flows, NodeRedError>]) {
        let mut revs: Vec<(&str, &Value, &Backend)> = Vec::new();
        for (r, b) in read.iter().zip(&self.backends) {
            if let Ok(f) = r {
                if !revs.iter().any(|(rev, _, _)| *rev == f.rev) {
                    revs.push((f.rev.as_str(), &f.flows, b));
                }
            }
        }
        revs.sort_by_key(|(rev, _, _)| *rev);
        let keys: Vec<String> = revs.iter().map(|(r, _, _)| (*r).to_owned()).collect();
        if revs.is_empty() {
            let why = read
                .iter()
                .find_map(|r| r.as_ref().err().map(ToString::to_string))
                .unwrap_or_else(|| "no replica".into());
            if !self.public.warned.swap(true, Ordering::Relaxed) {
                if self.public.read() {
                    tracing::warn!(instance = %self.instance, error = %why, "public listener: flows not readable now; keeping the routes last read");
                } else {
                    tracing::warn!(instance = %self.instance, error = %why, "public listener: flows not read yet; denying everything but public_paths");
                }
            }
            return;
        }
        self.public.warned.store(false, Ordering::Relaxed);
        if self
            .public
            .from_revs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(&keys)
        {
            return;
        }
        // each rev's node root, from a replica that runs it
        let mut sources = Vec::new();
        for (rev, flows, b) in &revs {
            match NodeRed::new(&b.addr).node_root().await {
                Ok(Some(root)) => sources.push((*flows, root)),
                Ok(None) => {
                    tracing::info!(instance = %self.instance, replica = %b.label, "httpNodeRoot is false: flows publish no http routes");
                }
                Err(e) => {
                    tracing::warn!(instance = %self.instance, replica = %b.label, rev, error = %e, "public listener: settings not readable; routes not updated");
                    return;
                }
            }
        }
        let borrowed: Vec<(&Value, &str)> = sources.iter().map(|(f, r)| (*f, r.as_str())).collect();
        let (routes, skipped) = PublicRoutes::union(&borrowed, &self.cfg.public_paths);
        for s in &skipped {
            tracing::warn!(instance = %self.instance, "public listener: {s}");
        }
        tracing::info!(instance = %self.instance, revs = ?keys, routes = ?routes.published, "public listener: routes the flows publish");
        *self
            .public
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        *self
            .public
            .from_revs
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }
}
