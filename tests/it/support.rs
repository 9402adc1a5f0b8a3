//! Test support: a real Mosquitto on a free loopback port, flowgate in-process
//! on port 0, real rumqttc clients, and waiting on conditions with a deadline.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowgate::app::App;
use flowgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flowgate-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir can be created");
    dir
}

/// A client id no other test in this process uses. The tests share one
/// process: a port one test freed (a broker it stopped, an app it shut down)
/// can be bound by another test while the first one's clients still reconnect
/// to it, and a client id both use would then take over the other's session.
pub fn unique_id(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A port that was free a moment ago, for processes that cannot report the
/// port they bound (Mosquitto).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port can be bound")
}

/// Waits until `cond` holds, polling; panics with `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real Mosquitto broker, killed on drop.
pub struct Mosquitto {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
    bin: String,
    conf: PathBuf,
}

/// How often a Mosquitto log says the broker is running (it does once its
/// listeners are bound).
fn times_running(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("mosquitto version") && l.ends_with(" running"))
        .count()
}

impl Mosquitto {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A broker with `extra` lines in its config (`allow_anonymous false`,
    /// `password_file ...`).
    pub async fn start_with(extra: &str) -> Self {
        let bin = std::env::var("FLOWGATE_MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
        Self::start_bin(&bin, extra).await
    }

    /// A broker that keeps its sessions and messages on disk across a
    /// restart (in a fresh folder named after `name`).
    pub async fn start_persistent(name: &str) -> Self {
        let dir = temp_dir(name);
        // Mosquitto started as root writes as the user `mosquitto`
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        Self::start_with(&format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        ))
        .await
    }

    /// The broker `bin` (Mosquitto 2.1.2 for the plugin tests) with `extra`.
    pub async fn start_bin(bin: &str, extra: &str) -> Self {
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let dir = temp_dir("mosquitto");
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("mosquitto-{attempt}.log"));
            let conf = dir.join(format!("mosquitto-{attempt}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\n{anonymous}persistence false\n\
                     set_tcp_nodelay true\nmax_queued_messages 100000\nmax_inflight_messages 0\n\
                     log_dest stderr\nlog_type all\nconnection_messages true\n{extra}\n"
                ),
            )
            .expect("mosquitto config can be written");
            let mut child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file can be created"))
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {bin} (install mosquitto; .ci/run does): {e}")
                });
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken between our check and its bind: retry
                }
                // "running" once its listeners are bound: before that, the
                // port may answer for another test's broker that took it
                if times_running(&log) > 0 && TcpStream::connect(addr).await.is_ok() {
                    return Self {
                        addr,
                        log,
                        child,
                        bin: bin.to_owned(),
                        conf,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM (it saves its persistence database when
    /// configured to) and starts it again on the same port and config.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    /// Stops the broker with SIGTERM and waits until it has exited.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let _ = self.child.wait();
    }

    /// Starts the stopped broker again on its port and config.
    pub async fn start_again(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("log file");
        let start = Instant::now();
        loop {
            let before = times_running(&self.log);
            let mut child = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("log file"))
                .spawn()
                .expect("mosquitto starts again");
            let up = Instant::now();
            while up.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port is not free yet: again
                }
                if times_running(&self.log) > before && TcpStream::connect(self.addr).await.is_ok()
                {
                    self.child = child;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(start.elapsed() < DEADLINE, "mosquitto did not start again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The broker's process id (to send it a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// flowgate in-process with `instances` (TOML `[[instance]]` tables) in front
/// of `upstream`, listening on loopback port 0.
pub async fn flowgate(upstream: SocketAddr, mode: &str, extra_mqtt: &str, instances: &str) -> App {
    let text = format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"mqtt://{upstream}\"\nmode = \"{mode}\"\n{extra_mqtt}\n{instances}\n"
    );
    init_logs();
    let config = Config::parse(&text, "test config").expect("test config is valid");
    App::start(config).await.expect("flowgate starts")
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("admin listener answers");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request is sent");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("response is read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sum of a metric's samples whose labels contain every `key="value"` given.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a v3.1.1 client saw.
#[derive(Debug)]
pub enum Seen {
    Message(Vec<u8>),
    SubAck,
    Disconnected(String),
}

/// A rumqttc v3.1.1 client whose event loop runs in a task, reporting to a channel.
pub struct Client3 {
    pub client: rumqttc::AsyncClient,
    pub events: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
    /// `client-id@host:port`, for failure messages.
    who: String,
}

impl Client3 {
    pub fn connect(addr: SocketAddr, id: &str, clean: bool) -> Self {
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_clean_session(clean);
        Self::with_options(opts)
    }

    /// A client with its own options (transport, credentials).
    pub fn with_options(mut opts: rumqttc::MqttOptions) -> Self {
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(1000);
        let (host, port) = opts.broker_address();
        let who = format!("{}@{host}:{port}", opts.client_id());
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10_000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Message(p.payload.to_vec()));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = tx.send(Seen::SubAck);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Disconnected(e.to_string()));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Self {
            client,
            events,
            task,
            who,
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe is queued");
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(Seen::SubAck)) => return,
                Ok(Some(Seen::Disconnected(e))) => {
                    panic!(
                        "{} disconnected while subscribing to {filter}: {e}",
                        self.who
                    )
                }
                Ok(Some(_)) => {}
                _ => panic!("no SUBACK for {filter}"),
            }
        }
    }
}

impl Drop for Client3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `n` QoS 1 messages `0..n` on `topic/{i}` from a fresh client and
/// waits until the broker acknowledged them all.
pub async fn publish_numbered(addr: SocketAddr, topic: &str, n: usize) {
    let mut opts = rumqttc::MqttOptions::new(
        format!("pub-{}", free_port()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_inflight(100);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10_000);
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(
                    format!("{topic}/{i}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    i.to_string(),
                )
                .await
                .expect("publish is queued");
        }
        client
    });
    let mut acked = 0;
    let start = Instant::now();
    while acked < n {
        assert!(
            start.elapsed() < DEADLINE,
            "publisher: {acked}/{n} acknowledged"
        );
        match tokio::time::timeout(DEADLINE, eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            Err(_) => panic!("publisher stalled"),
        }
    }
    let client = sender.await.expect("sender task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Logs to the test's output when RUST_LOG is set (`RUST_LOG=flowgate=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
