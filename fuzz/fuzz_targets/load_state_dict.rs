//! Hostile weight files: `load_safetensors_bytes` into the bundled architectures must return
//! an error (listing what is wrong), never panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qnn::fuzzing::state_dict(data);
});
