//! Arbitrary bytes as a connection's stream, read before CONNECT and after a CONNECT of each
//! version: the reader must never panic, and whatever it accepts must encode back to bytes
//! that decode to the same packet. See `mqttd_fuzz::decode_packet`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mqttd_fuzz::decode_packet(data);
});
