//! Arbitrary bytes as a value read from the durable store, with and without a valid checksum:
//! decoding must never panic, and whatever decodes must encode back to the same bytes and
//! the same record, every field compared. See `mqttd_fuzz::store_record`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mqttd_fuzz::store_record(data);
});
