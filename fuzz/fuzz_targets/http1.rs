//! The lean HTTP path's heads and chunked framing on arbitrary bytes: never
//! panics; a head it forwards is itself a valid head with the same request
//! line and framing; a response head it passes on keeps its status and
//! framing; a chunked body ends at the same byte however it is split.
#![no_main]

use bytes::BytesMut;
use flowgate::http::h1::{self, Answer, Chunked, Forwarded};
use libfuzzer_sys::fuzz_target;

const FWD: Forwarded<'static> = Forwarded {
    client_ip: "192.0.2.1",
    proto: "http",
};

fn chunked_end(data: &[u8], step: usize) -> Result<Option<usize>, h1::H1Error> {
    let mut c = Chunked::default();
    let mut pending = Vec::new();
    let mut taken = 0;
    for piece in data.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        let n = c.feed(&pending)?;
        assert!(n <= pending.len(), "consumed more than it was given");
        pending.drain(..n);
        taken += n;
        if c.is_done() {
            return Ok(Some(taken));
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let mut out = BytesMut::new();
    if let Ok(Some(head)) = h1::parse_request(data, &FWD, &mut out) {
        assert!(head.len <= data.len());
        if head.lean() {
            let mut again = BytesMut::new();
            match h1::parse_request(&out, &FWD, &mut again) {
                Ok(Some(second)) => {
                    assert_eq!(second.len, out.len());
                    assert_eq!(
                        (&second.method, &second.target, second.body, &second.host),
                        (&head.method, &head.target, head.body, &head.host)
                    );
                }
                // the three forwarded headers can take a full head over the count
                Err(h1::H1Error::TooManyHeaders) => {}
                other => panic!("a forwarded head does not parse: {other:?}\n{out:?}"),
            }
        }
    }

    let answer = Answer {
        replica: Some(("x-flowgate-replica", "0")),
        set_cookie: Some("flowgate_web=r0; Path=/"),
        close: false,
    };
    let mut out = BytesMut::new();
    if let Ok(Some(resp)) = h1::parse_response(data, "GET", &answer, &mut out) {
        assert!(resp.len <= data.len());
        let mut again = BytesMut::new();
        match h1::parse_response(&out, "GET", &answer, &mut again) {
            Ok(Some(second)) => {
                assert_eq!((second.status, second.body), (resp.status, resp.body))
            }
            // flowgate's headers can take a full head over the count
            Err(h1::H1Error::TooManyHeaders) => {}
            other => panic!("a passed-on head does not parse: {other:?}\n{out:?}"),
        }
    }

    let whole = chunked_end(data, data.len());
    for step in [1, 2, 7] {
        match (&whole, chunked_end(data, step)) {
            (Ok(Some(a)), Ok(Some(b))) => assert_eq!(*a, b, "step {step}"),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            // an error found in a piece may come before the end is known
            (Ok(None), Err(_)) | (Err(_), Ok(None)) => {}
            (a, b) => panic!("whole {a:?}, in steps of {step} {b:?}"),
        }
    }
});
