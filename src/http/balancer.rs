//! Choosing a replica for a request: pure functions over the usable
//! replicas, so each policy is tested without sockets.

use std::borrow::Cow;

use crate::config::{Balance, RequestKey};

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
        // a request without its key (a retry, or none in the request)
        (Balance::LeastInflight | Balance::KeyHash, _) => {
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

/// The replica that takes the key with hash `key` among `candidates`
/// (rendezvous hashing over replica indexes, the rule MQTT `key-hash` uses).
pub fn pick_keyed(key: u64, candidates: &[Candidate]) -> Option<usize> {
    let ids = candidates.iter().map(|c| c.index as u64);
    crate::hash::rendezvous(key, ids).map(|i| i as usize)
}

/// A request's `key-hash` key: the value of the header, of path segment N
/// (0-based; percent-decoded), of the query parameter (decoded, `+` a space)
/// or of the cookie. `None` when the request has none or it is empty: such a
/// request goes by least-inflight. `target` is the request target (path and
/// query); `header` the first value of the key's header; `cookies` the
/// `Cookie` headers joined by `;`.
pub fn request_key<'a>(
    key: &RequestKey,
    target: &'a str,
    header: Option<&'a [u8]>,
    cookies: Option<&'a str>,
) -> Option<Cow<'a, [u8]>> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let found: Cow<'a, [u8]> = match key {
        RequestKey::Header(_) => Cow::Borrowed(header?.trim_ascii()),
        RequestKey::Path(n) => {
            let path = path
                .split_once("://")
                .map_or(path, |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
            percent_decoded(path.strip_prefix('/')?.split('/').nth(*n)?, false)
        }
        RequestKey::Query(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decoded(k, true).as_ref() == name.as_bytes()).then(|| percent_decoded(v, true))
        })?,
        RequestKey::Cookie(name) => cookies?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k.trim() == name).then(|| Cow::Borrowed(v.trim().trim_matches('"').as_bytes()))
        })?,
    };
    (!found.is_empty()).then_some(found)
}

/// `%XX` decoded (a `%` not followed by two hex digits stays as it is);
/// with `plus`, `+` is a space (form encoding in a query). The one decoder of
/// request paths (`routes` uses it too).
pub(crate) fn percent_decoded(s: &str, plus: bool) -> Cow<'_, [u8]> {
    let b = s.as_bytes();
    let escaped = b.contains(&b'%') || (plus && b.contains(&b'+'));
    if !escaped {
        return Cow::Borrowed(b);
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
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

    fn key_of(
        key: &str,
        target: &str,
        header: Option<&str>,
        cookies: Option<&str>,
    ) -> Option<String> {
        let key = RequestKey::parse(key).expect("a key");
        request_key(&key, target, header.map(str::as_bytes), cookies)
            .map(|k| String::from_utf8_lossy(&k).into_owned())
    }

    #[test]
    fn the_key_is_read_from_header_path_query_or_cookie() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            key_of("header:x-device", "/a", Some(" d7 "), None),
            some("d7")
        );
        assert_eq!(key_of("header:x-device", "/a", None, None), None);
        assert_eq!(key_of("header:x-device", "/a", Some("  "), None), None);
        assert_eq!(
            key_of("path:1", "/devices/d%207/state?x=1", None, None),
            some("d 7")
        );
        assert_eq!(key_of("path:0", "/devices", None, None), some("devices"));
        assert_eq!(key_of("path:2", "/devices/d7", None, None), None);
        assert_eq!(key_of("path:1", "/devices//x", None, None), None);
        assert_eq!(
            key_of("path:1", "http://h:1/devices/d7", None, None),
            some("d7")
        );
        assert_eq!(
            key_of("query:id", "/a?x=1&id=d+7%21", None, None),
            some("d 7!")
        );
        assert_eq!(key_of("query:id", "/a?identity=3", None, None), None);
        assert_eq!(key_of("query:id", "/a?id=", None, None), None);
        assert_eq!(
            key_of("cookie:dev", "/", None, Some("a=1; dev=\"d7\"")),
            some("d7")
        );
        assert_eq!(key_of("cookie:dev", "/", None, Some("device=1")), None);
        // a lone or bad escape stays as it is; odd bytes are a key like any other
        assert_eq!(key_of("path:0", "/%zz%4", None, None), some("%zz%4"));
        assert_eq!(
            key_of("header:x-device", "/", Some("\u{7f}é"), None),
            some("\u{7f}é")
        );
        for bad in [
            "header:",
            "header:a b",
            "path:x",
            "query:",
            "cookie:a;b",
            "body:x",
            "x",
        ] {
            assert!(RequestKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_keyed_request_stays_on_its_replica_and_only_a_leavers_keys_move() {
        let all = cands(&[0, 0, 0]);
        let two = [all[0], all[2]];
        for k in 0..300 {
            let key = crate::hash::key_hash(format!("d{k}").as_bytes());
            let before = pick_keyed(key, &all).expect("a replica");
            assert_eq!(pick_keyed(key, &all), Some(before));
            if before != 1 {
                assert_eq!(pick_keyed(key, &two), Some(before));
            }
        }
        assert_eq!(pick_keyed(1, &[]), None);
    }

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
