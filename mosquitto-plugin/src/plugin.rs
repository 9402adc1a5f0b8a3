//! What flowgate does inside Mosquitto, as plain methods the C callbacks call
//! (and the tests call without a broker): share mode's rules, on the broker's
//! own events.
//!
//! - A CONNECT whose client id / username match an instance (its basic-auth
//!   event) takes the lowest free slot and the client id
//!   `{client_id}-{node_id}-{slot}`; the slot is handed back when the
//!   connection ends (its disconnect or offline event).
//! - A replica's SUBSCRIBE and UNSUBSCRIBE filters become
//!   `$share/{instance}~{h}/{filter}` (no-local cleared), except `$` filters and
//!   those a `broadcast` filter covers: the proxy's rules
//!   ([`flowgate::mqtt::rewrite`]), so plugin brokers and flowgate proxies
//!   serve one instance together.
//! - Messages to and from replicas are counted in the same metrics as the
//!   proxy's; `/metrics`, `/api/instances`, `/healthz` are served by the
//!   proxy's admin code on a thread of its own ([`AdminThread`]).
//!
//! Clients are known by their `struct mosquitto` address, which Mosquitto
//! keeps for a connection's whole life; an address handed to a new connection
//! replaces what an old one left.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use flowgate::admin::AdminState;
use flowgate::config::{Config, ConfigError};
use flowgate::metrics::Metrics;
use flowgate::mqtt::codec::{Protocol, NO_LOCAL};
use flowgate::mqtt::replicas::{Instances, NewReplica, SlotGuard};
use flowgate::mqtt::rewrite::{shared_filter, ShareRules};
use tokio_util::sync::CancellationToken;

/// A client's identity inside the broker: its `struct mosquitto` address.
pub type ClientKey = usize;

/// The table of replicas by client address, looked up for every message in
/// and out: addresses need no SipHash (they are not chosen by a client), a
/// multiply-shift spreads them.
type Clients = HashMap<ClientKey, Replica, BuildHasherDefault<AddressHasher>>;

#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }
}

/// What the basic-auth event does with a CONNECT.
#[derive(Debug, PartialEq, Eq)]
pub enum Auth {
    /// Not a replica: left exactly as it came.
    Untouched,
    /// A replica: this is its client id from now on.
    Replica { client_id: String },
    /// A replica, but its instance has `max_replicas` connected: refused
    /// (server busy), as the proxy refuses it.
    Full { instance: String },
}

/// One connected replica.
struct Replica {
    instance: String,
    guard: SlotGuard,
}

/// The plugin's state, one per broker.
pub struct Plugin {
    path: PathBuf,
    /// The current config (match rules and broadcast filters are re-read on
    /// reload); the slot tables stay those of the start.
    config: Mutex<Arc<Config>>,
    instances: Arc<Instances>,
    metrics: Arc<Metrics>,
    clients: Mutex<Clients>,
    admin: Option<AdminThread>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // each update is a single insert, remove or swap: a panic elsewhere
    // cannot leave the value half-changed
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the plugin could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("plugin_opt_config is not set: it names flowgate's TOML file")]
    NoConfig,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("admin.listen {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin.tls: {0}")]
    Tls(String),
}

impl Plugin {
    /// Reads the config at `path` and starts the admin listener (`admin`:
    /// false in tests that need none).
    pub fn start(path: Option<&Path>, admin: bool) -> Result<Self, StartError> {
        let path = path.ok_or(StartError::NoConfig)?.to_path_buf();
        let config = Config::load_plugin(&path)?;
        flowgate::app::check_files(&config, &path.display().to_string())?;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let instances = Arc::new(Instances::new(&config.instances, &metrics));
        let admin = if admin {
            Some(AdminThread::start(&config, &metrics, &instances)?)
        } else {
            None
        };
        Ok(Self {
            path,
            config: Mutex::new(config),
            instances,
            metrics,
            clients: Mutex::new(Clients::default()),
            admin,
        })
    }

    /// Where the admin listener listens (once started).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn instances(&self) -> &Instances {
        &self.instances
    }

    /// A CONNECT passes authentication (before the broker looks its client id
    /// up): is it a replica, and what is its client id?
    pub fn on_auth(
        &self,
        client: ClientKey,
        client_id: &str,
        username: Option<&str>,
        peer: &str,
        protocol: Protocol,
    ) -> Auth {
        // a connection that reuses an address ends what an old one left
        lock(&self.clients).remove(&client);
        let config = lock(&self.config).clone();
        let Some(rule) = config
            .instances
            .iter()
            .find(|i| i.match_rule.matches(client_id, username))
        else {
            return Auth::Untouched;
        };
        let Some(instance) = self.instances.get(&rule.name) else {
            // added by a reload: slot tables are made at start
            return Auth::Untouched;
        };
        let peer = SocketAddr::new(peer.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), 0);
        let Some((guard, new_id)) = instance.claim(NewReplica {
            client_id,
            peer,
            protocol,
            node_id: &config.node_id,
        }) else {
            return Auth::Full {
                instance: rule.name.clone(),
            };
        };
        lock(&self.clients).insert(
            client,
            Replica {
                instance: rule.name.clone(),
                guard,
            },
        );
        Auth::Replica { client_id: new_id }
    }

    /// The broker could not take the client id the basic-auth event gave
    /// (the client is refused): the slot goes back.
    pub fn on_auth_failed(&self, client: ClientKey) {
        lock(&self.clients).remove(&client);
    }

    /// The broker accepted the session: the replica counts as connected.
    pub fn on_connect(&self, client: ClientKey) {
        if let Some(r) = lock(&self.clients).get(&client) {
            r.guard.mark_accepted();
        }
    }

    /// The connection ended (a disconnect, or a persistent session going
    /// offline): the slot goes back.
    pub fn on_disconnect(&self, client: ClientKey) {
        lock(&self.clients).remove(&client);
    }

    /// The share rules of the replica `client`, applied to `f`; `None` for a
    /// client that is no replica.
    fn with_rules<T>(&self, client: ClientKey, f: impl FnOnce(&ShareRules<'_>) -> T) -> Option<T> {
        let instance = lock(&self.clients).get(&client)?.instance.clone();
        let config = lock(&self.config).clone();
        let broadcast = config
            .instances
            .iter()
            .find(|i| i.name == instance)
            .map(|i| i.broadcast.as_slice())
            .unwrap_or_default();
        Some(f(&ShareRules {
            instance: &instance,
            broadcast,
        }))
    }

    /// A SUBSCRIBE's filter: the shared filter and its options for a replica
    /// (no-local cleared: a protocol error on a shared subscription), `None`
    /// when it stays as it is.
    pub fn on_subscribe(
        &self,
        client: ClientKey,
        filter: &str,
        options: u8,
    ) -> Option<(String, u8)> {
        self.with_rules(client, |rules| {
            rules
                .shares(filter)
                .then(|| (shared_filter(rules.instance, filter), options & !NO_LOCAL))
        })
        .flatten()
    }

    /// An UNSUBSCRIBE's filter, rewritten as [`Self::on_subscribe`] does.
    pub fn on_unsubscribe(&self, client: ClientKey, filter: &str) -> Option<String> {
        self.with_rules(client, |rules| {
            rules
                .shares(filter)
                .then(|| shared_filter(rules.instance, filter))
        })
        .flatten()
    }

    /// A PUBLISH a replica sent (`from`) or the broker sends one (`!from`);
    /// `bytes` (topic and payload) is asked for replicas only.
    pub fn on_message(&self, client: ClientKey, from: bool, bytes: impl FnOnce() -> usize) {
        let clients = lock(&self.clients);
        let Some(r) = clients.get(&client) else {
            return;
        };
        let c = &r.guard.counters;
        let bytes = bytes();
        if from {
            c.messages_from.inc();
            c.bytes_from.inc_by(bytes as u64);
        } else {
            c.messages_to.inc();
            c.bytes_to.inc_by(bytes as u64);
        }
    }

    /// Re-reads the config (at `path`, or where it was): match rules and
    /// broadcast filters change for the next CONNECT and SUBSCRIBE. A bad
    /// file changes nothing. Returns what did not change until a restart.
    pub fn reload(&self, path: Option<&Path>) -> Result<Vec<String>, ConfigError> {
        let path = path.unwrap_or(&self.path);
        let new = Config::load_plugin(path)?;
        flowgate::app::check_files(&new, &path.display().to_string())?;
        let mut later = Vec::new();
        for i in &new.instances {
            if self.instances.get(&i.name).is_none() {
                later.push(format!(
                    "instance {} (new: its replicas are matched after a restart)",
                    i.name
                ));
            }
        }
        let mut config = lock(&self.config);
        if new.admin.listen != config.admin.listen
            || new.admin.tls.is_some() != config.admin.tls.is_some()
        {
            later.push("admin (the listener is kept until a restart)".to_owned());
        }
        if new.node_id != config.node_id {
            later.push("node_id (connected replicas keep their client ids)".to_owned());
        }
        *config = Arc::new(new);
        Ok(later)
    }
}

/// The admin listener on a thread of its own (a one-thread tokio runtime),
/// never on Mosquitto's.
struct AdminThread {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminThread {
    fn start(
        config: &Arc<Config>,
        metrics: &Arc<Metrics>,
        instances: &Arc<Instances>,
    ) -> Result<Self, StartError> {
        let listen = config.admin.listen;
        let admin_err = |source| StartError::Admin {
            addr: listen,
            source,
        };
        let tls = match &config.admin.tls {
            Some(t) => Some(
                flowgate::tls::Acceptor::new("admin.tls", t, &[b"http/1.1"])
                    .map_err(|e| StartError::Tls(e.to_string()))?,
            ),
            None => None,
        };
        let std_listener = std::net::TcpListener::bind(listen).map_err(admin_err)?;
        std_listener.set_nonblocking(true).map_err(admin_err)?;
        let addr = std_listener.local_addr().map_err(admin_err)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(admin_err)?;
        let state = Arc::new(AdminState {
            config: config.clone(),
            metrics: metrics.clone(),
            instances: instances.clone(),
            pools: Vec::new(),
            ready: AtomicBool::new(true),
            broker_up: AtomicBool::new(true),
            deploys: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("flowgate-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            let tracker = tokio_util::task::TaskTracker::new();
                            flowgate::admin::serve(listener, state, tls, token, tracker).await;
                        }
                        Err(e) => eprintln!("flowgate: admin listener: {e}"),
                    }
                });
            })
            .map_err(admin_err)?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AdminThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(text: &str) -> (Plugin, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("flowgate.toml");
        std::fs::write(&path, text).expect("write config");
        (Plugin::start(Some(&path), false).expect("starts"), dir)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "flowgate-plugin-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).expect("temp dir");
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const CONFIG: &str = "node_id = \"b1\"\n[[instance]]\nname = \"line1\"\n\
        match = { client_id = \"nr\" }\nbroadcast = [\"config/#\"]\nmax_replicas = 2\n";

    fn replica(p: &Plugin, key: ClientKey) -> Auth {
        p.on_auth(key, "nr", None, "127.0.0.1", Protocol::V5)
    }

    #[test]
    fn replicas_get_the_lowest_free_slot_back() {
        let (p, _dir) = plugin(CONFIG);
        assert_eq!(
            replica(&p, 1),
            Auth::Replica {
                client_id: "nr-b1-0".into()
            }
        );
        assert_eq!(
            replica(&p, 2),
            Auth::Replica {
                client_id: "nr-b1-1".into()
            }
        );
        assert_eq!(
            replica(&p, 3),
            Auth::Full {
                instance: "line1".into()
            }
        );
        p.on_disconnect(1);
        assert_eq!(
            replica(&p, 3),
            Auth::Replica {
                client_id: "nr-b1-0".into()
            }
        );
        assert_eq!(
            p.on_auth(9, "other", None, "127.0.0.1", Protocol::V311),
            Auth::Untouched
        );
        // an address reused by a new connection frees what the old one held
        assert_eq!(
            replica(&p, 2),
            Auth::Replica {
                client_id: "nr-b1-1".into()
            }
        );
    }

    #[test]
    fn filters_are_rewritten_as_the_proxy_does() {
        let (p, _dir) = plugin(CONFIG);
        replica(&p, 1);
        assert_eq!(
            p.on_subscribe(1, "jobs/#", 0b0000_0101),
            Some((shared_filter("line1", "jobs/#"), 0b0000_0001))
        );
        assert_eq!(p.on_subscribe(1, "config/a", 1), None);
        assert_eq!(p.on_subscribe(1, "$SYS/#", 0), None);
        assert_eq!(p.on_subscribe(2, "jobs/#", 0), None, "not a replica");
        assert_eq!(
            p.on_unsubscribe(1, "jobs/#"),
            Some(shared_filter("line1", "jobs/#"))
        );
        assert_eq!(p.on_unsubscribe(1, "config/#"), None);
    }

    #[test]
    fn messages_are_counted_per_replica_and_direction() {
        let (p, _dir) = plugin(CONFIG);
        replica(&p, 1);
        p.on_connect(1);
        p.on_message(1, true, || 10);
        p.on_message(1, false, || 5);
        p.on_message(1, false, || 5);
        p.on_message(7, false, || 5);
        let view = &p.instances().views()[0];
        assert_eq!(view.replicas_connected, 1);
        let r = &view.replicas[0];
        assert_eq!((r.messages_from_replica, r.messages_to_replica), (1, 2));
        assert_eq!((r.bytes_from_replica, r.bytes_to_replica), (10, 10));
        p.on_disconnect(1);
        assert!(p.instances().views()[0].replicas.is_empty());
    }

    #[test]
    fn reload_changes_rules_and_keeps_them_on_a_bad_file() {
        let (p, dir) = plugin(CONFIG);
        replica(&p, 1);
        let path = dir.0.join("flowgate.toml");
        std::fs::write(&path, CONFIG.replace("config/#", "jobs/#")).expect("write");
        assert!(p.reload(None).expect("valid").is_empty());
        assert_eq!(p.on_subscribe(1, "jobs/a", 0), None, "now broadcast");
        std::fs::write(&path, "[mqtt]\nmode = \"share\"\n").expect("write");
        assert!(p.reload(None).is_err());
        assert_eq!(p.on_subscribe(1, "jobs/a", 0), None, "rules kept");
        std::fs::write(
            &path,
            format!("{CONFIG}[[instance]]\nname = \"l2\"\nmatch = {{ client_id = \"x\" }}\n"),
        )
        .expect("write");
        let later = p.reload(None).expect("valid");
        assert!(later[0].contains("l2"), "{later:?}");
    }

    #[test]
    fn a_missing_or_bad_config_is_a_start_error() {
        assert!(matches!(
            Plugin::start(None, false),
            Err(StartError::NoConfig)
        ));
        let dir = tempdir::Dir::new();
        let path = dir.0.join("f.toml");
        std::fs::write(&path, "[broker]\n").expect("write");
        let e = Plugin::start(Some(&path), false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("only the flowgate proxy"), "{e}");
    }
}
