//! Rendezvous (highest random weight) hashing: the one rule both the MQTT
//! dispatcher (`strategy = "key-hash"`) and the HTTP balancer
//! (`balance = "key-hash"`) use, so a key value lands on a replica the same
//! way on both sides. Each key goes to the member with the highest weight
//! `mix(hash(key) ^ mix(id + 1))`: a member leaving moves only its own keys,
//! one coming back takes back only its own.

/// FNV-1a, 64 bits: the key's hash (not for anything an attacker must not
/// steer: it picks a replica, nothing more).
pub fn key_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads similar inputs over the whole range.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The member of `ids` that takes the key with hash `key`; ties (which need a
/// 64-bit collision) go to the higher id. `None` when there is no member.
pub fn rendezvous(key: u64, ids: impl IntoIterator<Item = u64>) -> Option<u64> {
    ids.into_iter()
        .max_by_key(|&id| (mix(key ^ mix(id + 1)), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_stays_and_only_a_leavers_keys_move() {
        let all = [0u64, 1, 2];
        let mut per = [0usize; 3];
        for k in 0..3000u32 {
            let key = key_hash(format!("device-{k}").as_bytes());
            let before = rendezvous(key, all).expect("a member");
            per[before as usize] += 1;
            assert_eq!(rendezvous(key, all), Some(before), "stable");
            let after = rendezvous(key, [0, 2]).expect("a member");
            if before != 1 {
                assert_eq!(after, before, "a key of a member that stayed moved");
            }
        }
        for n in per {
            assert!((800..=1200).contains(&n), "shares {per:?}");
        }
        assert_eq!(rendezvous(1, []), None);
    }
}
