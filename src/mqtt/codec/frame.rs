//! Framing of a byte stream into MQTT packets without buffering bodies that
//! only need forwarding.
//!
//! The scanner tells its caller, for the bytes at the front of its buffer,
//! either to forward some of them unchanged (the start of a frame, or the rest
//! of one already started) or that a whole frame of a kind the caller wants to
//! look inside is there. A large PUBLISH therefore streams through in pieces,
//! while a SUBSCRIBE is held until complete. Every frame size is checked against
//! the limit from its fixed header, before its body is waited for.

use super::{check_header, CodecError, PacketType};

/// What to do with the bytes at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Nothing can be decided until more bytes arrive.
    NeedMore,
    /// Forward the first `len` bytes unchanged. `start` names the packet when
    /// these bytes begin a frame, and is `None` for the rest of a frame.
    Forward {
        len: usize,
        start: Option<PacketType>,
    },
    /// The first `len` bytes are one whole frame of a kind the caller asked for.
    Whole { len: usize, packet: PacketType },
}

/// Stream state between calls: how much of a started frame is still to pass.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    max: usize,
    pass_left: usize,
}

impl FrameScanner {
    /// A scanner refusing frames whose remaining length exceeds `max`.
    pub fn new(max: usize) -> Self {
        Self { max, pass_left: 0 }
    }

    /// Decides what to do with the front of `buf`; the caller then consumes
    /// exactly the `len` bytes named (or reads more on `NeedMore`).
    /// `whole(packet)` says which packets the caller wants whole.
    pub fn scan(
        &mut self,
        buf: &[u8],
        whole: impl Fn(PacketType) -> bool,
    ) -> Result<Scan, CodecError> {
        if buf.is_empty() {
            return Ok(Scan::NeedMore);
        }
        if self.pass_left > 0 {
            let len = self.pass_left.min(buf.len());
            self.pass_left -= len;
            return Ok(Scan::Forward { len, start: None });
        }
        let Some(header) = check_header(buf, self.max)? else {
            return Ok(Scan::NeedMore);
        };
        let packet = header.packet_type()?;
        let frame_len = header.frame_len();
        if whole(packet) {
            return Ok(if buf.len() >= frame_len {
                Scan::Whole {
                    len: frame_len,
                    packet,
                }
            } else {
                Scan::NeedMore
            });
        }
        let len = frame_len.min(buf.len());
        self.pass_left = frame_len - len;
        Ok(Scan::Forward {
            len,
            start: Some(packet),
        })
    }

    /// True between frames (no frame half forwarded).
    pub fn at_boundary(&self) -> bool {
        self.pass_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a caller sees: bytes forwarded, frames started, whole frames.
    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        forwarded: Vec<u8>,
        starts: Vec<PacketType>,
        wholes: Vec<Vec<u8>>,
    }

    /// Feeds `input` in chunks of `chunk` bytes, consuming as a proxy would.
    fn run(input: &[u8], chunk: usize, max: usize) -> Result<Seen, CodecError> {
        let mut scanner = FrameScanner::new(max);
        let mut buf = Vec::new();
        let mut seen = Seen::default();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match scanner.scan(&buf, |p| p == PacketType::Subscribe)? {
                    Scan::NeedMore => break,
                    Scan::Forward { len, start } => {
                        seen.forwarded.extend(buf.drain(..len));
                        seen.starts.extend(start);
                    }
                    Scan::Whole { len, .. } => seen.wholes.push(buf.drain(..len).collect()),
                }
            }
        }
        Ok(seen)
    }

    fn sample_stream() -> Vec<u8> {
        let mut s = vec![0x30, 0x05, 0x00, 0x01, b't', b'h', b'i']; // PUBLISH t "hi"
        s.extend_from_slice(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'x', 0x00]); // SUBSCRIBE x
        s.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        let mut big = vec![0x32, 0x80, 0x01, 0x00, 0x01, b't', 0x00, 0x07];
        big.extend(std::iter::repeat_n(0xab, 128 - 5)); // PUBLISH QoS 1, 128 bytes
        s.extend_from_slice(&big);
        s
    }

    #[test]
    fn frames_are_found_whatever_the_chunking() {
        let input = sample_stream();
        let whole = run(&input, input.len(), 1024).expect("valid stream");
        assert_eq!(
            whole.starts,
            vec![
                PacketType::Publish,
                PacketType::Pingreq,
                PacketType::Publish
            ]
        );
        assert_eq!(whole.wholes, vec![input[7..15].to_vec()]);
        for chunk in [1, 2, 3, 7, 8, 9, 64] {
            assert_eq!(
                run(&input, chunk, 1024).as_ref(),
                Ok(&whole),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn oversize_frame_is_refused_from_its_header() {
        let input = [0x30, 0xff, 0x7f];
        assert_eq!(
            run(&input, 1, 1024).err(),
            Some(CodecError::TooLarge {
                len: 16_383,
                max: 1024
            })
        );
    }

    #[test]
    fn reserved_type_is_an_error() {
        assert_eq!(
            run(&[0x00, 0x00], 2, 10).err(),
            Some(CodecError::ReservedPacketType)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let _ = run(&bytes, chunk, 256);
        }

        #[test]
        fn forwarding_without_whole_frames_is_identity(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let mut scanner = FrameScanner::new(usize::MAX);
            let mut buf = Vec::new();
            let mut out = Vec::new();
            'outer: for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match scanner.scan(&buf, |_| false) {
                        Ok(Scan::NeedMore) => break,
                        Ok(Scan::Forward { len, .. }) => out.extend(buf.drain(..len)),
                        Ok(Scan::Whole { .. }) => unreachable!("no whole frames asked for"),
                        Err(_) => break 'outer,
                    }
                }
            }
            prop_assert!(bytes.starts_with(&out));
        }
    }
}
