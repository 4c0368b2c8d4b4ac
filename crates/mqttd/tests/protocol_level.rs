//! The real broker answers a CONNECT with a protocol level it does not speak with the four
//! bytes of an MQTT 3.1.1 CONNACK with return code 0x01 (unacceptable protocol version)
//! [MQTT-3.1.2-2], then closes the connection, as Mosquitto does.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::Broker;

/// A CONNECT with this protocol name and level, clean session, keep alive 60, client id "c".
fn connect(name: &str, level: u8) -> Vec<u8> {
    let mut body = (name.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&[level, 0x02, 0, 60, 0, 1, b'c']);
    let mut wire = vec![0x10, body.len() as u8];
    wire.extend(body);
    wire
}

#[tokio::test]
async fn unsupported_protocol_levels_get_connack_0x01_in_the_3_1_1_format() {
    let broker = Broker::start("");
    for (name, level) in [
        ("MQTT", 3),
        ("MQTT", 6),
        ("MQTT", 0xFF),
        ("MQIsdp", 4),
        ("MQIsdp", 5),
    ] {
        let mut stream = TcpStream::connect(broker.mqtt).await.expect("connect");
        stream
            .write_all(&connect(name, level))
            .await
            .expect("send CONNECT");
        // Everything until the broker closes: the answer, and nothing after it.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
            .await
            .expect("the broker closes the connection")
            .expect("a clean close");
        assert_eq!(
            answer,
            [0x20, 0x02, 0x00, 0x01],
            "{name} level {level}: {answer:02x?}"
        );
    }
    broker.stop();
}
