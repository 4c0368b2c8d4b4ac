//! The wire format: fixed headers, variable byte integers, properties and every packet of
//! MQTT 3.1, 3.1.1 and 5.0.
//!
//! Decoding is zero-copy within a packet: strings, binary fields and payloads are slices of the
//! packet's [`bytes::Bytes`]. [`PacketReader`] cuts a byte stream into packets and enforces the
//! maximum packet size from the fixed header alone.

mod decode;
mod encode;
mod error;
pub mod properties;
mod reader;
mod wire;

pub use decode::FixedHeader;
pub use error::{DecodeError, EncodeError};
pub use reader::PacketReader;
pub use wire::{decode_varint, varint_len};
