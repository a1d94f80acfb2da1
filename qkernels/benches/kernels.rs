//! Kernel throughput on real layer shapes, in GMAC/s (criterion reports elements/s = MAC/s).
//!
//! `cargo bench -p qkernels`. One thread unless `QK_BENCH_THREADS` says otherwise.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qkernels::{gemm, Activation, GemmOutput, OutputQuant, PackedWeights, QMatrix};
use qtensor::isa::Isa;
use qtensor::{QParams, QTensor};

fn weights(n: usize, k: usize) -> QTensor<i8> {
    let w = ndarray::Array2::from_shape_fn((n, k), |(i, j)| (((i * 31 + j * 17) % 255) as f32 - 127.0) * 0.01);
    QTensor::quantize(&w, QParams::per_channel(vec![0.01; n], vec![0; n], 0).unwrap()).unwrap()
}

fn bench_gemm(c: &mut Criterion) {
    let threads: usize = std::env::var("QK_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut group = c.benchmark_group("gemm");
    for (name, m, k, n) in [
        ("linear_512x512x512", 512, 512, 512),
        ("linear_1024x1024x1024", 1024, 1024, 1024),
        ("resnet18_layer1_im2col_3136x576x64", 3136, 576, 64),
        ("linear_m1_k512_n1000", 1, 512, 1000),
    ] {
        let a: Vec<u8> = (0..m * k).map(|i| (i * 7 % 251) as u8).collect();
        let w = weights(n, k);
        group.throughput(Throughput::Elements((m * k * n) as u64));
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported() && *i != Isa::Scalar) {
            let packed = PackedWeights::with_isa(isa, &w).unwrap();
            let mut out = vec![0u8; m * n];
            group.bench_function(BenchmarkId::new(isa.name(), name), |b| {
                b.iter(|| {
                    let a = QMatrix { data: &a, m, k, lda: k, scale: 0.02, zero_point: 3 };
                    let quant = OutputQuant { scale: 0.5, zero_point: 10, activation: Activation::Relu };
                    gemm(&a, &packed, None, GemmOutput::U8 { data: &mut out, ldc: n, quant }, threads).unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_gemm
}
criterion_main!(benches);
