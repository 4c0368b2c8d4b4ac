//! The server role: the fuzzer is the client on the wire and the broker behind the machine.

use std::time::Instant;

use bytes::BytesMut;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Accept, ConnectRequest, Event, ServerConfig, ServerConnection};
use mqttd_proto::session::{Enqueued, QueueLimits, Session, SessionEvent, NEVER_EXPIRES};
use mqttd_proto::{
    ClientId, Packet, PacketId, ProtocolVersion, QoS, ReasonCode, Subscribe, Unsubscribe,
};

use super::build::{self, MAX_OPS, MAX_RAW, MAX_STORED};
use super::input::{ServerOp, ServerSetup, SessionChoice};
use super::model::{assert_roundtrip, AckKind, Aliases, Inbound, OutFlows};
use super::Stats;

pub(super) fn run(setup: &ServerSetup, ops: &[ServerOp], stats: &mut Stats) {
    let mut h = Harness::new(setup, stats);
    for op in ops.iter().take(MAX_OPS) {
        h.step(op);
    }
    h.end_connection(false, false);
}

fn config(setup: &ServerSetup) -> ServerConfig {
    let default = ServerConfig::default();
    let nonzero = |x: u8, default: u16| if x == 0 { default } else { u16::from(x) };
    ServerConfig {
        max_packet_size: if setup.max_packet_size == 0 {
            default.max_packet_size
        } else {
            64 + u32::from(setup.max_packet_size)
        },
        receive_maximum: nonzero(setup.receive_maximum, default.receive_maximum),
        max_inflight_messages: nonzero(setup.max_inflight, default.max_inflight_messages),
        topic_alias_maximum: match setup.topic_alias_maximum % 5 {
            0 => default.topic_alias_maximum,
            n => u16::from(n - 1),
        },
        maximum_qos: match setup.maximum_qos % 3 {
            0 => QoS::ExactlyOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::AtMostOnce,
        },
        retain_available: setup.unavailable & 1 == 0,
        subscription_identifiers_available: setup.unavailable & 2 == 0,
        wildcard_subscription_available: setup.unavailable & 4 == 0,
        shared_subscription_available: setup.unavailable & 8 == 0,
        max_keepalive: u16::from(setup.max_keepalive),
        max_session_expiry: if setup.max_session_expiry == 0 {
            NEVER_EXPIRES
        } else {
            setup.max_session_expiry
        },
        ..default
    }
}

/// The client's limits, from its CONNECT.
#[derive(Debug, Clone)]
struct ClientLimits {
    version: ProtocolVersion,
    keep_alive: u16,
    will: bool,
    auth_method: Option<mqttd_proto::MqttStr>,
    receive_maximum: usize,
    max_packet_size: u32,
}

/// What the client and the broker know about the current connection.
#[derive(Debug, Default)]
struct Model {
    client: Option<ClientLimits>,
    /// The CONNECT the broker has been asked about and not answered yet.
    request: Option<ConnectRequest>,
    accepted: bool,
    connack: Option<mqttd_proto::ConnAck>,
    disconnect_sent: bool,
    closed: bool,
    /// The keep alive in force and when the client was last heard from, once connected.
    keep_alive: u16,
    last_heard: Option<Instant>,
    /// How the connection ended.
    close: Option<(ReasonCode, bool)>,
    out: OutFlows,
    aliases: Aliases,
    inbound: Inbound,
    /// Identifiers the client published QoS 2 messages with, for its PUBREL.
    client_qos2: Vec<PacketId>,
    /// SUBSCRIBE and UNSUBSCRIBE awaiting the broker's answer, with their filter counts.
    subscribes: Vec<(PacketId, usize)>,
    unsubscribes: Vec<(PacketId, usize)>,
}

/// A session the broker stored, with what the client knows about it.
struct Stored {
    session: Session,
    out: OutFlows,
    inbound: Inbound,
}

/// The packets and the number of events one drain produced.
#[derive(Debug, Default)]
struct Drained {
    packets: Vec<Packet>,
    events: usize,
}

struct Harness<'s> {
    now: Instant,
    config: ServerConfig,
    queue: QueueLimits,
    conn: ServerConnection,
    reader: PacketReader,
    buf: BytesMut,
    /// The transport is gone or the stream was refused: nothing more is read.
    broken: bool,
    /// Inside `handle_timeout`: a close now is the timer's.
    in_timer: bool,
    /// The version the client encodes with before the server knows one.
    client_version: ProtocolVersion,
    m: Model,
    store: Vec<Stored>,
    stats: &'s mut Stats,
}

impl<'s> Harness<'s> {
    fn new(setup: &ServerSetup, stats: &'s mut Stats) -> Self {
        let now = Instant::now();
        let config = config(setup);
        let conn = ServerConnection::new(config.clone(), now);
        stats.connections += 1;
        Self {
            now,
            reader: PacketReader::new(conn.max_packet_size()),
            conn,
            config,
            queue: build::queue_limits(&setup.queue),
            buf: BytesMut::new(),
            broken: false,
            in_timer: false,
            client_version: ProtocolVersion::V5,
            m: Model::default(),
            store: Vec::new(),
            stats,
        }
    }

    fn v5(&self) -> bool {
        self.conn.version().is_some_and(ProtocolVersion::is_v5)
    }

    fn step(&mut self, op: &ServerOp) {
        let now = self.now;
        match op {
            ServerOp::Connect { spec } => {
                let connect = build::connect(spec);
                self.client_version = connect.protocol;
                self.send(Packet::Connect(Box::new(connect)));
            }
            ServerOp::Publish { spec } => {
                let qos = build::qos(spec.message.qos);
                let id = (qos != QoS::AtMostOnce)
                    .then(|| build::packet_id(&spec.id, &self.m.client_qos2));
                self.send(Packet::Publish(build::publish(spec, id)));
            }
            ServerOp::PubAck { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubAck(build::ack(ack, id)));
            }
            ServerOp::PubRec { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubRec(build::ack(ack, id)));
            }
            ServerOp::PubRel { ack } => {
                let id = build::packet_id(&ack.id, &self.m.client_qos2);
                self.send(Packet::PubRel(build::ack(ack, id)));
            }
            ServerOp::PubComp { ack } => {
                let id = build::packet_id(&ack.id, &self.m.out.recent);
                self.send(Packet::PubComp(build::ack(ack, id)));
            }
            ServerOp::Subscribe {
                id,
                filters,
                subscription_id,
            } => self.send(Packet::Subscribe(Subscribe {
                packet_id: PacketId::new(*id).unwrap_or(PacketId::MIN),
                properties: mqttd_proto::SubscribeProperties {
                    subscription_identifier: std::num::NonZeroU32::new(
                        subscription_id % mqttd_proto::MAX_SUBSCRIPTION_ID,
                    ),
                    user_properties: Vec::new(),
                },
                filters: build::subscriptions(filters),
            })),
            ServerOp::Unsubscribe { id, filters } => self.send(Packet::Unsubscribe(Unsubscribe {
                packet_id: PacketId::new(*id).unwrap_or(PacketId::MIN),
                user_properties: Vec::new(),
                filters: build::filters(filters),
            })),
            ServerOp::PingReq => self.send(Packet::PingReq),
            ServerOp::Disconnect {
                reason,
                session_expiry,
                reason_string,
            } => {
                let mut d = mqttd_proto::Disconnect::new(build::reason(*reason));
                d.properties.session_expiry_interval = *session_expiry;
                d.properties.reason_string =
                    reason_string.then(|| "bye".try_into().unwrap_or_default());
                self.send(Packet::Disconnect(d));
            }
            ServerOp::Auth { spec } => self.send(Packet::Auth(build::auth(spec))),
            ServerOp::Raw {
                bytes,
                keep_partial,
            } => {
                let bytes = &bytes[..bytes.len().min(MAX_RAW)];
                self.feed(bytes, *keep_partial);
            }
            ServerOp::ConnectionLost => {
                self.broken = true;
                self.conn.connection_lost(now);
                self.drain();
            }
            ServerOp::Accept {
                session,
                assign_client_id,
                auth_data,
                user_properties,
                response_information,
            } => self.accept(
                session,
                *assign_client_id,
                *auth_data,
                *user_properties,
                *response_information,
            ),
            ServerOp::Reject { reason } => {
                let may = (self.m.request.is_some() && !self.conn.is_closed())
                    || self.conn.is_connected();
                let result = self.conn.reject(now, build::reason(*reason));
                assert_eq!(result.is_ok(), may, "reject() answered {result:?}");
                self.m.request = None;
                self.drain();
            }
            ServerOp::AuthContinue { data } => {
                let _ = self.conn.auth_continue(build::data(*data));
                self.drain();
            }
            ServerOp::ReauthSuccess { data } => {
                if self.conn.reauth_success(build::data(*data)).is_ok() {
                    self.stats.reauthenticated += 1;
                }
                self.drain();
            }
            ServerOp::PublishAck { id, reason } => {
                let id = build::packet_id(id, &self.m.inbound.awaiting_ids());
                self.publish_ack(id, build::reason(*reason));
            }
            ServerOp::SubscribeAck { id, reasons } => {
                let ids: Vec<_> = self.m.subscribes.iter().map(|(id, _)| *id).collect();
                let id = build::packet_id(id, &ids);
                let mut reasons = build::reason_list(reasons);
                if reasons.is_empty() {
                    let n = self
                        .m
                        .subscribes
                        .iter()
                        .find(|(i, _)| *i == id)
                        .map_or(1, |s| s.1);
                    reasons = vec![ReasonCode::GrantedQoS1; n];
                }
                if self.conn.subscribe_ack(id, reasons).is_ok() {
                    self.m.subscribes.retain(|(i, _)| *i != id);
                }
                self.drain();
            }
            ServerOp::UnsubscribeAck { id, reasons } => {
                let ids: Vec<_> = self.m.unsubscribes.iter().map(|(id, _)| *id).collect();
                let id = build::packet_id(id, &ids);
                let mut reasons = build::reason_list(reasons);
                if reasons.is_empty() {
                    let n = self
                        .m
                        .unsubscribes
                        .iter()
                        .find(|(i, _)| *i == id)
                        .map_or(1, |s| s.1);
                    reasons = vec![ReasonCode::Success; n];
                }
                if self.conn.unsubscribe_ack(id, reasons).is_ok() {
                    self.m.unsubscribes.retain(|(i, _)| *i != id);
                }
                self.drain();
            }
            ServerOp::Deliver {
                message,
                subscription_ids,
            } => {
                let delivery = build::delivery(message, subscription_ids, now);
                let outcome = self.conn.deliver(now, delivery);
                let drained = self.drain();
                let publishes = drained
                    .packets
                    .iter()
                    .filter(|p| matches!(p, Packet::Publish(_)))
                    .count();
                assert_eq!(
                    publishes,
                    usize::from(outcome == Enqueued::Sent),
                    "deliver() answered {outcome:?} and sent {:?}",
                    drained.packets
                );
            }
            ServerOp::ServerDisconnect { reason } => {
                self.conn.disconnect(now, build::reason(*reason));
                self.drain();
            }
            ServerOp::Advance { time, fire } => {
                self.now += build::duration(time);
                if *fire {
                    self.fire_timers();
                }
            }
            ServerOp::Timeout => self.timeout(),
            ServerOp::NewConnection {
                takeover,
                ack_pending,
            } => {
                self.end_connection(*takeover, *ack_pending);
                self.conn = ServerConnection::new(self.config.clone(), now);
                self.reader = PacketReader::new(self.conn.max_packet_size());
                self.buf.clear();
                self.broken = false;
                self.client_version = ProtocolVersion::V5;
                self.m = Model::default();
                self.stats.connections += 1;
            }
            ServerOp::SessionTimers { index } => self.session_timers(*index),
        }
    }

    /// Encodes a client packet as the client would and feeds it; packets the version cannot
    /// express (AUTH before 5.0) are never sent.
    fn send(&mut self, packet: Packet) {
        let version = match &packet {
            Packet::Connect(c) => c.protocol,
            _ => self.conn.version().unwrap_or(self.client_version),
        };
        let mut wire = BytesMut::new();
        if packet.encode(version, &mut wire).is_ok() {
            self.feed(&wire, false);
        }
    }

    /// Feeds bytes as a transport does: cut into packets, a refused stream reported and
    /// closed. The state is drained after every packet, so the model follows packet by packet.
    fn feed(&mut self, bytes: &[u8], keep_partial: bool) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.reader.read(&mut self.buf, self.conn.version()) {
                Ok(Some(packet)) => {
                    self.before_packet(&packet);
                    self.conn.handle_packet(self.now, packet);
                    self.drain();
                }
                Ok(None) => break,
                Err(e) => {
                    self.stats.decode_errors += 1;
                    self.conn.handle_decode_error(self.now, &e);
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

    /// The client's view of a packet it sends, in the state before the server reads it.
    fn before_packet(&mut self, packet: &Packet) {
        let closed = self.conn.is_closed();
        let connected = self.conn.is_connected();
        let handshake = !closed && !connected && self.conn.version().is_some();
        let m = &mut self.m;
        if connected {
            m.last_heard = Some(self.now);
        }
        let ack = match packet {
            Packet::Connect(c) if !closed && self.conn.version().is_none() => {
                let p = &c.properties;
                m.client = Some(ClientLimits {
                    version: c.protocol,
                    keep_alive: c.keep_alive,
                    will: c.will.is_some(),
                    auth_method: p.authentication_method.clone(),
                    receive_maximum: p
                        .receive_maximum
                        .map_or(usize::from(u16::MAX), |r| usize::from(r.get())),
                    max_packet_size: p.maximum_packet_size.map_or(u32::MAX, |m| m.get()),
                });
                m.aliases = Aliases::new(p.topic_alias_maximum.unwrap_or(0), c.protocol.is_v5());
                None
            }
            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => {
                if let Some(id) = p.packet_id {
                    build::remember(&mut m.client_qos2, id);
                }
                None
            }
            Packet::PubAck(r) => Some((AckKind::PubAck, r)),
            Packet::PubRec(r) => Some((AckKind::PubRec, r)),
            Packet::PubComp(r) => Some((AckKind::PubComp, r)),
            _ => None,
        };
        if let Some((kind, r)) = ack {
            if connected {
                m.out.on_ack(kind, r.packet_id, r.reason);
            } else if handshake {
                m.out.early.push((kind, r.packet_id, r.reason));
            }
        }
    }

    fn accept(
        &mut self,
        choice: &SessionChoice,
        assign_client_id: bool,
        auth_data: Option<u8>,
        user_properties: u8,
        response_information: bool,
    ) {
        let pending =
            self.m.request.is_some() && !self.conn.is_closed() && !self.conn.is_connected();
        let (client_id, expiry) = self.m.request.as_ref().map_or_else(
            || (ClientId::default(), 0),
            |r| (r.connect.client_id.clone(), r.session_expiry_interval),
        );
        let stored = match *choice {
            SessionChoice::Fresh => None,
            SessionChoice::Stored { index } | SessionChoice::StoredCopy { index }
                if !self.store.is_empty() =>
            {
                let i = usize::from(index) % self.store.len();
                if matches!(choice, SessionChoice::Stored { .. }) {
                    Some(self.store.remove(i))
                } else {
                    let s = &self.store[i];
                    Some(Stored {
                        session: s.session.clone(),
                        out: s.out.clone(),
                        inbound: s.inbound.clone(),
                    })
                }
            }
            _ => None,
        };
        let present = stored.is_some();
        let (session, out, inbound) = match stored {
            Some(s) => (s.session, s.out, s.inbound),
            None => (
                Session::new(client_id.clone(), expiry, self.queue),
                OutFlows::default(),
                Inbound::default(),
            ),
        };
        let mut accept = Accept::new(session, present);
        if assign_client_id && client_id.is_empty() {
            accept.assigned_client_id = ClientId::try_from("assigned-1").ok();
        }
        accept.authentication_data = build::data(auth_data);
        accept.user_properties = (0..user_properties % 3)
            .filter_map(|_| Some(("k".try_into().ok()?, "v".try_into().ok()?)))
            .collect();
        if response_information {
            accept.response_information = "response/".try_into().ok();
        }
        let result = self.conn.accept(self.now, accept);
        assert_eq!(
            result.is_ok(),
            pending,
            "accept() answered {result:?} with a CONNECT pending: {pending}"
        );
        if result.is_ok() {
            self.m.accepted = true;
            self.m.request = None;
            let early = std::mem::take(&mut self.m.out.early);
            self.m.out = OutFlows::resume(out.carried());
            self.m.out.early = early;
            self.m.inbound = inbound.carried();
        }
        self.drain();
        self.m.out.end_replay();
    }

    fn publish_ack(&mut self, id: PacketId, reason: ReasonCode) {
        let closed = self.conn.is_closed();
        let result = self.conn.publish_ack(id, reason);
        let awaited = self.m.inbound.awaiting.iter().any(|(a, _)| *a == id);
        if awaited && (self.conn.is_connected() || self.conn.session().is_some()) {
            assert!(
                result.is_ok(),
                "publish_ack({id}) of a message handed on: {result:?}"
            );
        }
        if result.is_ok() {
            if closed {
                self.m
                    .inbound
                    .acked_after_close(id, self.v5() && reason.is_error());
            } else {
                self.m.inbound.acked(id);
            }
        }
        self.drain();
    }

    /// Drains what the machine produced and checks it.
    fn drain(&mut self) -> Drained {
        let closed_before = self.m.closed;
        let mut drained = Drained::default();
        let packets: Vec<_> = std::iter::from_fn(|| self.conn.poll_transmit()).collect();
        let events: Vec<_> = std::iter::from_fn(|| self.conn.poll_event()).collect();
        // A flow discarded on resume frees its identifier before anything else is sent.
        for event in &events {
            if let Event::Delivered {
                packet_id,
                reason: ReasonCode::PacketTooLarge,
                ..
            } = event
            {
                self.m.out.on_discarded(*packet_id);
            }
        }
        for packet in packets {
            assert!(
                !closed_before,
                "{packet:?} transmitted after the connection was closed"
            );
            self.on_transmit(&packet);
            drained.packets.push(packet);
        }
        for event in events {
            self.on_event(event);
            drained.events += 1;
        }
        assert_eq!(
            self.conn.is_closed(),
            self.m.closed,
            "is_closed() disagrees with the Closed event"
        );
        drained
    }

    fn on_transmit(&mut self, packet: &Packet) {
        let version = self
            .conn
            .version()
            .unwrap_or_else(|| panic!("{packet:?} transmitted before the version is known"));
        assert_roundtrip(packet, version);
        let m = &mut self.m;
        assert!(
            !m.disconnect_sent,
            "{packet:?} transmitted after DISCONNECT"
        );
        if !version.is_v5() {
            assert!(
                !matches!(packet, Packet::Auth(_) | Packet::Disconnect(_)),
                "{packet:?} sent to an MQTT {version} client"
            );
        }
        match packet {
            Packet::ConnAck(ack) => {
                assert!(m.connack.is_none(), "a second CONNACK: {ack:?}");
                if ack.reason.is_error() {
                    assert!(
                        !ack.session_present,
                        "session present with an error [MQTT-3.2.2-6]"
                    );
                } else {
                    let client = m.client.as_ref();
                    let method = client.and_then(|c| c.auth_method.as_ref());
                    assert_eq!(
                        ack.properties.authentication_method.as_ref(),
                        method,
                        "CONNACK authentication method [MQTT-4.12.0-5, MQTT-4.12.0-6]"
                    );
                    m.keep_alive = ack
                        .properties
                        .server_keep_alive
                        .unwrap_or(client.map_or(0, |c| c.keep_alive));
                    m.last_heard = Some(self.now);
                    self.stats.connected += 1;
                }
                m.connack = Some(ack.clone());
            }
            Packet::Auth(auth) => {
                assert!(
                    m.connack
                        .as_ref()
                        .is_none_or(|a| a.reason == ReasonCode::Success),
                    "AUTH after a refused CONNACK"
                );
                let method = m.client.as_ref().and_then(|c| c.auth_method.as_ref());
                assert!(
                    method.is_some() && auth.properties.authentication_method.as_ref() == method,
                    "AUTH {auth:?} to a client whose CONNECT named the authentication method \
                     {method:?} [MQTT-4.12.0-5, MQTT-4.12.0-6]"
                );
            }
            other => assert!(
                m.connack
                    .as_ref()
                    .is_some_and(|a| a.reason == ReasonCode::Success),
                "{other:?} sent without a successful CONNACK before it [MQTT-3.2.0-1]"
            ),
        }
        match packet {
            Packet::Publish(p) => {
                let limits = m
                    .client
                    .clone()
                    .unwrap_or_else(|| panic!("PUBLISH before CONNECT"));
                assert_eq!(limits.version, version);
                m.aliases.resolve(p);
                let size = packet.encoded_len(version);
                assert!(
                    size as u64 <= u64::from(limits.max_packet_size),
                    "PUBLISH of {size} bytes to a client whose maximum packet size is {} \
                     [MQTT-3.1.2-24]",
                    limits.max_packet_size
                );
                let window = limits
                    .receive_maximum
                    .min(usize::from(self.config.max_inflight_messages))
                    .max(1);
                if m.out.is_resend(p) {
                    self.stats.resent += 1;
                }
                m.out.on_publish(p, window);
            }
            Packet::PubRel(r) => {
                if m.out.flows.get(&r.packet_id).is_some_and(|f| !f.counted) {
                    self.stats.resent += 1;
                }
                m.out.on_pubrel(r.packet_id);
            }
            Packet::Disconnect(_) => m.disconnect_sent = true,
            _ => {}
        }
        m.inbound.on_transmit(packet);
        if !m.out.early.is_empty() {
            m.out.apply_early();
        }
    }

    fn on_event(&mut self, event: Event) {
        let m = &mut self.m;
        assert!(!m.closed, "{event:?} after the Closed event");
        match event {
            Event::Connect(request) => {
                assert!(
                    m.request.is_none() && !m.accepted,
                    "a second Connect event: {request:?}"
                );
                m.request = Some(request);
            }
            Event::AuthContinue { .. } | Event::ReAuthenticate { .. } => {
                self.stats.auth_steps += 1;
            }
            Event::Publish(p) => {
                let receive_maximum = usize::from(self.config.receive_maximum);
                m.inbound
                    .on_handed_on(p.packet_id, p.message.qos, receive_maximum, true);
            }
            Event::Subscribe(s) => m.subscribes.push((s.packet_id, s.filters.len())),
            Event::Unsubscribe(u) => m.unsubscribes.push((u.packet_id, u.filters.len())),
            Event::Delivered { delivery, .. } => {
                if delivery.qos == QoS::ExactlyOnce {
                    self.stats.qos2_sent += 1;
                }
            }
            Event::InboundReleased { .. } => self.stats.qos2_received += 1,
            Event::Released { .. } | Event::Sent { .. } => {}
            Event::Closed { reason, by_client } => {
                if reason == ReasonCode::KeepAliveTimeout && self.in_timer {
                    // [MQTT-3.1.2-22]: one and a half times the keep alive without a packet.
                    let ka = std::time::Duration::from_secs(m.keep_alive.into());
                    assert!(
                        m.keep_alive > 0
                            && m.last_heard.is_some_and(|t| self.now >= t + ka * 3 / 2),
                        "keep alive timeout with keep alive {ka:?}, client last heard {:?} ago",
                        m.last_heard.map(|t| self.now - t)
                    );
                }
                if matches!(
                    reason,
                    ReasonCode::KeepAliveTimeout | ReasonCode::MaximumConnectTime
                ) {
                    self.stats.timed_out += 1;
                }
                m.closed = true;
                m.close = Some((reason, by_client));
                m.request = None;
            }
            // A new kind of event must be taught to this model of the broker.
            other => panic!("unhandled server event {other:?}"),
        }
    }

    /// Runs due timers as a driver does, asserting that each call makes progress.
    fn fire_timers(&mut self) {
        for _ in 0..3 {
            let due = self.conn.poll_timeout();
            if due.is_none_or(|t| t > self.now) {
                return;
            }
            self.in_timer = true;
            self.conn.handle_timeout(self.now);
            let drained = self.drain();
            self.in_timer = false;
            assert!(
                !drained.packets.is_empty()
                    || drained.events > 0
                    || self.conn.poll_timeout() != due,
                "handle_timeout(now) did nothing though poll_timeout() is {:?} before now: \
                 a driver would spin",
                due.map(|t| self.now - t)
            );
        }
        let due = self.conn.poll_timeout();
        assert!(
            due.is_none_or(|t| t > self.now),
            "timer still due after three calls to handle_timeout"
        );
    }

    /// `handle_timeout(now)` whatever is due: before the deadline it must do nothing.
    fn timeout(&mut self) {
        let due = self.conn.poll_timeout();
        if due.is_some_and(|t| t <= self.now) {
            return self.fire_timers();
        }
        self.conn.handle_timeout(self.now);
        let drained = self.drain();
        assert!(
            drained.packets.is_empty() && drained.events == 0,
            "handle_timeout before the deadline {due:?} acted: {drained:?}"
        );
        assert_eq!(
            self.conn.poll_timeout(),
            due,
            "handle_timeout moved the deadline"
        );
    }

    /// Ends the connection (takeover or lost transport) if it is open, acknowledges what the
    /// broker still owes if asked, and stores the session.
    fn end_connection(&mut self, takeover: bool, ack_pending: bool) {
        if !self.conn.is_closed() {
            if takeover {
                self.conn.disconnect(self.now, ReasonCode::SessionTakenOver);
            } else {
                self.conn.connection_lost(self.now);
            }
            self.drain();
        }
        if ack_pending {
            for id in self.m.inbound.awaiting_ids() {
                self.publish_ack(id, ReasonCode::Success);
            }
        }
        let session = self.conn.take_session();
        assert_eq!(
            session.is_some(),
            self.m.accepted,
            "take_session() after close, accepted: {}",
            self.m.accepted
        );
        assert!(self.conn.take_session().is_none(), "session taken twice");
        if let Some(session) = &session {
            // The will is published unless the client ended with a normal DISCONNECT
            // [MQTT-3.1.2-8, MQTT-3.1.2-10]; it waits in the session for its delay.
            let will = self.m.client.as_ref().is_some_and(|c| c.will);
            let normal = self.m.close == Some((ReasonCode::Success, true));
            assert_eq!(
                session.has_pending_will(),
                will && !normal,
                "pending will after {:?}, CONNECT with a will: {will}",
                self.m.close
            );
        }
        if let Some(session) = session {
            self.store.push(Stored {
                session,
                out: self.m.out.clone(),
                inbound: self.m.inbound.carried(),
            });
            if self.store.len() > MAX_STORED {
                self.store.remove(0);
            }
        }
    }

    fn session_timers(&mut self, index: u8) {
        if self.store.is_empty() {
            return;
        }
        let i = usize::from(index) % self.store.len();
        let session = &mut self.store[i].session;
        let due = session.poll_timeout();
        let event = session.handle_timeout(self.now);
        if due.is_some_and(|t| t <= self.now) {
            assert!(
                event.is_some() || session.poll_timeout() != due,
                "a session timer due {due:?} made no progress: a driver would spin"
            );
        } else {
            assert!(event.is_none(), "session timer fired before due: {event:?}");
        }
        match event {
            Some(SessionEvent::Expired { .. }) => {
                assert!(!session.has_pending_will(), "will kept after expiry");
                assert!(session.poll_timeout().is_none(), "timer left after expiry");
                self.store.remove(i);
                self.stats.session_events += 1;
            }
            Some(SessionEvent::WillDue(_)) => {
                assert!(
                    !session.has_pending_will(),
                    "will still pending after WillDue"
                );
                self.stats.session_events += 1;
            }
            None => {}
        }
    }
}
