//! Elementwise ops, lookup tables and pooling: every vector path equals the scalar one, and
//! the scalar one equals the written-out formula.

use proptest::prelude::*;
use qkernels::{
    adaptive_avg_pool2d, adaptive_avg_pool2d_with, add_isa, avg_pool2d, avg_pool2d_with, cat_channels, max_pool2d,
    max_pool2d_with, Lut, Pool2d, QImage, QuantU8, UnaryOp,
};

fn quant() -> impl Strategy<Value = QuantU8> {
    ((-9.0f32..2.0).prop_map(f32::exp2), 0i32..=255).prop_map(|(s, z)| QuantU8 { scale: s, zero_point: z })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(96)))]

    /// The int8 softmax, along contiguous lanes and along lanes `inner` apart, against the
    /// float softmax of the dequantized codes, quantized: within one code (the table's
    /// exponentials and the sums' order round differently), and nearly always equal.
    #[test]
    fn softmax_is_the_float_softmax_quantized(
        outer in 1usize..4, len in 1usize..40, inner in 1usize..20, q in quant(), seed in any::<u64>(),
    ) {
        let n = outer * len * inner;
        let mut s = seed | 1;
        let x: Vec<u8> = (0..n).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s >> 40) as u8 }).collect();
        let qo = QuantU8 { scale: 1.0 / 255.0, zero_point: 0 };
        let mut got = vec![0u8; n];
        qkernels::softmax_u8(&x, q, (outer, len, inner), qo, &mut got).unwrap();
        let mut equal = 0;
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| (o * len + k) * inner + i;
                let v: Vec<f32> = (0..len).map(|k| q.scale * (x[at(k)] as i32 - q.zero_point) as f32).collect();
                let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = v.iter().map(|&a| (a - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for k in 0..len {
                    let want = qtensor::kernels::quantize_scalar(e[k] / sum, 1.0 / qo.scale, 0, 0, 255);
                    let d = (got[at(k)] as i32 - want).abs();
                    prop_assert!(d <= 1, "lane {o}/{i} element {k}: {} vs {want}", got[at(k)]);
                    equal += usize::from(d == 0);
                }
            }
        }
        prop_assert!(equal * 100 >= n * 95, "{equal} of {n} equal");
    }

    /// The vectorisable requantization of a product equals PyTorch's formula for every
    /// product two bytes can make (and beyond), any zero point and multiplier.
    #[test]
    fn requantize_product_is_requantize_from_int(m in (-30.0f32..12.0).prop_map(f32::exp2), zp in 0i32..=255) {
        for src in (-70_000..=70_000).chain([i32::MIN / 2, -(1 << 24), 1 << 24, i32::MAX / 2]) {
            prop_assert_eq!(
                qkernels::requantize_product(src, m, zp),
                qkernels::requantize_from_int(src, m, zp),
                "src {} multiplier {} zp {}", src, m, zp
            );
        }
    }

    /// A per-channel gate broadcast over the pixels gives, element by element, `mul` of the
    /// image and the gate expanded to its shape.
    #[test]
    fn mul_channels_is_mul_with_the_gate_expanded(
        n in 1usize..3, pixels in 0usize..20, c in 1usize..70, qa in quant(), qb in quant(), qo in quant(), seed in any::<u8>()
    ) {
        let a: Vec<u8> = (0..n * pixels * c).map(|i| (i as u8).wrapping_mul(97).wrapping_add(seed)).collect();
        let b: Vec<u8> = (0..n * c).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed ^ 0x5a)).collect();
        let expanded: Vec<u8> = (0..n * pixels * c).map(|i| b[(i / (pixels * c)) * c + i % c]).collect();
        let mut want = vec![0u8; a.len()];
        qkernels::mul(&a, qa, &expanded, qb, &mut want, qo).unwrap();
        let mut got = vec![0u8; a.len()];
        qkernels::mul_channels(&a, qa, (n, pixels, c), &b, qb, &mut got, qo).unwrap();
        prop_assert_eq!(got, want);
    }

    /// The addition on every tier equals PyTorch's formulas, the vector loop's on the vector
    /// prefix and the scalar loop's on the rest.
    #[test]
    fn add_on_every_isa_equals_the_formula(
        a in prop::collection::vec(any::<u8>(), 0..300), qa in quant(), qb in quant(), qo in quant(), relu in any::<bool>(), seed in any::<u8>(),
    ) {
        let b: Vec<u8> = a.iter().map(|v| v.wrapping_mul(31).wrapping_add(seed)).collect();
        // PyTorch's vector loop dequantizes as fma(s, q, s * -z) over the first
        // vector_prefix(n) elements, its scalar loop as s * (q - z) over the rest.
        let prefix = qkernels::vector_prefix(a.len());
        let expected: Vec<u8> = a.iter().zip(&b).enumerate().map(|(i, (&x, &y))| {
            let dq = |q: u8, p: QuantU8| if i < prefix {
                p.scale.mul_add(q as f32, p.scale * -(p.zero_point as f32))
            } else {
                p.scale * (q as i32 - p.zero_point) as f32
            };
            let c = dq(x, qa) + dq(y, qb);
            let c = if relu { c.max(0.0) } else { c };
            qtensor::kernels::quantize_scalar(c, 1.0 / qo.scale, qo.zero_point, 0, 255) as u8
        }).collect();
        for isa in crate::isas_under_test() {
            let mut out = vec![0u8; a.len()];
            add_isa(isa, &a, qa, &b, qb, &mut out, qo, relu).unwrap();
            prop_assert_eq!(&out, &expected, "{}", isa);
        }
    }

    /// Channel concatenation against each channel's formula: copied where the parameters
    /// match the output's, else requantized with PyTorch's vector-loop dequantization on the
    /// first `c / 32 * 32 + c % 32 / 8 * 8` channels and its scalar one on the rest; images
    /// large enough to take several runs of the lookup kernel.
    #[test]
    fn cat_channels_requantizes_each_channel_by_its_loop(
        cs in prop::collection::vec(1usize..80, 1..4), pixels in 1usize..200, qs in prop::collection::vec(quant(), 4),
        same in any::<bool>(), qo in quant(), seed in any::<u64>(),
    ) {
        let mut s = seed | 1;
        let data: Vec<Vec<u8>> = cs.iter().map(|&c| (0..pixels * c).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s >> 40) as u8 }).collect()).collect();
        // The first input takes the output's parameters when `same`: a plain copy.
        let q_of = |i: usize| if same && i == 0 { qo } else { qs[i] };
        let imgs: Vec<QImage<'_>> = data.iter().zip(&cs).enumerate().map(|(i, (d, &c))| {
            QImage { data: d, n: 1, h: 1, w: pixels, c, scale: q_of(i).scale, zero_point: q_of(i).zero_point }
        }).collect();
        let total: usize = cs.iter().sum();
        let mut out = vec![0u8; pixels * total];
        cat_channels(&imgs, &mut out, qo).unwrap();
        for p in 0..pixels {
            let mut off = 0;
            for (i, (d, &c)) in data.iter().zip(&cs).enumerate() {
                let (qi, nv) = (q_of(i), c / 32 * 32 + c % 32 / 8 * 8);
                for ch in 0..c {
                    let v = d[p * c + ch];
                    let want = if qi == qo { v } else if ch < nv { qo.quantize(qi.dequantize_vec(v)) } else { qo.quantize(qi.dequantize(v)) };
                    prop_assert_eq!(out[p * total + off + ch], want, "pixel {}, input {}, channel {}", p, i, ch);
                }
                off += c;
            }
        }
    }

    #[test]
    fn lut_vector_path_equals_scalar(x in prop::collection::vec(any::<u8>(), 0..500), seed in any::<u64>()) {
        let table: [u8; 256] = std::array::from_fn(|i| ((i as u64).wrapping_mul(seed | 1) >> 7) as u8);
        let lut = Lut::from_table(table);
        let (mut v, mut s) = (vec![0u8; x.len()], vec![0u8; x.len()]);
        lut.apply(&x, &mut v).unwrap();
        lut.apply_scalar(&x, &mut s).unwrap();
        prop_assert_eq!(&v, &s);
        prop_assert!(x.iter().zip(&v).all(|(i, o)| table[*i as usize] == *o));
    }

    /// The float boundary's transposing dequantization, in blocks of pixels, equals the
    /// formula at every index (partial last blocks, one channel, many channels, batches).
    #[test]
    fn dequantize_nhwc_to_nchw_follows_the_formula(
        q in quant(), n in 1usize..3, h in 1usize..12, w in 1usize..15, c in 1usize..40, seed in any::<u64>(),
    ) {
        let len = n * h * w * c;
        let x: Vec<u8> = (0..len).map(|i| ((i as u64).wrapping_mul(seed | 1) >> 9) as u8).collect();
        let mut y = vec![f32::NAN; len];
        qkernels::dequantize_nhwc_to_nchw(&x, (n, h, w, c), q, &mut y).unwrap();
        for b in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    let v = x[(b * h * w + p) * c + ch];
                    let want = q.scale * ((v as i64 - q.zero_point as i64) as f32);
                    prop_assert_eq!(y[(b * c + ch) * h * w + p].to_bits(), want.to_bits());
                }
            }
        }
    }

    /// Both tables of every activation stay within one step of the function computed in f64
    /// (PyTorch's two loops differ from each other only by rounding), and `apply` uses the
    /// vector table on the first `vector_prefix(n)` elements only.
    #[test]
    fn activation_tables_follow_the_function_and_the_split(qi in quant(), qo in quant(), n in 0usize..300) {
        let exact = |op: UnaryOp, x: f64| -> f64 {
            match op {
                UnaryOp::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
                UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                UnaryOp::Tanh => x.tanh(),
                UnaryOp::LeakyRelu(s) => if x > 0.0 { x } else { x * s as f64 },
                UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
                UnaryOp::Elu(a) => if x >= 0.0 { x } else { a as f64 * x.exp_m1() },
                UnaryOp::Silu => x / (1.0 + (-x).exp()),
                _ => unreachable!(),
            }
        };
        for op in [UnaryOp::Hardswish, UnaryOp::Sigmoid, UnaryOp::Tanh, UnaryOp::LeakyRelu(0.1), UnaryOp::Gelu, UnaryOp::Elu(1.0), UnaryOp::Silu] {
            let t = op.tables(qi, qo);
            for q in 0..=255u8 {
                let want = qo.quantize(exact(op, qi.dequantize(q) as f64) as f32) as i32;
                for table in [&t.vector, &t.tail] {
                    prop_assert!((table.table()[q as usize] as i32 - want).abs() <= 1, "{:?} q {}: {} vs {}", op, q, table.table()[q as usize], want);
                }
            }
            let x: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let mut out = vec![0u8; n];
            t.apply(&x, &mut out).unwrap();
            let split = qkernels::vector_prefix(n);
            for (i, (&v, &o)) in x.iter().zip(&out).enumerate() {
                let table = if i < split { &t.vector } else { &t.tail };
                prop_assert_eq!(o, table.table()[v as usize]);
            }
        }
        let relu = UnaryOp::Relu.tables(qi, qi);
        prop_assert!((0..=255u8).all(|q| relu.vector.table()[q as usize] as i32 == (q as i32).max(qi.zero_point)));
    }

    #[test]
    fn pooling_matches_naive_windows(
        h in 1usize..9, w in 1usize..9, c in 1usize..20, k in 1usize..4, s in 1usize..3, pad in 0usize..2,
        ceil in any::<bool>(), include_pad in any::<bool>(), seed in any::<u32>(),
    ) {
        let x: Vec<u8> = (0..h * w * c).map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as u8).collect();
        let img = QImage { data: &x, n: 1, h, w, c, scale: 0.05, zero_point: 7 };
        let p = Pool2d { kernel: [k, k], stride: [s, s], padding: [pad, pad], dilation: [1, 1], ceil_mode: ceil, count_include_pad: include_pad, divisor_override: None };
        let Ok((oh, ow)) = p.output_hw(h, w) else { return Ok(()) };
        let mut out = vec![0u8; oh * ow * c];
        max_pool2d(&img, &p, &mut out).unwrap();
        let qo = QuantU8 { scale: 0.05, zero_point: 7 };
        let mut avg = vec![0u8; oh * ow * c];
        avg_pool2d(&img, &p, qo, &mut avg).unwrap();
        let mut ad = vec![0u8; 2 * 3 * c];
        adaptive_avg_pool2d(&img, (2, 3), qo, &mut ad).unwrap();
        for isa in crate::isas_under_test() {
            let (mut m2, mut a2, mut d2) = (vec![0u8; out.len()], vec![0u8; avg.len()], vec![0u8; ad.len()]);
            max_pool2d_with(isa, &img, &p, &mut m2).unwrap();
            avg_pool2d_with(isa, &img, &p, qo, &mut a2).unwrap();
            adaptive_avg_pool2d_with(isa, &img, (2, 3), qo, &mut d2).unwrap();
            prop_assert_eq!((&m2, &a2, &d2), (&out, &avg, &ad), "{}", isa);
        }
        for oy in 0..oh { for ox in 0..ow { for ch in 0..c {
            let mut best = 0u8;
            let (mut sum, mut n) = (0i32, 0i32);
            for ky in 0..k { for kx in 0..k {
                let (iy, ix) = ((oy * s + ky) as isize - pad as isize, (ox * s + kx) as isize - pad as isize);
                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                    let v = x[(iy as usize * w + ix as usize) * c + ch];
                    best = best.max(v);
                    sum += v as i32 - 7;
                    n += 1;
                }
            }}
            prop_assert_eq!(out[(oy * ow + ox) * c + ch], best);
            // Same scales in and out: the average of (q - zp), rounded half to even, plus zp.
            let ys = (oy * s) as isize - pad as isize;
            let xs = (ox * s) as isize - pad as isize;
            let pool = ((ys + k as isize).min((h + pad) as isize) - ys) * ((xs + k as isize).min((w + pad) as isize) - xs);
            let div = if include_pad { pool as f32 } else { n as f32 };
            let want = qtensor::kernels::quantize_scalar(sum as f32, 1.0 / (1.0 / (1.0 / div)), 7, 0, 255) as u8;
            prop_assert_eq!(avg[(oy * ow + ox) * c + ch], want);
        }}}
    }
}

#[test]
fn global_average_pool_and_cat() {
    let x: Vec<u8> = (0..2 * 3 * 5).map(|i| (i * 9 % 256) as u8).collect();
    let img = QImage { data: &x, n: 1, h: 2, w: 3, c: 5, scale: 0.1, zero_point: 3 };
    let mut g = vec![0u8; 5];
    adaptive_avg_pool2d(&img, (1, 1), QuantU8 { scale: 0.1, zero_point: 3 }, &mut g).unwrap();
    for ch in 0..5 {
        let mean = (0..6).map(|p| x[p * 5 + ch] as f64).sum::<f64>() / 6.0;
        assert!((g[ch] as f64 - mean).abs() <= 0.5 + 1e-9, "channel {ch}: {} vs {mean}", g[ch]);
    }
    let other: Vec<u8> = vec![10; 2 * 3 * 2];
    let img2 = QImage { data: &other, n: 1, h: 2, w: 3, c: 2, scale: 0.2, zero_point: 0 };
    let mut out = vec![0u8; 2 * 3 * 7];
    cat_channels(&[img, img2], &mut out, QuantU8 { scale: 0.1, zero_point: 3 }).unwrap();
    assert_eq!(&out[..5], &x[..5]); // same parameters: copied
    assert_eq!(&out[5..7], &[23, 23]); // 0.2 * 10 = 2.0 -> 3 + 20
                                       // An input of no channels adds nothing.
    let none = QImage { data: &[], c: 0, ..img2 };
    let mut with_none = vec![0u8; 2 * 3 * 7];
    cat_channels(&[img, none, img2], &mut with_none, QuantU8 { scale: 0.1, zero_point: 3 }).unwrap();
    assert_eq!(with_none, out);
    // Pixels wider than a run of the lookup kernel (4096 channels) go one at a time.
    let wide: Vec<u8> = (0..2 * 4200).map(|i| (i * 7 % 256) as u8).collect();
    let (qw, qo) = (QuantU8 { scale: 0.3, zero_point: 9 }, QuantU8 { scale: 0.1, zero_point: 3 });
    let w_img = QImage { data: &wide, n: 1, h: 1, w: 2, c: 4200, scale: qw.scale, zero_point: qw.zero_point };
    let mut wide_out = vec![0u8; 2 * 4200];
    cat_channels(&[w_img], &mut wide_out, qo).unwrap();
    for (i, (&o, &v)) in wide_out.iter().zip(&wide).enumerate() {
        let want = if i % 4200 < 4192 { qo.quantize(qw.dequantize_vec(v)) } else { qo.quantize(qw.dequantize(v)) };
        assert_eq!(o, want, "element {i}");
    }
    let e = cat_channels(&[img, QImage { h: 1, ..img2 }], &mut out, QuantU8 { scale: 0.1, zero_point: 3 }).unwrap_err();
    assert!(e.to_string().contains("height"), "{e}");
}

#[test]
fn flatten_follows_pytorch_order_and_errors_name_shapes() {
    // 1 image, 2x2 pixels, 3 channels: NHWC value = 10 * pixel + channel.
    let x: Vec<u8> = (0..4).flat_map(|p| (0..3).map(move |c| 10 * p + c)).collect();
    let img = QImage { data: &x, n: 1, h: 2, w: 2, c: 3, scale: 1.0, zero_point: 0 };
    let mut out = vec![0u8; 12];
    qkernels::flatten_nchw_order(&img, &mut out).unwrap();
    assert_eq!(out, vec![0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]);
    let q = QuantU8 { scale: 0.1, zero_point: 0 };
    let e = qkernels::add(&[1, 2], q, &[1], q, &mut [0, 0], q, false).unwrap_err().to_string();
    assert!(e.contains("expected [2], got [1]") && e.contains("broadcasting"), "{e}");
    let e = qkernels::mul(&[1], q, &[1], QuantU8 { scale: 0.0, zero_point: 0 }, &mut [0], q).unwrap_err().to_string();
    assert!(e.contains("scale 0e0"), "{e}");
    let e = qkernels::max_pool2d(&img, &Pool2d::square(3), &mut out).unwrap_err().to_string();
    assert!(e.contains("smaller than the window"), "{e}");
    let e = qkernels::batch_norm2d(&img, &[1.0; 2], &[0.0; 3], &[0.0; 3], &[1.0; 3], 1e-5, q, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected [3], got [2]") && e.contains("weight"), "{e}");
}

/// Byte transposes on every tier against the index arithmetic: sizes around the block sides
/// (8 and 16, with overlapping last blocks), narrow matrices of 2 to 7 (small batches) and 8
/// to 15 columns or rows (NHWC heads), and long ones; wrong buffer sizes are errors.
#[test]
fn transposes_on_every_tier_match_the_index_arithmetic() {
    let mut sizes: Vec<(usize, usize)> = Vec::new();
    for rows in (0..41).chain([63, 64, 65, 300]) {
        for cols in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 31, 33, 40, 300] {
            sizes.push((rows, cols));
        }
    }
    for isa in crate::isas_under_test() {
        for &(rows, cols) in &sizes {
            let src: Vec<u8> = (0..rows * cols).map(|i| (i * 31 % 253) as u8).collect();
            let mut dst = vec![0u8; rows * cols];
            qkernels::transpose_u8_isa(isa, &src, rows, cols, &mut dst).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c], "{isa}: {rows} x {cols} at {r}, {c}");
                }
            }
        }
    }
    let e = qkernels::transpose_u8(&[0; 5], 2, 3, &mut [0; 6]).unwrap_err().to_string();
    assert!(e.contains("transpose_u8") && e.contains("rows * cols"), "{e}");
}

#[test]
fn max_pooling_gives_the_same_bytes_on_any_thread_count() {
    // Outputs past the size (32 KiB) above which threads share the rows, batches of two.
    for (h, c, k, s, pad, dil) in [(57, 64, 3, 2, 1, 1), (40, 48, 2, 2, 0, 1), (45, 40, 3, 1, 1, 2)] {
        let x: Vec<u8> = (0..2 * h * h * c).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let img = QImage { data: &x, n: 2, h, w: h, c, scale: 0.05, zero_point: 3 };
        let p =
            Pool2d { kernel: [k, k], stride: [s, s], padding: [pad, pad], dilation: [dil, dil], ..Pool2d::square(k) };
        let (oh, ow) = p.output_hw(h, h).unwrap();
        let mut want = vec![0u8; 2 * oh * ow * c];
        max_pool2d(&img, &p, &mut want).unwrap();
        assert!(want.len() >= 1 << 15, "{} bytes: below the threads' share", want.len());
        for threads in [2, 3, 4] {
            let mut got = vec![0u8; want.len()];
            qkernels::max_pool2d_threads(&img, &p, &mut got, threads).unwrap();
            assert!(got == want, "h {h} c {c} k {k} threads {threads}");
        }
    }
}

#[test]
fn quantizing_nchw_into_nhwc_is_the_formula_per_value_on_any_thread_count() {
    // Channel counts with and without their own interleaving (1, 3, 4, 5), planes of a few
    // pixels and of several 512-pixel blocks with a partial last one, batches of one and two;
    // the largest shapes pass the size above which a pool's threads share an image.
    let q = QuantU8 { scale: 0.037, zero_point: 11 };
    for (n, c, h, w) in [(1, 1, 3, 5), (2, 3, 7, 9), (1, 3, 150, 151), (2, 4, 33, 71), (2, 5, 120, 117)] {
        let len = n * c * h * w;
        let x: Vec<f32> =
            (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 20) as f32 * 0.01 - 12.0).collect();
        let mut want = vec![0u8; len];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    let v = x[(b * c + ch) * h * w + p];
                    want[(b * h * w + p) * c + ch] =
                        qtensor::kernels::quantize_scalar(v, 1.0 / q.scale, q.zero_point, 0, 255) as u8;
                }
            }
        }
        for threads in [1, 2, 3] {
            let mut got = vec![0u8; len];
            qkernels::with_threads(threads, || qkernels::quantize_nchw_to_nhwc(&x, (n, c, h, w), q, &mut got)).unwrap();
            assert!(got == want, "n {n} c {c} h {h} w {w} threads {threads}");
        }
    }
}
