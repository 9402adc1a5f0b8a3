//! Picking the replica for a message: pure functions over the candidates, so
//! each strategy is tested without sockets.

pub use crate::config::Strategy;

/// A replica that could take the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub slot: u16,
    pub inflight: usize,
}

/// The hashing key of a topic: the whole topic, or its level `level` (0-based)
/// when the topic has that many levels.
pub fn key_of(topic: &str, level: Option<usize>) -> &str {
    level.and_then(|l| topic.split('/').nth(l)).unwrap_or(topic)
}

/// Chooses among `candidates` (never empty when called; `None` if it is).
/// `turn` is the instance's rotating counter, advanced by the caller.
pub fn pick(strategy: Strategy, candidates: &[Candidate], turn: usize, key: &str) -> Option<u16> {
    if candidates.is_empty() {
        return None;
    }
    let slot = match strategy {
        Strategy::RoundRobin => candidates[turn % candidates.len()].slot,
        Strategy::LeastInflight => {
            let least = candidates.iter().map(|c| c.inflight).min().unwrap_or(0);
            let tied: Vec<u16> = candidates
                .iter()
                .filter(|c| c.inflight == least)
                .map(|c| c.slot)
                .collect();
            tied[turn % tied.len()]
        }
        // the dispatcher keeps the active replica; among candidates, the lowest slot
        Strategy::ActiveStandby => candidates.iter().map(|c| c.slot).min()?,
        Strategy::KeyHash => {
            let members: Vec<(u16, u64)> = candidates
                .iter()
                .map(|c| (c.slot, u64::from(c.slot)))
                .collect();
            pick_keyed(key, &members)?
        }
    };
    Some(slot)
}

/// `key-hash` among replicas each known by its rendezvous id, `(slot, id)`:
/// the slot that takes `key`. The id is the slot, or the index of the
/// replica's HTTP twin (`tie::key_id`), so the HTTP side picks the same copy.
pub fn pick_keyed(key: &str, members: &[(u16, u64)]) -> Option<u16> {
    let ids = members.iter().map(|m| m.1);
    let id = crate::hash::rendezvous(crate::hash::key_hash(key.as_bytes()), ids)?;
    members.iter().find(|m| m.1 == id).map(|m| m.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(slots: &[u16]) -> Vec<Candidate> {
        slots
            .iter()
            .map(|&slot| Candidate { slot, inflight: 0 })
            .collect()
    }

    #[test]
    fn round_robin_takes_turns() {
        let c = cands(&[0, 1, 2]);
        let picks: Vec<_> = (0..6)
            .map(|t| pick(Strategy::RoundRobin, &c, t, ""))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
    }

    #[test]
    fn least_inflight_prefers_the_idle_replica() {
        let c = vec![
            Candidate {
                slot: 0,
                inflight: 5,
            },
            Candidate {
                slot: 1,
                inflight: 1,
            },
            Candidate {
                slot: 2,
                inflight: 1,
            },
        ];
        assert_eq!(pick(Strategy::LeastInflight, &c, 0, ""), Some(1));
        assert_eq!(pick(Strategy::LeastInflight, &c, 1, ""), Some(2));
    }

    #[test]
    fn key_hash_is_stable_and_moves_only_the_leavers_keys() {
        let all = cands(&[0, 1, 2, 3]);
        let without_2 = cands(&[0, 1, 3]);
        let keys: Vec<String> = (0..2000).map(|i| format!("sensors/dev{i}/temp")).collect();
        let mut per = [0usize; 4];
        for k in &keys {
            let before = pick(Strategy::KeyHash, &all, 0, k).expect("pick");
            assert_eq!(
                pick(Strategy::KeyHash, &all, 7, k),
                Some(before),
                "same key, same replica"
            );
            per[usize::from(before)] += 1;
            let after = pick(Strategy::KeyHash, &without_2, 0, k).expect("pick");
            if before != 2 {
                assert_eq!(after, before, "a key not on the leaver moved");
            }
        }
        assert!(per.iter().all(|&n| n > 350), "uneven spread {per:?}");
    }

    #[test]
    fn key_of_picks_a_level() {
        assert_eq!(key_of("a/b/c", Some(1)), "b");
        assert_eq!(key_of("a/b/c", Some(5)), "a/b/c");
        assert_eq!(key_of("a/b/c", None), "a/b/c");
    }
}
