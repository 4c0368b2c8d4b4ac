//! A CONNECT with a protocol level the server does not speak is answered with the MQTT 3.1.1
//! CONNACK return code 0x01 in the 3.1.1 format [MQTT-3.1.2-2], whatever the level: a client
//! that sent a level the server does not know cannot be assumed to read MQTT 5 packets, and
//! every MQTT client can read the four bytes `20 02 00 01` (what Mosquitto answers too).

use std::time::Instant;

use bytes::BytesMut;

use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Event, ServerConfig, ServerConnection};
use mqttd_proto::{ProtocolVersion, ReasonCode};

/// A CONNECT with this protocol name and level, clean session, keep alive 60, client id "c"
/// (and, for MQTT 5, no properties).
fn connect(name: &str, level: u8) -> Vec<u8> {
    let mut body = (name.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&[level, 0x02, 0, 60]);
    if (name, level) == ("MQTT", 5) {
        // No properties.
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    let mut wire = vec![0x10, body.len() as u8];
    wire.extend(body);
    wire
}

/// Feeds `bytes` to a new server connection as a transport driver would, and returns what the
/// server transmits (encoded in the version it chose to answer in) and the events it reports.
fn answer(bytes: &[u8]) -> (Option<ProtocolVersion>, Vec<u8>, Vec<Event>) {
    let now = Instant::now();
    let mut server = ServerConnection::new(ServerConfig::default(), now);
    let mut reader = PacketReader::new(server.max_packet_size());
    let mut rbuf = BytesMut::from(bytes);
    loop {
        match reader.read(&mut rbuf, server.version()) {
            Ok(Some(packet)) => server.handle_packet(now, packet),
            Ok(None) => break,
            Err(error) => {
                server.handle_decode_error(now, &error);
                break;
            }
        }
    }
    let version = server.version();
    let mut out = BytesMut::new();
    while let Some(packet) = server.poll_transmit() {
        let version = version.expect("a version to encode the answer with");
        packet.encode(version, &mut out).expect("encodable answer");
    }
    let mut events = Vec::new();
    while let Some(event) = server.poll_event() {
        events.push(event);
    }
    assert!(
        server.is_closed(),
        "the connection closes after the refusal"
    );
    (version, out.to_vec(), events)
}

#[test]
fn unsupported_levels_get_the_mqtt_3_1_1_return_code_1() {
    let cases = [
        ("MQTT", 0),
        ("MQTT", 1),
        ("MQTT", 2),
        ("MQTT", 3),
        ("MQTT", 6),
        ("MQTT", 7),
        ("MQTT", 0x7F),
        // Mosquitto's bridge bit is for 3.1 and 3.1.1 only.
        ("MQTT", 0x85),
        ("MQTT", 0x83),
        ("MQTT", 0xFF),
        ("MQIsdp", 0),
        ("MQIsdp", 4),
        ("MQIsdp", 5),
        ("MQIsdp", 6),
        ("MQIsdp", 0x84),
        ("MQIsdp", 0xFF),
    ];
    for (name, level) in cases {
        let (version, bytes, events) = answer(&connect(name, level));
        assert_eq!(
            bytes,
            [0x20, 0x02, 0x00, 0x01],
            "{name} level {level}: CONNACK 0x01 in the 3.1.1 format"
        );
        assert_eq!(
            version,
            Some(ProtocolVersion::V3_1_1),
            "{name} level {level}"
        );
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::Closed {
                    reason: ReasonCode::UnsupportedProtocolVersion,
                    by_client: false
                }
            )),
            "{name} level {level}: {events:?}"
        );
    }
}

#[test]
fn supported_levels_are_not_refused() {
    // 0x83 and 0x84: a Mosquitto bridge (`try_private`).
    for (name, level) in [
        ("MQIsdp", 3),
        ("MQTT", 4),
        ("MQTT", 5),
        ("MQIsdp", 0x83),
        ("MQTT", 0x84),
    ] {
        let now = Instant::now();
        let mut server = ServerConnection::new(ServerConfig::default(), now);
        let mut reader = PacketReader::new(server.max_packet_size());
        let mut rbuf = BytesMut::from(&connect(name, level)[..]);
        let packet = reader
            .read(&mut rbuf, None)
            .expect("a valid CONNECT")
            .expect("a whole packet");
        server.handle_packet(now, packet);
        assert!(!server.is_closed(), "{name} level {level}");
        let Some(Event::Connect(request)) = server.poll_event() else {
            panic!("{name} level {level}: no CONNECT");
        };
        assert_eq!(
            request.connect.properties.bridge,
            level & 0x80 != 0,
            "{name} level {level}"
        );
    }
}
