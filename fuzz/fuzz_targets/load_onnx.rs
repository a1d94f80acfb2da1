//! Hostile ONNX files: `qonnx::from_bytes` must return an error, never panic or allocate
//! beyond what the file holds; a model it imports must run a small input or refuse it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qonnx::fuzzing::onnx_model(data);
});
