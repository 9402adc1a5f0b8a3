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
use crate::broker::store::{Store, StoreError};
use crate::config::{Balance, Config, ConfigError, ConfigProblem, InstanceConfig, Mode, Upstream};
use crate::http::{self, backend::Pool};
use crate::metrics::Metrics;
use crate::mqtt::auth::PasswordFile;
use crate::mqtt::dispatch::strategy::Strategy;
use crate::mqtt::dispatch::upstream::{Login, UpstreamSession};
use crate::mqtt::dispatch::{DispatchSettings, Dispatcher, Driver, Handle};
use crate::mqtt::proxy::{self, ProxyContext, Transport};
use crate::mqtt::replicas::Instances;
use crate::tie::Tie;
use crate::tls::{Acceptor, Connector};

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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Auth(#[from] crate::mqtt::auth::AuthError),
    #[error("cannot start the HTTP threads: {0}")]
    Threads(String),
}

/// Reads every file the config names as the start will (TLS material,
/// password files), so `flowgate check` shows a bad one by its key; `origin`
/// names the config in the error.
pub fn check_files(config: &Config, origin: &str) -> Result<(), ConfigError> {
    use crate::config::NamedFile;
    let problems: Vec<ConfigProblem> = config
        .named_files()
        .into_iter()
        .filter_map(|(path, file)| {
            let read = match file {
                NamedFile::ServerTls(t) => crate::tls::server_config(t, &[]).map(drop).err(),
                NamedFile::UpstreamTls { host, tls } => Connector::new(host, tls).map(drop).err(),
                NamedFile::Passwords(p) => {
                    return PasswordFile::load(p).err().map(|e| ConfigProblem {
                        path,
                        message: e.to_string(),
                    })
                }
            };
            read.map(|e| ConfigProblem {
                path,
                message: e.to_string(),
            })
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: origin.to_owned(),
            problems,
        })
    }
}

/// A running flowgate.
pub struct App {
    pub mqtt_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Each HTTP listener's bound address, by its configured address.
    pub http_addrs: Vec<(SocketAddr, SocketAddr)>,
    /// `[mqtt.tls]`'s bound address.
    pub mqtts_addr: Option<SocketAddr>,
    /// `[mqtt.websocket]`'s bound address.
    pub ws_addr: Option<SocketAddr>,
    /// Each editor listener's bound address, by instance.
    pub editor_addrs: Vec<(String, SocketAddr)>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    admin: Arc<AdminState>,
    /// What SIGHUP reloads.
    acceptors: Vec<Arc<Acceptor>>,
    passwords: Vec<Arc<PasswordFile>>,
    /// The bundled broker's store, flushed at stop.
    store: Option<Store>,
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

/// Where the MQTT side reaches the broker: its 3.1.1 and 5.0 addresses, the
/// bundled broker (and its store) when there is no external one.
struct Broker {
    v3: String,
    v5: String,
    embedded: Option<broker::EmbeddedBroker>,
    store: Option<Store>,
}

impl Broker {
    /// The external broker, or the bundled one started (its store restored
    /// before any listener accepts a client).
    async fn start(config: &Config, metrics: &Arc<Metrics>) -> Result<Self, StartError> {
        if let Some(a) = config.mqtt.upstream.authority() {
            return Ok(Self {
                v3: a.clone(),
                v5: a,
                embedded: None,
                store: None,
            });
        }
        let store = match &config.data_dir {
            Some(dir) => Some(Store::open(dir, metrics)?),
            None => None,
        };
        let b = broker::start(config.mqtt.max_packet_size.bytes(), store.as_ref()).await?;
        Ok(Self {
            v3: b.v4.to_string(),
            v5: b.v5.to_string(),
            embedded: Some(b),
            store,
        })
    }
}

/// The password files: `mqtt.password_file`, each instance's, and every one
/// (SIGHUP reloads them).
struct Passwords {
    global: Option<Arc<PasswordFile>>,
    by_instance: HashMap<String, Arc<PasswordFile>>,
    all: Vec<Arc<PasswordFile>>,
}

impl Passwords {
    fn load(config: &Config) -> Result<Self, StartError> {
        let load = |path: &std::path::Path| PasswordFile::load(path).map(Arc::new);
        let global = config.mqtt.password_file.as_deref().map(load).transpose()?;
        let mut all: Vec<_> = global.iter().cloned().collect();
        let mut by_instance = HashMap::new();
        for inst in &config.instances {
            if let Some(p) = &inst.password_file {
                let file = load(p)?;
                all.push(file.clone());
                by_instance.insert(inst.name.clone(), file);
            }
        }
        Ok(Self {
            global,
            by_instance,
            all,
        })
    }
}

/// A bound listener and its address.
type Bound = (TcpListener, SocketAddr);

/// The MQTT listeners a config asks for: plain, TLS, and WebSocket (with its
/// path and TLS).
struct MqttListeners {
    plain: Bound,
    mqtts: Option<(Bound, Arc<Acceptor>)>,
    ws: Option<(Bound, String, Option<Arc<Acceptor>>)>,
}

impl MqttListeners {
    async fn bind(config: &Config, acceptors: &mut Vec<Arc<Acceptor>>) -> Result<Self, StartError> {
        let plain = bind("mqtt.listen", config.mqtt.listen).await?;
        let mut acceptor = |what: &str, cfg: &crate::config::TlsConfig, alpn: &[&[u8]]| {
            let a = Acceptor::new(what, cfg, alpn)?;
            acceptors.push(a.clone());
            Ok::<_, StartError>(a)
        };
        let mqtts = match &config.mqtt.tls {
            Some(t) => Some((
                bind("mqtt.tls.listen", t.listen).await?,
                acceptor("mqtt.tls", &t.tls, &[b"mqtt"])?,
            )),
            None => None,
        };
        let ws = match &config.mqtt.websocket {
            Some(w) => {
                let tls = match &w.tls {
                    Some(t) => Some(acceptor("mqtt.websocket.tls", t, &[b"http/1.1"])?),
                    None => None,
                };
                Some((
                    bind("mqtt.websocket.listen", w.listen).await?,
                    w.path.clone(),
                    tls,
                ))
            }
            None => None,
        };
        Ok(Self { plain, mqtts, ws })
    }

    /// Serves each on `ctx`; their bound addresses (plain, TLS, WebSocket).
    fn serve(
        self,
        ctx: &Arc<ProxyContext>,
        (shutdown, tracker): (&CancellationToken, &TaskTracker),
    ) -> (SocketAddr, Option<SocketAddr>, Option<SocketAddr>) {
        let serve = |listener, transport| {
            tracker.spawn(proxy::serve(
                listener,
                ctx.clone(),
                transport,
                shutdown.clone(),
                tracker.clone(),
            ));
        };
        serve(self.plain.0, Transport::default());
        let mqtts = self.mqtts.map(|((listener, bound), tls)| {
            serve(
                listener,
                Transport {
                    tls: Some(tls),
                    websocket: None,
                },
            );
            bound
        });
        let ws = self.ws.map(|((listener, bound), path, tls)| {
            serve(
                listener,
                Transport {
                    tls,
                    websocket: Some(path),
                },
            );
            bound
        });
        (self.plain.1, mqtts, ws)
    }
}

/// Instances with active-standby on both sides: the sides agree on the
/// active replica through one tie each.
fn ties(config: &Config) -> HashMap<String, Arc<Tie>> {
    config
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
        .collect()
}

/// A dispatcher per instance (dispatch mode), by instance name.
fn start_dispatchers(
    config: &Config,
    broker: &Broker,
    upstream_tls: Option<&Arc<Connector>>,
    instances: &Instances,
    ties: &HashMap<String, Arc<Tie>>,
    metrics: &Arc<Metrics>,
    owner: (&CancellationToken, &TaskTracker),
) -> HashMap<String, Handle> {
    let mut dispatchers = HashMap::new();
    if config.mqtt.mode != Mode::Dispatch {
        return dispatchers;
    }
    for inst in &config.instances {
        let login = Login {
            tls: upstream_tls.cloned(),
            username: inst.upstream_username.clone(),
            password: inst.upstream_password.clone(),
        };
        let negotiated = instances
            .get(&inst.name)
            .map(|i| i.upstream_protocol.clone())
            .unwrap_or_default();
        let handle = start_dispatcher(
            config,
            inst,
            (&broker.v3, &broker.v5, login),
            negotiated,
            metrics,
            owner,
            ties.get(&inst.name).cloned(),
        );
        dispatchers.insert(inst.name.clone(), handle);
    }
    dispatchers
}

/// The HTTP balancer: a replica pool per instance with `[instance.http]`,
/// its listeners (on shard threads) and probes; the pools and each
/// listener's bound address.
async fn start_http(
    config: &Config,
    ties: &HashMap<String, Arc<Tie>>,
    metrics: &Arc<Metrics>,
    acceptors: &mut Vec<Arc<Acceptor>>,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
) -> Result<(Vec<Arc<Pool>>, Vec<(SocketAddr, SocketAddr)>), StartError> {
    let pools: Vec<Arc<Pool>> = config
        .instances
        .iter()
        .filter_map(|i| {
            let cfg = i.http.clone()?;
            let tie = ties.get(&i.name).cloned();
            Some(Arc::new(Pool::new(
                &i.name,
                cfg,
                metrics.clone(),
                tie,
                (tracker, shutdown),
            )))
        })
        .collect();
    let mut http_addrs = Vec::new();
    let sites = http::sites(&pools);
    if !sites.is_empty() {
        let n = config.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let shards = Arc::new(
            http::shards::Shards::start(n).map_err(|e| StartError::Threads(e.to_string()))?,
        );
        for (addr, site) in sites {
            let (listener, bound) = bind("instance.http.listen", addr).await?;
            http_addrs.push((addr, bound));
            let tls = match site.tls() {
                Some(t) => {
                    let what = format!("instance.http.tls ({addr})");
                    let a = Acceptor::new(&what, t, &[b"http/1.1"])?;
                    acceptors.push(a.clone());
                    Some(a)
                }
                None => None,
            };
            tracker.spawn(http::serve(
                listener,
                Arc::new(site),
                tls,
                shutdown.clone(),
                tracker.clone(),
                shards.clone(),
            ));
        }
    }
    for pool in &pools {
        tracker.spawn(pool.clone().probe_loop(shutdown.clone()));
        tracker.spawn(pool.clone().rev_loop(shutdown.clone()));
    }
    Ok((pools, http_addrs))
}

/// The bundled broker's threads can die while flowgate goes on: readiness
/// and a gauge say so.
fn watch_bundled_broker(
    b: broker::EmbeddedBroker,
    admin: &Arc<AdminState>,
    metrics: &Metrics,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
) {
    let (state, gauge) = (admin.clone(), metrics.broker_up.clone());
    gauge.set(1);
    let up = move |up: bool| {
        state.broker_up.store(up, Ordering::Relaxed);
        gauge.set(i64::from(up));
        if up {
            tracing::info!("the bundled broker answers again; /readyz 200");
        } else {
            tracing::error!(
                falls = broker::WATCH_FALLS,
                "the bundled broker does not answer a CONNECT; /readyz 503 until it does"
            );
        }
    };
    let every = Duration::from_secs(2);
    tracker.spawn(broker::watch([b.v4, b.v5], every, up, shutdown.clone()));
}

impl App {
    /// Binds the listeners and starts serving: the broker (bundled or not),
    /// the MQTT side, the HTTP balancer, the editors, the admin API.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let broker = Broker::start(&config, &metrics).await?;
        let mut acceptors = Vec::new();
        let mqtt_listeners = MqttListeners::bind(&config, &mut acceptors).await?;
        let (admin_listener, admin_addr) = bind("admin.listen", config.admin.listen).await?;
        let admin_tls = (config.admin.tls.as_ref())
            .map(|t| Acceptor::new("admin.tls", t, &[b"http/1.1"]))
            .transpose()?;
        acceptors.extend(admin_tls.clone());
        let upstream_tls = config
            .mqtt
            .upstream
            .tls_host()
            .map(|host| Connector::new(host, &config.mqtt.upstream_tls).map(Arc::new))
            .transpose()
            .map_err(crate::tls::at_key("mqtt.upstream_ca_file"))?;
        let mut passwords = Passwords::load(&config)?;
        let instances = Arc::new(Instances::new(&config.instances, &metrics));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let owner = (&shutdown, &tracker);
        if config.mqtt.upstream != Upstream::Embedded {
            let timeout = config.mqtt.upstream_connect_timeout;
            tracker.spawn(probe_upstream(broker.v3.clone(), timeout));
        }
        let ties = ties(&config);
        let dispatchers = start_dispatchers(
            &config,
            &broker,
            upstream_tls.as_ref(),
            &instances,
            &ties,
            &metrics,
            owner,
        );
        let ctx = Arc::new(ProxyContext {
            config: config.clone(),
            instances: instances.clone(),
            metrics: metrics.clone(),
            upstream_v3: broker.v3.clone(),
            upstream_v5: broker.v5.clone(),
            upstream_tls,
            dispatchers,
            passwords: passwords.global.clone(),
            instance_passwords: std::mem::take(&mut passwords.by_instance),
            connections: Default::default(),
        });
        let (mqtt_addr, mqtts_addr, ws_addr) = mqtt_listeners.serve(&ctx, owner);
        let (pools, http_addrs) =
            start_http(&config, &ties, &metrics, &mut acceptors, owner).await?;
        let deploys = Arc::new(crate::deploy::Registry::default());
        let editor_addrs = start_editors(
            &config,
            &pools,
            &metrics,
            &deploys,
            (&mut acceptors, &mut passwords.all),
            owner,
        )
        .await?;
        let admin = Arc::new(AdminState {
            config: config.clone(),
            metrics: metrics.clone(),
            instances,
            pools,
            ready: AtomicBool::new(true),
            broker_up: AtomicBool::new(true),
            deploys,
            tasks: tracker.clone(),
        });
        if let Some(b) = broker.embedded {
            watch_bundled_broker(b, &admin, &metrics, owner);
        }
        tracker.spawn(admin::serve(
            admin_listener,
            admin.clone(),
            admin_tls,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(mqtt = %mqtt_addr, mqtts = ?mqtts_addr, ws = ?ws_addr, admin = %admin_addr, upstream = %config.mqtt.upstream, mode = ?config.mqtt.mode, node_id = %config.node_id, "flowgate started");
        Ok(Self {
            mqtt_addr,
            admin_addr,
            http_addrs,
            mqtts_addr,
            ws_addr,
            editor_addrs,
            metrics,
            shutdown,
            tracker,
            admin,
            acceptors,
            passwords: passwords.all,
            store: broker.store,
        })
    }

    /// SIGHUP: reads every certificate and password file again. New
    /// connections use the new ones; open connections are not touched. A
    /// file with a problem is logged and its old contents stay in use.
    /// Returns how many reloads failed.
    pub fn reload(&self) -> usize {
        let mut failed = 0;
        // the error of a reload that failed
        let mut record = |what: &str, failure: Option<&dyn std::error::Error>| {
            let result = match failure {
                None => {
                    tracing::info!(what, "reloaded");
                    "ok"
                }
                Some(e) => {
                    tracing::warn!(what, error = %e, "reload failed; the old one stays in use");
                    failed += 1;
                    "failed"
                }
            };
            self.metrics.tls_reloads.with_label_values(&[result]).inc();
        };
        for a in &self.acceptors {
            record(&a.what, a.reload().err().as_ref().map(|e| e as _));
        }
        for p in &self.passwords {
            let failure = p.reload().err();
            record(
                &p.path.display().to_string(),
                failure.as_ref().map(|e| e as _),
            );
        }
        failed
    }

    /// `/readyz` answers 503 from now on; everything else serves as before.
    pub fn unready(&self) {
        self.admin.ready.store(false, Ordering::Relaxed);
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
        // the clients are gone: what the broker reported is all there is
        let flushed = match &self.store {
            Some(store) => store.flush(grace).await,
            None => true,
        };
        done && flushed
    }
}

/// Starts the editor listeners (`[instance.editor]`); their bound
/// addresses, by instance. Their TLS acceptors and password files join
/// what SIGHUP reloads.
async fn start_editors(
    config: &Config,
    pools: &[Arc<Pool>],
    metrics: &Arc<Metrics>,
    deploys: &Arc<crate::deploy::Registry>,
    (acceptors, passwords): (&mut Vec<Arc<Acceptor>>, &mut Vec<Arc<PasswordFile>>),
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
) -> Result<Vec<(String, SocketAddr)>, StartError> {
    let mut addrs = Vec::new();
    for inst in &config.instances {
        let Some(cfg) = &inst.editor else { continue };
        // validation makes an editor table come with an http one
        let Some(pool) = pools.iter().find(|p| p.instance == inst.name) else {
            continue;
        };
        let users = match &cfg.password_file {
            Some(p) => {
                let file = Arc::new(PasswordFile::load(p)?);
                passwords.push(file.clone());
                Some(file)
            }
            None => None,
        };
        if !cfg.login && !cfg.listen.ip().is_loopback() {
            tracing::warn!(instance = %inst.name, listen = %cfg.listen, "the editor has no login (login = false) and listens beyond this machine: anyone who reaches it can change the flows");
        }
        let tls = match &cfg.tls {
            Some(t) => {
                let a = Acceptor::new(
                    &format!("instance.editor.tls ({})", inst.name),
                    t,
                    &[b"http/1.1"],
                )
                .map_err(StartError::Tls)?;
                acceptors.push(a.clone());
                Some(a)
            }
            None => None,
        };
        let (listener, bound) = bind("instance.editor.listen", cfg.listen).await?;
        let editor = Arc::new(crate::editor::Editor::new(
            &inst.name,
            cfg.clone(),
            pool.clone(),
            metrics.clone(),
            deploys.clone(),
            users,
            tracker.clone(),
            shutdown.clone(),
        ));
        tracing::info!(instance = %inst.name, editor = %bound, login = cfg.login, "editor listener");
        tracker.spawn(crate::editor::serve(
            listener,
            editor,
            tls,
            shutdown.clone(),
            tracker.clone(),
        ));
        addrs.push((inst.name.clone(), bound));
    }
    Ok(addrs)
}

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
    (upstream, upstream_v5, login): (&str, &str, Login),
    negotiated: Arc<std::sync::atomic::AtomicU8>,
    metrics: &Arc<Metrics>,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
    tie: Option<Arc<Tie>>,
) -> Handle {
    let (replica_tx, replica_rx) = mpsc::channel(4096);
    let (up_cmd_tx, up_cmd_rx) = mpsc::channel(65_536);
    let (up_ev_tx, up_ev_rx) = mpsc::channel(1024);
    let client_id = inst
        .upstream_client_id
        .clone()
        .unwrap_or_else(|| format!("flowgate-{}-{}", config.node_id, inst.name));
    let session = UpstreamSession {
        addr: upstream.to_owned(),
        addr_v5: upstream_v5.to_owned(),
        protocol: config.mqtt.upstream_protocol,
        negotiated,
        client_id: client_id.clone(),
        keep_alive: config.mqtt.upstream_keep_alive,
        connect_timeout: config.mqtt.upstream_connect_timeout,
        will: None,
        login: login.clone(),
        receive_max: crate::mqtt::dispatch::upstream::receive_maximum(config.mqtt.queue_limit),
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
        key_hosts: inst
            .http
            .as_ref()
            .map(crate::tie::key_hosts)
            .unwrap_or_default(),
        acl: inst.acl.clone(),
        queue_limit: config.mqtt.queue_limit,
        upstream_share: config.mqtt.upstream_share,
        upstream_addr: upstream.to_owned(),
        upstream_addr_v5: upstream_v5.to_owned(),
        upstream_client_id: client_id,
        retained_timeout: config.mqtt.upstream_connect_timeout,
        upstream_login: login,
        retain_options: config.mqtt.upstream != Upstream::Embedded,
        complete: inst.complete.clone(),
    };
    let dispatcher = Dispatcher::new(settings, metrics.clone(), std::time::Instant::now());
    let driver = Driver::new(dispatcher, up_cmd_tx, metrics.clone());
    tracker.spawn(driver.run(replica_rx, up_ev_rx, shutdown.clone()));
    Handle { tx: replica_tx }
}
