//! Why one MQTT connection ended. Each error names the side that failed
//! (client, upstream, or flowgate itself), which picks the log level and the
//! `kind` label of `flowgate_mqtt_errors_total`.

use std::io;
use std::time::Duration;

use thiserror::Error;

use super::codec::CodecError;

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("client sent an invalid packet: {0}")]
    ClientCodec(CodecError),
    #[error("broker sent an invalid packet: {0}")]
    UpstreamCodec(CodecError),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("client closed before sending CONNECT")]
    ClosedBeforeConnect,
    #[error("first packet is {0:?}, not CONNECT")]
    NotConnect(super::codec::PacketType),
    #[error("second CONNECT on one connection")]
    SecondConnect,
    #[error("client i/o: {0}")]
    ClientIo(io::Error),
    #[error("broker i/o: {0}")]
    UpstreamIo(io::Error),
    #[error("cannot reach broker {addr}: {reason}")]
    UpstreamConnect {
        addr: String,
        reason: crate::tls::TlsError,
    },
    #[error("rewritten client id is {0} bytes, over MQTT's 65535")]
    ClientIdTooLong(usize),
    #[error("client sent an invalid packet: {0}")]
    ClientWire(String),
    #[error("no packet from the client within {0:?} (1.5 x keep-alive)")]
    KeepAliveTimeout(Duration),
    #[error("{0}")]
    Handshake(String),
    #[error("refused {client_id:?}: {reason}")]
    Refused {
        client_id: String,
        reason: String,
        kind: &'static str,
    },
    #[error("internal: {0}")]
    Internal(String),
}

impl ConnError {
    /// The `kind` label of the error counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientCodec(e) => e.kind(),
            Self::UpstreamCodec(_) => "upstream_malformed_packet",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::ClosedBeforeConnect => "closed_before_connect",
            Self::NotConnect(_) | Self::SecondConnect => "protocol_violation",
            Self::ClientIo(_) => "client_io",
            Self::UpstreamIo(_) => "upstream_io",
            Self::UpstreamConnect { .. } => "upstream_unreachable",
            Self::ClientIdTooLong(_) => "client_id_too_long",
            Self::ClientWire(_) => "malformed_packet",
            Self::KeepAliveTimeout(_) => "keep_alive_timeout",
            Self::Handshake(_) => "handshake",
            Self::Refused { kind, .. } => kind,
            Self::Internal(_) => "internal",
        }
    }

    /// Logs the error at the level its side deserves: peer resets at debug,
    /// bad input and broker trouble at warn.
    pub fn log(&self) {
        match self {
            Self::ClientIo(_) | Self::ClosedBeforeConnect => {
                tracing::debug!(error = %self, kind = self.kind(), "connection closed")
            }
            Self::Internal(_) => {
                tracing::error!(error = %self, kind = self.kind(), "connection closed")
            }
            _ => tracing::warn!(error = %self, kind = self.kind(), "connection closed"),
        }
    }
}
