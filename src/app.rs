//! Starts every subsystem from a [`Config`] and hands back the bound addresses
//! and a way to stop. The only module that knows all the others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::admin::{self, AdminState};
use crate::broker;
use crate::config::{Balance, Config, InstanceConfig, Mode, Upstream};
use crate::http::{self, backend::Pool};
use crate::metrics::Metrics;
use crate::mqtt::dispatch::strategy::Strategy;
use crate::mqtt::dispatch::upstream::UpstreamSession;
use crate::mqtt::dispatch::{DispatchSettings, Dispatcher, Handle};
use crate::mqtt::proxy::{self, ProxyContext};
use crate::mqtt::replicas::Instances;
use crate::tie::Tie;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {key} = {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
}

/// A running flowgate.
pub struct App {
    pub mqtt_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Each HTTP listener's bound address, by its configured address.
    pub http_addrs: Vec<(SocketAddr, SocketAddr)>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    admin: Arc<AdminState>,
}

/// Binds `addr` (named by its config key in errors) and reports the address
/// actually bound (port 0 picks one).
async fn bind(
    key: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { key, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

impl App {
    /// Binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let (upstream_v3, upstream_v5) = match config.mqtt.upstream.authority() {
            Some(a) => (a.clone(), a),
            None => {
                let b = broker::start(config.mqtt.max_packet_size.bytes()).await?;
                (b.v4.to_string(), b.v5.to_string())
            }
        };
        let (mqtt_listener, mqtt_addr) = bind("mqtt.listen", config.mqtt.listen).await?;
        let (admin_listener, admin_addr) = bind("admin.listen", config.admin.listen).await?;

        let metrics = Arc::new(Metrics::new());
        let instances = Arc::new(Instances::new(&config.instances, &metrics));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();

        if config.mqtt.upstream != Upstream::Embedded {
            tracker.spawn(probe_upstream(
                upstream_v3.clone(),
                config.mqtt.upstream_connect_timeout,
            ));
        }
        // active-standby on both sides: the sides agree on the active replica
        let ties: HashMap<String, Arc<Tie>> = config
            .instances
            .iter()
            .filter(|i| {
                config.mqtt.mode == Mode::Dispatch
                    && i.strategy == Strategy::ActiveStandby
                    && i.http
                        .as_ref()
                        .is_some_and(|h| h.balance == Balance::ActiveStandby)
            })
            .map(|i| (i.name.clone(), Arc::new(Tie::default())))
            .collect();
        let mut dispatchers = HashMap::new();
        if config.mqtt.mode == Mode::Dispatch {
            for inst in &config.instances {
                let tie = ties.get(&inst.name).cloned();
                let handle = start_dispatcher(
                    &config,
                    inst,
                    &upstream_v3,
                    &metrics,
                    (&shutdown, &tracker),
                    tie,
                );
                dispatchers.insert(inst.name.clone(), handle);
            }
        }
        let ctx = Arc::new(ProxyContext {
            config: config.clone(),
            instances: instances.clone(),
            metrics: metrics.clone(),
            upstream_v3,
            upstream_v5,
            dispatchers,
        });
        tracker.spawn(proxy::serve(
            mqtt_listener,
            ctx,
            shutdown.clone(),
            tracker.clone(),
        ));
        let pools: Vec<Arc<Pool>> = config
            .instances
            .iter()
            .filter_map(|i| {
                let cfg = i.http.clone()?;
                let tie = ties.get(&i.name).cloned();
                Some(Arc::new(Pool::new(&i.name, cfg, metrics.clone(), tie)))
            })
            .collect();
        let mut http_addrs = Vec::new();
        for (addr, site) in http::sites(&pools) {
            let (listener, bound) = bind("instance.http.listen", addr).await?;
            http_addrs.push((addr, bound));
            tracker.spawn(http::serve(
                listener,
                Arc::new(site),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        for pool in &pools {
            tracker.spawn(pool.clone().probe_loop(shutdown.clone()));
            tracker.spawn(pool.clone().rev_loop(shutdown.clone()));
        }
        let admin = Arc::new(AdminState {
            config: config.clone(),
            metrics: metrics.clone(),
            instances,
            pools,
            ready: AtomicBool::new(true),
            deploys: Default::default(),
        });
        tracker.spawn(admin::serve(
            admin_listener,
            admin.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(mqtt = %mqtt_addr, admin = %admin_addr, upstream = %config.mqtt.upstream, mode = ?config.mqtt.mode, node_id = %config.node_id, "flowgate started");
        Ok(Self {
            mqtt_addr,
            admin_addr,
            http_addrs,
            metrics,
            shutdown,
            tracker,
            admin,
        })
    }

    /// Stops: readiness goes 503, listeners close, connections end; waits up
    /// to `grace` for tasks to finish. Returns whether all finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.admin.ready.store(false, Ordering::Relaxed);
        self.shutdown.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(?grace, "tasks still running after the grace period");
        }
        done
    }
}

/// Tells at start whether the broker answers, so a typo in `upstream` shows at
/// once instead of at the first client.
async fn probe_upstream(upstream: String, timeout: Duration) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&upstream)).await {
        Ok(Ok(_)) => tracing::info!(%upstream, "upstream broker reachable"),
        Ok(Err(e)) => {
            tracing::warn!(%upstream, error = %e, "upstream broker unreachable; clients get CONNACK 'server unavailable' until it answers")
        }
        Err(_) => {
            tracing::warn!(%upstream, ?timeout, "upstream broker did not answer; clients get CONNACK 'server unavailable' until it answers")
        }
    }
}

/// Starts one instance's upstream session and dispatcher; returns the handle
/// replica sessions talk to.
fn start_dispatcher(
    config: &Config,
    inst: &InstanceConfig,
    upstream: &str,
    metrics: &Arc<Metrics>,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
    tie: Option<Arc<Tie>>,
) -> Handle {
    let (replica_tx, replica_rx) = mpsc::channel(4096);
    let (up_cmd_tx, up_cmd_rx) = mpsc::channel(65_536);
    let (up_ev_tx, up_ev_rx) = mpsc::channel(1024);
    let client_id = format!("flowgate-{}-{}", config.node_id, inst.name);
    let session = UpstreamSession {
        addr: upstream.to_owned(),
        client_id: client_id.clone(),
        keep_alive: config.mqtt.upstream_keep_alive,
        connect_timeout: config.mqtt.upstream_connect_timeout,
        will: None,
    };
    tracker.spawn(session.run(up_cmd_rx, up_ev_tx, shutdown.clone()));
    let settings = DispatchSettings {
        instance: inst.name.clone(),
        strategy: inst.strategy,
        key_level: inst.key_level,
        broadcast: inst.broadcast.clone(),
        ack_timeout: inst.ack_timeout,
        max_inflight: inst.max_inflight,
        failback: inst.failback,
        tie,
        acl: inst.acl.clone(),
        queue_limit: config.mqtt.queue_limit,
        upstream_share: config.mqtt.upstream_share,
        upstream_addr: upstream.to_owned(),
        upstream_client_id: client_id,
        retained_timeout: config.mqtt.upstream_connect_timeout,
    };
    let dispatcher = Dispatcher::new(settings, up_cmd_tx, metrics.clone());
    tracker.spawn(dispatcher.run(replica_rx, up_ev_rx, shutdown.clone()));
    Handle { tx: replica_tx }
}
