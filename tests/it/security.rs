//! TLS and mTLS on the MQTT, HTTP and admin listeners, MQTT over WebSocket in
//! both modes, logins checked by flowgate, upstream credentials per instance,
//! and the connection and rate limits: real rumqttc clients, a real
//! Mosquitto, certificates made by openssl at test time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::app::App;
use flowgate::config::Config;
use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, QoS, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    eventually, free_port, http_get, init_logs, metric_sum, publish_numbered, temp_dir, unique_id,
    Client3, Mosquitto, Seen,
};

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate it signed, and a client certificate from another CA.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn make(tag: &str) -> Self {
        let dir = temp_dir(tag);
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs (apt install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext file");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for ca in ["ca", "rogue-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ]);
        }
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("rogue", "rogue-ca", "client.ext"),
            ("server2", "rogue-ca", "server.ext"),
        ] {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        Self { dir }
    }

    /// A rustls client config trusting `ca`, with a client certificate.
    fn client(&self, ca: &str, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path(&format!("{ca}.pem"))).expect("ca") {
            roots.add(c.expect("ca cert")).expect("root");
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        Arc::new(match cert {
            None => b.with_no_client_auth(),
            Some(name) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                        .expect("cert")
                        .map(|c| c.expect("cert"))
                        .collect();
                let key =
                    PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).expect("key");
                b.with_client_auth_cert(chain, key).expect("client cert")
            }
        })
    }
}

async fn start(text: &str) -> App {
    init_logs();
    let config = Config::parse(text, "test config").expect("test config is valid");
    App::start(config).await.expect("flowgate starts")
}

/// Polls a fresh v3.1.1 client until its CONNACK or its first error.
async fn connack3(opts: MqttOptions) -> Result<(), ConnectionError> {
    let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no CONNACK and no error within 10 s"),
        }
    }
}

/// Polls a fresh v5 client until its CONNACK or its first error.
async fn connack5(opts: rumqttc::v5::MqttOptions) -> Result<(), rumqttc::v5::ConnectionError> {
    let (_client, mut ev) = rumqttc::v5::AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_)))) => {
                return Ok(())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no CONNACK and no error within 10 s"),
        }
    }
}

fn tls_opts(id: &str, addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(id, "localhost", addr.port());
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o
}

/// Receives `n` messages on `c` within the deadline.
async fn receive(c: &mut Client3, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < n {
        let left = Duration::from_secs(20).saturating_sub(start.elapsed());
        match tokio::time::timeout(left, c.events.recv()).await {
            Ok(Some(Seen::Message(m))) => got.push(m),
            Ok(Some(_)) => {}
            _ => panic!("{}/{n} messages", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn mqtt_over_tls_with_client_certificates_and_a_wrong_one_refused() {
    let certs = Certs::make("tls-mqtt");
    let p = |n: &str| certs.path(n).display().to_string();
    let app = start(&format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [mqtt.tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         client_ca_file = \"{}\"\n\
         [[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"line1-nodered\" }}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ))
    .await;
    let mqtts = app.mqtts_addr.expect("mqtts listener");

    // a replica with a good certificate works end to end (dispatch mode)
    let mut replica = Client3::with_options(tls_opts(
        "line1-nodered",
        mqtts,
        certs.client("ca", Some("client")),
    ));
    replica.subscribe("jobs/#", QoS::AtLeastOnce).await;
    publish_numbered(app.mqtt_addr, "jobs", 5).await;
    assert_eq!(receive(&mut replica, 5).await.len(), 5);

    // a fresh client's CONNACK over TLS, trusting `ca`, with `cert`
    let login = |id: &str, ca: &str, cert: Option<&str>| {
        connack3(tls_opts(id, mqtts, certs.client(ca, cert)))
    };
    // no client certificate, one from another CA, a server nobody trusts
    let none = login("c2", "ca", None).await;
    assert!(none.is_err(), "a client without a certificate got in");
    let rogue = login("c3", "ca", Some("rogue")).await;
    assert!(rogue.is_err(), "a client with a rogue certificate got in");
    let untrusted = login("c4", "rogue-ca", Some("client")).await;
    assert!(
        untrusted.is_err(),
        "the client trusted a server it should not"
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert!(
        metric_sum(&m, "flowgate_mqtt_errors_total", &[("kind", "handshake")]) >= 2.0,
        "handshake failures are counted"
    );

    // SIGHUP's reload: the listener now presents a certificate from the
    // other CA; the open replica session is untouched
    std::fs::copy(certs.path("server2.pem"), certs.path("server.pem")).expect("swap cert");
    std::fs::copy(certs.path("server2.key"), certs.path("server.key")).expect("swap key");
    assert_eq!(app.reload(), 0, "reload failed");
    let old_ca = login("c5", "ca", Some("client")).await;
    assert!(old_ca.is_err(), "the old certificate is still served");
    let new_ca = login("c6", "rogue-ca", Some("client")).await;
    assert!(new_ca.is_ok(), "the reloaded certificate: {new_ca:?}");
    publish_numbered(app.mqtt_addr, "jobs", 3).await;
    assert_eq!(
        receive(&mut replica, 3).await.len(),
        3,
        "the open session went on"
    );
    // a broken file keeps the old certificate
    std::fs::write(certs.path("server.pem"), "not a certificate").expect("break");
    assert_eq!(app.reload(), 1);
    let still = login("c7", "rogue-ca", Some("client")).await;
    assert!(
        still.is_ok(),
        "a failed reload dropped the certificate: {still:?}"
    );
    app.shutdown(Duration::from_secs(2)).await;
}

/// One HTTPS GET with a rustls client; returns the status line.
async fn https_get(addr: SocketAddr, path: &str, tls: Arc<rustls::ClientConfig>) -> String {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn admin_and_http_listeners_serve_https_and_mqtt_over_wss() {
    let certs = Certs::make("tls-http");
    let p = |n: &str| certs.path(n).display().to_string();
    // a replica: a plain HTTP server answering 200
    let replica = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let replica_addr = replica.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = replica.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
            });
        }
    });
    let tls = format!(
        "cert_file = \"{}\", key_file = \"{}\"",
        p("server.pem"),
        p("server.key")
    );
    let app = start(&format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntls = {{ {tls} }}\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [mqtt.websocket]\nlisten = \"127.0.0.1:0\"\ntls = {{ {tls} }}\n\
         [[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"line1-nodered\" }}\n\
         [instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [\"{replica_addr}\"]\n\
         health_tcp_only = true\npublic_paths = [\"/\"]\ntls = {{ {tls} }}\n\
         [instance.editor]\nlisten = \"127.0.0.1:0\"\nlogin = false\ntls = {{ {tls} }}\n"
    ))
    .await;
    let trust = certs.client("ca", None);
    assert!(https_get(app.admin_addr, "/healthz", trust.clone())
        .await
        .contains("200"));
    let http = app.http_addrs[0].1;
    assert!(https_get(http, "/api", trust.clone()).await.contains("200"));
    // the editor listener over HTTPS: flowgate's own answer and the editor replica's
    let editor = app.editor_addrs[0].1;
    assert!(https_get(editor, "/auth/login", trust.clone())
        .await
        .contains("200"));
    assert!(https_get(editor, "/red/main.js", trust.clone())
        .await
        .contains("200"));
    // plain HTTP to a TLS listener gets nothing served
    let mut s = TcpStream::connect(app.admin_addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));

    // wss: a replica over TLS + WebSocket gets the jobs a TCP client publishes
    let wss = app.ws_addr.expect("ws listener");
    let mut o = MqttOptions::new(
        "line1-nodered",
        format!("wss://localhost:{}/mqtt", wss.port()),
        wss.port(),
    );
    o.set_transport(Transport::wss_with_config(
        rumqttc::TlsConfiguration::Rustls(trust),
    ));
    let mut replica = Client3::with_options(o);
    replica.subscribe("jobs/#", QoS::AtLeastOnce).await;
    publish_numbered(app.mqtt_addr, "jobs", 4).await;
    assert_eq!(receive(&mut replica, 4).await.len(), 4);
    app.shutdown(Duration::from_secs(2)).await;
}

fn ws_opts(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(
        id,
        format!("ws://127.0.0.1:{}/mqtt", addr.port()),
        addr.port(),
    );
    o.set_transport(Transport::Ws);
    o
}

/// Two replicas over WebSocket share `n` jobs: each once, both get some.
async fn two_ws_replicas_share(app: &App, n: usize) {
    let ws = app.ws_addr.expect("ws listener");
    let mut a = Client3::with_options(ws_opts("line1-nodered", ws));
    let mut b = Client3::with_options(ws_opts("line1-nodered", ws));
    a.subscribe("jobs/#", QoS::AtLeastOnce).await;
    b.subscribe("jobs/#", QoS::AtLeastOnce).await;
    publish_numbered(app.mqtt_addr, "jobs", n).await;
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let (mut from_a, mut from_b) = (0, 0);
    let start = Instant::now();
    while seen.len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}/{n}",
            seen.len()
        );
        tokio::select! {
            Some(Seen::Message(m)) = a.events.recv() => { from_a += 1; seen.push(m) }
            Some(Seen::Message(m)) = b.events.recv() => { from_b += 1; seen.push(m) }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Seen::Message(m)) = a.events.try_recv() {
        seen.push(m);
    }
    while let Ok(Seen::Message(m)) = b.events.try_recv() {
        seen.push(m);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n);
    assert!(from_a > 0 && from_b > 0, "a {from_a}, b {from_b}");
    assert_eq!(from_a + from_b, n, "a job was delivered twice");
}

#[tokio::test]
async fn mqtt_over_websocket_shares_work_in_dispatch_and_share_modes() {
    let instance = "[[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\n";
    let ws = "[mqtt.websocket]\nlisten = \"127.0.0.1:0\"\n";
    let app = start(&format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         {ws}{instance}"
    ))
    .await;
    two_ws_replicas_share(&app, 40).await;
    // a wrong path is answered 404 by the upgrade
    let wsa = app.ws_addr.expect("ws");
    let mut s = TcpStream::connect(wsa).await.expect("connect");
    s.write_all(
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = vec![0u8; 256];
    let n = s.read(&mut out).await.unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&out[..n])
    );
    app.shutdown(Duration::from_secs(2)).await;

    let broker = Mosquitto::start().await;
    let app = crate::support::flowgate(broker.addr, "share", ws, instance).await;
    two_ws_replicas_share(&app, 40).await;
    app.shutdown(Duration::from_secs(2)).await;
}

fn passwords(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwords");
    for (u, pw) in users {
        flowgate::mqtt::auth::set_user(&path, u, pw.as_bytes()).expect("set user");
    }
    path
}

#[tokio::test]
async fn logins_are_checked_with_the_right_connack_codes_for_3_1_1_and_5() {
    let dir = temp_dir("auth");
    let file = passwords(&dir, &[("alice", "s3cret")]);
    let app = start(&format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         password_file = \"{}\"\n",
        file.display()
    ))
    .await;
    let a = app.mqtt_addr;
    let v3 = |user: Option<(&str, &str)>| {
        let mut o = MqttOptions::new(format!("c{}", free_port()), "127.0.0.1", a.port());
        if let Some((u, p)) = user {
            o.set_credentials(u, p);
        }
        o
    };
    assert!(connack3(v3(Some(("alice", "s3cret")))).await.is_ok());
    for (creds, code) in [
        (
            Some(("alice", "wrong")),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            Some(("mallory", "s3cret")),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (None, ConnectReturnCode::NotAuthorized),
    ] {
        match connack3(v3(creds)).await {
            Err(ConnectionError::ConnectionRefused(got)) => assert_eq!(got, code, "{creds:?}"),
            other => panic!("{creds:?}: {other:?}"),
        }
    }
    let v5 = |user: Option<(&str, &str)>| {
        let mut o =
            rumqttc::v5::MqttOptions::new(format!("c{}", free_port()), "127.0.0.1", a.port());
        if let Some((u, p)) = user {
            o.set_credentials(u, p);
        }
        o
    };
    assert!(connack5(v5(Some(("alice", "s3cret")))).await.is_ok());
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
    for (creds, code) in [
        (Some(("alice", "wrong")), Code5::BadUserNamePassword),
        (Some(("mallory", "x")), Code5::BadUserNamePassword),
        (None, Code5::NotAuthorized),
    ] {
        match connack5(v5(creds)).await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(got)) => {
                assert_eq!(got, code, "{creds:?}")
            }
            other => panic!("{creds:?}: {other:?}"),
        }
    }
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(&m, "flowgate_mqtt_auth_total", &[("result", "ok")]),
        2.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_mqtt_connect_refused_total",
            &[("reason", "bad_credentials")]
        ),
        4.0
    );
    // a user added and SIGHUP's reload: bob gets in without a restart
    passwords(&dir, &[("bob", "hunter2")]);
    assert_eq!(app.reload(), 0);
    assert!(connack3(v3(Some(("bob", "hunter2")))).await.is_ok());
    // a line from Mosquitto's own mosquitto_passwd works as it is
    let mosq_pw = dir.join("mosquitto.pw");
    std::fs::write(&mosq_pw, "").expect("pw file");
    let out = Command::new("mosquitto_passwd")
        .args(["-b", &mosq_pw.display().to_string(), "carol", "n0de-red"])
        .output()
        .expect("mosquitto_passwd runs");
    assert!(out.status.success(), "{out:?}");
    let line = std::fs::read_to_string(&mosq_pw).expect("read");
    assert!(line.starts_with("carol:$7$"), "{line}");
    let mut all = std::fs::read_to_string(&file).expect("read");
    all.push_str(&line);
    std::fs::write(&file, all).expect("write");
    assert_eq!(app.reload(), 0);
    assert!(connack3(v3(Some(("carol", "n0de-red")))).await.is_ok());
    match connack3(v3(Some(("carol", "n0de-rex")))).await {
        Err(ConnectionError::ConnectionRefused(got)) => {
            assert_eq!(got, ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("carol with a wrong password: {other:?}"),
    }
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn replicas_log_in_to_flowgate_and_flowgate_to_the_broker_with_the_instances_credentials() {
    // the broker only knows the instance's user
    let dir = temp_dir("upstream-creds");
    let broker_pw = dir.join("mosquitto.pw");
    std::fs::write(&broker_pw, "").expect("pw file");
    let out = Command::new("mosquitto_passwd")
        .args([
            "-b",
            &broker_pw.display().to_string(),
            "line1-up",
            "broker-secret",
        ])
        .output()
        .expect("mosquitto_passwd runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        broker_pw.display()
    ))
    .await;
    let replicas_pw = passwords(&dir, &[("replica", "replica-secret")]);
    let instance = format!(
        "[[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"line1-nodered\" }}\n\
         password_file = \"{}\"\nupstream_username = \"line1-up\"\nupstream_password = \"broker-secret\"\n",
        replicas_pw.display()
    );
    for mode in ["dispatch", "share"] {
        let app = crate::support::flowgate(broker.addr, mode, "", &instance).await;
        let mut o = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
        o.set_credentials("replica", "replica-secret");
        let mut replica = Client3::with_options(o);
        replica.subscribe("jobs/#", QoS::AtLeastOnce).await;
        // the publisher logs in to the broker itself, through flowgate
        let mut po = MqttOptions::new(unique_id("publisher"), "127.0.0.1", app.mqtt_addr.port());
        po.set_credentials("line1-up", "broker-secret");
        let publisher = Client3::with_options(po);
        for i in 0..5 {
            publisher
                .client
                .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, i.to_string())
                .await
                .expect("queued");
        }
        assert_eq!(receive(&mut replica, 5).await.len(), 5, "{mode}");
        // a replica with the broker's password is not one of the replicas' users
        let mut bad = MqttOptions::new("line1-nodered", "127.0.0.1", app.mqtt_addr.port());
        bad.set_credentials("line1-up", "broker-secret");
        match connack3(bad).await {
            Err(ConnectionError::ConnectionRefused(c)) => {
                assert_eq!(c, ConnectReturnCode::BadUserNamePassword, "{mode}")
            }
            other => panic!("{mode}: {other:?}"),
        }
        drop(publisher);
        app.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn connection_replica_and_publish_rate_limits_answer_as_documented() {
    let app = start(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         max_connections = 3\nmax_publish_rate = 20\n\
         [[instance]]\nname = \"line1\"\nmatch = { client_id = \"line1-nodered\" }\nmax_replicas = 1\n",
    )
    .await;
    let a = app.mqtt_addr;
    let mut replica = Client3::connect(a, "line1-nodered", true);
    replica.subscribe("jobs/#", QoS::AtLeastOnce).await;
    // a second replica is over max_replicas: 5.0 says quota exceeded
    let second = rumqttc::v5::MqttOptions::new("line1-nodered", "127.0.0.1", a.port());
    match connack5(second).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(c)) => {
            assert_eq!(
                c,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::QuotaExceeded
            )
        }
        other => panic!("second replica: {other:?}"),
    }
    // connections: the replica and two more; the fourth is refused (3.1.1: 3)
    let one = Client3::connect(a, "other-1", true);
    let two = Client3::connect(a, "other-2", true);
    eventually("three connections are open", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_mqtt_connections_active", &[]) >= 3.0
    })
    .await;
    match connack3(MqttOptions::new("other-3", "127.0.0.1", a.port())).await {
        Err(ConnectionError::ConnectionRefused(c)) => {
            assert_eq!(c, ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("fourth connection: {other:?}"),
    }
    drop((one, two));
    eventually("the two others are gone", || async {
        let (_, m) = http_get(app.admin_addr, "/metrics").await;
        metric_sum(&m, "flowgate_mqtt_connections_active", &[]) <= 1.0
    })
    .await;

    // publish rate: the replica publishes 60 at once at 20/s; none is lost,
    // and it cannot take less than (60 - 20) / 20 = 2 s
    let mut sink = Client3::connect(a, "sink", true);
    sink.subscribe("out/#", QoS::AtLeastOnce).await;
    let started = Instant::now();
    for i in 0..60 {
        replica
            .client
            .publish(format!("out/{i}"), QoS::AtLeastOnce, false, i.to_string())
            .await
            .expect("queued");
    }
    let got = receive(&mut sink, 60).await;
    let took = started.elapsed();
    assert_eq!(got.len(), 60);
    assert!(
        took >= Duration::from_millis(1900),
        "60 publishes at 20/s took {took:?}"
    );
    let (_, m) = http_get(app.admin_addr, "/metrics").await;
    assert!(
        metric_sum(
            &m,
            "flowgate_mqtt_throttled_total",
            &[("instance", "line1")]
        ) > 0.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_mqtt_connect_refused_total",
            &[("reason", "max_replicas")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "flowgate_mqtt_connect_refused_total",
            &[("reason", "max_connections")]
        ),
        1.0
    );
    app.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn http_request_heads_too_large_or_too_slow_are_refused() {
    let replica = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let replica_addr = replica.local_addr().expect("addr");
    let app = start(&format!(
        "node_id = \"fg1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [[instance]]\nname = \"line1\"\nmatch = {{ client_id = \"x\" }}\n\
         [instance.http]\nlisten = \"127.0.0.1:0\"\nreplicas = [\"{replica_addr}\"]\n\
         health_tcp_only = true\npublic_paths = [\"/\"]\nmax_header_size = \"16KiB\"\nheader_timeout = \"500ms\"\n"
    ))
    .await;
    let http = app.http_addrs[0].1;
    // 40 KiB of headers: 431
    let mut s = TcpStream::connect(http).await.expect("connect");
    let big = "x".repeat(40 << 10);
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let mut out = vec![0u8; 512];
    let n = s.read(&mut out).await.unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out[..n])
    );
    // a slowloris head: the connection ends after header_timeout
    let mut s = TcpStream::connect(http).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut buf = vec![0u8; 512];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a slow request head kept its connection");
    assert!(started.elapsed() >= Duration::from_millis(400));
    drop(replica);
    app.shutdown(Duration::from_secs(2)).await;
}
