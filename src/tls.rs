//! TLS with rustls (ring provider): server configs for the listeners, with
//! optional client certificates (mTLS), reloaded from their files on SIGHUP;
//! and the client side for an `mqtts://` upstream broker.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::config::{ClientAuth, TlsConfig, UpstreamTls};
use crate::stream::Stream;

/// The system's CA bundle (Debian, Ubuntu, Alpine), used for an upstream
/// broker when no `upstream_ca_file` is set.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable PEM private key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Builds a listener's rustls config from its files.
pub fn server_config(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (&cfg.client_ca_file, cfg.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let verifier = if cfg.client_auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&cfg.cert_file)?, key(&cfg.key_file)?)
        .map_err(|e| {
            format!(
                "{} with {}: {e}",
                cfg.cert_file.display(),
                cfg.key_file.display()
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS listener's handshakes: the config in use, swapped for a new one
/// from the same files by [`Acceptor::reload`]. Connections already up keep
/// the config they started with.
pub struct Acceptor {
    /// The listener's config key, for logs (`mqtt.tls`).
    pub what: String,
    cfg: TlsConfig,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
}

impl Acceptor {
    pub fn new(what: &str, cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<Self>, String> {
        let config = server_config(cfg, alpn).map_err(|e| format!("{what}: {e}"))?;
        Ok(Arc::new(Self {
            what: what.to_owned(),
            cfg: cfg.clone(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again; on a problem the config in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let config = server_config(&self.cfg, &alpn).map_err(|e| format!("{}: {e}", self.what))?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// The server side of a handshake, bounded by `timeout`.
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Stream, String> {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        match tokio::time::timeout(timeout, accept).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
        }
    }
}

/// A plain connection, or the server side of a TLS handshake when the
/// listener has TLS (HTTP and admin listeners).
pub async fn accept(
    tls: Option<&Acceptor>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Stream, String> {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Stream::Tcp(tcp)),
        Some(t) => t.accept(tcp, timeout).await,
    }
}

/// The client side for an `mqtts://` upstream broker.
pub struct Connector {
    name: ServerName<'static>,
    inner: tokio_rustls::TlsConnector,
}

impl Connector {
    pub fn new(host: &str, cfg: &UpstreamTls) -> Result<Self, String> {
        let roots = roots(cfg.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_CA)))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c)?, key(k)?)
                .map_err(|e| format!("{} with {}: {e}", c.display(), k.display()))?,
            _ => builder.with_no_client_auth(),
        };
        let name = cfg.server_name.as_deref().unwrap_or(host).to_owned();
        let name = ServerName::try_from(name).map_err(|e| format!("not a server name: {e}"))?;
        Ok(Self {
            name,
            inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    async fn connect(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let s = self.inner.connect(self.name.clone(), tcp).await?;
        Ok(Stream::Tls(Box::new(s.into())))
    }
}

/// Connects to `addr` within `timeout`, TLS included when `tls` is given.
pub async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<&Connector>,
) -> Result<Stream, String> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(Stream::Tcp(tcp)),
            Some(c) => c
                .connect(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}")),
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
