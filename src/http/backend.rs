//! An instance's HTTP replicas: their health, in-flight counts, drain flags,
//! pooled connections and the active health probe.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balancer::{self, Candidate};
use super::health::Health;
use super::watch::PublicSide;
use crate::config::{Balance, HttpConfig};
use crate::metrics::names::SIDE_HTTP;
use crate::metrics::{Failover, Metrics};
use crate::tie::Tie;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Idle pooled connections kept per replica.
const MAX_IDLE: usize = 64;
/// Idle lean-path connections kept per replica: enough for hundreds of busy
/// clients without opening a connection per request (each closes after
/// `idle_timeout` unused).
const MAX_IDLE_RAW: usize = 512;

/// One replica's HTTP side.
pub struct Backend {
    pub index: usize,
    pub label: String,
    pub addr: String,
    /// The IP its MQTT connection comes from (active-standby tie), if known.
    pub mqtt_host: Option<std::net::IpAddr>,
    health: Mutex<Health>,
    up: AtomicBool,
    draining: AtomicBool,
    pub inflight: AtomicUsize,
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
    /// Idle connections of the lean path (no HTTP state but the socket),
    /// with the shard whose runtime they belong to.
    idle_raw: Mutex<Vec<(Option<usize>, TcpStream, Instant)>>,
    /// Bumped when the replica goes down: spliced (WebSocket) connections
    /// watching it close.
    generation: watch::Sender<u64>,
    /// Set once the probe found the admin API off (404): TCP checks from then.
    tcp_fallback: AtomicBool,
    /// The first failed probe of the current run of failures.
    failing_since: Mutex<Option<Instant>>,
    /// The replica's Node-RED flow `rev`, as last read (divergence watch).
    rev: Mutex<Option<String>>,
    /// Its rev differs from most replicas'.
    diverged: AtomicBool,
    /// Where its connections' tasks (hyper drivers, upgrade splices) run:
    /// the app's tracker, so shutdown waits for them.
    tasks: TaskTracker,
    /// The app's shutdown: pooled connections are not kept after it, spliced
    /// ones close.
    closing: CancellationToken,
    /// Why and since when the replica is down (active-standby's failover cause).
    down: Mutex<Option<(&'static str, Instant)>>,
    pub up_gauge: IntGauge,
    pub inflight_gauge: IntGauge,
    /// `flowgate_http_requests_total` by code class 1xx..5xx, resolved once.
    codes: [IntCounter; 5],
    pub duration: Histogram,
}

/// All replicas of one instance, and how to choose among them.
pub struct Pool {
    pub instance: String,
    pub cfg: HttpConfig,
    pub backends: Vec<Arc<Backend>>,
    turn: AtomicUsize,
    rng: Mutex<u64>,
    /// Requests and retries, for the retry budget.
    requests: AtomicU64,
    retries_done: AtomicU64,
    pub retries: IntCounter,
    /// `key-hash` requests without their key (gone by least-inflight).
    pub keyless: IntCounter,
    pub metrics: Arc<Metrics>,
    standby: Mutex<Standby>,
    /// Shared with the instance's dispatcher when both sides are active-standby.
    tie: Option<Arc<Tie>>,
    /// What the public listener lets through (the flows watch keeps it).
    pub public: PublicSide,
}

/// Active-standby (`balance = "active-standby"`): the active replica, and the
/// failover under way until another replica served a request.
#[derive(Default)]
struct Standby {
    active: Option<usize>,
    lost: Option<(usize, &'static str, Instant)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // each critical section is a single update: a poisoned lock is consistent
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Responses sent to clients from this replica, every status code.
    pub fn requests_total(&self) -> u64 {
        self.codes.iter().map(IntCounter::get).sum()
    }

    /// The flow `rev` last read from the replica, and whether it differs
    /// from most replicas'.
    pub fn rev(&self) -> (Option<String>, bool) {
        (
            lock(&self.rev).clone(),
            self.diverged.load(Ordering::Relaxed),
        )
    }

    /// Records the flow `rev` read from the replica and whether it differs
    /// from most replicas'; whether it differed before.
    pub(super) fn set_rev(&self, rev: Option<String>, diverged: bool) -> bool {
        *lock(&self.rev) = rev;
        self.diverged.swap(diverged, Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// A receiver that changes when this replica goes down.
    pub fn down_signal(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn apply(&self, instance: &str, up: bool, cause: &str) {
        self.up.store(up, Ordering::Relaxed);
        self.up_gauge.set(i64::from(up));
        if up {
            *lock(&self.down) = None;
            tracing::info!(%instance, replica = %self.label, addr = %self.addr, "http replica up");
        } else {
            tracing::warn!(%instance, replica = %self.label, addr = %self.addr, cause, "http replica down");
            self.generation.send_modify(|g| *g += 1);
            lock(&self.idle).clear();
            lock(&self.idle_raw).clear();
        }
    }

    /// Counts an answered request by its status class.
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.codes[class].inc();
    }

    /// A pooled connection that can take a request now, if any.
    pub fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Gives a connection back for reuse (dropped, its task ending, once
    /// the app shuts down).
    pub fn checkin(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        // under the lock: `close_idle` after the cancel sees this one
        if idle.len() < MAX_IDLE && !self.closing.is_cancelled() {
            idle.push((sender, Instant::now()));
        }
    }

    /// An idle lean-path connection that is still open, if any.
    pub fn checkout_raw(&self, idle_timeout: Duration) -> Option<TcpStream> {
        let shard = super::shards::current();
        let mut idle = lock(&self.idle_raw);
        // the newest of this shard's: the others stay with the thread they wake
        while let Some(at) = idle.iter().rposition(|(s, _, _)| *s == shard) {
            let (_, tcp, since) = idle.remove(at);
            // a replica that closed it (or sent what nobody asked for) shows
            // as readable; an open, quiet one would block
            let mut probe = [0u8; 1];
            let quiet = matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if quiet && since.elapsed() < idle_timeout {
                return Some(tcp);
            }
        }
        None
    }

    /// Closes pooled connections unused for `idle_timeout` (the probe loop
    /// calls it each second, so a quiet replica's pool empties too).
    /// Drops every pooled connection (their driver tasks end).
    fn close_idle(&self) {
        lock(&self.idle).clear();
        lock(&self.idle_raw).clear();
    }

    /// Runs `task` on the app's tracker; it ends at shutdown at the latest.
    pub fn spawn_until_shutdown<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = closing.cancelled() => {}
            }
        });
    }

    pub fn prune_idle(&self, idle_timeout: Duration) {
        lock(&self.idle_raw).retain(|(_, _, since)| since.elapsed() < idle_timeout);
        lock(&self.idle).retain(|(_, since)| since.elapsed() < idle_timeout);
    }

    /// Gives a lean-path connection back for reuse.
    pub fn checkin_raw(&self, tcp: TcpStream) {
        let shard = super::shards::current();
        let mut idle = lock(&self.idle_raw);
        if idle.len() < MAX_IDLE_RAW {
            idle.push((shard, tcp, Instant::now()));
        }
    }

    /// A new TCP connection to the replica.
    pub async fn connect_tcp(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A new connection (HTTP/1.1, upgrades allowed).
    pub async fn connect(&self, timeout: Duration) -> Result<SendRequest<Body>, ConnectError> {
        let stream = self.connect_tcp(timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let addr = self.addr.clone();
        // ends when its sender is dropped: after its request once the app
        // shuts down (`checkin`, `close_idle`)
        self.tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "replica connection ended");
            }
        });
        Ok(sender)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
}

impl ConnectError {
    /// Nothing listens there: the replica is down now.
    pub fn refused(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

impl Pool {
    pub fn new(
        instance: &str,
        cfg: HttpConfig,
        metrics: Arc<Metrics>,
        tie: Option<Arc<Tie>>,
        owner: (&TaskTracker, &CancellationToken),
    ) -> Self {
        let backends = cfg
            .replicas
            .iter()
            .enumerate()
            .map(|(index, addr)| {
                let label = index.to_string();
                let up_gauge = metrics
                    .http_replica_up
                    .with_label_values(&[instance, &label]);
                up_gauge.set(1);
                let inflight_gauge = metrics.http_inflight.with_label_values(&[instance, &label]);
                let codes = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| {
                    metrics
                        .http_requests
                        .with_label_values(&[instance, &label, c])
                });
                let duration = metrics.http_duration.with_label_values(&[instance, &label]);
                let mqtt_host = crate::tie::replica_host(addr, cfg.mqtt_hosts.get(index).copied());
                Arc::new(Backend {
                    index,
                    label,
                    mqtt_host,
                    addr: addr.clone(),
                    health: Mutex::new(Health::default()),
                    up: AtomicBool::new(true),
                    draining: AtomicBool::new(false),
                    inflight: AtomicUsize::new(0),
                    idle: Mutex::new(Vec::new()),
                    idle_raw: Mutex::new(Vec::new()),
                    generation: watch::channel(0).0,
                    tcp_fallback: AtomicBool::new(cfg.health_tcp_only),
                    failing_since: Mutex::new(None),
                    rev: Mutex::new(None),
                    diverged: AtomicBool::new(false),
                    down: Mutex::new(None),
                    tasks: owner.0.clone(),
                    closing: owner.1.clone(),
                    up_gauge,
                    inflight_gauge,
                    codes,
                    duration,
                })
            })
            .collect();
        let retries = metrics.http_retries.with_label_values(&[instance]);
        let keyless = metrics.http_keyless.with_label_values(&[instance]);
        let denied = metrics.http_denied.with_label_values(&[instance]);
        let cfg_public_paths = cfg.public_paths.clone();
        Self {
            instance: instance.to_owned(),
            cfg,
            backends,
            turn: AtomicUsize::new(0),
            rng: Mutex::new(0x2545_f491_4f6c_dd1d),
            requests: AtomicU64::new(0),
            retries_done: AtomicU64::new(0),
            retries,
            keyless,
            metrics,
            standby: Mutex::new(Standby::default()),
            tie,
            public: PublicSide::new(&cfg_public_paths, denied),
        }
    }

    /// Chooses a replica not in `tried`: healthy and not draining; when no
    /// replica is healthy, any not draining (the last one is never ejected).
    pub fn pick(&self, tried: &[usize]) -> Option<Arc<Backend>> {
        if self.cfg.balance == Balance::ActiveStandby {
            return self.pick_active(tried);
        }
        let candidates = self.candidates(tried);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let draw = {
            let mut rng = lock(&self.rng);
            let a = balancer::next_random(&mut rng) as usize;
            (a, balancer::next_random(&mut rng) as usize)
        };
        let index = balancer::pick(self.cfg.balance, &candidates, turn, draw)?;
        self.backends.get(index).cloned()
    }

    /// `key-hash`: the replica the key (its hash) belongs to among the usable
    /// ones; a replica leaving moves only its own keys.
    pub fn pick_keyed(&self, key: u64) -> Option<Arc<Backend>> {
        let index = balancer::pick_keyed(key, &self.candidates(&[]))?;
        self.backends.get(index).cloned()
    }

    /// The replicas a request may go to: healthy and not draining, not in
    /// `tried`; when no replica is healthy, any not draining (the last one
    /// is never ejected).
    fn candidates(&self, tried: &[usize]) -> Vec<Candidate> {
        let usable = |healthy_only: bool| -> Vec<Candidate> {
            self.backends
                .iter()
                .filter(|b| {
                    !tried.contains(&b.index) && !b.is_draining() && (!healthy_only || b.is_up())
                })
                .map(|b| Candidate {
                    index: b.index,
                    inflight: b.inflight.load(Ordering::Relaxed),
                })
                .collect()
        };
        let mut candidates = usable(true);
        if candidates.is_empty() && !self.backends.iter().any(|b| b.is_up() && !b.is_draining()) {
            candidates = usable(false);
        }
        candidates
    }

    /// Active-standby: the active replica while it is up, not draining and
    /// not already tried for this request; otherwise the lowest one that is
    /// (with `failback`, a lower one that is up again takes the role back).
    fn pick_active(&self, tried: &[usize]) -> Option<Arc<Backend>> {
        let usable = |b: &&Arc<Backend>| !tried.contains(&b.index) && !b.is_draining();
        let healthy = |b: &&Arc<Backend>| usable(b) && b.is_up();
        let mut st = lock(&self.standby);
        let current = st.active.and_then(|i| self.backends.get(i)).filter(healthy);
        let lowest = self.backends.iter().find(healthy);
        // tied to the MQTT side: the replica on the host of its active replica
        let followed = self
            .tie
            .as_ref()
            .and_then(|t| t.mqtt_active())
            .and_then(|ip| {
                let mut on_host = self
                    .backends
                    .iter()
                    .filter(healthy)
                    .filter(|b| b.mqtt_host == Some(ip));
                match (on_host.next(), on_host.next()) {
                    (Some(b), None) => Some(b),
                    _ => None,
                }
            });
        let chosen = match (followed, current, lowest) {
            (Some(f), _, _) => f,
            (None, Some(c), Some(l)) if self.cfg.failback && l.index < c.index => l,
            (None, Some(c), _) => c,
            (None, None, Some(l)) => l,
            // none healthy: the last replica is never ejected
            (None, None, None) => self.backends.iter().find(usable)?,
        };
        if st.active != Some(chosen.index) {
            if let Some(prev) = st.active.and_then(|i| self.backends.get(i)) {
                let (cause, since) = if !prev.is_up() {
                    lock(&prev.down).unwrap_or(("health", Instant::now()))
                } else if tried.contains(&prev.index) {
                    ("error", Instant::now())
                } else if prev.is_draining() {
                    ("drain", Instant::now())
                } else if followed.is_some() {
                    ("follow", Instant::now())
                } else {
                    ("failback", Instant::now())
                };
                tracing::warn!(instance = %self.instance, from = %prev.label, to = %chosen.label, cause, "http active replica changes");
                if st.lost.is_none() {
                    st.lost = Some((prev.index, cause, since));
                }
            } else {
                tracing::info!(instance = %self.instance, replica = %chosen.label, "http active replica");
            }
            st.active = Some(chosen.index);
        }
        Some(chosen.clone())
    }

    /// A replica answered a request: ends an active-standby failover when it
    /// is not the replica that lost the role.
    pub fn served(&self, backend: &Backend) {
        if self.cfg.balance != Balance::ActiveStandby {
            return;
        }
        let mut st = lock(&self.standby);
        let Some((from, cause, since)) = st.lost else {
            return;
        };
        if from == backend.index {
            return;
        }
        st.lost = None;
        let from = self.backends.get(from).map(|b| b.label.clone());
        self.metrics.failover(Failover::now(
            &self.instance,
            SIDE_HTTP,
            cause,
            from,
            backend.label.clone(),
            since,
        ));
    }

    /// Tells the MQTT side that `backend`'s host is down (since) or up.
    fn tie_health(&self, backend: &Backend, down_since: Option<Instant>) {
        if let (Some(tie), Some(host)) = (&self.tie, backend.mqtt_host) {
            tie.set_unhealthy(host, down_since);
        }
    }

    /// The replica a sticky cookie names, if it can take requests.
    pub fn sticky(&self, index: usize) -> Option<Arc<Backend>> {
        self.backends
            .get(index)
            .filter(|b| b.is_up() && !b.is_draining())
            .cloned()
    }

    /// Counts a request for the retry budget.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// May a request that reached a replica be retried? Within the budget
    /// (retries <= budget x requests, plus a small allowance).
    pub fn take_retry(&self) -> bool {
        let requests = self.requests.load(Ordering::Relaxed) as f64;
        let done = self.retries_done.load(Ordering::Relaxed) as f64;
        if done < 3.0 + self.cfg.retry_budget * requests {
            self.retries_done.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// A refused connection: down at once, unless it is the last one up.
    pub fn passive_down(&self, backend: &Backend) {
        let others_up = self
            .backends
            .iter()
            .any(|b| b.index != backend.index && b.is_up());
        if !others_up {
            return;
        }
        let changed = lock(&backend.health).force_down();
        if changed {
            *lock(&backend.down) = Some(("refused", Instant::now()));
            self.tie_health(backend, Some(Instant::now()));
            backend.apply(&self.instance, false, "connection refused");
        }
    }

    fn record(&self, backend: &Backend, ok: bool, cause: &str) {
        let first_failure = {
            let mut since = lock(&backend.failing_since);
            if ok {
                *since = None;
                Instant::now()
            } else {
                *since.get_or_insert_with(Instant::now)
            }
        };
        let flipped = lock(&backend.health).record(ok, self.cfg.health_rise, self.cfg.health_fall);
        match flipped {
            Some(false) => {
                let others_up = self
                    .backends
                    .iter()
                    .any(|b| b.index != backend.index && b.is_up());
                if others_up {
                    *lock(&backend.down) = Some(("health", first_failure));
                    self.tie_health(backend, Some(first_failure));
                    backend.apply(&self.instance, false, cause);
                } else {
                    // never eject the last replica: keep it up, try again next time
                    *lock(&backend.health) = Health::default();
                    tracing::warn!(instance = %self.instance, replica = %backend.label, cause, "health check failed on the last replica up: kept in service");
                }
            }
            Some(true) => {
                backend.apply(&self.instance, true, cause);
                self.tie_health(backend, None);
            }
            None => {}
        }
    }

    /// Probes every replica each `health_interval` until `shutdown`.
    pub async fn probe_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => {
                    self.backends.iter().for_each(|b| b.close_idle());
                    return;
                }
            }
            for b in &self.backends {
                b.prune_idle(self.cfg.idle_timeout);
            }
            let probes = self.backends.iter().map(|b| {
                let pool = self.clone();
                let b = b.clone();
                async move {
                    let (ok, cause) = pool.probe(&b).await;
                    pool.record(&b, ok, cause);
                }
            });
            futures_join_all(probes).await;
        }
    }

    async fn probe(&self, b: &Backend) -> (bool, &'static str) {
        let timeout = self.cfg.health_timeout;
        if b.tcp_fallback.load(Ordering::Relaxed) {
            return match tokio::time::timeout(timeout, TcpStream::connect(&b.addr)).await {
                Ok(Ok(_)) => (true, "tcp probe"),
                _ => (false, "tcp probe failed"),
            };
        }
        let check = async {
            let mut sender = b.connect(timeout).await.ok()?;
            let req = Request::get(self.cfg.health_path.as_str())
                .header(hyper::header::HOST, b.addr.as_str())
                .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            Some(resp.status().as_u16())
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(Some(status)) if status == self.cfg.health_status => (true, "http probe"),
            Ok(Some(404)) => {
                if !b.tcp_fallback.swap(true, Ordering::Relaxed) {
                    tracing::info!(instance = %self.instance, replica = %b.label, path = %self.cfg.health_path, "health path answers 404 (admin API off?): checking by TCP connect from now on");
                }
                (true, "tcp fallback")
            }
            Ok(Some(_)) => (false, "http probe: unexpected status"),
            _ => (false, "http probe failed"),
        }
    }
}

/// Runs futures concurrently and waits for all (no futures crate needed).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}
