//! Property tests across the codec: decode/encode round trips keep bytes,
//! arbitrary input never panics.

use proptest::prelude::*;

use super::{write_remaining_length, Connect, Protocol, Subscribe, Unsubscribe};

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_props(out: &mut Vec<u8>, props: &[u8]) {
    write_remaining_length(out, props.len());
    out.extend_from_slice(props);
}

fn frame(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    write_remaining_length(&mut out, body.len());
    out.extend(body);
    out
}

prop_compose! {
    fn connect_frame()(
        v5 in any::<bool>(),
        clean in any::<bool>(),
        keep_alive in any::<u16>(),
        props in proptest::collection::vec(any::<u8>(), 0..40),
        client_id in "[a-zA-Z0-9/_-]{0,30}",
        will in proptest::option::of(("[a-z/]{1,20}", proptest::collection::vec(any::<u8>(), 0..50), 0u8..3, any::<bool>())),
        username in proptest::option::of("[a-z]{0,10}"),
        password in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        let mut flags = if clean { 0x02 } else { 0 };
        if let Some((_, _, qos, retain)) = &will {
            flags |= 0x04 | (qos << 3) | if *retain { 0x20 } else { 0 };
        }
        if username.is_some() { flags |= 0x80; }
        if password.is_some() { flags |= 0x40; }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if v5 { put_props(&mut body, &props); }
        put_str(&mut body, client_id.as_bytes());
        if let Some((topic, payload, _, _)) = &will {
            if v5 { put_props(&mut body, &props); }
            put_str(&mut body, topic.as_bytes());
            put_str(&mut body, payload);
        }
        if let Some(u) = &username { put_str(&mut body, u.as_bytes()); }
        if let Some(p) = &password { put_str(&mut body, p); }
        frame(0x10, body)
    }
}

prop_compose! {
    fn subscribe_frame()(
        packet_id in 1u16..,
        props in proptest::collection::vec(any::<u8>(), 0..20),
        entries in proptest::collection::vec(("[a-z+#/]{1,20}", 0u8..3), 1..5),
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut v3 = packet_id.to_be_bytes().to_vec();
        let mut v5 = v3.clone();
        put_props(&mut v5, &props);
        let mut unsub = v3.clone();
        for (filter, qos) in &entries {
            for body in [&mut v3, &mut v5] {
                put_str(body, filter.as_bytes());
                body.push(*qos);
            }
            put_str(&mut unsub, filter.as_bytes());
        }
        (frame(0x82, v3), frame(0x82, v5), frame(0xa2, unsub))
    }
}

proptest! {
    #[test]
    fn connect_reencode_with_its_own_id_keeps_every_byte(frame in connect_frame(), junk in proptest::collection::vec(any::<u8>(), 0..8)) {
        let with_junk = [frame.clone(), junk].concat();
        let c = Connect::decode(&with_junk).expect("generated CONNECT is valid");
        prop_assert_eq!(c.encode_with_client_id(c.client_id), frame);
    }

    #[test]
    fn connect_reencode_with_a_new_id_changes_only_the_id(frame in connect_frame(), id in "[a-z0-9-]{0,40}") {
        let c = Connect::decode(&frame).expect("generated CONNECT is valid");
        let out = c.encode_with_client_id(&id);
        let back = Connect::decode(&out).expect("re-encoded CONNECT is valid");
        prop_assert_eq!(back.client_id, id.as_str());
        prop_assert_eq!(back.flags, c.flags);
        prop_assert_eq!(back.keep_alive, c.keep_alive);
        prop_assert_eq!(back.username, c.username);
        prop_assert_eq!(&back.will, &c.will);
        prop_assert_eq!(back.encode_with_client_id(c.client_id), frame);
    }

    #[test]
    fn subscribe_and_unsubscribe_identity_reencode_keeps_bytes((v3, v5, unsub) in subscribe_frame()) {
        for (frame, protocol) in [(&v3, Protocol::V311), (&v5, Protocol::V5)] {
            let s = Subscribe::decode(frame, protocol).expect("generated SUBSCRIBE is valid");
            let same: Vec<_> = s.entries.iter().map(|e| (e.filter, e.options)).collect();
            prop_assert_eq!(&s.encode_with(&same), frame);
        }
        let u = Unsubscribe::decode(&unsub, Protocol::V311).expect("generated UNSUBSCRIBE is valid");
        prop_assert_eq!(u.encode_with(&u.filters), unsub);
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Connect::decode(&bytes);
        let _ = super::ConnectReturn::decode(&bytes);
        for protocol in [Protocol::V31, Protocol::V311, Protocol::V5] {
            let _ = Subscribe::decode(&bytes, protocol);
            let _ = Unsubscribe::decode(&bytes, protocol);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(frame in connect_frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = frame;
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = Connect::decode(&bytes);
    }
}
