//! The rewrites on arbitrary input: a CONNECT given a replica's client id, and
//! SUBSCRIBE / UNSUBSCRIBE filters turned into shared ones, decode again and
//! keep what they must keep.
#![no_main]

use flowgate::mqtt::codec::{Connect, Protocol, Subscribe, Unsubscribe};
use flowgate::mqtt::rewrite::{replica_client_id, ShareRules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Connect::decode(data) {
        let id = replica_client_id(c.client_id, "line1", "fg1", 3);
        let out = c.encode_with_client_id(&id);
        let back = Connect::decode(&out).expect("a rewritten CONNECT decodes");
        assert_eq!(back.client_id, id);
        assert_eq!(back.flags, c.flags);
        assert_eq!(back.keep_alive, c.keep_alive);
        assert_eq!(back.username, c.username);
    }
    let rules = ShareRules {
        instance: "line1",
        broadcast: &[],
    };
    for protocol in [Protocol::V311, Protocol::V5] {
        if let Ok(s) = Subscribe::decode(data, protocol) {
            if let Some((out, _)) = rules.subscribe(&s, protocol) {
                let back =
                    Subscribe::decode(&out, protocol).expect("a rewritten SUBSCRIBE decodes");
                assert_eq!(back.entries.len(), s.entries.len());
            }
        }
        if let Ok(u) = Unsubscribe::decode(data, protocol) {
            if let Some((out, _)) = rules.unsubscribe(&u) {
                let back =
                    Unsubscribe::decode(&out, protocol).expect("a rewritten UNSUBSCRIBE decodes");
                assert_eq!(back.filters.len(), u.filters.len());
            }
        }
    }
});
