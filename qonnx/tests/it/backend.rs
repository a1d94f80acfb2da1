//! ONNX's backend test cases (`scripts/onnx/onnx_backend_cases.py`).
