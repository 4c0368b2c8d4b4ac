//! The fuzz targets' code, and helpers they share.
//!
//! Each target in `fuzz_targets/` only hands its input to a function here
//! ([`decode_packet`], [`store_record`], [`cluster_frame`], [`session::run`], [`broker::run`]),
//! so that the corpus replay test
//! (`tests/corpus.rs`) runs every committed input through exactly what the fuzzer runs.
//!
//! A packet target treats its input as the bytes a peer sent on one connection and cuts them
//! into packets with [`PacketReader`], exactly as a transport does.

pub mod broker;
pub mod session;

use bytes::{Bytes, BytesMut};
use mqttd_broker::storage::fuzzing::decode_stored_records;
use mqttd_cluster::wire::{frame_len, Frame};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{Packet, ProtocolVersion};

/// The `decode_packet` target: `data` as a connection's stream, read before CONNECT and
/// after a CONNECT of each version; every packet read must encode back to itself.
pub fn decode_packet(data: &[u8]) {
    for version in READER_VERSIONS {
        for_each_packet(data, version, assert_roundtrip);
    }
}

/// The `cluster_frame` target: `data` as the body of a frame a cluster peer sent on its
/// forwarding link (routes and forwarded messages). The decoder must not panic, and a frame it
/// accepts must encode, with a length prefix that says its length, to a body that decodes to
/// the same frame. Returns the kind of frame `data` is, if it is one.
pub fn cluster_frame(data: &[u8]) -> Option<&'static str> {
    let frame = Frame::decode(Bytes::copy_from_slice(data)).ok()?;
    let encoded = frame.encode();
    let prefix = <[u8; 4]>::try_from(&encoded[..4]).expect("a length prefix");
    assert_eq!(frame_len(prefix, usize::MAX), Ok(encoded.len() - 4));
    let again = Frame::decode(Bytes::copy_from_slice(&encoded[4..])).expect("decodes again");
    assert_eq!(again, frame, "a frame's encoding decodes to the same frame");
    Some(match frame {
        Frame::Snapshot(_) => "snapshot",
        Frame::Delta(_) => "delta",
        Frame::Resync => "resync",
        Frame::Message(_) => "message",
        _ => "other",
    })
}

/// The `store_record` target: `data` as a value read from the durable store, as it is and
/// behind a valid header (so that the decoders past the checksum are reached too); whatever
/// decodes must encode back to the same bytes and record. Returns the kinds of record `data`
/// itself is valid as.
pub fn store_record(data: &[u8]) -> Vec<&'static str> {
    let kinds = decode_stored_records(data);
    decode_stored_records(&seal_record(data));
    kinds
}

/// `body` behind the header of a stored value: the format version and a valid checksum.
pub fn seal_record(body: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(body.len() + 5);
    sealed.push(1);
    sealed.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    sealed.extend_from_slice(body);
    sealed
}

/// The packet size limit the targets read with: far above what a fuzz input holds, so that
/// every input is decoded rather than refused for its size.
pub const MAX_PACKET_SIZE: u32 = 1 << 20;

/// Every state a reader can be in: before CONNECT, and after a CONNECT of each version.
pub const READER_VERSIONS: [Option<ProtocolVersion>; 4] = [
    None,
    Some(ProtocolVersion::V3_1),
    Some(ProtocolVersion::V3_1_1),
    Some(ProtocolVersion::V5),
];

/// Reads `data` as one connection's byte stream, starting with the reader told `version`,
/// and calls `f` with the version the reader was told and each packet it returns. A CONNECT
/// read before the version is known fixes it for the rest of the stream, as in a server.
/// Stops when the reader needs more bytes or refuses the stream.
pub fn for_each_packet(
    data: &[u8],
    mut version: Option<ProtocolVersion>,
    mut f: impl FnMut(Option<ProtocolVersion>, &Packet),
) {
    let mut reader = PacketReader::new(MAX_PACKET_SIZE);
    let mut buf = BytesMut::from(data);
    loop {
        match reader.read(&mut buf, version) {
            Ok(Some(packet)) => {
                f(version, &packet);
                if let Packet::Connect(connect) = &packet {
                    version.get_or_insert(connect.protocol);
                }
            }
            Ok(None) => return,
            Err(e) => {
                // Choosing the answer to a refused stream must not panic either.
                std::hint::black_box((e.reason_code(), e.connect_version()));
                return;
            }
        }
    }
}

/// Encodes a packet that a reader told `version` returned, and asserts that the encoding has
/// the announced length and reads back as the same packet.
pub fn assert_roundtrip(version: Option<ProtocolVersion>, packet: &Packet) {
    let (encode_as, read_as) = match (packet, version) {
        // CONNECT carries its own version.
        (Packet::Connect(connect), _) => (connect.protocol, None),
        (_, Some(version)) => (version, Some(version)),
        (_, None) => panic!("{packet:?} was read before CONNECT"),
    };
    let mut buf = BytesMut::new();
    if let Err(e) = packet.encode(encode_as, &mut buf) {
        panic!("decoded {packet:?} does not encode for {encode_as}: {e}");
    }
    assert_eq!(
        buf.len(),
        packet.encoded_len(encode_as),
        "encoded_len of {packet:?}"
    );
    let encoded = buf.clone();
    match PacketReader::new(u32::MAX).read(&mut buf, read_as) {
        Ok(Some(again)) => assert_eq!(&again, packet, "re-encoded as {encoded:02X?}"),
        other => panic!("{packet:?} re-encoded as {encoded:02X?} reads as {other:?}"),
    }
    assert!(
        buf.is_empty(),
        "re-encoding of {packet:?} has trailing bytes"
    );
}
