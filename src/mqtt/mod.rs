//! The MQTT bridge: codec (bytes only), topic filters, rewriting (pure), the
//! replica table, and the proxy that owns the sockets.

pub mod auth;
pub mod codec;
pub mod dispatch;
pub mod error;
pub mod limit;
pub mod proxy;
pub mod pump;
pub mod replicas;
pub mod rewrite;
/// Moved to [`crate::topic`] (config uses it; kept here for old paths).
pub use crate::topic;
pub mod ws;
