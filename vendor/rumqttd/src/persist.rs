//! flowgate patch: a hook that lets the embedder keep retained messages
//! across restarts. The router reports every change of its retained set to a
//! [`RetainedStore`]'s sink, and starts with the messages the embedder restored.
//! How and where they are kept is the embedder's business.

use std::fmt;
use std::sync::Arc;

use crate::protocol::{Publish, PublishProperties};

/// One change of the retained set, in the order the router made them.
#[derive(Debug, Clone)]
pub enum RetainedChange {
    /// `topic` now retains this message.
    Set {
        topic: String,
        publish: Publish,
        properties: Option<PublishProperties>,
    },
    /// `topic` retains nothing any more.
    Clear { topic: String },
}

/// Receives the router's retained changes. Called on the router's thread:
/// must not block (hand the change to a writer of its own).
pub trait RetainedSink: Send + Sync {
    fn changed(&self, change: RetainedChange);
}

/// What the router starts with and whom it tells (in `RouterConfig`).
#[derive(Clone)]
pub struct RetainedStore {
    /// Retained messages the router starts with (topic in the publish).
    pub restore: Arc<Vec<(Publish, Option<PublishProperties>)>>,
    pub sink: Arc<dyn RetainedSink>,
}

impl fmt::Debug for RetainedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedStore")
            .field("restore", &self.restore.len())
            .finish_non_exhaustive()
    }
}
