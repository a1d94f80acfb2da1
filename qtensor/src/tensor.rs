//! [`QTensor`]: integer data plus the parameters that give it meaning.

use ndarray::{Array, ArrayBase, ArrayD, ArrayViewD, Data, Dimension, IxDyn};

use crate::isa::{self, Isa};
use crate::kernels::{check_range_dtype, dequantize_block, for_blocks, nan_error, quantize_block, CHUNK};
use crate::{QElement, QError, QParams, QuantRange, Result};

/// A quantized tensor: integers of type `T` (`u8`, `i8` or `i32`), their [`QParams`] and the
/// [`QuantRange`] they were clamped to. Real value of element `q` in channel `c`:
/// `scale[c] * (q - zero_point[c])`.
///
/// Data is always stored in standard (row-major, contiguous) layout.
///
/// ```
/// use ndarray::array;
/// use qtensor::{QParams, QTensor};
/// let x = array![[0.0f32, 0.5], [1.0, -0.25]];
/// let q = QTensor::<u8>::quantize(&x, QParams::per_tensor(0.25, 2)?)?;
/// assert_eq!(q.int_repr(), array![[2u8, 4], [6, 1]].into_dyn());
/// assert_eq!(q.dequantize(), x.into_dyn());
/// # Ok::<(), qtensor::QError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct QTensor<T: QElement> {
    data: ArrayD<T>,
    params: QParams,
    range: QuantRange,
}

/// Splits a row-major `shape` around `axis`: (elements before, channels, elements after).
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[axis], shape[axis + 1..].iter().product())
}

/// Quantizes a row-major slice of `shape` with validated parameters. Returns whether a NaN
/// was seen.
fn quantize_flat<T: QElement>(
    isa: Isa,
    src: &[f32],
    shape: &[usize],
    dst: &mut [T],
    params: &QParams,
    range: &QuantRange,
) -> bool {
    let (qmin, qmax) = (range.qmin(), range.qmax());
    match params {
        QParams::PerTensor { scale, zero_point } => {
            let inv = 1.0f32 / scale;
            for_blocks(src, dst, CHUNK, |_, s, d| quantize_block(isa, s, d, inv, *zero_point, qmin, qmax))
        }
        QParams::PerChannel(pc) => {
            let (channels, inner) = split_at_axis(shape, pc.axis());
            let invs: Vec<f32> = pc.scales().iter().map(|s| 1.0f32 / s).collect();
            let zps = pc.zero_points();
            for_blocks(src, dst, inner, |b, s, d| {
                let c = b % channels;
                quantize_block(isa, s, d, invs[c], zps[c], qmin, qmax)
            })
        }
    }
}

/// Dequantizes a row-major slice of `shape` with validated parameters.
fn dequantize_flat<T: QElement>(isa: Isa, src: &[T], shape: &[usize], dst: &mut [f32], params: &QParams) {
    match params {
        QParams::PerTensor { scale, zero_point } => {
            for_blocks(src, dst, CHUNK, |_, s, d| {
                dequantize_block(isa, s, d, *scale, *zero_point);
                false
            });
        }
        QParams::PerChannel(pc) => {
            let (channels, inner) = split_at_axis(shape, pc.axis());
            for_blocks(src, dst, inner, |b, s, d| {
                let c = b % channels;
                dequantize_block(isa, s, d, pc.scales()[c], pc.zero_points()[c]);
                false
            });
        }
    }
}

impl<T: QElement> QTensor<T> {
    /// Quantizes `x` into the full range of `T`, exactly as PyTorch's
    /// `torch.quantize_per_tensor` / `torch.quantize_per_channel`:
    /// `q = clamp(zp + round_half_even(x * (1/scale)), T::MIN, T::MAX)`. ±inf saturate.
    ///
    /// # Errors
    /// [`QError::NanInput`] if `x` holds a NaN; invalid parameters for `x`'s shape
    /// ([`QError::AxisOutOfRange`], [`QError::ChannelCountMismatch`],
    /// [`QError::ZeroPointOutOfRange`], [`QError::InvalidScale`]).
    pub fn quantize<S, D>(x: &ArrayBase<S, D>, params: QParams) -> Result<Self>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        Self::quantize_in_range(x, params, QuantRange::full(T::DTYPE))
    }

    /// Quantizes `x`, clamping to `range` instead of the full range of `T` (PyTorch clamps
    /// weights to their observer's range this way, e.g. `-127..=127`).
    ///
    /// # Errors
    /// As [`QTensor::quantize`], and [`QError::Unsupported`] for a range of another dtype.
    pub fn quantize_in_range<S, D>(x: &ArrayBase<S, D>, params: QParams, range: QuantRange) -> Result<Self>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        Self::quantize_with(isa::selected(), x, params, range)
    }

    /// [`QTensor::quantize_in_range`] with an explicit instruction set (capped to what the
    /// CPU supports), for conformance tests and benchmarks.
    ///
    /// # Errors
    /// As [`QTensor::quantize_in_range`].
    pub fn quantize_with<S, D>(isa: Isa, x: &ArrayBase<S, D>, params: QParams, range: QuantRange) -> Result<Self>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        const OP: &str = "QTensor::quantize";
        check_range_dtype::<T>(OP, &range)?;
        params.validate(OP, x.shape(), &range)?;
        let isa = isa.capped_to_supported();
        let x = x.as_standard_layout();
        let src = x.as_slice().expect("standard layout is contiguous");
        let mut out = vec![T::default(); src.len()];
        if quantize_flat(isa, src, x.shape(), &mut out, &params, &range) {
            return Err(nan_error(OP, src, x.shape()));
        }
        let data = ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("length equals the shape's product");
        Ok(QTensor { data, params, range })
    }

    /// Wraps existing integer data (e.g. loaded from a file) with its parameters.
    ///
    /// # Errors
    /// Invalid parameters for the data's shape, a range of another dtype, or a value outside
    /// `range` ([`QError::InvalidRange`], naming the first such value).
    pub fn from_int_repr<D: Dimension>(data: Array<T, D>, params: QParams, range: QuantRange) -> Result<Self> {
        const OP: &str = "QTensor::from_int_repr";
        check_range_dtype::<T>(OP, &range)?;
        params.validate(OP, data.shape(), &range)?;
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !range.contains(v.to_i32() as i64)) {
            return Err(QError::InvalidRange {
                op: OP,
                qmin: range.qmin() as i64,
                qmax: range.qmax() as i64,
                dtype: T::DTYPE,
                reason: format!(
                    "value {v} at flat index {i} lies outside it; clamp the data to the range or \
                     pass the range it was quantized with"
                ),
            });
        }
        let data = data.into_dyn().as_standard_layout().into_owned();
        Ok(QTensor { data, params, range })
    }

    /// Real values: `scale[c] * (q - zero_point[c])`, one `f32` rounding per element.
    pub fn dequantize(&self) -> ArrayD<f32> {
        self.dequantize_with(isa::selected())
    }

    /// [`QTensor::dequantize`] with an explicit instruction set.
    pub fn dequantize_with(&self, isa: Isa) -> ArrayD<f32> {
        let src = self.data.as_slice().expect("QTensor data is always standard layout");
        let mut out = vec![0.0f32; src.len()];
        dequantize_flat(isa.capped_to_supported(), src, self.data.shape(), &mut out, &self.params);
        ArrayD::from_shape_vec(self.data.raw_dim(), out).expect("length equals the shape's product")
    }

    /// Re-expresses the tensor with new parameters (and possibly a new element type, e.g.
    /// `i32` accumulators to `u8`), into the full range of `U`. Defined as, and bit-identical
    /// to, `QTensor::<U>::quantize(&self.dequantize(), params)`.
    ///
    /// # Errors
    /// Invalid `params` for this tensor's shape.
    pub fn requantize<U: QElement>(&self, params: QParams) -> Result<QTensor<U>> {
        self.requantize_in_range(params, QuantRange::full(U::DTYPE))
    }

    /// [`QTensor::requantize`] clamping to `range`.
    ///
    /// # Errors
    /// Invalid `params` for this tensor's shape, or a range of another dtype.
    pub fn requantize_in_range<U: QElement>(&self, params: QParams, range: QuantRange) -> Result<QTensor<U>> {
        const OP: &str = "QTensor::requantize";
        check_range_dtype::<U>(OP, &range)?;
        params.validate(OP, self.shape(), &range)?;
        QTensor::<U>::quantize_in_range(&self.dequantize(), params, range)
    }

    /// The integer values.
    pub fn int_repr(&self) -> ArrayViewD<'_, T> {
        self.data.view()
    }

    /// The integer values as a flat row-major slice.
    pub fn as_slice(&self) -> &[T] {
        self.data.as_slice().expect("QTensor data is always standard layout")
    }

    /// Takes the integer values out.
    pub fn into_int_repr(self) -> ArrayD<T> {
        self.data
    }

    /// The quantization parameters.
    pub fn params(&self) -> &QParams {
        &self.params
    }

    /// The range the values were clamped to.
    pub fn range(&self) -> QuantRange {
        self.range
    }

    /// The element type.
    pub fn dtype(&self) -> crate::DType {
        T::DTYPE
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.data.shape()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Fake quantization: quantize to `T` in `range`, then dequantize, all in one call; the
/// values an int8 model would see, in `f32`, for simulating quantization error. Equal to
/// `QTensor::<T>::quantize_in_range(x, params, range)?.dequantize()`, shape preserved.
///
/// ```
/// use ndarray::array;
/// use qtensor::{fake_quantize, DType, QParams, QuantRange};
/// let x = array![0.1f32, 0.26, 9.0];
/// let y = fake_quantize::<i8, _, _>(&x, &QParams::per_tensor(0.25, 0)?,
///                                   QuantRange::custom(DType::I8, -8, 7)?)?;
/// assert_eq!(y, array![0.0, 0.25, 1.75]);
/// # Ok::<(), qtensor::QError>(())
/// ```
///
/// # Errors
/// As [`QTensor::quantize_in_range`].
pub fn fake_quantize<T, S, D>(x: &ArrayBase<S, D>, params: &QParams, range: QuantRange) -> Result<Array<f32, D>>
where
    T: QElement,
    S: Data<Elem = f32>,
    D: Dimension,
{
    let q = QTensor::<T>::quantize_in_range(x, params.clone(), range)?;
    let y = q.dequantize();
    Ok(y.into_dimensionality::<D>().expect("dequantize keeps the input's shape"))
}
