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
pub mod topic;
pub mod ws;
