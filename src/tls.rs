//! TLS with rustls (ring provider): server configs for the listeners, with
//! optional client certificates (mTLS), reloaded from their files on SIGHUP;
//! and the client side for an `mqtts://` upstream broker.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::{ClientAuth, TlsConfig, UpstreamTls};
use crate::stream::Stream;

/// The system's CA bundle (Debian, Ubuntu, Alpine), used for an upstream
/// broker when no `upstream_ca_file` is set.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What went wrong building a TLS config or making a TLS connection.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: no usable PEM private key: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused what the files hold (`what` names them).
    #[error("{what}: {source}")]
    Refused { what: String, source: rustls::Error },
    #[error("{}: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("not a server name: {0}")]
    ServerName(rustls::pki_types::InvalidDnsNameError),
    /// Where the error is in the config (`what` is its key, `mqtt.tls`).
    #[error("{what}: {source}")]
    In { what: String, source: Box<TlsError> },
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no TLS handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("no answer within {0:?}")]
    ConnectTimeout(Duration),
}

fn refused(what: String) -> impl FnOnce(rustls::Error) -> TlsError {
    move |source| TlsError::Refused { what, source }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Key {
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(refused(path.display().to_string()))?;
    }
    Ok(roots)
}

/// Builds a listener's rustls config from its files.
pub fn server_config(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused("the TLS provider".into()))?;
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
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&cfg.cert_file)?, key(&cfg.key_file)?)
        .map_err(refused(format!(
            "{} with {}",
            cfg.cert_file.display(),
            cfg.key_file.display()
        )))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// `e`, said to be about the config key `what`.
pub fn at_key(what: &str) -> impl FnOnce(TlsError) -> TlsError + '_ {
    move |e| TlsError::In {
        what: what.to_owned(),
        source: Box::new(e),
    }
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
    pub fn new(what: &str, cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let config = server_config(cfg, alpn).map_err(at_key(what))?;
        Ok(Arc::new(Self {
            what: what.to_owned(),
            cfg: cfg.clone(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again; on a problem the config in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let config = server_config(&self.cfg, &alpn).map_err(at_key(&self.what))?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// The server side of a handshake, bounded by `timeout`.
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Stream, TlsError> {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        match tokio::time::timeout(timeout, accept).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
            Ok(Err(e)) => Err(TlsError::Handshake(e)),
            Err(_) => Err(TlsError::HandshakeTimeout(timeout)),
        }
    }
}

/// A plain connection, or the server side of a TLS handshake when the
/// listener has TLS (HTTP and admin listeners).
pub async fn accept(
    tls: Option<&Acceptor>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Stream, TlsError> {
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
    pub fn new(host: &str, cfg: &UpstreamTls) -> Result<Self, TlsError> {
        let roots = roots(cfg.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_CA)))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(refused("the TLS provider".into()))?
            .with_root_certificates(roots);
        let config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c)?, key(k)?)
                .map_err(refused(format!("{} with {}", c.display(), k.display())))?,
            _ => builder.with_no_client_auth(),
        };
        let name = cfg.server_name.as_deref().unwrap_or(host).to_owned();
        let name = ServerName::try_from(name).map_err(TlsError::ServerName)?;
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
) -> Result<Stream, TlsError> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(TlsError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(Stream::Tcp(tcp)),
            Some(c) => c.connect(tcp).await.map_err(TlsError::Handshake),
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| TlsError::ConnectTimeout(timeout))?
}
