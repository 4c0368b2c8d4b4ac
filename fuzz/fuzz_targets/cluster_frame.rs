//! Arbitrary bytes as the body of a frame from a cluster peer's forwarding link: the decoder
//! must never panic, and whatever it accepts must encode back to a frame that decodes to the
//! same value. See `mqttd_fuzz::cluster_frame`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mqttd_fuzz::cluster_frame(data);
});
