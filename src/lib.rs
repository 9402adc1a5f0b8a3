//! flowgate runs one Node-RED instance as N identical replicas that share the
//! work, without changing the flows.
//!
//! ```text
//!  replica r0 ──MQTT──▶ mqtt::proxy ─▶ instance match ─▶ mqtt::dispatch (default) ─▶ broker
//!  replica r1 ──MQTT──▶   (mqtt::replicas: slots)     | mqtt::rewrite (share mode)   (broker/: embedded
//!  sensors   ──MQTT──▶   (unmatched clients: byte-exact pass-through) ───────────▶   rumqttd, or external)
//!                      admin: /metrics /api/instances /healthz /readyz /status
//! ```
//!
//! Map of the crate (mirrored in README.md):
//! - [`config`]: the TOML file, validated into [`config::Config`];
//! - [`mqtt::codec`]: MQTT framing and the packets flowgate looks inside; bytes only;
//! - [`topic`]: MQTT topic filters: validation, matching, coverage;
//! - [`mqtt::rewrite`]: pure client-id and shared-subscription rewriting;
//! - [`mqtt::replicas`]: which replica holds which slot of which instance;
//! - [`mqtt::proxy`], [`mqtt::pump`]: the sockets: listener, per-connection tasks,
//!   share-mode and pass-through forwarding;
//! - [`mqtt::dispatch`]: dispatch mode: terminated replica sessions, the upstream
//!   session per instance, strategies, acknowledgement tracking;
//! - [`broker`]: the embedded rumqttd and its store of retained messages;
//! - [`hash`]: rendezvous hashing, one rule for MQTT and HTTP `key-hash`;
//! - [`http`]: the HTTP balancer: [`http::lean`] carries HTTP/1.1 requests on
//!   heads read once ([`http::h1`], bytes only), hyper ([`http::forward`]) what
//!   it hands over (upgrades, HTTP/1.0, chunked request bodies); replica pools
//!   and probes ([`http::backend`]), pure choice ([`http::balancer`]) and health;
//! - [`metrics`]: the owned Prometheus registry and every metric name;
//! - [`admin`]: the admin HTTP API and the `/status` page; [`client`]: a small
//!   HTTP/1.1 client for it and for Node-RED's admin API ([`nodered`]);
//! - [`status`]: the `flowgate status` table;
//! - [`loadtest`]: `flowgate loadtest`: open-loop ramps, reports, charts;
//! - [`deploy`]: rolling flow deploys to Node-RED replicas, one at a time;
//! - [`tie`]: active-standby: the MQTT and HTTP sides of an instance agree on the active replica;
//! - [`listener`]: the accept loop every listener shares;
//! - [`stream`], [`tls`]: one connection type for TCP, TLS and WebSocket; rustls
//!   configs, reloaded on SIGHUP;
//! - [`app`]: starts everything from a config, stops it.
//!
//! Glossary: an *instance* is one Node-RED application; a *replica* is one
//! running copy of it; a *slot* is a replica's number on this flowgate node,
//! the lowest free one, reused after a reconnect; the *upstream* is the broker.

pub mod admin;
pub mod app;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod deploy;
pub mod editor;
pub mod hash;
pub mod http;
pub mod listener;
pub mod loadtest;
pub mod metrics;
pub mod mqtt;
pub mod nodered;
pub mod status;
pub mod stream;
pub mod tie;
pub mod tls;
pub mod topic;
