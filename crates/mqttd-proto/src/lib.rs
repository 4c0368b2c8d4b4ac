//! The protocol core of mqttd: an MQTT 3.1, 3.1.1 and 5.0 codec and the per-connection state
//! machines of both roles, with no I/O.
//!
//! # Design
//!
//! Nothing in this crate touches a socket, a runtime or a clock. Like `quinn-proto`, it is a
//! deterministic state machine: the caller feeds it packets and the current time, and polls it
//! for packets to send, events to act on and the next instant it wants to be woken at. TCP, TLS,
//! WebSocket and QUIC transports are thin drivers around it, and the same code runs under
//! property tests, fuzzers and a simulated clock.
//!
//! - [`codec`] encodes and decodes packets. [`codec::PacketReader`] cuts a byte stream into
//!   packets and refuses a packet whose declared size exceeds the maximum packet size as soon as
//!   the fixed header is read. Every [`codec::DecodeError`] names the rule that was broken and
//!   the [`ReasonCode`] that answers it.
//! - [`types`] holds the protocol values as newtypes: a [`TopicName`] never contains a
//!   wildcard, a [`TopicFilter`] always has well-placed ones, a [`PacketId`] is never zero.
//! - [`server`] is the broker's side of one connection: CONNECT validation, keep alive, QoS 1
//!   and 2 flows in both directions, flow control, topic aliases, will delay, enhanced
//!   authentication. It reports decisions it cannot make alone (authentication, routing,
//!   durability) as events and waits for the broker's answer.
//! - [`client`] is the client's side, used by `mqttd pub`, `mqttd sub`, `mqttd bench` and
//!   bridges.
//! - [`session`] is the state that outlives a connection (in-flight messages, queued messages,
//!   the QoS 2 packet identifiers awaiting release) and can be stored and resumed.
//!
//! # Streams
//!
//! MQTT over QUIC in multi-stream mode carries one connection on a control stream plus data
//! streams. Every packet in and out, every event and every delivery has a [`StreamId`], an
//! opaque identity the driver chooses per stream of the connection; byte-stream transports use
//! [`StreamId::CONTROL`] for everything, through the calls without a stream
//! ([`server::ServerConnection::handle_packet`], `poll_transmit`, `poll_event`, `deliver`),
//! which behave exactly as before streams existed. A multi-stream driver uses the `_on` and
//! `_tagged` variants, and the machines apply these rules:
//!
//! - An acknowledgement goes back on the stream of the packet it answers: PUBACK and PUBREC on
//!   the PUBLISH's stream, PUBCOMP on the PUBREL's, SUBACK and UNSUBACK on the request's,
//!   PINGRESP on the PINGREQ's. A PUBREL goes on the stream its PUBLISH went.
//! - Messages for a subscription go on the stream the SUBSCRIBE came on: the broker learns it
//!   from the stream of the `Subscribe` event and passes it to `deliver_on`. Streams the client
//!   has not used, or that were lost, fall back to the control stream.
//! - Topic aliases are per stream, both ways: the same alias names different topics on two
//!   streams, and an alias set on one stream is unknown on another.
//! - Packet identifiers belong to the session, whatever the stream.
//! - A lost data stream is not a lost connection (`stream_lost`): acknowledgements owed on it
//!   move to the control stream, and outgoing QoS 1 and 2 flows sent on it are resent and
//!   continue there. Losing the control stream loses the connection.
//! - Stream hints belong to one connection and are never persisted: a resumed session sends
//!   everything on the control stream.
//!
//! # Persist, then acknowledge
//!
//! The server state machine never acknowledges an inbound QoS 1 or QoS 2 PUBLISH by itself: it
//! emits the message and sends PUBACK or PUBREC only when the broker calls back after storing it
//! durably (or deciding that no durable copy is needed). A durable store plugs in at that point
//! without changing the protocol code.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod alias;
pub mod backoff;
pub mod client;
pub mod codec;
mod flow;
pub mod message;
pub mod packet;
pub mod reason;
pub mod server;
pub mod session;
mod sparse;
pub mod types;

pub use alias::AliasError;
pub use flow::{InboundPublish, Violation};
pub use message::{Delivery, Message, MessageProperties};

pub use packet::*;
pub use reason::{ReasonCode, ReasonContext};
pub use types::{
    ClientId, MqttStr, PacketId, ProtocolVersion, QoS, StreamId, StringError, TopicFilter,
    TopicName,
};
