//! Hot paths of the MQTT bridge: framing a stream of PUBLISH packets (every
//! byte a replica sends or receives goes through it), and the CONNECT and
//! SUBSCRIBE rewrites.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flowgate::mqtt::codec::{
    write_remaining_length, Connect, FrameScanner, PacketType, Protocol, Scan, Subscribe,
};
use flowgate::mqtt::rewrite::ShareRules;

fn publish(payload: usize) -> Vec<u8> {
    let mut body = vec![0, 7];
    body.extend_from_slice(b"jobs/42");
    body.extend_from_slice(&[0, 1]);
    body.resize(body.len() + payload, 0xab);
    let mut frame = vec![0x32];
    write_remaining_length(&mut frame, body.len());
    frame.extend(body);
    frame
}

fn scan_all(scanner: &mut FrameScanner, buf: &[u8]) -> usize {
    let mut at = 0;
    let mut frames = 0;
    loop {
        match scanner.scan(&buf[at..], |p| p == PacketType::Subscribe) {
            Ok(Scan::Forward { len, start }) => {
                frames += usize::from(start.is_some());
                at += len;
            }
            Ok(Scan::Whole { len, .. }) => at += len,
            Ok(Scan::NeedMore) | Err(_) => return frames,
        }
    }
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_scan");
    for size in [64, 1024] {
        let stream: Vec<u8> = (0..1000).flat_map(|_| publish(size)).collect();
        group.throughput(Throughput::Elements(1000));
        group.bench_function(format!("publish_{size}B_x1000"), |b| {
            b.iter(|| {
                let mut scanner = FrameScanner::new(1 << 20);
                scan_all(&mut scanner, &stream)
            })
        });
    }
    group.finish();
}

fn rewrites(c: &mut Criterion) {
    let mut connect = vec![0x10, 0];
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60, 0, 13];
    body.extend_from_slice(b"line1-nodered");
    body.extend_from_slice(&[0, 4, b'u', b's', b'e', b'r', 0, 4, b'p', b'a', b's', b's']);
    connect[1] = body.len() as u8;
    connect.extend(body);
    c.bench_function("connect_decode_and_rewrite_id", |b| {
        b.iter(|| {
            let c = Connect::decode(&connect).expect("valid");
            c.encode_with_client_id("line1-nodered-fg1-0")
        })
    });

    let subscribe = [
        &[0x82, 14, 0, 10, 0, 3][..],
        b"a/+",
        &[1, 0, 3],
        b"b/#",
        &[2],
    ]
    .concat();
    let rules = ShareRules {
        instance: "line1",
        broadcast: &[],
    };
    c.bench_function("subscribe_decode_and_share", |b| {
        b.iter_batched(
            || subscribe.clone(),
            |frame| {
                let s = Subscribe::decode(&frame, Protocol::V311).expect("valid");
                rules.subscribe(&s, Protocol::V311)
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, framing, rewrites);
criterion_main!(benches);
