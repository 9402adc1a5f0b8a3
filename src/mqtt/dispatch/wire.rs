//! The packets of a terminated MQTT session, independent of the protocol
//! version, and their translation to and from bytes with rumqttc's
//! `mqttbytes` codec (v4 for 3.1/3.1.1, v5 for 5.0). No I/O.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::mqtt::codec::Protocol;
pub use crate::mqtt::codec::QoS;

/// rumqttc's QoS types for flowgate's (the codec's) QoS.
impl QoS {
    /// rumqttc's v4 (3.1/3.1.1) QoS.
    pub(crate) fn v4(self) -> rumqttc::mqttbytes::QoS {
        match self {
            Self::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
            Self::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
            Self::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
        }
    }

    /// rumqttc's v5 QoS.
    pub(crate) fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            Self::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            Self::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            Self::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        }
    }
}

impl From<rumqttc::mqttbytes::QoS> for QoS {
    fn from(q: rumqttc::mqttbytes::QoS) -> Self {
        Self::from_bits(q as u8)
    }
}

impl From<rumqttc::v5::mqttbytes::QoS> for QoS {
    fn from(q: rumqttc::v5::mqttbytes::QoS) -> Self {
        Self::from_bits(q as u8)
    }
}

/// A message as flowgate moves it: what every protocol version can carry.
/// MQTT 5 publish properties ride along for v5 peers and are dropped for 3.x.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Box<v5::PublishProperties>>,
}

/// A will: its message and, MQTT 5, its will delay interval in seconds (0:
/// none).
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub msg: Message,
    pub delay: u32,
}

/// One filter of a SUBSCRIBE with its options (MQTT 5; 3.x asks only a QoS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRequest {
    pub filter: String,
    pub qos: QoS,
    /// v5 no local: not the subscriber's own publishes.
    pub no_local: bool,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 retain handling: 0 retained messages on every subscribe, 1 only on
    /// a new subscription, 2 never.
    pub retain_handling: u8,
}

impl SubRequest {
    /// A 3.x-style request: a filter and a QoS, default options.
    pub fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Self {
            filter: filter.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

/// Reason codes flowgate passes on (MQTT 5; 3.x cannot carry them).
pub const SUCCESS: u8 = 0x00;
pub const NOT_AUTHORIZED: u8 = 0x87;

/// Packets a peer sends that a session handles.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Publish {
        msg: Message,
        pkid: u16,
        dup: bool,
    },
    /// With the reason (code 0 for 3.x).
    PubAck(u16, Reason),
    PubRec(u16, Reason),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubRequest>,
        /// v5 subscription identifier.
        id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    ConnAck {
        accepted: bool,
        session_present: bool,
        code: u8,
        /// v5: the broker's receive maximum and maximum packet size.
        receive_max: Option<u16>,
        max_packet: Option<u32>,
    },
    /// With each filter's code: the QoS granted (0-2) or a failure (0x80 up),
    /// and the v5 reason string and user properties.
    SubAck(u16, Vec<u8>, AckProps),
    UnsubAck(u16),
    PingReq,
    PingResp,
    /// `expiry`: the MQTT 5 session expiry interval it sets, if any; `will`:
    /// reason 0x04, "disconnect with will message" (the will is published).
    Disconnect {
        expiry: Option<u32>,
        will: bool,
    },
    /// A packet the session ignores (v5 AUTH).
    Ignored,
}

/// Packets a session sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Session present: the replica's earlier subscriptions were kept.
    ConnAck(bool),
    Publish {
        msg: Message,
        pkid: u16,
        dup: bool,
    },
    /// With a reason: v5 carries it (0x87 for a publish the acl refused, the
    /// broker's code and string for one it answered), 3.1.1 can only
    /// acknowledge.
    PubAck(u16, Reason),
    PubRec(u16, Reason),
    PubRel(u16),
    PubComp(u16),
    /// `granted`: the QoS (0-2) or a failure code (0x80 and up: 3.1.1 says
    /// failure, 5.0 the reason below).
    SubAck {
        pkid: u16,
        granted: Vec<u8>,
        /// v5: the broker's reason string and user properties, if it said any.
        props: AckProps,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
}

/// What an MQTT 5 acknowledgement says besides its codes: a reason string
/// and user properties (none for 3.x).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProps {
    pub string: Option<String>,
    pub user: Vec<(String, String)>,
}

impl AckProps {
    fn from_parts(string: Option<String>, user: Vec<(String, String)>) -> Self {
        Self { string, user }
    }

    pub fn is_empty(&self) -> bool {
        self.string.is_none() && self.user.is_empty()
    }
}

/// A PUBACK or PUBREC reason: its code (0x80 and up a refusal) and what it
/// says besides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason {
    pub code: u8,
    pub props: AckProps,
}

impl From<u8> for Reason {
    fn from(code: u8) -> Self {
        Self {
            code,
            props: AckProps::default(),
        }
    }
}

/// DISCONNECT reason 0x04: "disconnect with will message".
const DISCONNECT_WITH_WILL: u8 = 0x04;

/// SUBACK codes (5.0 reason codes; 3.1.1 sends 0x80 for each).
pub const SUB_FAILURE: u8 = 0x80;
pub const SUB_NOT_AUTHORIZED: u8 = 0x87;
pub const SUB_SHARED_NOT_SUPPORTED: u8 = 0x9E;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// Decodes the next packet of `buf` (consuming it); `Ok(None)` when more bytes
/// are needed.
pub fn decode(
    protocol: Protocol,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Incoming>, WireError> {
    if protocol.is_v5() {
        // a DISCONNECT may omit its reason code (0: normal) and properties
        // length (MQTT 5 3.14.2.1-2), an AUTH both (3.15.2.1); rumqttc 0.25
        // wants them
        let short = match buf[..] {
            [0xe0, 0x00, ..] => Some((2, Some(0))),
            [0xe0, 0x01, code, ..] => Some((3, Some(code))),
            [0xf0, 0x00, ..] => Some((2, None)),
            _ => None,
        };
        if let Some((len, disconnect)) = short {
            buf.advance(len);
            return Ok(Some(disconnect.map_or(Incoming::Ignored, |code| {
                Incoming::Disconnect {
                    expiry: None,
                    will: code == DISCONNECT_WITH_WILL,
                }
            })));
        }
        match v5::Packet::read(buf, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
            Ok(p) => Ok(Some(from_v5(p)?)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError(e.to_string())),
        }
    } else {
        match v4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(from_v4(p)?)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError(e.to_string())),
        }
    }
}

fn from_v4(p: v4::Packet) -> Result<Incoming, WireError> {
    Ok(match p {
        v4::Packet::Publish(p) => Incoming::Publish {
            msg: Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos.into(),
                retain: p.retain,
                properties: None,
            },
            pkid: p.pkid,
            dup: p.dup,
        },
        v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid, SUCCESS.into()),
        v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid, SUCCESS.into()),
        v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubRequest::new(f.path, f.qos.into()))
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::ConnAck(c) => Incoming::ConnAck {
            accepted: c.code == v4::ConnectReturnCode::Success,
            session_present: c.session_present,
            code: c.code as u8,
            receive_max: None,
            max_packet: None,
        },
        v4::Packet::SubAck(s) => Incoming::SubAck(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => *q as u8,
                    v4::SubscribeReasonCode::Failure => SUB_FAILURE,
                })
                .collect(),
            AckProps::default(),
        ),
        v4::Packet::UnsubAck(u) => Incoming::UnsubAck(u.pkid),
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            expiry: None,
            will: false,
        },
        v4::Packet::Connect(_) => return Err(WireError("second CONNECT".into())),
    })
}

fn from_v5(p: v5::Packet) -> Result<Incoming, WireError> {
    Ok(match p {
        v5::Packet::Publish(p) => Incoming::Publish {
            msg: Message {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| WireError("topic is not UTF-8".into()))?,
                payload: p.payload,
                qos: p.qos.into(),
                retain: p.retain,
                properties: p.properties.map(Box::new),
            },
            pkid: p.pkid,
            dup: p.dup,
        },
        v5::Packet::PubAck(a) => Incoming::PubAck(
            a.pkid,
            Reason {
                code: puback_code(a.reason),
                props: a.properties.map_or_else(AckProps::default, |p| {
                    AckProps::from_parts(p.reason_string, p.user_properties)
                }),
            },
        ),
        v5::Packet::PubRec(a) => Incoming::PubRec(
            a.pkid,
            Reason {
                code: pubrec_code(a.reason),
                props: a.properties.map_or_else(AckProps::default, |p| {
                    AckProps::from_parts(p.reason_string, p.user_properties)
                }),
            },
        ),
        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            id: s.properties.as_ref().and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubRequest {
                    filter: f.path,
                    qos: f.qos.into(),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::ConnAck(c) => Incoming::ConnAck {
            accepted: c.code == v5::ConnectReturnCode::Success,
            session_present: c.session_present,
            code: c.code as u8,
            receive_max: c.properties.as_ref().and_then(|p| p.receive_max),
            max_packet: c.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        v5::Packet::SubAck(s) => Incoming::SubAck(
            s.pkid,
            s.return_codes.iter().map(|c| suback_code(*c)).collect(),
            s.properties.map_or_else(AckProps::default, |p| {
                AckProps::from_parts(p.reason_string, p.user_properties)
            }),
        ),
        v5::Packet::UnsubAck(u) => Incoming::UnsubAck(u.pkid),
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            will: d.reason_code as u8 == DISCONNECT_WITH_WILL,
            expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Incoming::Ignored,
        v5::Packet::Connect(..) => return Err(WireError("second CONNECT".into())),
    })
}

/// Appends the bytes of `packet` to `out`.
pub fn encode(protocol: Protocol, packet: &Outgoing, out: &mut BytesMut) -> Result<(), WireError> {
    let r = if protocol.is_v5() {
        to_v5(packet).write(out, None).map_err(|e| e.to_string())
    } else {
        to_v4(packet)
            .write(out, usize::MAX)
            .map_err(|e| e.to_string())
    };
    r.map(|_| ()).map_err(WireError)
}

fn to_v4(p: &Outgoing) -> v4::Packet {
    match p {
        Outgoing::ConnAck(present) => {
            v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, *present))
        }
        Outgoing::Publish { msg, pkid, dup } => {
            let mut publish =
                v4::Publish::from_bytes(&msg.topic, msg.qos.v4(), msg.payload.clone());
            publish.pkid = *pkid;
            publish.dup = *dup;
            publish.retain = msg.retain;
            v4::Packet::Publish(publish)
        }
        Outgoing::PubAck(id, _) => v4::Packet::PubAck(v4::PubAck::new(*id)),
        Outgoing::PubRec(id, _) => v4::Packet::PubRec(v4::PubRec::new(*id)),
        Outgoing::PubRel(id) => v4::Packet::PubRel(v4::PubRel::new(*id)),
        Outgoing::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(*id)),
        Outgoing::SubAck { pkid, granted, .. } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            granted
                .iter()
                .map(|&q| match q {
                    0..=2 => v4::SubscribeReasonCode::Success(QoS::from_bits(q).v4()),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outgoing::PingResp => v4::Packet::PingResp,
    }
}

fn to_v5(p: &Outgoing) -> v5::Packet {
    match p {
        Outgoing::ConnAck(present) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *present,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }),
        Outgoing::Publish { msg, pkid, dup } => {
            let mut publish = v5::Publish::new(
                msg.topic.as_str(),
                msg.qos.v5(),
                msg.payload.clone(),
                msg.properties.as_deref().cloned(),
            );
            publish.pkid = *pkid;
            publish.dup = *dup;
            publish.retain = msg.retain;
            v5::Packet::Publish(publish)
        }
        Outgoing::PubAck(id, r) => {
            let props = (!r.props.is_empty()).then(|| v5::PubAckProperties {
                reason_string: r.props.string.clone(),
                user_properties: r.props.user.clone(),
            });
            let mut ack = v5::PubAck::new(*id, props);
            ack.reason = puback_reason(r.code);
            v5::Packet::PubAck(ack)
        }
        Outgoing::PubRec(id, r) => {
            let props = (!r.props.is_empty()).then(|| v5::PubRecProperties {
                reason_string: r.props.string.clone(),
                user_properties: r.props.user.clone(),
            });
            let mut rec = v5::PubRec::new(*id, props);
            rec.reason = pubrec_reason(r.code);
            v5::Packet::PubRec(rec)
        }
        Outgoing::PubRel(id) => v5::Packet::PubRel(v5::PubRel::new(*id, None)),
        Outgoing::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(*id, None)),
        Outgoing::SubAck {
            pkid,
            granted,
            props,
        } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: granted.iter().map(|&q| suback_reason(q)).collect(),
            properties: (!props.is_empty()).then(|| v5::SubAckProperties {
                reason_string: props.string.clone(),
                user_properties: props.user.clone(),
            }),
        }),
        Outgoing::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::Success; *count],
            properties: None,
        }),
        Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
    }
}

/// PUBACK/PUBREC reason codes in the order of rumqttc's enums.
const PUB_REASONS: [u8; 9] = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];

/// The byte of a PUBACK or PUBREC reason and back (the two enums of
/// rumqttc name the same codes).
macro_rules! pub_reasons {
    ($code:ident, $reason:ident, $ty:ty) => {
        fn $code(r: $ty) -> u8 {
            type R = $ty;
            let i = match r {
                R::Success => 0,
                R::NoMatchingSubscribers => 1,
                R::UnspecifiedError => 2,
                R::ImplementationSpecificError => 3,
                R::NotAuthorized => 4,
                R::TopicNameInvalid => 5,
                R::PacketIdentifierInUse => 6,
                R::QuotaExceeded => 7,
                R::PayloadFormatInvalid => 8,
            };
            PUB_REASONS[i]
        }

        fn $reason(code: u8) -> $ty {
            type R = $ty;
            match code {
                0x00 => R::Success,
                0x10 => R::NoMatchingSubscribers,
                0x83 => R::ImplementationSpecificError,
                0x87 => R::NotAuthorized,
                0x90 => R::TopicNameInvalid,
                0x91 => R::PacketIdentifierInUse,
                0x97 => R::QuotaExceeded,
                0x99 => R::PayloadFormatInvalid,
                _ => R::UnspecifiedError,
            }
        }
    };
}

pub_reasons!(puback_code, puback_reason, v5::PubAckReason);
pub_reasons!(pubrec_code, pubrec_reason, v5::PubRecReason);

fn suback_code(c: v5::SubscribeReasonCode) -> u8 {
    use v5::SubscribeReasonCode as C;
    match c {
        C::Success(q) => q as u8,
        C::Failure | C::Unspecified => 0x80,
        C::ImplementationSpecific => 0x83,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8F,
        C::PkidInUse => 0x91,
        C::QuotaExceeded => 0x97,
        C::SharedSubscriptionsNotSupported => 0x9E,
        C::SubscriptionIdNotSupported => 0xA1,
        C::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

fn suback_reason(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as C;
    match code {
        0..=2 => C::Success(QoS::from_bits(code).v5()),
        0x83 => C::ImplementationSpecific,
        0x87 => C::NotAuthorized,
        0x8F => C::TopicFilterInvalid,
        0x91 => C::PkidInUse,
        0x97 => C::QuotaExceeded,
        0x9E => C::SharedSubscriptionsNotSupported,
        0xA1 => C::SubscriptionIdNotSupported,
        0xA2 => C::WildcardSubscriptionsNotSupported,
        _ => C::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            topic: "jobs/1".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        }
    }

    #[test]
    fn a_v5_disconnect_says_whether_the_will_goes_out() {
        for (bytes, want) in [
            (&[0xe0, 0x00][..], (None, false)),
            (&[0xe0, 0x01, 0x00][..], (None, false)),
            (&[0xe0, 0x01, 0x04][..], (None, true)),
            (&[0xe0, 0x02, 0x00, 0x00][..], (None, false)),
            (&[0xf0, 0x00, 0xe0, 0x01, 0x04][..], (None, true)),
            (
                &[0xe0, 0x07, 0x04, 0x05, 0x11, 0, 0, 0, 9][..],
                (Some(9), true),
            ),
        ] {
            let mut buf = BytesMut::from(bytes);
            let mut got = decode(Protocol::V5, &mut buf, 1024).expect("decode");
            if got == Some(Incoming::Ignored) {
                got = decode(Protocol::V5, &mut buf, 1024).expect("decode");
            }
            assert!(buf.is_empty(), "{bytes:x?}: all read");
            assert_eq!(
                got,
                Some(Incoming::Disconnect {
                    expiry: want.0,
                    will: want.1
                }),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn publish_round_trips_through_both_versions() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut buf = BytesMut::new();
            encode(
                protocol,
                &Outgoing::Publish {
                    msg: msg(),
                    pkid: 7,
                    dup: false,
                },
                &mut buf,
            )
            .expect("encode");
            buf.extend_from_slice(&[0xc0]); // the first byte of the next packet
            let got = decode(protocol, &mut buf, 1024).expect("decode");
            assert_eq!(
                got,
                Some(Incoming::Publish {
                    msg: msg(),
                    pkid: 7,
                    dup: false
                })
            );
            assert_eq!(decode(protocol, &mut buf, 1024).expect("partial"), None);
        }
    }

    #[test]
    fn v311_publish_golden_bytes() {
        let mut buf = BytesMut::new();
        encode(
            Protocol::V311,
            &Outgoing::Publish {
                msg: msg(),
                pkid: 7,
                dup: false,
            },
            &mut buf,
        )
        .expect("encode");
        // PUBLISH QoS 1, remaining 11, topic "jobs/1", packet id 7, payload "x"
        assert_eq!(&buf[..], b"\x32\x0b\x00\x06jobs/1\x00\x07x");
    }

    #[test]
    fn refused_filters_are_failures_in_suback() {
        let mut v4 = BytesMut::new();
        let granted = vec![1, SUB_FAILURE, SUB_NOT_AUTHORIZED];
        encode(
            Protocol::V311,
            &Outgoing::SubAck {
                pkid: 7,
                granted,
                props: AckProps::default(),
            },
            &mut v4,
        )
        .expect("encodes");
        assert_eq!(&v4[..], &[0x90, 5, 0, 7, 1, 0x80, 0x80]);
        let mut v5 = BytesMut::new();
        let granted = vec![1, SUB_NOT_AUTHORIZED, SUB_SHARED_NOT_SUPPORTED];
        encode(
            Protocol::V5,
            &Outgoing::SubAck {
                pkid: 7,
                granted,
                props: AckProps::default(),
            },
            &mut v5,
        )
        .expect("encodes");
        assert_eq!(&v5[v5.len() - 3..], &[1, 0x87, 0x9E]);
    }

    #[test]
    fn oversized_input_is_an_error() {
        let mut buf = BytesMut::from(&b"\x30\xff\xff\xff\x7f"[..]);
        assert!(decode(Protocol::V311, &mut buf, 1024).is_err());
    }

    #[test]
    fn v5_subscribe_options_and_identifier_are_read() {
        let mut f = v5::Filter::new("jobs/#", QoS::AtLeastOnce.v5());
        f.nolocal = true;
        f.preserve_retain = true;
        f.retain_forward_rule = v5::RetainForwardRule::OnNewSubscribe;
        let mut s = v5::Subscribe::new(
            f,
            Some(v5::SubscribeProperties {
                id: Some(42),
                user_properties: Vec::new(),
            }),
        );
        s.pkid = 9;
        let mut buf = BytesMut::new();
        v5::Packet::Subscribe(s)
            .write(&mut buf, None)
            .expect("encode");
        let got = decode(Protocol::V5, &mut buf, 1024).expect("decode");
        assert_eq!(
            got,
            Some(Incoming::Subscribe {
                pkid: 9,
                filters: vec![SubRequest {
                    filter: "jobs/#".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 1,
                }],
                id: Some(42),
            })
        );
    }

    #[test]
    fn reason_codes_survive_both_ways() {
        for code in PUB_REASONS {
            assert_eq!(puback_code(puback_reason(code)), code);
            assert_eq!(pubrec_code(pubrec_reason(code)), code);
            let mut buf = BytesMut::new();
            encode(Protocol::V5, &Outgoing::PubAck(3, code.into()), &mut buf).expect("encode");
            assert_eq!(
                decode(Protocol::V5, &mut buf, 64).expect("decode"),
                Some(Incoming::PubAck(3, code.into()))
            );
            // 3.1.1 cannot say it: a plain PUBACK
            let mut buf = BytesMut::new();
            encode(Protocol::V311, &Outgoing::PubAck(3, code.into()), &mut buf).expect("encode");
            assert_eq!(&buf[..], &[0x40, 2, 0, 3]);
        }
        // the reason string and user properties go with the code
        let said = AckProps {
            string: Some("quota of line1".into()),
            user: vec![("k".into(), "v".into())],
        };
        let reason = Reason {
            code: 0x97,
            props: said.clone(),
        };
        let mut buf = BytesMut::new();
        encode(Protocol::V5, &Outgoing::PubAck(3, reason.clone()), &mut buf).expect("encode");
        encode(Protocol::V5, &Outgoing::PubRec(4, reason.clone()), &mut buf).expect("encode");
        let suback = Outgoing::SubAck {
            pkid: 5,
            granted: vec![0x87],
            props: said.clone(),
        };
        encode(Protocol::V5, &suback, &mut buf).expect("encode");
        let mut next = || decode(Protocol::V5, &mut buf, 256).expect("decode");
        assert_eq!(next(), Some(Incoming::PubAck(3, reason.clone())));
        assert_eq!(next(), Some(Incoming::PubRec(4, reason)));
        assert_eq!(next(), Some(Incoming::SubAck(5, vec![0x87], said)));
        for code in [
            0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
        ] {
            assert_eq!(suback_code(suback_reason(code)), code);
        }
    }

    #[test]
    fn subacks_carry_each_filters_code() {
        // 3.1.1 SUBACK: QoS 1, failure
        let mut buf = BytesMut::from(&[0x90, 4, 0, 5, 1, 0x80][..]);
        assert_eq!(
            decode(Protocol::V311, &mut buf, 64).expect("decode"),
            Some(Incoming::SubAck(5, vec![1, 0x80], AckProps::default()))
        );
        // 5.0 SUBACK, no properties: QoS 2, not authorized
        let mut buf = BytesMut::from(&[0x90, 5, 0, 5, 0, 2, 0x87][..]);
        assert_eq!(
            decode(Protocol::V5, &mut buf, 64).expect("decode"),
            Some(Incoming::SubAck(5, vec![2, 0x87], AckProps::default()))
        );
    }
}
