//! The codec on the hot path: decoding and encoding a QoS 1 PUBLISH with a 64-byte payload, as
//! MQTT 3.1.1 and 5.0.
//!
//! `cargo bench -p mqttd-proto --bench codec`; results are in docs/benchmarks.md.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{Packet, PacketId, ProtocolVersion, Publish, QoS, TopicName};

fn publish() -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::try_from("site/42/dev/1234/temp").expect("valid topic"),
        packet_id: PacketId::new(7),
        properties: Default::default(),
        payload: vec![0x5a; 64].into(),
    })
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish 64 B");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let packet = publish();
        let mut wire = BytesMut::new();
        packet.encode(version, &mut wire).expect("encodes");
        let wire = wire.freeze();
        group.bench_function(format!("encode {version}"), |b| {
            let mut out = BytesMut::with_capacity(256);
            b.iter(|| {
                out.clear();
                black_box(&packet)
                    .encode(version, &mut out)
                    .expect("encodes");
            })
        });
        group.bench_function(format!("decode {version}"), |b| {
            let mut reader = PacketReader::new(1 << 20);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                black_box(reader.read(&mut buf, Some(version)).expect("decodes"))
            })
        });
    }
    group.finish();
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, codec);
}
criterion_main!(group::benches);
