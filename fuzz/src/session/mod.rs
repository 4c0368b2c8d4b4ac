//! The `session` target: arbitrary packet sequences, broker or application decisions and time
//! steps driving [`ServerConnection`](mqttd_proto::server::ServerConnection) or
//! [`ClientConnection`](mqttd_proto::client::ClientConnection), with the protocol's invariants
//! checked after every step.
//!
//! An [`Input`] picks a role, a configuration and up to [`build::MAX_OPS`] operations. In the
//! server role the fuzzer plays both the client (packets, structured or raw bytes) and the
//! broker (accept with a fresh or a stored session, reject, authentication steps,
//! acknowledgements, deliveries, disconnects), reconnects with the stored session and runs the
//! stored sessions' timers. In the client role it plays the server and the application.
//!
//! Every packet fed to a machine goes through the codec as a transport would feed it, so only
//! what can be on the wire reaches the machine, and malformed input reaches
//! `handle_decode_error`. After every step the harness drains `poll_transmit` and `poll_event`
//! and checks, from the wire and the events alone ([`model`]):
//!
//! - every transmit encodes with the connection's version and reads back as the same packet,
//!   less what that version cannot carry;
//! - no more QoS 1 and 2 PUBLISH packets unacknowledged than the peer's receive maximum, no
//!   packet identifier reused while in flight, resends only of carried flows, with DUP set;
//! - nothing but CONNACK and AUTH before a successful CONNACK (server), CONNECT first and no
//!   PUBLISH before CONNACK (client), nothing after DISCONNECT, after a refused CONNACK or once
//!   closed, no AUTH or DISCONNECT to an MQTT 3 client, one `Closed` event and nothing after it;
//! - topic aliases within the peer's maximum and set before use, PUBLISH packets within the
//!   peer's maximum packet size, the client within the server's maximum QoS and retain support;
//! - AUTH, and an authentication method in CONNACK, only to a client whose CONNECT named that
//!   method; no session expiry in the client's DISCONNECT when its CONNECT asked for none;
//! - SUBSCRIBE, UNSUBSCRIBE and PUBLISH never share a packet identifier in flight (client);
//! - a QoS 2 message is never handed on twice between PUBREC and PUBREL, nor a message twice
//!   before it is acknowledged, nor more than the announced receive maximum;
//! - the timers cannot make a driver spin: when `poll_timeout() <= now`, `handle_timeout(now)`
//!   makes progress, and it does nothing before that; the same for a stored session's timers;
//! - a keep alive timeout only after one and a half keep alives of silence (server) or an
//!   unanswered PINGREQ (client); a stored session holds a will exactly when CONNECT had one
//!   and the client did not end with a normal DISCONNECT;
//! - API answers agree with the state: `accept` works exactly when a CONNECT is pending,
//!   `deliver` and `publish` report `Sent` exactly when a PUBLISH went out, a closed connection
//!   yields its session once.

pub mod build;
pub mod input;
pub mod model;

mod client;
mod server;

pub use input::{Encode, Input};

/// What a run did, so that the seed program can check its scenarios get where they mean to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections started.
    pub connections: usize,
    /// Successful CONNACKs.
    pub connected: usize,
    /// PUBLISH packets resent with DUP, and PUBREL resent, on a resumed session.
    pub resent: usize,
    /// Outgoing QoS 2 messages completed by PUBCOMP.
    pub qos2_sent: usize,
    /// Incoming QoS 2 messages released by PUBREL.
    pub qos2_received: usize,
    /// Authentication steps reported (challenges, continuations, re-authentications).
    pub auth_steps: usize,
    /// Re-authentications completed.
    pub reauthenticated: usize,
    /// Connections closed by a timer.
    pub timed_out: usize,
    /// Stored session timer events (will published, session expired).
    pub session_events: usize,
    /// Streams refused by the decoder.
    pub decode_errors: usize,
}

/// Runs one input, panicking on the first violated invariant.
pub fn run(input: &Input) -> Stats {
    let mut stats = Stats::default();
    match input {
        Input::Server { setup, ops } => server::run(setup, ops, &mut stats),
        Input::Client { setup, ops } => client::run(setup, ops, &mut stats),
    }
    stats
}
