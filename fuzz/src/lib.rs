//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! A target treats its input as the bytes a peer sent on one connection and cuts them into
//! packets with [`PacketReader`], exactly as a transport does.

pub mod session;

use bytes::BytesMut;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{Packet, ProtocolVersion};

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
