//! Hot path of the HTTP balancer's lean path: reading a request head and
//! writing it on with the forwarded headers, the same for a response head,
//! and finding the end of a chunked body. Every proxied request pays the
//! first two once.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowgate::http::h1::{self, Answer, Chunked, Forwarded};

/// A browser's request head (what a dashboard or API client sends).
const REQUEST: &[u8] = b"GET /api/orders?since=1700000000 HTTP/1.1\r\nHost: line1.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\nAccept-Language: en-GB,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n\
Connection: keep-alive\r\nCookie: flowgate_line1=r1; session=4f0c2a9e\r\nX-Forwarded-For: 10.0.0.7\r\n\r\n";

/// A Node-RED (Express) response head.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nX-Powered-By: Express\r\nAccess-Control-Allow-Origin: *\r\n\
Content-Type: application/json; charset=utf-8\r\nContent-Length: 512\r\nETag: W/\"200-abc\"\r\n\
Date: Sun, 29 Nov 2026 12:00:00 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n";

fn heads(c: &mut Criterion) {
    let fwd = Forwarded {
        client_ip: "192.0.2.7",
        proto: "http",
    };
    let answer = Answer {
        replica: Some(("x-flowgate-replica", "1")),
        set_cookie: None,
        close: false,
    };
    let mut group = c.benchmark_group("http1_head");
    group.throughput(Throughput::Bytes(REQUEST.len() as u64));
    let mut out = BytesMut::with_capacity(2048);
    group.bench_function("request", |b| {
        b.iter(|| {
            out.clear();
            h1::parse_request(std::hint::black_box(REQUEST), &fwd, &mut out)
        })
    });
    group.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    group.bench_function("response", |b| {
        b.iter(|| {
            out.clear();
            h1::parse_response(std::hint::black_box(RESPONSE), "GET", &answer, &mut out)
        })
    });
    group.finish();
}

fn chunked(c: &mut Criterion) {
    // 64 chunks of 1 KiB, as a streaming response sends them
    let mut body = Vec::new();
    for _ in 0..64 {
        body.extend_from_slice(b"400\r\n");
        body.extend(std::iter::repeat_n(b'x', 1024));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut group = c.benchmark_group("http1_chunked");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("end_of_64_chunks", |b| {
        b.iter(|| {
            let mut c = Chunked::default();
            let n = c.feed(std::hint::black_box(&body));
            (n, c.is_done())
        })
    });
    group.finish();
}

criterion_group!(benches, heads, chunked);
criterion_main!(benches);
