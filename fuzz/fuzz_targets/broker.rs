//! Arbitrary scripts of packets, raw bytes, closes and time steps from several clients driving
//! the real broker's connections over in-memory streams, with the broker's invariants checked
//! from what each client receives: see `mqttd_fuzz::broker`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mqttd_fuzz::broker::run(data);
});
