//! Primitive wire types: integers, variable byte integers, strings and binary data.

use bytes::{Buf, BufMut, Bytes};

use super::error::DecodeError;
use crate::types::{MqttStr, PacketId};

/// A cursor over one packet body. Reading a string or binary field slices the body without
/// copying.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::UnexpectedEnd(field));
        }
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let b = self
            .buf
            .first()
            .copied()
            .ok_or(DecodeError::UnexpectedEnd(field))?;
        self.buf = self.buf.slice(1..);
        Ok(b)
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::UnexpectedEnd(field));
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::UnexpectedEnd(field));
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        match decode_varint(&self.buf)? {
            Some((value, len)) => {
                self.buf = self.buf.slice(len..);
                Ok(value)
            }
            None => Err(DecodeError::UnexpectedEnd(field)),
        }
    }

    pub(crate) fn binary(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<MqttStr, DecodeError> {
        let bytes = self.binary(field)?;
        MqttStr::from_bytes(bytes).map_err(|error| DecodeError::InvalidString { field, error })
    }

    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16("packet identifier")?).ok_or(DecodeError::ZeroPacketId)
    }

    /// Splits off the next `len` bytes as their own reader.
    pub(crate) fn sub(&mut self, len: usize) -> Result<Self, DecodeError> {
        if self.buf.len() < len {
            return Err(DecodeError::PropertyLength);
        }
        Ok(Self::new(self.buf.split_to(len)))
    }

    /// The rest of the body (a payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Decodes a variable byte integer from the start of `buf`: `Ok(None)` if more bytes are needed,
/// else the value and the number of bytes it used.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // The shortest encoding is required [MQTT-1.5.5-1]: a trailing zero byte after a
            // continuation adds nothing.
            if byte == 0 && i > 0 {
                return Err(DecodeError::MalformedVariableInteger);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err(DecodeError::MalformedVariableInteger)
    } else {
        Ok(None)
    }
}

/// The number of bytes a variable byte integer takes.
pub fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(buf: &mut impl BufMut, mut value: u32) {
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub(crate) fn put_binary(buf: &mut impl BufMut, data: &[u8]) {
    // Constructors and decoders bound strings to 65,535 bytes; binary data handed in by a
    // caller is truncated by the length prefix, so cap it the same way.
    let data = data.get(..usize::from(u16::MAX)).unwrap_or(data);
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

pub(crate) fn put_string(buf: &mut impl BufMut, s: &MqttStr) {
    put_binary(buf, s.as_bytes());
}

/// Encoded length of a length-prefixed field.
pub(crate) fn binary_len(data: &[u8]) -> usize {
    2 + data.len().min(usize::from(u16::MAX))
}
