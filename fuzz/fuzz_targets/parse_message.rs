//! `cargo fuzz run parse_message`: every parser entry point on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sip_wire::fuzzing::exercise(data));
