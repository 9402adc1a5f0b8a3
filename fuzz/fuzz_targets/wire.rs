//! Dispatch mode's packet decoding (what a replica sends to a terminated
//! session), both protocol versions, on arbitrary bytes: errors, never panics,
//! and always makes progress or asks for more.
#![no_main]

use bytes::BytesMut;
use flowgate::mqtt::codec::Protocol;
use flowgate::mqtt::dispatch::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        for _ in 0..64 {
            let before = buf.len();
            match wire::decode(protocol, &mut buf, 1 << 16) {
                Ok(Some(_)) => assert!(buf.len() < before, "a packet decoded from no bytes"),
                Ok(None) | Err(_) => break,
            }
        }
    }
});
