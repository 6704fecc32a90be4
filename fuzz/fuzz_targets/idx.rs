//! Feeds arbitrary bytes to the IDX image and label parsers, raw and
//! gzipped. Any panic, abort or allocation past the fuzzer's limit is a bug.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let name = Path::new("fuzz-input");
    let _ = isonn::data::idx::parse_images(bytes, name);
    let _ = isonn::data::idx::parse_labels(bytes, name, 10);
});
