//! Hostile saved models: `QuantizedModel::from_bytes` must return an error, never panic or
//! allocate without bound; a model it accepts must run (or refuse) small inputs the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qnn::fuzzing::saved_model(data);
});
