//! Writes the seed corpus of the `store_record` fuzz target: every kind of stored record
//! (retained message, a session's stored message, session record, QoS 2 flow state), each
//! minimal and with every field set, encoded by the broker's own encoders; and a few damaged
//! values that each decoder must refuse. Each seed is checked to decode as exactly the kinds
//! it means to (none for the damaged ones) and to round-trip.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example store_record_seeds -- fuzz/corpus/store_record
//! ```
//!
//! File names say what a seed holds, so rerunning the program overwrites its own seeds and
//! leaves any other file in the directory alone. Expiry times are stored as wall-clock
//! milliseconds, so those seeds differ from run to run.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mqttd_broker::storage::fuzzing::{
    encode_delivery, encode_flow, encode_message, encode_session,
};
use mqttd_broker::storage::{SessionRecord, StoredWill};
use mqttd_fuzz::{seal_record, store_record};
use mqttd_proto::session::OutboundState;
use mqttd_proto::{
    ClientId, Delivery, Message, MessageProperties, MqttStr, PacketId, QoS, RetainHandling,
    SubscriptionOptions, TopicFilter, TopicName, Will, WillProperties,
};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/store_record".to_owned()),
    );
    std::fs::create_dir_all(&dir)?;
    let seeds = seeds()?;
    for (name, bytes, kinds) in &seeds {
        let decoded = store_record(bytes);
        assert_eq!(&decoded, kinds, "{name} decodes as {decoded:?}");
        std::fs::write(dir.join(name), bytes)?;
        println!("{name}: {} bytes, valid as {decoded:?}", bytes.len());
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}

fn s(s: &str) -> Result<MqttStr, Error> {
    Ok(MqttStr::try_from(s)?)
}

fn topic(t: &str) -> Result<TopicName, Error> {
    Ok(TopicName::try_from(t)?)
}

fn filter(f: &str) -> Result<TopicFilter, Error> {
    Ok(TopicFilter::try_from(f)?)
}

fn minimal_message(qos: QoS) -> Result<Message, Error> {
    Ok(Message::new(
        topic("a/b")?,
        Bytes::from_static(b"x"),
        qos,
        false,
    ))
}

/// Every field set; expiring in an hour.
fn full_message(qos: QoS) -> Result<Message, Error> {
    let mut m = Message::new(
        topic("sensors/kitchen/temperature")?,
        Bytes::from_static(b"{\"celsius\": 21.5}"),
        qos,
        true,
    );
    m.properties = MessageProperties {
        payload_format_indicator: Some(true),
        content_type: Some(s("application/json")?),
        response_topic: Some(topic("replies/1")?),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
        user_properties: vec![(s("unit")?, s("C")?), (s("")?, s("empty key")?)],
    };
    m.expires_at = Some(Instant::now() + Duration::from_secs(3600));
    Ok(m)
}

fn delivery(message: Message) -> Delivery {
    Delivery::new(Arc::new(message))
}

type Seed = (String, Vec<u8>, Vec<&'static str>);

fn seeds() -> Result<Vec<Seed>, Error> {
    let valid = |name: &str, bytes: Bytes, kind: &'static str| -> Seed {
        (name.to_owned(), bytes.to_vec(), vec![kind])
    };
    let mut seeds = vec![
        valid(
            "message-minimal",
            encode_message(&minimal_message(QoS::AtMostOnce)?),
            "message",
        ),
        valid(
            "message-full",
            encode_message(&full_message(QoS::ExactlyOnce)?),
            "message",
        ),
        valid(
            "message-empty-payload",
            encode_message(&Message::new(
                topic("a")?,
                Bytes::new(),
                QoS::AtLeastOnce,
                true,
            )),
            "message",
        ),
    ];
    let mut expired = minimal_message(QoS::AtLeastOnce)?;
    expired.expires_at = Instant::now().checked_sub(Duration::from_secs(60));
    seeds.push(valid(
        "message-expired",
        encode_message(&expired),
        "message",
    ));

    seeds.push(valid(
        "delivery-minimal",
        encode_delivery(&delivery(minimal_message(QoS::AtLeastOnce)?)),
        "delivery",
    ));
    let mut full = delivery(full_message(QoS::ExactlyOnce)?);
    full.qos = QoS::AtLeastOnce;
    full.retain = false;
    full.subscription_ids = vec![NonZeroU32::MIN, NonZeroU32::MAX];
    full.shared = Some(filter("sensors/+/temperature")?);
    seeds.push(valid("delivery-full", encode_delivery(&full), "delivery"));
    let mut downgraded = delivery(minimal_message(QoS::ExactlyOnce)?);
    downgraded.qos = QoS::AtMostOnce;
    downgraded.retain = true;
    seeds.push(valid(
        "delivery-qos0-retained",
        encode_delivery(&downgraded),
        "delivery",
    ));

    let client_id = ClientId::try_from("fuzz")?;
    let minimal_session = SessionRecord {
        client_id: client_id.clone(),
        expiry_interval: 0,
        subscriptions: Vec::new(),
        will: None,
        disconnected_at: None,
    };
    seeds.push(valid(
        "session-minimal",
        encode_session(&minimal_session),
        "session",
    ));
    let options = |qos, no_local, retain_as_published, retain_handling| SubscriptionOptions {
        qos,
        no_local,
        retain_as_published,
        retain_handling,
    };
    let full_session = SessionRecord {
        client_id,
        expiry_interval: u32::MAX,
        subscriptions: vec![
            (
                filter("a/#")?,
                options(
                    QoS::AtMostOnce,
                    false,
                    false,
                    RetainHandling::SendAtSubscribe,
                ),
                None,
            ),
            (
                filter("+/b/+")?,
                options(QoS::AtLeastOnce, true, false, RetainHandling::SendIfNew),
                NonZeroU32::new(7),
            ),
            (
                filter("c")?,
                options(QoS::ExactlyOnce, true, true, RetainHandling::DoNotSend),
                Some(NonZeroU32::MAX),
            ),
        ],
        will: Some(StoredWill {
            will: Will {
                topic: topic("status/fuzz")?,
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties {
                    will_delay_interval: Some(30),
                    payload_format_indicator: Some(false),
                    message_expiry_interval: Some(600),
                    content_type: Some(s("text/plain")?),
                    response_topic: Some(topic("status/replies")?),
                    correlation_data: Some(Bytes::from_static(b"cd")),
                    user_properties: vec![(s("k")?, s("v")?)],
                },
            },
            delay: 30,
        }),
        disconnected_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
    };
    seeds.push(valid(
        "session-full",
        encode_session(&full_session),
        "session",
    ));

    let id = |n| PacketId::new(n).ok_or("zero packet identifier");
    seeds.push(valid(
        "flow-publish-sent",
        encode_flow(id(1)?, OutboundState::PublishSent),
        "flow",
    ));
    seeds.push(valid(
        "flow-release-sent",
        encode_flow(id(u16::MAX)?, OutboundState::ReleaseSent),
        "flow",
    ));

    // Damaged values, which every decoder must refuse: a changed byte under the checksum, an
    // unknown format, and bodies with a valid checksum that are short, too long, or hold a
    // value no writer produces.
    let invalid = |name: &str, bytes: Vec<u8>| -> Seed { (name.to_owned(), bytes, Vec::new()) };
    let full_delivery = encode_delivery(&full).to_vec();
    let mut flipped = full_delivery.clone();
    if let Some(b) = flipped.last_mut() {
        *b ^= 1;
    }
    seeds.push(invalid("invalid-checksum", flipped));
    let mut format = encode_flow(id(1)?, OutboundState::PublishSent).to_vec();
    if let Some(b) = format.first_mut() {
        *b = 2;
    }
    seeds.push(invalid("invalid-format", format));
    let session = encode_session(&full_session);
    let body = session.get(5..).ok_or("short record")?;
    seeds.push(invalid(
        "invalid-truncated",
        seal_record(body.get(..body.len() - 1).ok_or("empty")?),
    ));
    seeds.push(invalid(
        "invalid-trailing-byte",
        seal_record(&[body, &[0]].concat()),
    ));
    // A flow whose state byte is 3.
    seeds.push(invalid("invalid-flow-state", seal_record(&[0, 1, 3])));
    seeds.push(invalid("invalid-empty", Vec::new()));
    Ok(seeds)
}
