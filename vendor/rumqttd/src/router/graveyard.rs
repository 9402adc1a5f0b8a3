use std::collections::{HashMap, HashSet, VecDeque};

use crate::protocol::{Publish, PublishProperties};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        self.connections.remove(id)
    }

    /// Save connection tracker
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        recorded: VecDeque<(Publish, Option<PublishProperties>)>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            recorded,
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
            },
        );
    }

    /// flowgate patch: the saved persistent sessions
    pub fn sessions(&self) -> impl Iterator<Item = (&String, &SessionState)> {
        self.connections
            .iter()
            .filter_map(|(id, s)| Some((id, s.session_state.as_ref()?)))
    }

    /// flowgate patch: whether a persistent session of this id is saved
    pub fn has_session(&self, id: &str) -> bool {
        self.connections
            .get(id)
            .is_some_and(|s| s.session_state.is_some())
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
            },
        );
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// flowgate patch: incoming QoS 2 publishes waiting for their PUBREL
    /// (lost with the connection before: the client's PUBREL after a
    /// reconnect then found nothing and was disconnected)
    pub recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}
