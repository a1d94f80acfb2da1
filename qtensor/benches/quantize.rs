//! Quantize / dequantize throughput in GB/s of f32 (the side PyTorch's figures count), one
//! call over a whole activation-sized tensor, per instruction set.
//!
//! `cargo bench -p qtensor`; set `RAYON_NUM_THREADS=1` for single-core numbers.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qtensor::isa::Isa;
use qtensor::kernels::{dequantize_slice_with, quantize_slice_with};
use qtensor::{DType, QParams, QTensor, QuantRange};

/// ResNet-18's first activation (1x64x112x112) and a 12.8 MB f32 batch like PyTorch's
/// HistogramObserver benchmark.
const SIZES: [(&str, usize); 2] = [("resnet18_conv1_out_802k", 64 * 112 * 112), ("batch_3_2m", 3_200_000)];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("qtensor");
    for (name, n) in SIZES {
        let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        let mut q = vec![0u8; n];
        let mut y = vec![0.0f32; n];
        group.throughput(Throughput::Bytes((n * 4) as u64));
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            group.bench_with_input(BenchmarkId::new(format!("quantize_u8_{isa}"), name), &xs, |b, xs| {
                b.iter(|| quantize_slice_with(isa, xs, &mut q, 0.04, 125, QuantRange::full(DType::U8)).unwrap())
            });
            group.bench_with_input(BenchmarkId::new(format!("dequantize_u8_{isa}"), name), &q.clone(), |b, q| {
                b.iter(|| dequantize_slice_with(isa, q, &mut y, 0.04, 125).unwrap())
            });
        }
        let w = ndarray::Array2::from_shape_vec((64, n / 64), xs.clone()).unwrap();
        let pc = QParams::per_channel((0..64).map(|c| 0.01 + c as f32 * 1e-3).collect(), vec![0; 64], 0).unwrap();
        group.bench_function(BenchmarkId::new("quantize_i8_per_channel", name), |b| {
            b.iter(|| QTensor::<i8>::quantize(&w, pc.clone()).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
