//! Observer throughput in GB/s of f32 observed, on a 12.8 MB batch (4x64x112x112, as in
//! PyTorch's HistogramObserver measurement), after one warm-up batch. One thread.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qobserve::{HistogramObserver, MinMaxObserver, Observer, QuantSpec};

fn data(seed: u32, n: usize) -> ndarray::ArrayD<f32> {
    let mut s = seed | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // Roughly normal: a sum of three uniforms.
            ((s & 0x3ff) as f32 + ((s >> 10) & 0x3ff) as f32 + ((s >> 20) & 0x3ff) as f32) / 512.0 - 3.0
        })
        .collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[4, 64, 112, 112]), v).unwrap()
}

fn bench(c: &mut Criterion) {
    let n = 4 * 64 * 112 * 112;
    let x = data(7, n);
    let mut g = c.benchmark_group("observe_12.8MB");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("minmax", |b| {
        let mut o = MinMaxObserver::new(QuantSpec::u8_affine());
        b.iter(|| o.observe(x.view()).unwrap())
    });
    g.bench_function("histogram_2048", |b| {
        let mut o = HistogramObserver::new(QuantSpec::u8_affine()).unwrap();
        o.observe(x.view()).unwrap();
        b.iter(|| o.observe(x.view()).unwrap())
    });
    g.finish();
    let mut o = HistogramObserver::new(QuantSpec::u8_affine()).unwrap();
    o.observe(x.view()).unwrap();
    c.bench_function("histogram_2048_qparams", |b| b.iter(|| o.qparams().unwrap()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(15).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
