//! # qfuse: float-to-float rewrites before quantization
//!
//! **Status: created, not yet filled.** This crate will fold batch-norm into the preceding
//! convolution or linear layer (equal to PyTorch's `fuse_conv_bn_weights`) and fuse ReLU into
//! its producer. It depends only on [`qtensor`]; it knows nothing of observers or kernels.
