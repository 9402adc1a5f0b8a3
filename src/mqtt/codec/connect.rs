//! CONNECT (decode, re-encode with another client id) and CONNACK (the return
//! code of an answer, and the refusal flowgate sends itself).

use std::fmt;
use std::ops::Range;

use super::{
    body_of, check_header, write_binary, write_remaining_length, write_str, CodecError, PacketType,
    Protocol, QoS, Reader,
};

/// A decoded CONNECT that borrows its frame. Only the client id and the
/// credentials can be changed on encode; every other byte is copied.
pub struct Connect<'a> {
    pub protocol: Protocol,
    /// The connect flags byte as sent.
    pub flags: u8,
    pub keep_alive: u16,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub has_password: bool,
    /// The password, never logged.
    pub password: Option<&'a [u8]>,
    pub will: Option<Will<'a>>,
    /// The body (after the fixed header).
    body: &'a [u8],
    /// Where the connect flags byte lies in `body`.
    flags_pos: usize,
    /// Where the client id (with its length prefix) lies in `body`.
    client_id_range: Range<usize>,
    /// Where the username and password (the payload's last fields) start.
    credentials_start: usize,
}

/// The username and password flowgate logs in with upstream instead of a
/// replica's own.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub username: &'a str,
    pub password: Option<&'a [u8]>,
}

/// The will message a CONNECT carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    /// v5 will properties, raw (empty for 3.x).
    pub properties: &'a [u8],
}

impl fmt::Debug for Will<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Will")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish()
    }
}

impl fmt::Debug for Connect<'_> {
    // The password is never printed; only whether there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("protocol", &self.protocol)
            .field("flags", &format_args!("{:#010b}", self.flags))
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("has_password", &self.has_password)
            .field("will", &self.will)
            .finish()
    }
}

const FLAG_USERNAME: u8 = 0x80;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_WILL: u8 = 0x04;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_RESERVED: u8 = 0x01;

/// The protocol name and level.
fn protocol(r: &mut Reader<'_>) -> Result<Protocol, CodecError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    match (name, level) {
        (b"MQTT", 4) => Ok(Protocol::V311),
        (b"MQTT", 5) => Ok(Protocol::V5),
        (b"MQIsdp", 3) => Ok(Protocol::V31),
        _ => Err(CodecError::UnsupportedProtocol {
            name: String::from_utf8_lossy(name).into_owned(),
            level,
        }),
    }
}

/// The will, when the connect flags say there is one (and none of its
/// flags when they say there is not).
fn will<'a>(
    r: &mut Reader<'a>,
    flags: u8,
    protocol: Protocol,
) -> Result<Option<Will<'a>>, CodecError> {
    let will_qos = (flags >> 3) & 0x03;
    if flags & FLAG_WILL == 0 {
        if will_qos != 0 || flags & FLAG_WILL_RETAIN != 0 {
            return Err(CodecError::ReservedBit {
                field: "will flags without a will",
            });
        }
        return Ok(None);
    }
    if will_qos == 3 {
        return Err(CodecError::ReservedBit { field: "will qos" });
    }
    let properties = if protocol.is_v5() {
        r.properties("will properties")?
    } else {
        &[]
    };
    Ok(Some(Will {
        topic: r.string("will topic")?,
        payload: r.binary("will payload")?,
        qos: QoS::from_bits(will_qos),
        retain: flags & FLAG_WILL_RETAIN != 0,
        properties,
    }))
}

impl<'a> Connect<'a> {
    /// Decodes a whole CONNECT frame (fixed header included).
    pub fn decode(frame: &'a [u8]) -> Result<Self, CodecError> {
        let body = body_of(frame, PacketType::Connect, 0)?;
        let mut r = Reader::new(body);
        let protocol = protocol(&mut r)?;
        let flags_pos = r.pos();
        let flags = r.u8("connect flags")?;
        if flags & FLAG_RESERVED != 0 {
            return Err(CodecError::ReservedBit {
                field: "connect flags",
            });
        }
        let keep_alive = r.u16("keep alive")?;
        if protocol.is_v5() {
            r.properties("connect properties")?;
        }
        let id_start = r.pos();
        let client_id = r.string("client id")?;
        let client_id_range = id_start..r.pos();
        let will = will(&mut r, flags, protocol)?;
        let credentials_start = r.pos();
        let username = if flags & FLAG_USERNAME != 0 {
            Some(r.string("username")?)
        } else {
            None
        };
        let has_password = flags & FLAG_PASSWORD != 0;
        let password = if has_password {
            Some(r.binary("password")?)
        } else {
            None
        };
        if r.remaining() != 0 {
            return Err(CodecError::TrailingBytes(r.remaining()));
        }
        Ok(Self {
            protocol,
            flags,
            keep_alive,
            client_id,
            username,
            has_password,
            password,
            will,
            body,
            flags_pos,
            client_id_range,
            credentials_start,
        })
    }

    pub fn clean_start(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    /// Encodes this CONNECT with `client_id` in place of the original; all
    /// other bytes are the frame's own.
    pub fn encode_with_client_id(&self, client_id: &str) -> Vec<u8> {
        self.encode_with(client_id, None)
    }

    /// Encodes this CONNECT with `client_id`, and with `credentials` in place
    /// of the client's username and password when given.
    pub fn encode_with(&self, client_id: &str, credentials: Option<Credentials<'_>>) -> Vec<u8> {
        let head = &self.body[..self.client_id_range.start];
        let tail = match credentials {
            None => &self.body[self.client_id_range.end..],
            Some(_) => &self.body[self.client_id_range.end..self.credentials_start],
        };
        let creds_len = credentials.map_or(0, |c| {
            2 + c.username.len() + c.password.map_or(0, |p| 2 + p.len())
        });
        let remaining = head.len() + 2 + client_id.len() + tail.len() + creds_len;
        let mut out = Vec::with_capacity(remaining + 5);
        out.push(0x10);
        write_remaining_length(&mut out, remaining);
        let flags_at = out.len() + self.flags_pos;
        out.extend_from_slice(head);
        write_str(&mut out, client_id);
        out.extend_from_slice(tail);
        if let Some(c) = credentials {
            let mut flags = self.flags & !(FLAG_USERNAME | FLAG_PASSWORD) | FLAG_USERNAME;
            write_str(&mut out, c.username);
            if let Some(p) = c.password {
                flags |= FLAG_PASSWORD;
                write_binary(&mut out, p);
            }
            out[flags_at] = flags;
        }
        out
    }
}

/// What a CONNACK says about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectReturn {
    Accepted,
    /// The broker refused, with its return (3.x) or reason (5.0) code.
    Refused(u8),
}

impl ConnectReturn {
    /// Reads the return code of a whole CONNACK frame.
    pub fn decode(frame: &[u8]) -> Result<Self, CodecError> {
        let header = check_header(frame, usize::MAX)?.ok_or(CodecError::Truncated {
            field: "fixed header",
        })?;
        let packet = header.packet_type()?;
        if packet != PacketType::Connack {
            return Err(CodecError::Unexpected {
                expected: PacketType::Connack,
                got: packet,
            });
        }
        let body = frame
            .get(header.header_len..header.frame_len())
            .ok_or(CodecError::Truncated { field: "body" })?;
        let mut r = Reader::new(body);
        r.u8("connack flags")?;
        Ok(match r.u8("connack code")? {
            0 => Self::Accepted,
            code => Self::Refused(code),
        })
    }
}

/// The CONNACK flowgate sends when it cannot reach the broker for a client:
/// "server unavailable" (3.x return code 3, v5 reason code 0x88).
pub fn connack_refusal(protocol: Protocol) -> &'static [u8] {
    if protocol.is_v5() {
        &[0x20, 0x03, 0x00, 0x88, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x03]
    }
}

/// Why flowgate itself refuses a CONNECT, with the code each protocol
/// version has for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong password or unknown user: 3.x 4, 5.0 0x86.
    BadCredentials,
    /// No credentials where they are required, or a client certificate
    /// missing: 3.x 5, 5.0 0x87.
    NotAuthorized,
    /// A connection limit: 3.x 3 (server unavailable), 5.0 0x97 (quota
    /// exceeded).
    Busy,
}

impl Refusal {
    /// The whole CONNACK frame.
    pub fn frame(self, protocol: Protocol) -> Vec<u8> {
        let (v3, v5) = match self {
            Self::BadCredentials => (4, 0x86),
            Self::NotAuthorized => (5, 0x87),
            Self::Busy => (3, 0x97),
        };
        if protocol.is_v5() {
            vec![0x20, 0x03, 0x00, v5, 0x00]
        } else {
            vec![0x20, 0x02, 0x00, v3]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MQTT 3.1.1 CONNECT, clean session, keep alive 60, client id "ab",
    /// will "w"/"x" at QoS 1, username "u", password "p".
    fn v311_full() -> Vec<u8> {
        vec![
            0x10,
            26, // CONNECT, remaining length 26
            0x00,
            0x04,
            b'M',
            b'Q',
            b'T',
            b'T',        // protocol name
            0x04,        // level 4 = 3.1.1
            0b1100_1110, // username, password, will qos 1, will, clean
            0x00,
            0x3c, // keep alive 60
            0x00,
            0x02,
            b'a',
            b'b', // client id
            0x00,
            0x01,
            b'w', // will topic
            0x00,
            0x01,
            b'x', // will payload
            0x00,
            0x01,
            b'u', // username
            0x00,
            0x01,
            b'p', // password
        ]
    }

    /// MQTT 5 CONNECT with connect properties (session expiry 0x11 = 120),
    /// will properties (will delay 0x18 = 5), client id "c", no credentials.
    fn v5_with_properties() -> Vec<u8> {
        vec![
            0x10,
            34, // CONNECT, remaining length 34
            0x00,
            0x04,
            b'M',
            b'Q',
            b'T',
            b'T',        // protocol name
            0x05,        // level 5
            0b0010_0100, // will retain, will qos 0, will
            0x00,
            0x0a, // keep alive 10
            0x05,
            0x11,
            0x00,
            0x00,
            0x00,
            0x78, // properties: session expiry 120
            0x00,
            0x01,
            b'c', // client id
            0x05,
            0x18,
            0x00,
            0x00,
            0x00,
            0x05, // will properties: will delay 5
            0x00,
            0x03,
            b'l',
            b'/',
            b'w', // will topic
            0x00,
            0x02,
            b'g',
            b'o', // will payload
        ]
    }

    #[test]
    fn decodes_v311_connect_fields() {
        let frame = v311_full();
        let c = Connect::decode(&frame).expect("valid connect");
        assert_eq!(c.protocol, Protocol::V311);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id, "ab");
        assert_eq!(c.username, Some("u"));
        assert!(c.has_password);
        assert!(c.clean_start());
        let will = c.will.as_ref().expect("will");
        assert_eq!(
            (will.topic, will.payload, will.qos, will.retain),
            ("w", &b"x"[..], QoS::AtLeastOnce, false)
        );
    }

    #[test]
    fn reencode_with_same_id_is_byte_identical() {
        for frame in [v311_full(), v5_with_properties()] {
            let c = Connect::decode(&frame).expect("valid connect");
            assert_eq!(c.encode_with_client_id(c.client_id), frame);
        }
    }

    #[test]
    fn reencode_changes_only_the_client_id() {
        let frame = v5_with_properties();
        let c = Connect::decode(&frame).expect("valid connect");
        let out = c.encode_with_client_id("c-fg1-0");
        assert_eq!(out[1], 34 + 6);
        let again = Connect::decode(&out).expect("re-encoded connect decodes");
        assert_eq!(again.client_id, "c-fg1-0");
        assert_eq!(again.flags, c.flags);
        assert_eq!(again.will, c.will);
        // everything before and after the id is the original bytes
        assert_eq!(out[2..18], frame[2..18]);
        assert_eq!(out[18 + 9..], frame[18 + 3..]);
    }

    #[test]
    fn decodes_mqtt_31() {
        let frame = [
            0x10, 14, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00,
            0x00,
        ];
        let c = Connect::decode(&frame).expect("3.1 connect");
        assert_eq!(c.protocol, Protocol::V31);
        assert_eq!(c.client_id, "");
    }

    #[test]
    fn rejects_reserved_flag_and_unknown_protocol() {
        let mut frame = v311_full();
        frame[9] |= 0x01;
        assert!(matches!(
            Connect::decode(&frame),
            Err(CodecError::ReservedBit { .. })
        ));
        let mut frame = v311_full();
        frame[8] = 6;
        assert!(matches!(
            Connect::decode(&frame),
            Err(CodecError::UnsupportedProtocol { level: 6, .. })
        ));
    }

    #[test]
    fn rejects_truncated_strings_and_trailing_bytes() {
        let mut frame = v311_full();
        frame[13] = 0x09; // client id claims 9 bytes
        assert!(matches!(
            Connect::decode(&frame),
            Err(CodecError::Truncated { .. })
        ));
        let mut frame = v311_full();
        frame[1] += 1;
        frame.push(0);
        assert_eq!(
            Connect::decode(&frame).err(),
            Some(CodecError::TrailingBytes(1))
        );
    }

    #[test]
    fn rejects_bad_utf8_client_id() {
        let mut frame = v311_full();
        frame[14] = 0xff;
        assert_eq!(
            Connect::decode(&frame).err(),
            Some(CodecError::BadUtf8 { field: "client id" })
        );
    }

    #[test]
    fn trailing_junk_after_the_frame_is_ignored() {
        let mut frame = v311_full();
        frame.extend_from_slice(&[0xde, 0xad]);
        let c = Connect::decode(&frame).expect("frame decodes");
        assert_eq!(c.client_id, "ab");
        assert_eq!(c.encode_with_client_id("ab"), v311_full());
    }

    #[test]
    fn debug_never_prints_the_password() {
        let frame = v311_full();
        let c = Connect::decode(&frame).expect("valid connect");
        let text = format!("{c:?}");
        assert!(text.contains("has_password: true"));
        assert!(!text.contains("\"p\""));
    }

    #[test]
    fn connack_codes() {
        assert_eq!(
            ConnectReturn::decode(&[0x20, 0x02, 0x00, 0x00]),
            Ok(ConnectReturn::Accepted)
        );
        assert_eq!(
            ConnectReturn::decode(&[0x20, 0x03, 0x00, 0x87, 0x00]),
            Ok(ConnectReturn::Refused(0x87))
        );
        assert_eq!(
            ConnectReturn::decode(connack_refusal(Protocol::V311)),
            Ok(ConnectReturn::Refused(3))
        );
    }
}
