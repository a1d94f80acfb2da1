//! Kernel throughput on real layer shapes. Criterion's "elements" are multiply-accumulates,
//! so its Gelem/s reads as GMAC/s. One thread unless `QK_BENCH_THREADS` says otherwise.
//!
//! `cargo bench -p qkernels`; `cargo xtask bench` runs the same shapes with f32 and PyTorch
//! beside them.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qkernels::{
    gemm, quantize_weights_per_channel, Activation, Conv2dGeometry, GemmOutput, OutputQuant, PackedConv2d,
    PackedWeights, QImage, QMatrix,
};
use qtensor::isa::Isa;

const QUANT: OutputQuant = OutputQuant { scale: 0.5, zero_point: 10, activation: Activation::Relu };

fn threads() -> usize {
    std::env::var("QK_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn weights(shape: &[usize]) -> qtensor::QTensor<i8> {
    let n: usize = shape.iter().product();
    let w = ndarray::ArrayD::from_shape_vec(shape, (0..n).map(|i| ((i * 31 % 255) as f32 - 127.0) * 0.01).collect())
        .unwrap();
    quantize_weights_per_channel(&w.view()).unwrap()
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for (name, m, k, n) in [
        ("linear_512x512x512", 512, 512, 512),
        ("linear_1024x1024x1024", 1024, 1024, 1024),
        ("resnet18_layer1_im2col_3136x576x64", 3136, 576, 64),
        ("linear_m1_k512_n1000", 1, 512, 1000),
    ] {
        let a: Vec<u8> = (0..m * k).map(|i| (i * 7 % 251) as u8).collect();
        let w = weights(&[n, k]);
        group.throughput(Throughput::Elements((m * k * n) as u64));
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported() && *i != Isa::Scalar) {
            let packed = PackedWeights::with_isa(isa, &w).unwrap();
            let mut out = vec![0u8; m * n];
            group.bench_function(BenchmarkId::new(isa.name(), name), |b| {
                b.iter(|| {
                    let a = QMatrix { data: &a, m, k, lda: k, scale: 0.02, zero_point: 3 };
                    gemm(&a, &packed, None, GemmOutput::U8 { data: &mut out, ldc: n, quant: QUANT }, threads()).unwrap()
                })
            });
        }
    }
    group.finish();
}

fn bench_conv(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv2d");
    // name, c, oc, hw, k, stride, groups
    for (name, ch, oc, hw, k, s, g) in [
        ("resnet18_conv1_7x7s2", 3, 64, 224, 7, 2, 1),
        ("resnet18_layer1_3x3", 64, 64, 56, 3, 1, 1),
        ("resnet18_layer4_3x3", 512, 512, 7, 3, 1, 1),
        ("resnet18_downsample_1x1s2", 64, 128, 56, 1, 2, 1),
        ("mobilenetv2_dw3x3_112x32", 32, 32, 112, 3, 1, 32),
        ("mobilenetv2_dw3x3_56x144", 144, 144, 56, 3, 1, 144),
        ("mobilenetv2_dw3x3s2_56x144", 144, 144, 56, 3, 2, 144),
        ("mobilenetv2_pw1x1_56x24to144", 24, 144, 56, 1, 1, 1),
    ] {
        let geom = Conv2dGeometry { stride: [s, s], padding: [k / 2, k / 2], dilation: [1, 1], groups: g };
        let x: Vec<u8> = (0..hw * hw * ch).map(|i| (i * 13 % 251) as u8).collect();
        let img = QImage { data: &x, n: 1, h: hw, w: hw, c: ch, scale: 0.02, zero_point: 5 };
        let w = weights(&[oc, k, k, ch / g]);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported() && *i != Isa::Scalar) {
            let conv = PackedConv2d::with_isa(isa, &w, Some(&vec![0.1; oc]), geom).unwrap();
            let (oh, ow) = conv.output_hw(hw, hw).unwrap();
            group.throughput(Throughput::Elements((oh * ow * oc * k * k * (ch / g)) as u64));
            let mut out = vec![0u8; oh * ow * oc];
            group.bench_function(BenchmarkId::new(isa.name(), name), |b| {
                b.iter(|| conv.forward_u8(&img, QUANT, &mut out, threads()).unwrap())
            });
        }
    }
    group.finish();
}

fn bench_ops(c: &mut Criterion) {
    use qkernels::{
        adaptive_avg_pool2d, add, add_scalar, avg_pool2d, batch_norm2d, cat_channels, dequantize_nhwc_to_nchw,
        flatten_nchw_order, layer_norm, max_pool2d, mul, mul_scalar, quantize_nchw_to_nhwc, upsample_nearest, Pool2d,
        QuantU8, UnaryOp,
    };
    let mut group = c.benchmark_group("ops");
    let q = QuantU8 { scale: 0.05, zero_point: 3 };
    // ResNet-18 layer1 residual add and MobileNetV2-sized activations (56x56x144).
    let n = 56 * 56 * 144;
    let a: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = (0..n).map(|i| (i * 13 % 251) as u8).collect();
    let mut out = vec![0u8; n];
    group.throughput(Throughput::Bytes(n as u64));
    group.bench_function("add_relu_56x56x144", |bch| bch.iter(|| add(&a, q, &b, q, &mut out, q, true).unwrap()));
    let hswish = UnaryOp::Hardswish.tables(q, q);
    group.bench_function("hardswish_lut_56x56x144", |bch| bch.iter(|| hswish.apply(&a, &mut out).unwrap()));
    let img = QImage { data: &a, n: 1, h: 56, w: 56, c: 144, scale: 0.05, zero_point: 3 };
    let pool = Pool2d { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ..Pool2d::square(3) };
    let mut pooled = vec![0u8; 28 * 28 * 144];
    group.bench_function("max_pool3x3s2_56x56x144", |bch| bch.iter(|| max_pool2d(&img, &pool, &mut pooled).unwrap()));
    let mut gap = vec![0u8; 144];
    group.bench_function("global_avg_pool_56x56x144", |bch| {
        bch.iter(|| adaptive_avg_pool2d(&img, (1, 1), q, &mut gap).unwrap())
    });
    let qb = QuantU8 { scale: 0.07, zero_point: 9 };
    group.bench_function("mul_56x56x144", |bch| bch.iter(|| mul(&a, q, &b, qb, &mut out, q).unwrap()));
    group.bench_function("add_scalar_56x56x144", |bch| bch.iter(|| add_scalar(&a, q, 0.3, &mut out).unwrap()));
    group.bench_function("mul_scalar_56x56x144", |bch| bch.iter(|| mul_scalar(&a, q, 1.7, &mut out).unwrap()));
    let avg = Pool2d { stride: [1, 1], padding: [1, 1], ..Pool2d::square(3) };
    group.bench_function("avg_pool3x3s1_56x56x144", |bch| bch.iter(|| avg_pool2d(&img, &avg, q, &mut out).unwrap()));
    let ch: Vec<f32> = (0..144).map(|i| 0.5 + i as f32 / 144.0).collect();
    group.bench_function("batch_norm2d_56x56x144", |bch| {
        bch.iter(|| batch_norm2d(&img, &ch, &ch, &ch, &ch, 1e-5, q, &mut out).unwrap())
    });
    group.bench_function("layer_norm_56x56x144", |bch| {
        bch.iter(|| layer_norm(&img, &ch, &ch, 1e-5, q, &mut out).unwrap())
    });
    group
        .bench_function("flatten_nchw_order_56x56x144", |bch| bch.iter(|| flatten_nchw_order(&img, &mut out).unwrap()));
    // Two 72-channel halves, one needing requantization.
    let half = 56 * 56 * 72;
    let (l, r) = (
        QImage { data: &a[..half], n: 1, h: 56, w: 56, c: 72, scale: 0.05, zero_point: 3 },
        QImage { data: &b[..half], n: 1, h: 56, w: 56, c: 72, scale: 0.07, zero_point: 9 },
    );
    group.bench_function("cat_channels_2x72_56x56", |bch| bch.iter(|| cat_channels(&[l, r], &mut out, q).unwrap()));
    let small = QImage { data: &a[..28 * 28 * 144], n: 1, h: 28, w: 28, c: 144, scale: 0.05, zero_point: 3 };
    group.bench_function("upsample_nearest_2x_28x28x144", |bch| {
        bch.iter(|| upsample_nearest(&small, (56, 56), None, &mut out).unwrap())
    });
    let f: Vec<f32> = (0..n).map(|i| ((i * 7 % 251) as f32 - 125.0) * 0.01).collect();
    let mut back = vec![0f32; n];
    group.bench_function("quantize_nchw_to_nhwc_144x56x56", |bch| {
        bch.iter(|| quantize_nchw_to_nhwc(&f, (1, 144, 56, 56), q, &mut out).unwrap())
    });
    group.bench_function("dequantize_nhwc_to_nchw_56x56x144", |bch| {
        bch.iter(|| dequantize_nhwc_to_nchw(&a, (1, 56, 56, 144), q, &mut back).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = bench_gemm, bench_conv, bench_ops
}
criterion_main!(benches);
