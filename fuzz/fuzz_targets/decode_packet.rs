//! Arbitrary bytes as a connection's stream, read before CONNECT and after a CONNECT of each
//! version: the reader must never panic, and whatever it accepts must encode back to bytes
//! that decode to the same packet.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttd_fuzz::{assert_roundtrip, for_each_packet, READER_VERSIONS};

fuzz_target!(|data: &[u8]| {
    for version in READER_VERSIONS {
        for_each_packet(data, version, assert_roundtrip);
    }
});
