//! Choosing a replica for a request: pure functions over the usable
//! replicas, so each policy is tested without sockets.

use crate::config::Balance;

/// A replica that may take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub inflight: usize,
}

/// Picks among `candidates`. `turn` advances round-robin; `(a, b)` are two
/// random numbers for the power-of-two-choices draw.
pub fn pick(
    balance: Balance,
    candidates: &[Candidate],
    turn: usize,
    (a, b): (usize, usize),
) -> Option<usize> {
    let n = candidates.len();
    match (balance, n) {
        (_, 0) => None,
        (_, 1) => Some(candidates[0].index),
        (Balance::RoundRobin, _) => Some(candidates[turn % n].index),
        // the pool keeps the active replica; among candidates, the lowest index
        (Balance::ActiveStandby, _) => candidates.iter().map(|c| c.index).min(),
        (Balance::LeastInflight, _) => {
            let first = candidates[a % n];
            // a second, different candidate
            let second = candidates[(a % n + 1 + b % (n - 1)) % n];
            Some(if second.inflight < first.inflight {
                second.index
            } else {
                first.index
            })
        }
    }
}

/// A small xorshift generator: the draw needs no cryptographic quality.
pub fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(inflight: &[usize]) -> Vec<Candidate> {
        inflight
            .iter()
            .enumerate()
            .map(|(index, &inflight)| Candidate { index, inflight })
            .collect()
    }

    #[test]
    fn round_robin_cycles() {
        let c = cands(&[0, 0, 0]);
        let got: Vec<_> = (0..6)
            .map(|t| pick(Balance::RoundRobin, &c, t, (0, 0)))
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2].map(Some));
    }

    #[test]
    fn two_choices_never_pick_the_busier_of_the_pair() {
        let c = cands(&[5, 0, 9]);
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1000 {
            let a = next_random(&mut state) as usize;
            let b = next_random(&mut state) as usize;
            let chosen = pick(Balance::LeastInflight, &c, 0, (a, b)).expect("pick");
            assert_ne!(chosen, 2, "the busiest replica loses every pair it is in");
        }
    }

    #[test]
    fn two_choices_spread_evenly_when_idle() {
        let c = cands(&[0, 0, 0, 0]);
        let mut state = 42;
        let mut per = [0usize; 4];
        for _ in 0..4000 {
            let a = next_random(&mut state) as usize;
            let b = next_random(&mut state) as usize;
            per[pick(Balance::LeastInflight, &c, 0, (a, b)).expect("pick")] += 1;
        }
        assert!(per.iter().all(|&n| n > 800), "{per:?}");
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(pick(Balance::LeastInflight, &[], 0, (1, 2)), None);
        assert_eq!(
            pick(Balance::LeastInflight, &cands(&[3]), 0, (1, 2)),
            Some(0)
        );
    }
}
