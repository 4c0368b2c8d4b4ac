//! Arbitrary datagrams to and from a few addresses through the QUIC listener's
//! anti-amplification guard, which reads peer bytes before noq does: it must never panic,
//! never allow more than it is given or part of a datagram, and stay within its capacity. See
//! `mqttd_broker::fuzzing::quic_guard`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mqttd_broker::fuzzing::quic_guard(data);
});
