//! The `broker` target: a script of packets, raw bytes, closes and time steps from several
//! clients driving the real broker's connection tasks over in-memory streams
//! ([`FuzzBroker`]), on a current-thread runtime with paused time, with the broker's
//! invariants checked from what each client sent and received.
//!
//! The input is read a byte at a time ([`Script`]): each step names a client ([`SLOTS`] of
//! them) and an operation ([`op`]) with its arguments. A structured CONNECT, SUBSCRIBE or
//! PUBLISH picks from small tables (client identifiers, filters with wildcards and a shared
//! one, topics), and every publication and will gets a payload of its own, so that each
//! message can be followed to whoever receives it. After every step the runtime runs until
//! every task waits, and everything the broker wrote is read and checked.
//!
//! Everything a client writes, raw bytes included, is also read with the codec as the broker
//! reads it, so the model knows which CONNECT, SUBSCRIBE, PUBLISH and acknowledgements the
//! broker can have seen. A session (the model's view of one) collects every filter any of its
//! connections asked for, and is carried over exactly when the broker says it is (session
//! present; MQTT 3.1, which cannot say, is assumed to resume when it asked to). Checked:
//!
//! - the broker never panics or hangs: steps are bounded, time is virtual, and at the end a
//!   shutdown must end every task;
//! - everything it writes reads back with `mqttd-proto`'s decoder, as the client's version;
//! - CONNACK first (or AUTH), once; nothing after a refusing CONNACK or a DISCONNECT; no
//!   DISCONNECT to an MQTT 3 client; no session present for a clean start or a refusal;
//! - every PUBLISH a client receives matches a filter its session asked for, at no more than
//!   the highest QoS asked for with it and the QoS it was published with, on the topic it was
//!   published to, with topic aliases within what the client allowed and set before use;
//! - a QoS 2 message (published once) reaches a session at QoS 2 at most once per filter of
//!   the session that matches it, not counting retained copies and resends with DUP of the
//!   same packet identifier before PUBREL;
//! - a QoS 2 PUBLISH a client resends with DUP before its PUBREL is not routed again;
//! - no more QoS 1 and 2 messages unacknowledged on a connection than its receive maximum
//!   and the broker's in-flight window;
//! - SUBACK, UNSUBACK, PUBACK, PUBREC and PUBCOMP answer a packet the client sent on that
//!   connection, with one reason per filter and no more than the QoS asked for;
//! - a will is never published after its client ended with a normal DISCONNECT;
//! - malformed input closes that client's connection, and the others keep working: at the
//!   end every connection still in good standing answers PINGREQ, and a new client can
//!   subscribe, publish and receive its own message.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU16;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_broker::fuzzing::{small_config, FuzzBroker};
use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Disconnect, DisconnectProperties, Packet, PacketId,
    ProtocolVersion, PubResponse, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    Subscribe, SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, TopicName,
    Unsubscribe, Will, WillProperties,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::session::build::{FILTERS, TOPICS};
use crate::MAX_PACKET_SIZE;

/// Clients the script plays.
pub const SLOTS: usize = 3;
/// Most steps run per input.
pub const MAX_STEPS: usize = 64;
/// Most raw bytes written in one step.
pub const MAX_RAW: usize = 64;
/// Client identifiers a structured CONNECT picks from; the empty one asks for an assigned one.
pub const CLIENT_IDS: [&str; 4] = ["c0", "c1", "c2", ""];
/// Time steps, in milliseconds.
pub const TIME_STEPS: [u64; 6] = [1, 100, 1_000, 5_000, 30_000, 120_000];
/// The broker's window of messages in flight per client (`small_config`).
const MAX_INFLIGHT: usize = 4;
/// Long enough, in virtual time, for every task to finish what a step started.
const SETTLE: Duration = Duration::from_millis(50);
/// Above this many publications a subscriber's queue could fill and make a publisher wait
/// (no longer read) for real time to pass: the checks that need the broker to read stop.
const CALM_PUBLICATIONS: usize = 500;

/// Operation codes: a step's first byte is `op * SLOTS + slot` ([`step`]).
pub mod op {
    /// CONNECT on a new stream: version and flags, client identifier and will, keep alive.
    pub const CONNECT: u8 = 0;
    /// SUBSCRIBE: a bit set of filters, then QoS and options.
    pub const SUBSCRIBE: u8 = 1;
    /// UNSUBSCRIBE from one filter.
    pub const UNSUBSCRIBE: u8 = 2;
    /// PUBLISH: topic, QoS and retain.
    pub const PUBLISH: u8 = 3;
    /// One acknowledgement the client owes (PUBACK, PUBREC, PUBREL, PUBCOMP), by index.
    pub const ACK: u8 = 4;
    /// Every acknowledgement the client owes, in order.
    pub const ACK_ALL: u8 = 5;
    /// DISCONNECT: normal, or with the will.
    pub const DISCONNECT: u8 = 6;
    /// The client closes its stream.
    pub const CLOSE: u8 = 7;
    /// Raw bytes: a length, then the bytes.
    pub const RAW: u8 = 8;
    /// Virtual time passes: an index into `TIME_STEPS`.
    pub const TIME: u8 = 9;
    /// PINGREQ.
    pub const PING: u8 = 10;
    /// The last QoS 1 or 2 PUBLISH again, with DUP.
    pub const RESEND: u8 = 11;
    /// How many there are.
    pub const COUNT: u8 = 12;
}

/// The byte that starts a step of `op` for client `slot`.
pub fn step(slot: u8, op: u8) -> u8 {
    op * SLOTS as u8 + slot % SLOTS as u8
}

/// What a run did, so that the seed program can check its scripts get where they mean to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful CONNACKs.
    pub connected: usize,
    /// CONNACKs with session present.
    pub resumed: usize,
    /// PUBLISH packets clients received.
    pub delivered: usize,
    /// QoS 2 deliveries completed by PUBCOMP on the subscriber's side.
    pub qos2_completed: usize,
    /// Connections the broker ended with DISCONNECT.
    pub disconnected: usize,
    /// Client streams that were malformed (as the codec reads them).
    pub malformed: usize,
    /// Wills received.
    pub wills: usize,
}

/// Reads the script a byte at a time; an exhausted script reads as nothing.
pub struct Script<'a> {
    data: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn arg(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        taken
    }
}

/// One client session as the model sees it.
#[derive(Debug, Default)]
struct SessionModel {
    /// Every filter a connection of the session asked for, with the highest QoS asked.
    filters: HashMap<TopicFilter, QoS>,
    /// QoS 2 deliveries counted per payload.
    qos2: HashMap<Bytes, usize>,
    /// QoS 2 deliveries waiting for PUBREL: packet identifier → payload.
    awaiting_release: HashMap<u16, Bytes>,
    /// Packet identifiers of every QoS 2 delivery.
    qos2_ids: HashSet<u16>,
}

type SessionRef = Rc<RefCell<SessionModel>>;

/// An acknowledgement a client owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Ack(PacketId),
    Rec(PacketId),
    Rel(PacketId),
    Comp(PacketId),
}

/// A publication, as the broker can have read it.
#[derive(Debug, Default)]
struct Publication {
    count: usize,
    topics: HashSet<TopicName>,
    max_qos: u8,
    will: bool,
}

/// One client connection: its stream, what it sent (as the broker reads it) and what it got.
struct Conn {
    number: usize,
    stream: Option<DuplexStream>,
    /// Whether the client wrote anything yet.
    wrote: bool,
    // What the client sent, read as the broker reads it.
    sent: BytesMut,
    sent_reader: PacketReader,
    connect: Option<Connect>,
    malformed: bool,
    /// The CONNACK version to read a refusal of an unreadable CONNECT with.
    refusal_version: Option<ProtocolVersion>,
    filters: HashMap<TopicFilter, QoS>,
    subscribes: HashMap<u16, Vec<QoS>>,
    unsubscribes: HashMap<u16, usize>,
    qos1_sent: HashSet<u16>,
    qos2_sent: HashSet<u16>,
    /// QoS 2 publications without PUBREL yet: packet identifier → payload.
    qos2_open: HashMap<u16, Bytes>,
    releases_sent: HashSet<u16>,
    pings_sent: usize,
    will: Option<Bytes>,
    // What the client received.
    received: BytesMut,
    reader: PacketReader,
    connack: Option<bool>,
    ended: bool,
    eof: bool,
    session: Option<SessionRef>,
    aliases: HashMap<u16, TopicName>,
    /// QoS 1 and 2 deliveries not acknowledged by the client yet.
    unacked: HashSet<u16>,
    owed: Vec<Owed>,
    pings_answered: usize,
    /// PUBACK and PUBCOMP packets received.
    acks_received: usize,
    /// Payloads of the PUBLISH packets received.
    payloads_received: Vec<Bytes>,
    next_id: u16,
    last_publish: Option<Publish>,
}

impl Conn {
    fn new(number: usize, stream: DuplexStream) -> Self {
        Self {
            number,
            stream: Some(stream),
            wrote: false,
            sent: BytesMut::new(),
            sent_reader: PacketReader::new(small_config().max_packet_size),
            connect: None,
            malformed: false,
            refusal_version: None,
            filters: HashMap::new(),
            subscribes: HashMap::new(),
            unsubscribes: HashMap::new(),
            qos1_sent: HashSet::new(),
            qos2_sent: HashSet::new(),
            qos2_open: HashMap::new(),
            releases_sent: HashSet::new(),
            pings_sent: 0,
            will: None,
            received: BytesMut::new(),
            reader: PacketReader::new(MAX_PACKET_SIZE),
            connack: None,
            ended: false,
            eof: false,
            session: None,
            aliases: HashMap::new(),
            unacked: HashSet::new(),
            owed: Vec::new(),
            pings_answered: 0,
            acks_received: 0,
            payloads_received: Vec::new(),
            next_id: 0,
            last_publish: None,
        }
    }

    fn version(&self) -> Option<ProtocolVersion> {
        self.connect.as_ref().map(|c| c.protocol)
    }

    fn packet_id(&mut self) -> PacketId {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        PacketId::new(self.next_id).unwrap_or(PacketId::MIN)
    }

    /// Whether the connection is up as far as the client knows, and its stream in step.
    fn in_good_standing(&self) -> bool {
        self.stream.is_some()
            && self.connack == Some(true)
            && !self.ended
            && !self.eof
            && !self.malformed
            && self.sent.is_empty()
    }
}

/// The whole model: the clients, the sessions and every publication.
struct Harness {
    broker: FuzzBroker,
    slots: [Option<Conn>; SLOTS],
    opened: usize,
    latest: HashMap<ClientId, SessionRef>,
    publications: HashMap<Bytes, Publication>,
    /// Wills whose clients ended with a normal DISCONNECT.
    cancelled_wills: HashSet<Bytes>,
    /// PUBLISH packets clients wrote, as read.
    published: usize,
    next_payload: u32,
    stats: Stats,
    log: Vec<String>,
}

/// Runs one script; panics on the first broken invariant.
pub fn run(data: &[u8]) -> Stats {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let Ok(runtime) = runtime else {
        panic!("cannot build a runtime");
    };
    runtime.block_on(async {
        let mut h = Harness::new();
        h.run(Script { data }).await;
        // For reading what an input does: `BROKER_FUZZ_LOG=1 cargo fuzz run broker FILE`.
        if std::env::var_os("BROKER_FUZZ_LOG").is_some() {
            eprintln!("{}", h.log.join("\n"));
        }
        h.stats
    })
}

impl Harness {
    fn new() -> Self {
        Self {
            broker: FuzzBroker::new(small_config()),
            slots: Default::default(),
            opened: 0,
            latest: HashMap::new(),
            publications: HashMap::new(),
            cancelled_wills: HashSet::new(),
            published: 0,
            next_payload: 0,
            stats: Stats::default(),
            log: Vec::new(),
        }
    }

    /// Panics with what happened so far.
    fn fail(&self, what: String) -> ! {
        panic!(
            "broker invariant broken: {what}\nsteps so far:\n  {}",
            self.log.join("\n  ")
        );
    }

    async fn run(&mut self, mut script: Script<'_>) {
        for _ in 0..MAX_STEPS {
            let Some(first) = script.byte() else {
                break;
            };
            let slot = usize::from(first) % SLOTS;
            let code = (first / SLOTS as u8) % op::COUNT;
            self.step(slot, code, &mut script).await;
            tokio::time::sleep(SETTLE).await;
            self.drain_all().await;
        }
        self.finish().await;
    }

    fn payload(&mut self, kind: u8) -> Bytes {
        self.next_payload += 1;
        let mut p = vec![kind];
        p.extend_from_slice(&self.next_payload.to_be_bytes());
        Bytes::from(p)
    }

    /// The slot's connection, opening one if it has none.
    fn conn(&mut self, slot: usize) -> &mut Conn {
        if self.slots[slot].is_none() {
            self.open(slot);
        }
        match &mut self.slots[slot] {
            Some(conn) => conn,
            None => unreachable!("opened above"),
        }
    }

    fn open(&mut self, slot: usize) {
        self.opened += 1;
        let stream = self.broker.connect();
        self.slots[slot] = Some(Conn::new(self.opened, stream));
    }

    async fn step(&mut self, slot: usize, code: u8, script: &mut Script<'_>) {
        match code {
            op::CONNECT => {
                let (a, b, c) = (script.arg(), script.arg(), script.arg());
                let connect = self.structured_connect(a, b, c);
                // A CONNECT starts a new stream unless this one has sent nothing yet.
                if self.slots[slot].as_ref().is_some_and(|conn| conn.wrote) {
                    self.slots[slot] = None;
                }
                self.send(slot, Packet::Connect(Box::new(connect))).await;
            }
            op::SUBSCRIBE => {
                let (a, b) = (script.arg(), script.arg());
                let qos = QoS::from_bits((b & 3) % 3).unwrap_or_default();
                let filters = (0..FILTERS.len())
                    .filter(|i| a & (1 << i) != 0)
                    .chain(std::iter::once(usize::from(a) % FILTERS.len()))
                    .collect::<HashSet<_>>();
                let mut filters: Vec<_> = filters.into_iter().collect();
                filters.sort_unstable();
                let packet_id = self.conn(slot).packet_id();
                let subscribe = Subscribe {
                    packet_id,
                    properties: SubscribeProperties {
                        subscription_identifier: (b & 0x80 != 0).then_some(
                            std::num::NonZeroU32::MIN.saturating_add(u32::from(b & 0x0F)),
                        ),
                        user_properties: Vec::new(),
                    },
                    filters: filters
                        .into_iter()
                        .map(|i| Subscription {
                            filter: filter(i),
                            options: SubscriptionOptions {
                                qos,
                                no_local: b & 0x04 != 0,
                                retain_as_published: b & 0x08 != 0,
                                retain_handling: match ((b >> 4) & 3) % 3 {
                                    0 => RetainHandling::SendAtSubscribe,
                                    1 => RetainHandling::SendIfNew,
                                    _ => RetainHandling::DoNotSend,
                                },
                            },
                        })
                        .collect(),
                };
                self.send(slot, Packet::Subscribe(subscribe)).await;
            }
            op::UNSUBSCRIBE => {
                let a = script.arg();
                let packet_id = self.conn(slot).packet_id();
                let unsubscribe = Unsubscribe {
                    packet_id,
                    user_properties: Vec::new(),
                    filters: vec![filter(usize::from(a))],
                };
                self.send(slot, Packet::Unsubscribe(unsubscribe)).await;
            }
            op::PUBLISH => {
                let a = script.arg();
                let qos = QoS::from_bits((a >> 2) % 3).unwrap_or_default();
                let payload = self.payload(b'm');
                let packet_id = (qos != QoS::AtMostOnce).then(|| self.conn(slot).packet_id());
                let publish = Publish {
                    dup: false,
                    qos,
                    retain: a & 0x10 != 0,
                    topic: topic(a),
                    packet_id,
                    properties: PublishProperties::default(),
                    payload,
                };
                self.send(slot, Packet::Publish(publish)).await;
            }
            op::ACK => {
                let a = usize::from(script.arg());
                let conn = self.conn(slot);
                if !conn.owed.is_empty() {
                    let owed = conn.owed.remove(a % conn.owed.len());
                    self.send(slot, owed_packet(owed)).await;
                }
            }
            op::ACK_ALL => {
                let owed = std::mem::take(&mut self.conn(slot).owed);
                for owed in owed {
                    self.send(slot, owed_packet(owed)).await;
                }
            }
            op::DISCONNECT => {
                let a = script.arg();
                let reason = if a & 1 == 0 {
                    ReasonCode::Success
                } else {
                    ReasonCode::DisconnectWithWillMessage
                };
                let conn = self.conn(slot);
                // A will is cancelled by a normal DISCONNECT the broker reads while the
                // connection is up (an earlier close would show as the end of the stream).
                let cancels = reason == ReasonCode::Success && conn.in_good_standing();
                let will = conn.will.clone().filter(|_| cancels);
                let disconnect = Disconnect {
                    reason,
                    properties: DisconnectProperties::default(),
                };
                self.send(slot, Packet::Disconnect(disconnect)).await;
                if let Some(will) = will {
                    self.cancelled_wills.insert(will);
                }
            }
            op::CLOSE => {
                if let Some(conn) = &mut self.slots[slot] {
                    conn.stream = None;
                }
                self.log.push(format!("client {slot}: close"));
            }
            op::RAW => {
                let len = usize::from(script.arg()) % (MAX_RAW + 1);
                let raw = script.bytes(len).to_vec();
                self.write(slot, &raw, format!("raw {raw:02X?}")).await;
            }
            op::TIME => {
                let ms = TIME_STEPS[usize::from(script.arg()) % TIME_STEPS.len()];
                self.log.push(format!("{ms} ms pass"));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            op::PING => {
                self.send(slot, Packet::PingReq).await;
            }
            op::RESEND => {
                if let Some(mut publish) = self.conn(slot).last_publish.clone() {
                    publish.dup = true;
                    self.send(slot, Packet::Publish(publish)).await;
                }
            }
            _ => {}
        }
    }

    fn structured_connect(&mut self, a: u8, b: u8, c: u8) -> Connect {
        let protocol = crate::session::build::version(a & 3);
        let v5 = protocol == ProtocolVersion::V5;
        let will = (b & 0x10 != 0).then(|| Will {
            topic: topic(b >> 5),
            payload: self.payload(b'w'),
            qos: QoS::from_bits((b >> 2) % 3).unwrap_or_default(),
            retain: false,
            properties: WillProperties {
                will_delay_interval: (v5 && c & 0x40 != 0).then_some(u32::from(c & 0x0F)),
                ..WillProperties::default()
            },
        });
        Connect {
            protocol,
            clean_start: a & 0x04 == 0,
            keep_alive: if c & 0x80 != 0 { 60 } else { 0 },
            client_id: ClientId::try_from(CLIENT_IDS[usize::from(b) % CLIENT_IDS.len()])
                .unwrap_or_default(),
            will,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: (v5 && a & 0x08 != 0).then_some(if a & 0x10 != 0 {
                    u32::MAX
                } else {
                    60
                }),
                receive_maximum: (v5 && a & 0x20 != 0).then_some(NonZeroU16::MIN),
                topic_alias_maximum: (v5 && a & 0x40 != 0).then_some(2),
                ..ConnectProperties::default()
            },
        }
    }

    /// Writes a packet as the client, encoded for the connection's version.
    async fn send(&mut self, slot: usize, packet: Packet) {
        let conn = self.conn(slot);
        let version = match &packet {
            Packet::Connect(c) => c.protocol,
            _ => conn.version().unwrap_or(ProtocolVersion::V3_1_1),
        };
        if let Packet::Publish(p) = &packet {
            if p.qos != QoS::AtMostOnce {
                conn.last_publish = Some(p.clone());
            }
        }
        let mut buf = BytesMut::new();
        if let Err(e) = packet.encode(version, &mut buf) {
            // Some structured packets do not exist in every version (no AUTH in 3.1.1).
            self.log
                .push(format!("client {slot}: cannot encode {packet:?}: {e}"));
            return;
        }
        self.write(slot, &buf, format!("{packet:?}")).await;
    }

    async fn write(&mut self, slot: usize, bytes: &[u8], what: String) {
        self.conn(slot);
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        let number = conn.number;
        let Some(stream) = &mut conn.stream else {
            self.log.push(format!(
                "client {slot} (#{number}): closed, not sent: {what}"
            ));
            return;
        };
        // The buffer is far larger than a script writes: a write that waits means the
        // broker stopped reading, and the bytes simply stay unread.
        let wrote = tokio::time::timeout(Duration::ZERO, stream.write_all(bytes)).await;
        if !matches!(wrote, Ok(Ok(()))) {
            self.log
                .push(format!("client {slot} (#{number}): write failed: {what}"));
            return;
        }
        self.log.push(format!("client {slot} (#{number}): {what}"));
        conn.wrote = true;
        conn.sent.extend_from_slice(bytes);
        self.read_sent(slot);
    }

    /// Reads what `slot` sent as the broker reads it, and records what each packet means.
    fn read_sent(&mut self, slot: usize) {
        loop {
            let Some(conn) = &mut self.slots[slot] else {
                return;
            };
            if conn.malformed {
                conn.sent.clear();
                return;
            }
            let version = conn.version();
            match conn.sent_reader.read(&mut conn.sent, version) {
                Ok(Some(packet)) => self.client_sent(slot, packet),
                Ok(None) => return,
                Err(e) => {
                    conn.malformed = true;
                    // The broker answers a broken CONNECT in its version; a first packet of a
                    // protocol level or name it does not speak, in 3.1.1's format (return code
                    // 0x01), which every version can read [MQTT-3.1.2-2].
                    let unknown_level = matches!(
                        e,
                        DecodeError::UnsupportedProtocolLevel(_) | DecodeError::InvalidProtocolName
                    );
                    conn.refusal_version = e.connect_version().or_else(|| {
                        (unknown_level && conn.connect.is_none()).then_some(ProtocolVersion::V3_1_1)
                    });
                    conn.sent.clear();
                    self.stats.malformed += 1;
                    self.log.push(format!("client {slot}: malformed: {e}"));
                    return;
                }
            }
        }
    }

    fn client_sent(&mut self, slot: usize, packet: Packet) {
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        match packet {
            Packet::Connect(connect) if conn.connect.is_none() => {
                if let Some(will) = &connect.will {
                    conn.will = Some(will.payload.clone());
                    let p = self.publications.entry(will.payload.clone()).or_default();
                    p.count += 1;
                    p.topics.insert(will.topic.clone());
                    p.max_qos = p.max_qos.max(will.qos.bits());
                    p.will = true;
                }
                conn.connect = Some(*connect);
            }
            Packet::Publish(publish) => {
                self.published += 1;
                let id = publish.packet_id.map(PacketId::get);
                // A QoS 2 resend before PUBREL is the same publication [MQTT-4.3.3-10].
                let resend = publish.dup
                    && id.is_some_and(|id| conn.qos2_open.get(&id) == Some(&publish.payload));
                match (publish.qos, id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        conn.qos1_sent.insert(id);
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        conn.qos2_sent.insert(id);
                        if !resend {
                            conn.qos2_open.insert(id, publish.payload.clone());
                        }
                    }
                    _ => {}
                }
                let p = self
                    .publications
                    .entry(publish.payload.clone())
                    .or_default();
                if !resend {
                    p.count += 1;
                }
                // A topic alias alone names no topic the model can check.
                if !publish.topic.is_empty() {
                    p.topics.insert(publish.topic.clone());
                } else {
                    p.count += 2;
                }
                p.max_qos = p.max_qos.max(publish.qos.bits());
            }
            Packet::PubRel(r) => {
                conn.releases_sent.insert(r.packet_id.get());
                conn.qos2_open.remove(&r.packet_id.get());
            }
            Packet::PubAck(r) => {
                conn.unacked.remove(&r.packet_id.get());
            }
            Packet::PubComp(r) => {
                conn.unacked.remove(&r.packet_id.get());
                self.stats.qos2_completed += 1;
            }
            Packet::PubRec(r) if r.reason.is_error() => {
                conn.unacked.remove(&r.packet_id.get());
            }
            Packet::Subscribe(s) => {
                let mut asked = Vec::new();
                for sub in s.filters {
                    asked.push(sub.options.qos);
                    let qos = conn.filters.entry(sub.filter.clone()).or_default();
                    *qos = (*qos).max(sub.options.qos);
                    if let Some(session) = &conn.session {
                        let mut session = session.borrow_mut();
                        let qos = session.filters.entry(sub.filter).or_default();
                        *qos = (*qos).max(sub.options.qos);
                    }
                }
                conn.subscribes.insert(s.packet_id.get(), asked);
            }
            Packet::Unsubscribe(u) => {
                conn.unsubscribes.insert(u.packet_id.get(), u.filters.len());
            }
            Packet::PingReq => conn.pings_sent += 1,
            _ => {}
        }
    }

    async fn drain_all(&mut self) {
        for slot in 0..SLOTS {
            self.drain(slot).await;
        }
    }

    /// Reads and checks everything the broker wrote to `slot` so far.
    async fn drain(&mut self, slot: usize) {
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        let Some(stream) = &mut conn.stream else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::ZERO, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    conn.eof = true;
                    break;
                }
                Ok(Ok(n)) => conn.received.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        loop {
            let Some(conn) = &mut self.slots[slot] else {
                return;
            };
            if conn.received.is_empty() {
                return;
            }
            let Some(version) = conn.version().or(conn.refusal_version) else {
                let bytes = conn.received.clone();
                self.fail(format!(
                    "client {slot}: broker wrote {bytes:02X?} before it could read a CONNECT"
                ));
            };
            match conn.reader.read(&mut conn.received, Some(version)) {
                Ok(Some(packet)) => self.received(slot, version, packet),
                Ok(None) => return,
                Err(e) => {
                    let bytes = conn.received.clone();
                    self.fail(format!(
                        "client {slot}: broker wrote unreadable {bytes:02X?} ({version}): {e}"
                    ));
                }
            }
        }
    }

    /// Checks one packet the broker sent to `slot`.
    fn received(&mut self, slot: usize, version: ProtocolVersion, packet: Packet) {
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        let number = conn.number;
        let what = format!("{packet:?}");
        let short: String = what.chars().take(300).collect();
        self.log
            .push(format!("client {slot} (#{number}) got: {short}"));
        if conn.ended {
            self.fail(format!(
                "client {slot}: {what} after the broker ended the connection"
            ));
        }
        match packet {
            Packet::ConnAck(ack) => {
                if conn.connack.is_some() {
                    self.fail(format!("client {slot}: a second CONNACK {what}"));
                }
                let accepted = !ack.reason.is_error();
                conn.connack = Some(accepted);
                let Some(connect) = &conn.connect else {
                    // The refusal of a CONNECT the broker could not read.
                    if accepted {
                        self.fail(format!("client {slot}: accepted an unreadable CONNECT"));
                    }
                    conn.ended = true;
                    return;
                };
                if ack.session_present && (connect.clean_start || !accepted) {
                    self.fail(format!(
                        "client {slot}: session present with clean start or a refusal: {what}"
                    ));
                }
                if !accepted {
                    conn.ended = true;
                    return;
                }
                self.stats.connected += 1;
                let resumed = !connect.clean_start
                    && (ack.session_present || connect.protocol == ProtocolVersion::V3_1);
                self.stats.resumed += usize::from(ack.session_present);
                let id = if connect.client_id.is_empty() {
                    ack.properties.assigned_client_identifier.clone()
                } else {
                    Some(connect.client_id.clone())
                };
                let session = match &id {
                    Some(id) if resumed => self.latest.get(id).cloned(),
                    _ => None,
                }
                .unwrap_or_default();
                if let Some(id) = id {
                    self.latest.insert(id, session.clone());
                }
                {
                    let mut s = session.borrow_mut();
                    for (filter, qos) in &conn.filters {
                        let q = s.filters.entry(filter.clone()).or_default();
                        *q = (*q).max(*qos);
                    }
                }
                conn.session = Some(session);
            }
            Packet::Auth(_) if version == ProtocolVersion::V5 && conn.connack.is_none() => {}
            _ if conn.connack != Some(true) => {
                self.fail(format!("client {slot}: {what} before CONNACK"));
            }
            Packet::Publish(publish) => self.delivered(slot, publish),
            Packet::PubAck(r) => {
                conn.acks_received += 1;
                if !conn.qos1_sent.contains(&r.packet_id.get()) {
                    self.fail(format!(
                        "client {slot}: PUBACK for no QoS 1 PUBLISH: {what}"
                    ));
                }
            }
            Packet::PubRec(r) => {
                if !conn.qos2_sent.contains(&r.packet_id.get()) {
                    self.fail(format!(
                        "client {slot}: PUBREC for no QoS 2 PUBLISH: {what}"
                    ));
                }
                if !r.reason.is_error() {
                    conn.owed.push(Owed::Rel(r.packet_id));
                }
            }
            Packet::PubComp(r) => {
                conn.acks_received += 1;
                if !conn.releases_sent.contains(&r.packet_id.get()) {
                    self.fail(format!("client {slot}: PUBCOMP for no PUBREL: {what}"));
                }
            }
            Packet::PubRel(r) => {
                let id = r.packet_id.get();
                let known = conn
                    .session
                    .as_ref()
                    .is_some_and(|s| s.borrow().qos2_ids.contains(&id));
                if !known {
                    self.fail(format!(
                        "client {slot}: PUBREL for no QoS 2 delivery: {what}"
                    ));
                }
                if let Some(s) = &conn.session {
                    s.borrow_mut().awaiting_release.remove(&id);
                }
                conn.owed.retain(|o| *o != Owed::Rec(r.packet_id));
                conn.owed.push(Owed::Comp(r.packet_id));
            }
            Packet::SubAck(ack) => {
                let Some(asked) = conn.subscribes.remove(&ack.packet_id.get()) else {
                    self.fail(format!("client {slot}: SUBACK for no SUBSCRIBE: {what}"));
                };
                if ack.reasons.len() != asked.len() {
                    self.fail(format!("client {slot}: SUBACK for {asked:?}: {what}"));
                }
                for (reason, asked) in ack.reasons.iter().zip(&asked) {
                    let granted = match reason {
                        ReasonCode::Success => Some(QoS::AtMostOnce),
                        ReasonCode::GrantedQoS1 => Some(QoS::AtLeastOnce),
                        ReasonCode::GrantedQoS2 => Some(QoS::ExactlyOnce),
                        _ => None,
                    };
                    if granted.is_some_and(|g| g > *asked) {
                        self.fail(format!(
                            "client {slot}: SUBACK grants more than {asked:?}: {what}"
                        ));
                    }
                }
            }
            Packet::UnsubAck(ack) => {
                let Some(count) = conn.unsubscribes.remove(&ack.packet_id.get()) else {
                    self.fail(format!(
                        "client {slot}: UNSUBACK for no UNSUBSCRIBE: {what}"
                    ));
                };
                if version == ProtocolVersion::V5 && ack.reasons.len() != count {
                    self.fail(format!(
                        "client {slot}: UNSUBACK for {count} filters: {what}"
                    ));
                }
            }
            Packet::PingResp => {
                conn.pings_answered += 1;
                if conn.pings_answered > conn.pings_sent {
                    self.fail(format!("client {slot}: PINGRESP without PINGREQ"));
                }
            }
            Packet::Disconnect(_) => {
                if version != ProtocolVersion::V5 {
                    self.fail(format!(
                        "client {slot}: DISCONNECT to an MQTT {version} client"
                    ));
                }
                conn.ended = true;
                self.stats.disconnected += 1;
            }
            _ => self.fail(format!(
                "client {slot}: the broker sent a client's packet: {what}"
            )),
        }
    }

    /// Checks a PUBLISH the broker sent to `slot`, which is connected.
    fn delivered(&mut self, slot: usize, publish: Publish) {
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        self.stats.delivered += 1;
        conn.payloads_received.push(publish.payload.clone());
        let what = format!("{publish:?}");
        let Some(session) = conn.session.clone() else {
            self.fail(format!("client {slot}: PUBLISH without a session: {what}"));
        };
        let alias_max = conn
            .connect
            .as_ref()
            .and_then(|c| c.properties.topic_alias_maximum)
            .unwrap_or(0);
        let topic = match publish.properties.topic_alias {
            Some(alias) if alias.get() > alias_max => {
                self.fail(format!(
                    "client {slot}: topic alias beyond {alias_max}: {what}"
                ));
            }
            Some(alias) if publish.topic.is_empty() => match conn.aliases.get(&alias.get()) {
                Some(topic) => topic.clone(),
                None => self.fail(format!("client {slot}: unknown topic alias: {what}")),
            },
            Some(alias) => {
                conn.aliases.insert(alias.get(), publish.topic.clone());
                publish.topic.clone()
            }
            None => publish.topic.clone(),
        };
        let s = session.borrow();
        let matching: Vec<(&TopicFilter, QoS)> = s
            .filters
            .iter()
            .chain(&conn.filters)
            .filter(|(f, _)| f.matches(&topic))
            .map(|(f, q)| (f, *q))
            .collect();
        let Some(most) = matching.iter().map(|(_, q)| *q).max() else {
            let held: std::collections::BTreeSet<String> = s
                .filters
                .keys()
                .chain(conn.filters.keys())
                .map(|f| f.as_str().to_owned())
                .collect();
            drop(matching);
            self.fail(format!(
                "client {slot}: PUBLISH on {topic:?} matches no filter of its session {held:?}: {what}"
            ));
        };
        if publish.qos > most {
            self.fail(format!(
                "client {slot}: PUBLISH above the QoS asked for ({most:?}): {what}"
            ));
        }
        let filters: HashSet<&TopicFilter> = matching.iter().map(|(f, _)| *f).collect();
        let copies_allowed = filters.len();
        drop(s);
        let mut once = false;
        if let Some(p) = self.publications.get(&publish.payload) {
            if p.will {
                self.stats.wills += 1;
            }
            if p.count == 1 {
                once = true;
                if !p.topics.contains(&topic) {
                    self.fail(format!(
                        "client {slot}: PUBLISH on another topic than {:?}: {what}",
                        p.topics
                    ));
                }
                if publish.qos.bits() > p.max_qos {
                    self.fail(format!(
                        "client {slot}: PUBLISH above its QoS {}: {what}",
                        p.max_qos
                    ));
                }
            }
        }
        if self.cancelled_wills.contains(&publish.payload) {
            self.fail(format!(
                "client {slot}: a will after a normal DISCONNECT: {what}"
            ));
        }
        let Some(conn) = &mut self.slots[slot] else {
            return;
        };
        if let Some(id) = publish.packet_id {
            let fresh = conn.unacked.insert(id.get());
            let receive_max = conn
                .connect
                .as_ref()
                .and_then(|c| c.properties.receive_maximum)
                .map_or(usize::from(u16::MAX), |m| usize::from(m.get()));
            if fresh && conn.unacked.len() > receive_max.min(MAX_INFLIGHT) {
                let unacked = conn.unacked.clone();
                self.fail(format!(
                    "client {slot}: {unacked:?} unacknowledged, beyond {receive_max} and {MAX_INFLIGHT}: {what}"
                ));
            }
            conn.owed.push(match publish.qos {
                QoS::ExactlyOnce => Owed::Rec(id),
                _ => Owed::Ack(id),
            });
        }
        if publish.qos == QoS::ExactlyOnce {
            let Some(id) = publish.packet_id.map(PacketId::get) else {
                return;
            };
            let mut s = session.borrow_mut();
            let resend = publish.dup && s.awaiting_release.get(&id) == Some(&publish.payload);
            s.qos2_ids.insert(id);
            s.awaiting_release.insert(id, publish.payload.clone());
            if once && !resend && !publish.retain {
                let count = s.qos2.entry(publish.payload.clone()).or_default();
                *count += 1;
                let count = *count;
                drop(s);
                if count > copies_allowed {
                    self.fail(format!(
                        "client {slot}: QoS 2 message delivered {count} times to a session with {copies_allowed} matching filters: {what}"
                    ));
                }
            }
        }
    }

    /// The end of a script: what must hold once it is over.
    async fn finish(&mut self) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.drain_all().await;
        let calm = self.published < CALM_PUBLICATIONS;
        for slot in 0..SLOTS {
            let Some(conn) = &self.slots[slot] else {
                continue;
            };
            // Malformed input ends that connection.
            if calm && conn.malformed && conn.stream.is_some() && !conn.eof {
                self.fail(format!(
                    "client {slot}: malformed input, but the connection is still open"
                ));
            }
        }
        // Every connection in good standing still answers.
        let live: Vec<usize> = (0..SLOTS)
            .filter(|&s| self.slots[s].as_ref().is_some_and(Conn::in_good_standing))
            .collect();
        for &slot in &live {
            self.send(slot, Packet::PingReq).await;
        }
        tokio::time::sleep(SETTLE).await;
        self.drain_all().await;
        for &slot in &live {
            let Some(conn) = &self.slots[slot] else {
                continue;
            };
            if calm && !conn.ended && !conn.eof && conn.pings_answered < conn.pings_sent {
                self.fail(format!("client {slot}: no PINGRESP"));
            }
        }
        // What the script did, not the check.
        let stats = self.stats;
        self.final_client().await;
        self.stats = stats;
        if !self.broker.shutdown(Duration::from_secs(30)).await {
            self.fail("tasks still running 30 s after shutdown".into());
        }
        let open = self.broker.metrics().connections_open.get();
        if open != 0 {
            self.fail(format!("{open} connections open after shutdown"));
        }
    }

    /// A new client must still get through: CONNECT, SUBSCRIBE, PUBLISH to itself, PINGREQ.
    async fn final_client(&mut self) {
        let slot = 0;
        self.slots[slot] = None;
        let client_id = ClientId::try_from("final").unwrap_or_default();
        let connect = Connect {
            protocol: ProtocolVersion::V3_1_1,
            clean_start: true,
            keep_alive: 0,
            client_id,
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        };
        let check = TopicName::try_from("final/check").unwrap_or_else(|_| TopicName::empty());
        let payload = Bytes::from_static(b"fence");
        let id = PacketId::MIN;
        let packets = [
            Packet::Connect(Box::new(connect)),
            Packet::Subscribe(Subscribe {
                packet_id: id,
                properties: SubscribeProperties::default(),
                filters: vec![Subscription {
                    filter: TopicFilter::try_from("final/check").unwrap_or_else(|_| filter(0)),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                }],
            }),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: check,
                packet_id: Some(id),
                properties: PublishProperties::default(),
                payload: payload.clone(),
            }),
            Packet::PingReq,
        ];
        for packet in packets {
            self.send(slot, packet).await;
        }
        tokio::time::sleep(SETTLE).await;
        self.drain(slot).await;
        let Some(conn) = &self.slots[slot] else {
            return;
        };
        let ok = conn.connack == Some(true)
            && conn.subscribes.is_empty()
            && conn.pings_answered == 1
            && conn.acks_received == 1
            && conn.payloads_received.contains(&payload);
        if !ok {
            self.fail(
                "a new client did not get CONNACK, SUBACK, its own message and PINGRESP".into(),
            );
        }
    }
}

fn topic(x: u8) -> TopicName {
    TopicName::try_from(TOPICS[usize::from(x) % TOPICS.len()])
        .unwrap_or_else(|_| TopicName::empty())
}

fn filter(x: usize) -> TopicFilter {
    let text = FILTERS[x % FILTERS.len()];
    TopicFilter::try_from(text).unwrap_or_else(|e| panic!("filter {text}: {e}"))
}

fn owed_packet(owed: Owed) -> Packet {
    let ack = |packet_id| PubResponse {
        packet_id,
        reason: ReasonCode::Success,
        properties: Default::default(),
    };
    match owed {
        Owed::Ack(id) => Packet::PubAck(ack(id)),
        Owed::Rec(id) => Packet::PubRec(ack(id)),
        Owed::Rel(id) => Packet::PubRel(ack(id)),
        Owed::Comp(id) => Packet::PubComp(ack(id)),
    }
}
