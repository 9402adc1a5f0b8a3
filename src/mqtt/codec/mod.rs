//! MQTT packet codec: bytes in, bytes out, no I/O.
//!
//! Owns the fixed header (packet type, flags, remaining length), the primitive
//! field readers, and the few packets flowgate must look inside: CONNECT (to
//! recognise replicas and rewrite their client id), SUBSCRIBE and UNSUBSCRIBE (to
//! rewrite filters) and CONNACK (to know a session was accepted). It is not a
//! general MQTT codec: every other packet is only framed, never decoded, so the
//! proxy can forward it as the same bytes.
//!
//! Decoding borrows from the frame and remembers where each field lies, so an
//! encode that changes one field copies every other byte unchanged (v5
//! properties, subscription options, will, credentials). "Need more bytes" is
//! `Ok(None)`, never an error. Sizes are checked from the fixed header before a
//! body is buffered.

mod connect;
mod frame;
mod subscribe;

pub use connect::{connack_refusal, Connect, ConnectReturn, Credentials, Refusal, Will};
pub use frame::{FrameScanner, Scan};
pub use subscribe::{Subscribe, SubscribeEntry, Unsubscribe, NO_LOCAL};

use thiserror::Error;

/// A QoS level, ordered: a subscription's granted QoS caps a message's with
/// `min`, and an upstream subscription asks for the `max` of its replicas'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// From the two bits a fixed header, a will flag or a subscription option
    /// carries; 3, which the codec refuses before, reads as 2.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0x03 {
            0 => Self::AtMostOnce,
            1 => Self::AtLeastOnce,
            _ => Self::ExactlyOnce,
        }
    }
}

/// Largest remaining length MQTT can express (four length bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Packet types by their fixed-header nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    Connack = 2,
    Publish = 3,
    Puback = 4,
    Pubrec = 5,
    Pubrel = 6,
    Pubcomp = 7,
    Subscribe = 8,
    Suback = 9,
    Unsubscribe = 10,
    Unsuback = 11,
    Pingreq = 12,
    Pingresp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    /// The type named by the high nibble of a fixed header's first byte.
    pub fn from_first_byte(byte: u8) -> Result<Self, CodecError> {
        Ok(match byte >> 4 {
            1 => Self::Connect,
            2 => Self::Connack,
            3 => Self::Publish,
            4 => Self::Puback,
            5 => Self::Pubrec,
            6 => Self::Pubrel,
            7 => Self::Pubcomp,
            8 => Self::Subscribe,
            9 => Self::Suback,
            10 => Self::Unsubscribe,
            11 => Self::Unsuback,
            12 => Self::Pingreq,
            13 => Self::Pingresp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return Err(CodecError::ReservedPacketType),
        })
    }
}

/// The protocol a client speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    #[serde(rename = "3.1")]
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0 (`MQTT`, level 5).
    #[serde(rename = "5.0")]
    V5,
}

impl Protocol {
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

/// Why bytes are not a valid packet. Each variant says what was wrong; the
/// proxy turns it into a log line and the `kind` label of an error counter.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("remaining length uses more than four bytes")]
    MalformedLength,
    #[error("packet of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("packet type 0 is reserved")]
    ReservedPacketType,
    #[error("invalid fixed header flags {flags:#06b} for {packet:?}")]
    BadFlags { packet: PacketType, flags: u8 },
    #[error("{field} runs past the end of the packet")]
    Truncated { field: &'static str },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("reserved bit set in {field}")]
    ReservedBit { field: &'static str },
    #[error("{0} bytes left over after the last field")]
    TrailingBytes(usize),
    #[error("{packet:?} carries no topic filter")]
    NoFilters { packet: PacketType },
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected {
        expected: PacketType,
        got: PacketType,
    },
}

impl CodecError {
    /// A short stable name for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "packet_too_large",
            Self::UnsupportedProtocol { .. } => "unsupported_protocol",
            Self::Unexpected { .. } => "unexpected_packet",
            _ => "malformed_packet",
        }
    }
}

/// A parsed fixed header: where the body starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub first_byte: u8,
    /// Bytes taken by the first byte and the remaining-length field (2..=5).
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FixedHeader {
    pub fn packet_type(&self) -> Result<PacketType, CodecError> {
        PacketType::from_first_byte(self.first_byte)
    }

    /// The whole frame's length, header included.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Reads a fixed header from the front of `buf`. `Ok(None)` when more bytes are
/// needed; an error when the length is malformed or above `max` (the body is
/// never waited for in that case).
pub fn check_header(buf: &[u8], max: usize) -> Result<Option<FixedHeader>, CodecError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    let mut remaining_len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining_len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if remaining_len > max {
                return Err(CodecError::TooLarge {
                    len: remaining_len,
                    max,
                });
            }
            return Ok(Some(FixedHeader {
                first_byte,
                header_len: 2 + i,
                remaining_len,
            }));
        }
    }
    Err(CodecError::MalformedLength)
}

/// The body of a whole frame of type `expected` whose fixed-header flags
/// must be `flags` (0b0010 for SUBSCRIBE and UNSUBSCRIBE, 0 for CONNECT).
pub(crate) fn body_of(frame: &[u8], expected: PacketType, flags: u8) -> Result<&[u8], CodecError> {
    let header = check_header(frame, usize::MAX)?.ok_or(CodecError::Truncated {
        field: "fixed header",
    })?;
    let packet = header.packet_type()?;
    if packet != expected {
        return Err(CodecError::Unexpected {
            expected,
            got: packet,
        });
    }
    if header.first_byte & 0x0f != flags {
        return Err(CodecError::BadFlags {
            packet,
            flags: header.first_byte & 0x0f,
        });
    }
    frame
        .get(header.header_len..header.frame_len())
        .ok_or(CodecError::Truncated { field: "body" })
}

/// Checks the fixed-header flags MQTT fixes for each packet type: 0b0010
/// for PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for the others, and for PUBLISH a
/// QoS of 0-2 (with DUP clear at QoS 0).
pub fn check_flags(first_byte: u8) -> Result<PacketType, CodecError> {
    let packet = PacketType::from_first_byte(first_byte)?;
    let flags = first_byte & 0x0f;
    let ok = match packet {
        PacketType::Publish => {
            let qos = (flags >> 1) & 0x03;
            qos != 3 && !(qos == 0 && flags & 0x08 != 0)
        }
        PacketType::Pubrel | PacketType::Subscribe | PacketType::Unsubscribe => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(packet)
    } else {
        Err(CodecError::BadFlags { packet, flags })
    }
}

/// Appends `len` as an MQTT variable byte integer.
pub fn write_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed UTF-8 string. The caller guarantees `s` fits in
/// 65535 bytes (filters and client ids are checked where they are built).
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    write_binary(out, s.as_bytes());
}

/// Appends length-prefixed binary data (at most 65535 bytes are written).
pub(crate) fn write_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// A cursor over a packet body that remembers positions, for decoders that
/// must later copy unchanged ranges.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        let byte = *self
            .buf
            .get(self.pos)
            .ok_or(CodecError::Truncated { field })?;
        self.pos += 1;
        Ok(byte)
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(CodecError::Truncated { field })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// A u16-length-prefixed byte string.
    pub(crate) fn binary(&mut self, field: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    /// A u16-length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<&'a str, CodecError> {
        let bytes = self.binary(field)?;
        std::str::from_utf8(bytes).map_err(|_| CodecError::BadUtf8 { field })
    }

    /// A v5 property block: its length as a variable byte integer, then that
    /// many bytes, skipped whole (flowgate passes properties on unchanged).
    pub(crate) fn properties(&mut self, field: &'static str) -> Result<&'a [u8], CodecError> {
        let mut len = 0usize;
        for i in 0..4 {
            let byte = self.u8(field)?;
            len |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return self.take(len, field);
            }
        }
        Err(CodecError::MalformedLength)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_more_bytes_until_length_ends() {
        assert_eq!(check_header(&[], 100), Ok(None));
        assert_eq!(check_header(&[0x30], 100), Ok(None));
        assert_eq!(check_header(&[0x30, 0x80], 1000), Ok(None));
        assert_eq!(
            check_header(&[0x30, 0x80, 0x01], 1000),
            Ok(Some(FixedHeader {
                first_byte: 0x30,
                header_len: 3,
                remaining_len: 128
            }))
        );
    }

    #[test]
    fn header_rejects_five_length_bytes() {
        assert_eq!(
            check_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(CodecError::MalformedLength)
        );
    }

    #[test]
    fn header_rejects_oversize_before_body_arrives() {
        // 0xff 0xff 0xff 0x7f = 268_435_455 with no body at all
        assert_eq!(
            check_header(&[0x30, 0xff, 0xff, 0xff, 0x7f], 1024),
            Err(CodecError::TooLarge {
                len: MAX_REMAINING_LENGTH,
                max: 1024
            })
        );
    }

    #[test]
    fn fixed_header_flags() {
        assert_eq!(check_flags(0x82), Ok(PacketType::Subscribe));
        assert!(check_flags(0x80).is_err());
        assert_eq!(check_flags(0x3d), Ok(PacketType::Publish)); // DUP, QoS 2, retain
        assert!(check_flags(0x36).is_err()); // QoS 3
        assert!(check_flags(0x38).is_err()); // DUP at QoS 0
        assert!(check_flags(0xc1).is_err());
        assert_eq!(check_flags(0x62), Ok(PacketType::Pubrel));
    }

    #[test]
    fn remaining_length_round_trips_at_boundaries() {
        for len in [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING_LENGTH,
        ] {
            let mut out = vec![0x30];
            write_remaining_length(&mut out, len);
            let header = check_header(&out, usize::MAX)
                .expect("valid header")
                .expect("complete header");
            assert_eq!(header.remaining_len, len);
            assert_eq!(header.header_len, out.len());
        }
    }
}

#[cfg(test)]
mod proptests;
