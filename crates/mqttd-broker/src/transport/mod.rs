//! What a connection goes through between `accept` and MQTT: the PROXY protocol header
//! ([`proxy`]) and the WebSocket upgrade and framing ([`websocket`]). Each is generic over the
//! byte stream underneath, so that they compose: TCP or TLS, then PROXY or WebSocket. They
//! run in the connection's task, under its CONNECT deadline (see `listener`), never in an
//! accept loop, and each ends with a byte stream the byte-stream driver runs on.

pub(crate) mod prefixed;
pub(crate) mod proxy;
pub(crate) mod websocket;

pub(crate) use proxy::{read_proxy_header, ProxiedAddr};
pub(crate) use websocket::accept_websocket;
