//! Pure rewriting for replicas: their client ids, and (share mode) their
//! subscription filters into shared subscriptions. No I/O, no state.
//!
//! The share name of a filter is `{instance}~{h}`, `h` being the first 32 bits
//! of the FNV-1a hash of the filter in lowercase hex: one group per instance and
//! filter (rumqttd keys groups by share name alone), computed the same on every
//! replica, every flowgate node and every flowgate version.

use super::codec::{Protocol, Subscribe, Unsubscribe, NO_LOCAL};
use super::topic::{covers, TopicFilter};

/// The client id a replica gets upstream: `{client_id}-{node_id}-{slot}`. An
/// empty client id takes the instance name in its place.
pub fn replica_client_id(client_id: &str, instance: &str, node_id: &str, slot: u16) -> String {
    let base = if client_id.is_empty() {
        instance
    } else {
        client_id
    };
    format!("{base}-{node_id}-{slot}")
}

/// FNV-1a, 32 bits: short, stable, no dependency.
pub fn filter_hash(filter: &str) -> u32 {
    filter.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// `$share/{instance}~{h}/{filter}`.
pub fn shared_filter(instance: &str, filter: &str) -> String {
    format!("$share/{instance}~{:08x}/{filter}", filter_hash(filter))
}

/// The rules for one instance's subscriptions in share mode.
#[derive(Debug, Clone, Copy)]
pub struct ShareRules<'a> {
    pub instance: &'a str,
    pub broadcast: &'a [TopicFilter],
}

impl ShareRules<'_> {
    /// Is `filter` shared? Not when it is already a `$share/` or another `$`
    /// filter, nor when a broadcast filter covers it.
    pub fn shares(&self, filter: &str) -> bool {
        !filter.starts_with('$') && !self.broadcast.iter().any(|b| covers(b.as_str(), filter))
    }

    /// The SUBSCRIBE re-encoded with shared filters, or `None` when no filter
    /// changes (the original bytes are then forwarded). Returns the number of
    /// filters rewritten too.
    pub fn subscribe(&self, sub: &Subscribe<'_>, protocol: Protocol) -> Option<(Vec<u8>, usize)> {
        let mut changed = 0;
        let rewritten: Vec<(String, u8)> = sub
            .entries
            .iter()
            .map(|e| {
                if self.shares(e.filter) {
                    changed += 1;
                    // no-local is a protocol error on a shared subscription
                    let options = if protocol.is_v5() {
                        e.options & !NO_LOCAL
                    } else {
                        e.options
                    };
                    (shared_filter(self.instance, e.filter), options)
                } else {
                    (e.filter.to_owned(), e.options)
                }
            })
            .collect();
        if changed == 0 {
            return None;
        }
        let entries: Vec<(&str, u8)> = rewritten.iter().map(|(f, o)| (f.as_str(), *o)).collect();
        Some((sub.encode_with(&entries), changed))
    }

    /// The UNSUBSCRIBE re-encoded the same way as [`Self::subscribe`].
    pub fn unsubscribe(&self, unsub: &Unsubscribe<'_>) -> Option<(Vec<u8>, usize)> {
        let mut changed = 0;
        let rewritten: Vec<String> = unsub
            .filters
            .iter()
            .map(|f| {
                if self.shares(f) {
                    changed += 1;
                    shared_filter(self.instance, f)
                } else {
                    (*f).to_owned()
                }
            })
            .collect();
        if changed == 0 {
            return None;
        }
        let filters: Vec<&str> = rewritten.iter().map(String::as_str).collect();
        Some((unsub.encode_with(&filters), changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broadcast() -> Vec<TopicFilter> {
        vec![TopicFilter::new("config/#").expect("valid filter")]
    }

    #[test]
    fn client_ids_carry_node_and_slot() {
        assert_eq!(
            replica_client_id("line1-nodered", "line1", "fg1", 0),
            "line1-nodered-fg1-0"
        );
        assert_eq!(replica_client_id("", "line1", "fg1", 3), "line1-fg1-3");
    }

    #[test]
    fn hash_is_stable_and_known() {
        // FNV-1a test vectors
        assert_eq!(filter_hash(""), 0x811c_9dc5);
        assert_eq!(filter_hash("a"), 0xe40c_292c);
        assert_eq!(shared_filter("line1", "a"), "$share/line1~e40c292c/a");
    }

    #[test]
    fn shares_only_plain_non_broadcast_filters() {
        let b = broadcast();
        let rules = ShareRules {
            instance: "line1",
            broadcast: &b,
        };
        assert!(rules.shares("jobs/#"));
        assert!(!rules.shares("config/#"));
        assert!(!rules.shares("config/a/b"));
        assert!(!rules.shares("$share/g/jobs"));
        assert!(!rules.shares("$SYS/#"));
    }

    #[test]
    fn v5_subscribe_rewrite_clears_no_local_and_keeps_the_rest() {
        let b = broadcast();
        let rules = ShareRules {
            instance: "i",
            broadcast: &b,
        };
        // packet id 5, no properties, "j" options 0b0010_1101, "config/x" options 0b0000_0101
        let frame = [
            &[
                0x82,
                18,
                0x00,
                0x05,
                0x00,
                0x00,
                0x01,
                b'j',
                0b0010_1101,
                0x00,
                0x08,
            ][..],
            b"config/x",
            &[0b0000_0101],
        ]
        .concat();
        let sub = Subscribe::decode(&frame, Protocol::V5).expect("valid");
        let (out, changed) = rules.subscribe(&sub, Protocol::V5).expect("rewritten");
        assert_eq!(changed, 1);
        let back = Subscribe::decode(&out, Protocol::V5).expect("valid output");
        assert_eq!(back.packet_id, 5);
        assert_eq!(back.entries[0].filter, shared_filter("i", "j"));
        assert_eq!(back.entries[0].options, 0b0010_1001);
        assert_eq!(back.entries[1].filter, "config/x");
        assert_eq!(back.entries[1].options, 0b0000_0101);
    }

    #[test]
    fn nothing_to_share_means_no_rewrite() {
        let rules = ShareRules {
            instance: "i",
            broadcast: &[],
        };
        let frame = [0x82, 8, 0x00, 0x01, 0x00, 0x03, b'$', b'a', b'b', 0x01];
        let sub = Subscribe::decode(&frame, Protocol::V311).expect("valid");
        assert!(rules.subscribe(&sub, Protocol::V311).is_none());
        let unsub = Unsubscribe::decode(&[0xa2, 7, 0, 1, 0, 3, b'$', b'a', b'b'], Protocol::V311)
            .expect("valid");
        assert!(rules.unsubscribe(&unsub).is_none());
    }

    #[test]
    fn unsubscribe_matches_subscribe_rewrite() {
        let rules = ShareRules {
            instance: "i",
            broadcast: &[],
        };
        let unsub =
            Unsubscribe::decode(&[0xa2, 5, 0, 1, 0, 1, b'j'], Protocol::V311).expect("valid");
        let (out, n) = rules.unsubscribe(&unsub).expect("rewritten");
        assert_eq!(n, 1);
        let back = Unsubscribe::decode(&out, Protocol::V311).expect("valid output");
        assert_eq!(back.filters, vec![shared_filter("i", "j").as_str()]);
    }
}
