//! Dispatch mode: flowgate terminates the replicas' MQTT sessions and hands
//! each message from the instance's one upstream session to exactly one
//! replica.
//!
//! One [`Dispatcher`] per instance owns all the state (no locks): the
//! replicas with their filters and unacknowledged messages, the queue of
//! messages waiting for a replica, and the upstream session's packet ids. It
//! does no I/O: its [`Driver`] task feeds it events and does what it decides.
//! The replica sessions ([`session`]) and the upstream session ([`upstream`])
//! only move packets and report to the driver over channels.
//!
//! Guarantees: a QoS 1/2 message is acknowledged upstream only after a replica
//! acknowledged it; a replica that disconnects, or leaves a message
//! unacknowledged past `ack_timeout`, has its unacknowledged messages handed
//! to another replica, oldest first; with no replica able to take a message it
//! waits in a queue of at most `queue_limit`, and past that the dispatcher
//! stops reading from the broker (back-pressure: the broker holds them).
//! With completion acknowledgement (`complete`), "acknowledged" means done: a
//! job is acknowledged upstream once its replica published the result
//! carrying its key ([`complete`]), and one not done is handed on the same
//! way.

pub mod complete;
mod core;
mod driver;
pub mod session;
pub mod strategy;
pub mod upstream;
pub mod wire;

pub use self::core::{DispatchSettings, Dispatcher};
pub use self::driver::{Driver, Handle, ReplicaEvent};
