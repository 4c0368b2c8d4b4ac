//! Arbitrary packet sequences, broker or application decisions and time steps driving the
//! server and client connection state machines, with the protocol's invariants checked after
//! every step: see `mqttd_fuzz::session`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttd_fuzz::session::{run, Input};

fuzz_target!(|input: Input| {
    run(&input);
});
