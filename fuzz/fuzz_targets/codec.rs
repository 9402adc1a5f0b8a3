//! The share-mode and pass-through codec on arbitrary bytes: the frame
//! scanner walks a stream the way the proxy does (whole CONNECT / SUBSCRIBE /
//! UNSUBSCRIBE frames decoded, every other byte forwarded) and never panics,
//! never loops, and accounts for every byte.
#![no_main]

use flowgate::mqtt::codec::{
    write_remaining_length, Connect, ConnectReturn, Credentials, FrameScanner, PacketType, Protocol, Scan,
    Subscribe, Unsubscribe,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Connect::decode(data);
    let _ = ConnectReturn::decode(data);
    let mut scanner = FrameScanner::new(1 << 16);
    let mut at = 0;
    while at < data.len() {
        let whole = |p: PacketType| {
            matches!(
                p,
                PacketType::Connect | PacketType::Subscribe | PacketType::Unsubscribe
            )
        };
        match scanner.scan(&data[at..], whole) {
            Ok(Scan::NeedMore) | Err(_) => break,
            Ok(Scan::Forward { len, .. }) => {
                assert!(
                    len > 0 && at + len <= data.len(),
                    "forward of {len} at {at}"
                );
                at += len;
            }
            Ok(Scan::Whole { len, packet }) => {
                assert!(
                    len > 0 && at + len <= data.len(),
                    "whole frame of {len} at {at}"
                );
                let frame = &data[at..at + len];
                // a re-encode writes the remaining length in the fewest bytes
                // (MQTT 5 requires it; 3.1.1 frames may pad it): identity
                // holds for minimal headers (flowgate forwards the original
                // bytes of a frame it does not change)
                let minimal = {
                    let mut header = vec![frame[0]];
                    let body = frame.len()
                        - 1
                        - frame[1..].iter().take_while(|b| *b & 0x80 != 0).count()
                        - 1;
                    write_remaining_length(&mut header, body);
                    frame.starts_with(&header)
                };
                for protocol in [Protocol::V311, Protocol::V5] {
                    match packet {
                        PacketType::Subscribe => {
                            if let Ok(s) = Subscribe::decode(frame, protocol)
                                .map_err(|_| ())
                                .and_then(|s| if minimal { Ok(s) } else { Err(()) })
                            {
                                let same: Vec<_> =
                                    s.entries.iter().map(|e| (e.filter, e.options)).collect();
                                assert_eq!(
                                    s.encode_with(&same),
                                    frame,
                                    "identity re-encode changed bytes"
                                );
                            }
                        }
                        PacketType::Unsubscribe => {
                            if let Ok(u) = Unsubscribe::decode(frame, protocol)
                                .map_err(|_| ())
                                .and_then(|u| if minimal { Ok(u) } else { Err(()) })
                            {
                                assert_eq!(
                                    u.encode_with(&u.filters),
                                    frame,
                                    "identity re-encode changed bytes"
                                );
                            }
                        }
                        _ => {
                            if let Ok(c) = Connect::decode(frame).map_err(|_| ()).and_then(|c| {
                                if minimal {
                                    Ok(c)
                                } else {
                                    Err(())
                                }
                            }) {
                                assert_eq!(c.encode_with_client_id(c.client_id), frame);
                                // new upstream credentials: a CONNECT that
                                // decodes to them, everything else kept
                                let creds = Credentials {
                                    username: "line1-up",
                                    password: Some(b"secret"),
                                };
                                let again = c.encode_with("x", Some(creds));
                                let d = Connect::decode(&again).expect("re-encoded CONNECT");
                                assert_eq!(d.username, Some("line1-up"));
                                assert_eq!(d.password, Some(&b"secret"[..]));
                                assert_eq!((d.client_id, d.keep_alive), ("x", c.keep_alive));
                                assert_eq!(d.will, c.will);
                            }
                        }
                    }
                }
                at += len;
            }
        }
    }
});
