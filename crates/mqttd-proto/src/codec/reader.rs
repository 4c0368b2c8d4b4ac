//! Cutting a byte stream into packets.

use bytes::{Bytes, BytesMut};

use super::decode::FixedHeader;
use super::error::DecodeError;
use crate::packet::{Packet, PacketType};
use crate::types::ProtocolVersion;

/// The most the reader reserves ahead of bytes actually received.
const RESERVE_STEP: usize = 64 * 1024;

/// Splits a byte stream (TCP, TLS, WebSocket or one QUIC stream) into packets.
///
/// Each packet body is copied out of the read buffer into an allocation of its own before it is
/// decoded, so messages that are queued for a long time hold exactly their own bytes and never
/// pin a connection's whole read buffer.
#[derive(Debug, Clone)]
pub struct PacketReader {
    max_packet_size: u32,
}

impl PacketReader {
    /// A reader that refuses packets larger than `max_packet_size` bytes, header included.
    pub fn new(max_packet_size: u32) -> Self {
        Self { max_packet_size }
    }

    /// The size limit in force.
    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// Changes the size limit, e.g. once CONNECT has been processed.
    pub fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max;
    }

    /// How many more bytes the next packet needs before `read` can return it, if the fixed
    /// header is complete. Lets a transport read exactly what is missing.
    pub fn missing(&self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        Ok(FixedHeader::parse(buf, self.max_packet_size)?
            .map(|h| h.packet_len().saturating_sub(buf.len())))
    }

    /// Takes the next complete packet from the front of `buf`. `version` is `None` until
    /// CONNECT has been decoded, and then only a CONNECT is accepted.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole packet. After an error the
    /// stream is unusable and the connection must be closed.
    pub fn read(
        &mut self,
        buf: &mut BytesMut,
        version: Option<ProtocolVersion>,
    ) -> Result<Option<Packet>, DecodeError> {
        let Some(header) = FixedHeader::parse(buf, self.max_packet_size)? else {
            return Ok(None);
        };
        if version.is_none() && header.packet_type() != Some(PacketType::Connect) {
            return Err(DecodeError::ExpectedConnect);
        }
        let len = header.packet_len();
        if buf.len() < len {
            // Grow towards the declared size in steps, so a peer cannot make us allocate a
            // whole maximum-size packet by sending only its fixed header.
            buf.reserve((len - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let frame = buf.split_to(len);
        let body = Bytes::copy_from_slice(frame.get(header.header_len..).unwrap_or_default());
        Packet::decode(header, body, version.unwrap_or(ProtocolVersion::V5)).map(Some)
    }
}
