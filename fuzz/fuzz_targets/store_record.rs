//! Arbitrary bytes as a value read from the durable store, with and without a valid checksum:
//! decoding must never panic, and whatever decodes must encode back to the same record.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttd_broker::storage::fuzzing::decode_stored_records;

fuzz_target!(|data: &[u8]| {
    decode_stored_records(data);
    // The same bytes behind a valid header, so that the decoders past the checksum are
    // reached too.
    let mut sealed = Vec::with_capacity(data.len() + 5);
    sealed.push(1);
    sealed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    sealed.extend_from_slice(data);
    decode_stored_records(&sealed);
});
