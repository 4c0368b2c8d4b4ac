//! The client role: the fuzzer is the server on the wire and the application behind the
//! machine.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use mqttd_proto::client::{ClientConfig, ClientConnection, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::session::Enqueued;
use mqttd_proto::{
    ClientId, Packet, PacketId, ProtocolVersion, QoS, ReasonCode, SubAck, SubscribeProperties,
    UnsubAck, MAX_SUBSCRIPTION_ID,
};

use super::build::{self, MAX_OPS, MAX_RAW};
use super::input::{ClientOp, ClientSetup};
use super::model::{assert_roundtrip, AckKind, Aliases, Inbound, OutFlows};
use super::Stats;

pub(super) fn run(setup: &ClientSetup, ops: &[ClientOp], stats: &mut Stats) {
    let mut h = Harness::new(setup, stats);
    for op in ops.iter().take(MAX_OPS) {
        h.step(op);
    }
    h.end_connection();
}

fn config(setup: &ClientSetup) -> ClientConfig {
    let mut config = ClientConfig::new(ClientId::try_from("client").unwrap_or_default());
    config.version = build::version(setup.version);
    config.clean_start = !setup.resume;
    config.keep_alive = setup.keep_alive;
    if setup.receive_maximum > 0 {
        config.receive_maximum = setup.receive_maximum;
    }
    if setup.max_packet_size > 0 {
        config.max_packet_size = 64 + u32::from(setup.max_packet_size);
    }
    config.topic_alias_maximum = u16::from(setup.topic_alias_maximum % 5);
    config.authentication =
        build::method(setup.auth_method).map(|m| (m, build::data(setup.auth_data)));
    config.auto_ack = !setup.manual_ack;
    config.session_expiry_interval = setup.session_expiry;
    config.username = setup
        .username
        .then(|| "user".try_into().unwrap_or_default());
    config.password = setup.password.then(|| bytes::Bytes::from_static(b"pass"));
    config.will = setup.will.as_ref().map(build::will);
    config.queue_limits = build::queue_limits(&setup.queue);
    config
}

/// The server's limits, from the CONNACK that accepted the connection.
#[derive(Debug, Clone, Copy)]
struct ServerLimits {
    receive_maximum: usize,
    max_packet_size: u32,
    maximum_qos: QoS,
    retain_available: bool,
}

/// What the server and the application know about the current connection.
#[derive(Debug, Default)]
struct Model {
    connect_sent: bool,
    /// The session expiry interval the CONNECT asked for.
    connect_session_expiry: u32,
    /// A successful CONNACK was fed while connecting: the limits it set.
    server: Option<ServerLimits>,
    disconnect_sent: bool,
    closed: bool,
    /// When a PINGREQ went out with no packet received since.
    ping_unanswered: Option<Instant>,
    out: OutFlows,
    /// SUBSCRIBE and UNSUBSCRIBE awaiting SUBACK or UNSUBACK, and recent ones.
    control: BTreeSet<PacketId>,
    control_recent: Vec<PacketId>,
    aliases: Aliases,
    inbound: Inbound,
    /// Identifiers the server published QoS 2 messages with, for its PUBREL.
    server_qos2: Vec<PacketId>,
}

#[derive(Debug, Default)]
struct Drained {
    packets: Vec<Packet>,
    events: usize,
}

struct Harness<'s> {
    now: Instant,
    config: ClientConfig,
    client: ClientConnection,
    reader: PacketReader,
    buf: BytesMut,
    broken: bool,
    /// Inside `handle_timeout`: a close now is the timer's.
    in_timer: bool,
    m: Model,
    stats: &'s mut Stats,
}

impl<'s> Harness<'s> {
    fn new(setup: &ClientSetup, stats: &'s mut Stats) -> Self {
        let now = Instant::now();
        let config = config(setup);
        let client = ClientConnection::new(config.clone(), None, now);
        let mut h = Self {
            now,
            reader: PacketReader::new(client.max_packet_size()),
            client,
            config,
            buf: BytesMut::new(),
            broken: false,
            in_timer: false,
            m: Model::default(),
            stats,
        };
        h.stats.connections += 1;
        h.drain();
        h
    }

    fn version(&self) -> ProtocolVersion {
        self.client.version()
    }

    fn step(&mut self, op: &ClientOp) {
        let now = self.now;
        match op {
            ClientOp::ConnAck { spec } => self.send(Packet::ConnAck(build::connack(spec))),
            ClientOp::Publish { spec } => {
                let qos = build::qos(spec.message.qos);
                let id = (qos != QoS::AtMostOnce)
                    .then(|| build::packet_id(&spec.id, &self.m.server_qos2));
                self.send(Packet::Publish(build::publish(spec, id)));
            }
            ClientOp::PubAck { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubAck(build::ack(ack, id)));
            }
            ClientOp::PubRec { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubRec(build::ack(ack, id)));
            }
            ClientOp::PubRel { ack } => {
                let id = build::packet_id(&ack.id, &self.m.server_qos2);
                self.send(Packet::PubRel(build::ack(ack, id)));
            }
            ClientOp::PubComp { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubComp(build::ack(ack, id)));
            }
            ClientOp::SubAck { id, reasons } => {
                let packet_id = build::packet_id(id, &self.m.control_recent);
                let mut reasons = build::reason_list(reasons);
                if reasons.is_empty() {
                    reasons.push(ReasonCode::GrantedQoS1);
                }
                self.send(Packet::SubAck(SubAck {
                    packet_id,
                    properties: Default::default(),
                    reasons,
                }));
            }
            ClientOp::UnsubAck { id, reasons } => {
                let packet_id = build::packet_id(id, &self.m.control_recent);
                self.send(Packet::UnsubAck(UnsubAck {
                    packet_id,
                    properties: Default::default(),
                    reasons: build::reason_list(reasons),
                }));
            }
            ClientOp::PingResp => self.send(Packet::PingResp),
            ClientOp::Disconnect {
                reason,
                reason_string,
            } => {
                let mut d = mqttd_proto::Disconnect::new(build::reason(*reason));
                d.properties.reason_string =
                    reason_string.then(|| "bye".try_into().unwrap_or_default());
                self.send(Packet::Disconnect(d));
            }
            ClientOp::Auth { spec } => self.send(Packet::Auth(build::auth(spec))),
            ClientOp::Raw {
                bytes,
                keep_partial,
            } => {
                let bytes = &bytes[..bytes.len().min(MAX_RAW)];
                self.feed(bytes, *keep_partial);
            }
            ClientOp::ConnectionLost => {
                self.broken = true;
                self.client.connection_lost(now);
                self.drain();
            }
            ClientOp::AppPublish { message } => {
                let message = build::message(message, now);
                let result = self.client.publish(now, Arc::new(message));
                let drained = self.drain();
                let publishes = drained
                    .packets
                    .iter()
                    .filter(|p| matches!(p, Packet::Publish(_)))
                    .count();
                assert_eq!(
                    publishes,
                    usize::from(result == Ok(Enqueued::Sent)),
                    "publish() answered {result:?} and sent {:?}",
                    drained.packets
                );
            }
            ClientOp::AppSubscribe {
                filters,
                subscription_id,
            } => {
                let properties = SubscribeProperties {
                    subscription_identifier: NonZeroU32::new(subscription_id % MAX_SUBSCRIPTION_ID),
                    user_properties: Vec::new(),
                };
                let result = self
                    .client
                    .subscribe(build::subscriptions(filters), properties);
                let drained = self.drain();
                let sent: Vec<_> = drained
                    .packets
                    .iter()
                    .filter_map(|p| match p {
                        Packet::Subscribe(s) => Some(s.packet_id),
                        _ => None,
                    })
                    .collect();
                assert_eq!(sent, result.ok().into_iter().collect::<Vec<_>>());
            }
            ClientOp::AppUnsubscribe { filters } => {
                let result = self.client.unsubscribe(build::filters(filters));
                let drained = self.drain();
                let sent: Vec<_> = drained
                    .packets
                    .iter()
                    .filter_map(|p| match p {
                        Packet::Unsubscribe(u) => Some(u.packet_id),
                        _ => None,
                    })
                    .collect();
                assert_eq!(sent, result.ok().into_iter().collect::<Vec<_>>());
            }
            ClientOp::AppAck { id, reason } => {
                let id = build::packet_id(id, &self.m.inbound.awaiting_ids());
                let reason = build::reason(*reason);
                let closed = self.client.is_closed();
                if self.client.ack(id, reason).is_ok() {
                    if closed {
                        let refused = self.version().is_v5() && reason.is_error();
                        self.m.inbound.acked_after_close(id, refused);
                    } else {
                        self.m.inbound.acked(id);
                    }
                }
                self.drain();
            }
            ClientOp::AppAuthContinue { data } => {
                let _ = self.client.auth_continue(build::data(*data));
                self.drain();
            }
            ClientOp::AppReauthenticate { data } => {
                let _ = self.client.reauthenticate(build::data(*data));
                self.drain();
            }
            ClientOp::AppDisconnect {
                reason,
                session_expiry,
            } => {
                self.client
                    .disconnect(now, build::reason(*reason), *session_expiry);
                self.drain();
            }
            ClientOp::Advance { time, fire } => {
                self.now += build::duration(time);
                if *fire {
                    self.fire_timers();
                }
            }
            ClientOp::Timeout => self.timeout(),
            ClientOp::NewConnection { clean_start } => {
                let (session, out, inbound) = self.end_connection();
                self.config.clean_start = *clean_start;
                self.client = ClientConnection::new(self.config.clone(), Some(session), now);
                self.reader = PacketReader::new(self.client.max_packet_size());
                self.buf.clear();
                self.broken = false;
                self.m = Model::default();
                if !clean_start {
                    self.m.out = OutFlows::resume(out.carried());
                    self.m.inbound = inbound;
                }
                self.stats.connections += 1;
                self.drain();
            }
        }
    }

    /// Encodes a server packet for the client's version and feeds it; packets the version
    /// cannot express are never sent.
    fn send(&mut self, packet: Packet) {
        let mut wire = BytesMut::new();
        if packet.encode(self.version(), &mut wire).is_ok() {
            self.feed(&wire, false);
        }
    }

    fn feed(&mut self, bytes: &[u8], keep_partial: bool) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        let version = Some(self.version());
        loop {
            match self.reader.read(&mut self.buf, version) {
                Ok(Some(packet)) => {
                    self.before_packet(&packet);
                    self.client.handle_packet(self.now, packet);
                    self.drain();
                }
                Ok(None) => break,
                Err(e) => {
                    self.stats.decode_errors += 1;
                    self.client.handle_decode_error(self.now, &e);
                    self.broken = true;
                    self.drain();
                    break;
                }
            }
        }
        if !keep_partial {
            self.buf.clear();
        }
    }

    /// The server's view of a packet it sends, in the state before the client reads it.
    fn before_packet(&mut self, packet: &Packet) {
        let connected = self.client.is_connected();
        let connecting = !connected && !self.client.is_closed();
        let v5 = self.version().is_v5();
        let m = &mut self.m;
        if connected {
            m.ping_unanswered = None;
        }
        match packet {
            Packet::ConnAck(ack) if connecting && !ack.reason.is_error() => {
                let p = &ack.properties;
                m.server = Some(ServerLimits {
                    receive_maximum: p
                        .receive_maximum
                        .map_or(usize::from(u16::MAX), |r| usize::from(r.get())),
                    max_packet_size: p.maximum_packet_size.map_or(u32::MAX, NonZeroU32::get),
                    maximum_qos: p.maximum_qos.unwrap_or(QoS::ExactlyOnce),
                    retain_available: p.retain_available.unwrap_or(true),
                });
                m.aliases = Aliases::new(p.topic_alias_maximum.unwrap_or(0), v5);
                if !ack.session_present {
                    // The server kept nothing: the flows start over [MQTT-3.2.2-5].
                    m.out = OutFlows::default();
                    m.inbound = Default::default();
                }
            }
            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => {
                if let Some(id) = p.packet_id {
                    build::remember(&mut m.server_qos2, id);
                }
            }
            Packet::PubAck(r) if connected => {
                m.out.on_ack(AckKind::PubAck, r.packet_id, r.reason);
            }
            Packet::PubRec(r) if connected => {
                m.out.on_ack(AckKind::PubRec, r.packet_id, r.reason);
            }
            Packet::PubComp(r) if connected => {
                m.out.on_ack(AckKind::PubComp, r.packet_id, r.reason);
            }
            Packet::SubAck(SubAck { packet_id, .. })
            | Packet::UnsubAck(UnsubAck { packet_id, .. })
                if connected =>
            {
                m.control.remove(packet_id);
            }
            _ => {}
        }
    }

    /// Drains what the machine produced and checks it. Events first: with automatic
    /// acknowledgement the PUBREC of a message is queued before its event, and the event must
    /// be judged by the state before that PUBREC.
    fn drain(&mut self) -> Drained {
        let closed_before = self.m.closed;
        let mut drained = Drained::default();
        while let Some(event) = self.client.poll_event() {
            self.on_event(event);
            drained.events += 1;
        }
        while let Some(packet) = self.client.poll_transmit(self.now) {
            assert!(
                !closed_before,
                "{packet:?} transmitted after the connection was closed"
            );
            self.on_transmit(&packet);
            drained.packets.push(packet);
        }
        assert_eq!(
            self.client.is_closed(),
            self.m.closed,
            "is_closed() disagrees with the Closed event"
        );
        drained
    }

    fn on_transmit(&mut self, packet: &Packet) {
        let version = self.version();
        assert_roundtrip(packet, version);
        let m = &mut self.m;
        assert!(
            !m.disconnect_sent,
            "{packet:?} transmitted after DISCONNECT"
        );
        match packet {
            Packet::Connect(c) => {
                assert!(!m.connect_sent, "a second CONNECT [MQTT-3.1.0-2]");
                assert_eq!(c.protocol, version, "CONNECT for another version");
                m.connect_sent = true;
                m.connect_session_expiry = c.properties.session_expiry_interval.unwrap_or(0);
            }
            other => assert!(m.connect_sent, "{other:?} before CONNECT [MQTT-3.1.0-1]"),
        }
        match packet {
            Packet::Publish(p) => {
                let limits = m
                    .server
                    .unwrap_or_else(|| panic!("PUBLISH before a successful CONNACK: {p:?}"));
                m.aliases.resolve(p);
                let size = packet.encoded_len(version);
                assert!(
                    size as u64 <= u64::from(limits.max_packet_size),
                    "PUBLISH of {size} bytes to a server whose maximum packet size is {} \
                     [MQTT-3.1.2-24]",
                    limits.max_packet_size
                );
                let resend = m.out.is_resend(p);
                if resend {
                    self.stats.resent += 1;
                } else {
                    assert!(
                        p.qos <= limits.maximum_qos,
                        "PUBLISH at {:?} to a server whose maximum QoS is {:?} [MQTT-3.2.2-11]",
                        p.qos,
                        limits.maximum_qos
                    );
                    assert!(
                        !p.retain || limits.retain_available,
                        "retained PUBLISH to a server without retain support [MQTT-3.2.2-14]"
                    );
                }
                if let Some(id) = p.packet_id {
                    assert!(
                        !m.control.contains(&id),
                        "PUBLISH {id} while SUBSCRIBE or UNSUBSCRIBE {id} awaits its answer \
                         [MQTT-2.2.1-3]"
                    );
                }
                m.out.on_publish(p, limits.receive_maximum);
            }
            Packet::Subscribe(s) => self.on_control(s.packet_id),
            Packet::Unsubscribe(u) => self.on_control(u.packet_id),
            Packet::PingReq => {
                assert!(m.server.is_some(), "PINGREQ before CONNACK");
                m.ping_unanswered.get_or_insert(self.now);
            }
            Packet::PubRel(r) => {
                if m.out.flows.get(&r.packet_id).is_some_and(|f| !f.counted) {
                    self.stats.resent += 1;
                }
                m.out.on_pubrel(r.packet_id);
            }
            Packet::Disconnect(d) => {
                if m.connect_session_expiry == 0 {
                    assert!(
                        d.properties.session_expiry_interval.unwrap_or(0) == 0,
                        "DISCONNECT sets a session expiry though CONNECT asked for none \
                         [MQTT-3.14.2-2]: {d:?}"
                    );
                }
                m.disconnect_sent = true;
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                panic!("the client sent a server's packet: {packet:?}")
            }
            Packet::Connect(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Auth(_) => {}
        }
        self.m.inbound.on_transmit(packet);
    }

    /// A SUBSCRIBE or UNSUBSCRIBE went out with `id`.
    fn on_control(&mut self, id: PacketId) {
        let m = &mut self.m;
        assert!(
            !m.out.flows.contains_key(&id),
            "SUBSCRIBE or UNSUBSCRIBE {id} while PUBLISH {id} is in flight [MQTT-2.2.1-3]"
        );
        assert!(
            m.control.insert(id),
            "SUBSCRIBE or UNSUBSCRIBE {id} while another one awaits its answer [MQTT-2.2.1-3]"
        );
        build::remember(&mut m.control_recent, id);
    }

    fn on_event(&mut self, event: Event) {
        let m = &mut self.m;
        assert!(!m.closed, "{event:?} after the Closed event");
        match event {
            Event::Connected(_) => {
                assert!(m.server.is_some(), "Connected without a successful CONNACK");
                self.stats.connected += 1;
            }
            Event::AuthChallenge { .. } => self.stats.auth_steps += 1,
            Event::ReAuthenticated { .. } => self.stats.reauthenticated += 1,
            Event::Publish(p) => {
                let receive_maximum = usize::from(self.config.receive_maximum);
                m.inbound.on_handed_on(
                    p.packet_id,
                    p.message.qos,
                    receive_maximum,
                    !self.config.auto_ack,
                );
            }
            Event::Delivered {
                packet_id,
                reason,
                delivery,
            } => {
                if reason == ReasonCode::PacketTooLarge {
                    m.out.on_discarded(packet_id);
                }
                if delivery.qos == QoS::ExactlyOnce {
                    self.stats.qos2_sent += 1;
                }
            }
            Event::Rejected(_) | Event::SubAck(_) | Event::UnsubAck(_) => {}
            Event::Closed { reason, .. } => {
                if reason == ReasonCode::KeepAliveTimeout && self.in_timer {
                    assert!(
                        m.ping_unanswered.is_some(),
                        "keep alive timeout without an unanswered PINGREQ"
                    );
                }
                if matches!(
                    reason,
                    ReasonCode::KeepAliveTimeout | ReasonCode::MaximumConnectTime
                ) {
                    self.stats.timed_out += 1;
                }
                m.closed = true;
            }
        }
    }

    fn fire_timers(&mut self) {
        for _ in 0..3 {
            let due = self.client.poll_timeout();
            if due.is_none_or(|t| t > self.now) {
                return;
            }
            self.in_timer = true;
            self.client.handle_timeout(self.now);
            let drained = self.drain();
            self.in_timer = false;
            assert!(
                !drained.packets.is_empty()
                    || drained.events > 0
                    || self.client.poll_timeout() != due,
                "handle_timeout(now) did nothing though poll_timeout() is {:?} before now: \
                 a driver would spin",
                due.map(|t| self.now - t)
            );
        }
        let due = self.client.poll_timeout();
        assert!(
            due.is_none_or(|t| t > self.now),
            "timer still due after three calls to handle_timeout"
        );
    }

    fn timeout(&mut self) {
        let due = self.client.poll_timeout();
        if due.is_some_and(|t| t <= self.now) {
            return self.fire_timers();
        }
        self.client.handle_timeout(self.now);
        let drained = self.drain();
        assert!(
            drained.packets.is_empty() && drained.events == 0,
            "handle_timeout before the deadline {due:?} acted: {drained:?}"
        );
        assert_eq!(
            self.client.poll_timeout(),
            due,
            "handle_timeout moved the deadline"
        );
    }

    /// Ends the connection if it is open and takes the session, with what the server knows
    /// about its flows.
    fn end_connection(&mut self) -> (mqttd_proto::session::Session, OutFlows, Inbound) {
        if !self.client.is_closed() {
            self.client.connection_lost(self.now);
            self.drain();
        }
        let session = self
            .client
            .take_session()
            .unwrap_or_else(|| panic!("no session after the connection closed"));
        assert!(self.client.take_session().is_none(), "session taken twice");
        (session, self.m.out.clone(), self.m.inbound.carried())
    }
}
