//! Models PyTorch exported (`scripts/onnx/qonnx_fixtures.py`): our float outputs against ONNX
//! Runtime's fp32, and our int8 SQNR against ONNX Runtime's `quantize_static`.
