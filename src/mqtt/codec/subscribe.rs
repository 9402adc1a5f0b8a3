//! SUBSCRIBE and UNSUBSCRIBE: decode into filters, re-encode with some filters
//! replaced. The packet id, v5 properties and every subscription options byte
//! are kept as sent, except where the caller asks to change them.

use super::{body_of, write_remaining_length, write_str, CodecError, PacketType, Protocol, Reader};

/// One filter of a SUBSCRIBE and its options byte (QoS in 3.x; QoS, no-local,
/// retain-as-published and retain handling in 5.0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeEntry<'a> {
    pub filter: &'a str,
    pub options: u8,
}

/// A decoded SUBSCRIBE borrowing its frame.
#[derive(Debug)]
pub struct Subscribe<'a> {
    pub packet_id: u16,
    pub entries: Vec<SubscribeEntry<'a>>,
    /// Packet id and (v5) properties, raw, as they open the body.
    head: &'a [u8],
}

/// A decoded UNSUBSCRIBE borrowing its frame.
#[derive(Debug)]
pub struct Unsubscribe<'a> {
    pub packet_id: u16,
    pub filters: Vec<&'a str>,
    head: &'a [u8],
}

/// v5 subscription option bit "no local".
pub const NO_LOCAL: u8 = 0x04;

/// Reads the packet id and, for v5, the properties; returns the raw head.
fn read_head<'a>(
    r: &mut Reader<'a>,
    body: &'a [u8],
    protocol: Protocol,
) -> Result<(u16, &'a [u8]), CodecError> {
    let packet_id = r.u16("packet id")?;
    if protocol.is_v5() {
        r.properties("properties")?;
    }
    Ok((packet_id, &body[..r.pos()]))
}

impl<'a> Subscribe<'a> {
    pub fn decode(frame: &'a [u8], protocol: Protocol) -> Result<Self, CodecError> {
        let body = body_of(frame, PacketType::Subscribe, 0b0010)?;
        let mut r = Reader::new(body);
        let (packet_id, head) = read_head(&mut r, body, protocol)?;
        let reserved = if protocol.is_v5() { 0xc0 } else { 0xfc };
        let mut entries = Vec::new();
        while r.remaining() > 0 {
            let filter = r.string("topic filter")?;
            let options = r.u8("subscription options")?;
            if options & reserved != 0 {
                return Err(CodecError::ReservedBit {
                    field: "subscription options",
                });
            }
            entries.push(SubscribeEntry { filter, options });
        }
        if entries.is_empty() {
            return Err(CodecError::NoFilters {
                packet: PacketType::Subscribe,
            });
        }
        Ok(Self {
            packet_id,
            entries,
            head,
        })
    }

    /// Encodes the packet with `entries` in place of the decoded ones.
    pub fn encode_with(&self, entries: &[(&str, u8)]) -> Vec<u8> {
        let remaining = self.head.len() + entries.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
        let mut out = Vec::with_capacity(remaining + 5);
        out.push(0x82);
        write_remaining_length(&mut out, remaining);
        out.extend_from_slice(self.head);
        for (filter, options) in entries {
            write_str(&mut out, filter);
            out.push(*options);
        }
        out
    }
}

impl<'a> Unsubscribe<'a> {
    pub fn decode(frame: &'a [u8], protocol: Protocol) -> Result<Self, CodecError> {
        let body = body_of(frame, PacketType::Unsubscribe, 0b0010)?;
        let mut r = Reader::new(body);
        let (packet_id, head) = read_head(&mut r, body, protocol)?;
        let mut filters = Vec::new();
        while r.remaining() > 0 {
            filters.push(r.string("topic filter")?);
        }
        if filters.is_empty() {
            return Err(CodecError::NoFilters {
                packet: PacketType::Unsubscribe,
            });
        }
        Ok(Self {
            packet_id,
            filters,
            head,
        })
    }

    /// Encodes the packet with `filters` in place of the decoded ones.
    pub fn encode_with(&self, filters: &[&str]) -> Vec<u8> {
        let remaining = self.head.len() + filters.iter().map(|f| 2 + f.len()).sum::<usize>();
        let mut out = Vec::with_capacity(remaining + 5);
        out.push(0xa2);
        write_remaining_length(&mut out, remaining);
        out.extend_from_slice(self.head);
        for filter in filters {
            write_str(&mut out, filter);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3.1.1 SUBSCRIBE, packet id 10, "a/+" QoS 1 and "b/#" QoS 2.
    const V311_SUB: &[u8] = &[
        0x82, 14, // SUBSCRIBE, remaining length 14
        0x00, 0x0a, // packet id 10
        0x00, 0x03, b'a', b'/', b'+', 0x01, // "a/+" QoS 1
        0x00, 0x03, b'b', b'/', b'#', 0x02, // "b/#" QoS 2
    ];

    /// v5 SUBSCRIBE, packet id 1, subscription identifier 7, "x" with no-local,
    /// retain-as-published, retain handling 2 and QoS 1 (0b0010_1101).
    const V5_SUB: &[u8] = &[
        0x82,
        9, // SUBSCRIBE, remaining length 9
        0x00,
        0x01, // packet id 1
        0x02,
        0x0b,
        0x07, // properties: subscription identifier 7
        0x00,
        0x01,
        b'x',        // "x"
        0b0010_1101, // options
    ];

    /// 3.1.1 UNSUBSCRIBE, packet id 3, "a/+".
    const V311_UNSUB: &[u8] = &[0xa2, 7, 0x00, 0x03, 0x00, 0x03, b'a', b'/', b'+'];

    /// v5 UNSUBSCRIBE, packet id 4, user property ("k","v"), "x".
    const V5_UNSUB: &[u8] = &[
        0xa2, 13, // UNSUBSCRIBE, remaining length 13
        0x00, 0x04, // packet id 4
        0x07, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property k=v
        0x00, 0x01, b'x', // "x"
    ];

    #[test]
    fn decodes_v311_subscribe() {
        let s = Subscribe::decode(V311_SUB, Protocol::V311).expect("valid");
        assert_eq!(s.packet_id, 10);
        assert_eq!(
            s.entries,
            vec![
                SubscribeEntry {
                    filter: "a/+",
                    options: 1
                },
                SubscribeEntry {
                    filter: "b/#",
                    options: 2
                }
            ]
        );
    }

    #[test]
    fn identity_reencode_is_byte_identical() {
        for (frame, protocol) in [(V311_SUB, Protocol::V311), (V5_SUB, Protocol::V5)] {
            let s = Subscribe::decode(frame, protocol).expect("valid");
            let same: Vec<_> = s.entries.iter().map(|e| (e.filter, e.options)).collect();
            assert_eq!(s.encode_with(&same), frame);
        }
        for (frame, protocol) in [(V311_UNSUB, Protocol::V311), (V5_UNSUB, Protocol::V5)] {
            let u = Unsubscribe::decode(frame, protocol).expect("valid");
            assert_eq!(u.encode_with(&u.filters), frame);
        }
    }

    #[test]
    fn v5_rewrite_keeps_properties_and_options() {
        let s = Subscribe::decode(V5_SUB, Protocol::V5).expect("valid");
        let out = s.encode_with(&[("$share/g/x", s.entries[0].options & !NO_LOCAL)]);
        assert_eq!(
            out,
            [
                &[0x82, 18, 0x00, 0x01, 0x02, 0x0b, 0x07, 0x00, 0x0a][..],
                b"$share/g/x",
                &[0b0010_1001]
            ]
            .concat()
        );
    }

    #[test]
    fn v5_unsubscribe_keeps_user_properties() {
        let u = Unsubscribe::decode(V5_UNSUB, Protocol::V5).expect("valid");
        assert_eq!(u.filters, vec!["x"]);
        let out = u.encode_with(&["$share/g/x"]);
        assert_eq!(out[2..12], V5_UNSUB[2..12]);
        assert_eq!(&out[14..], b"$share/g/x");
    }

    #[test]
    fn trailing_junk_after_the_frame_is_ignored() {
        let frame = [V311_SUB, &[0x30, 0x00]].concat();
        let s = Subscribe::decode(&frame, Protocol::V311).expect("valid");
        assert_eq!(s.entries.len(), 2);
    }

    #[test]
    fn rejects_bad_flags_reserved_bits_and_empty_payload() {
        let mut frame = V311_SUB.to_vec();
        frame[0] = 0x80;
        assert!(matches!(
            Subscribe::decode(&frame, Protocol::V311),
            Err(CodecError::BadFlags { .. })
        ));
        let mut frame = V311_SUB.to_vec();
        frame[9] = 0x05; // no-local is reserved in 3.1.1
        assert!(matches!(
            Subscribe::decode(&frame, Protocol::V311),
            Err(CodecError::ReservedBit { .. })
        ));
        assert_eq!(
            Subscribe::decode(&[0x82, 2, 0, 1], Protocol::V311).err(),
            Some(CodecError::NoFilters {
                packet: PacketType::Subscribe
            })
        );
    }

    #[test]
    fn rejects_a_filter_without_its_options_byte() {
        let frame = [0x82, 6, 0x00, 0x01, 0x00, 0x01, b'x', 0x00];
        assert!(Subscribe::decode(&frame[..7], Protocol::V311).is_err());
        let short = [0x82, 5, 0x00, 0x01, 0x00, 0x01, b'x'];
        assert_eq!(
            Subscribe::decode(&short, Protocol::V311).err(),
            Some(CodecError::Truncated {
                field: "subscription options"
            })
        );
    }
}
