//! Element types of quantized tensors.
//!
//! A quantized tensor stores integers of one [`DType`]; the Rust type that holds one value
//! implements the sealed trait [`QElement`]. Only this crate can add element types, which
//! lets it add more later (4-bit values packed two to a byte, 16-bit integers) without
//! breaking anyone: [`DType`] is `#[non_exhaustive]`, and the trait describes a type by its
//! logical range ([`QElement::MIN`], [`QElement::MAX`]) and its bit width rather than assuming
//! one value per byte.

use std::fmt;

/// The integer type of a quantized tensor's values.
///
/// The names follow PyTorch's (`quint8`, `qint8`, `qint32`) in [`fmt::Display`] so error
/// messages read naturally to someone coming from `torch.ao.quantization`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// Unsigned 8-bit, values 0..=255 (PyTorch `quint8`): activations.
    U8,
    /// Signed 8-bit, values -128..=127 (PyTorch `qint8`): weights.
    I8,
    /// Signed 32-bit (PyTorch `qint32`): accumulators and biases.
    I32,
}

impl DType {
    /// Smallest value of the type.
    pub const fn min_value(self) -> i64 {
        match self {
            DType::U8 => 0,
            DType::I8 => -128,
            DType::I32 => i32::MIN as i64,
        }
    }

    /// Largest value of the type.
    pub const fn max_value(self) -> i64 {
        match self {
            DType::U8 => 255,
            DType::I8 => 127,
            DType::I32 => i32::MAX as i64,
        }
    }

    /// Number of bits of one logical value.
    pub const fn bits(self) -> u32 {
        match self {
            DType::U8 | DType::I8 => 8,
            DType::I32 => 32,
        }
    }

    /// Whether the type is signed.
    pub const fn is_signed(self) -> bool {
        !matches!(self, DType::U8)
    }

    /// PyTorch's name for the type.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::U8 => "quint8",
            DType::I8 => "qint8",
            DType::I32 => "qint32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rust = match self {
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::I32 => "i32",
        };
        write!(f, "{rust} ({})", self.torch_name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for i8 {}
    impl Sealed for i32 {}
}

/// A Rust type that stores one quantized value. Implemented for `u8`, `i8` and `i32`.
///
/// Sealed: the set of element types belongs to this crate, so that every kernel can match on
/// [`QElement::DTYPE`] exhaustively within the workspace. `bytemuck::Pod` lets integer data be
/// viewed as bytes (for files and SIMD loads) without `unsafe` at the call site.
pub trait QElement:
    sealed::Sealed
    + bytemuck::Pod
    + Copy
    + Default
    + PartialEq
    + Eq
    + PartialOrd
    + Ord
    + Send
    + Sync
    + fmt::Debug
    + fmt::Display
    + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Smallest value, widened.
    const MIN: i32;
    /// Largest value, widened.
    const MAX: i32;

    /// Widens the value to `i32` (exact for every element type).
    fn to_i32(self) -> i32;

    /// Narrows an `i32` that the caller has already clamped into `[MIN, MAX]`.
    ///
    /// Debug builds assert the precondition; release builds truncate like `as`.
    fn from_i32_clamped(v: i32) -> Self;
}

macro_rules! impl_qelement {
    ($t:ty, $dtype:expr) => {
        impl QElement for $t {
            const DTYPE: DType = $dtype;
            const MIN: i32 = <$t>::MIN as i32;
            const MAX: i32 = <$t>::MAX as i32;

            #[inline(always)]
            fn to_i32(self) -> i32 {
                self as i32
            }

            #[inline(always)]
            fn from_i32_clamped(v: i32) -> Self {
                debug_assert!(
                    (<Self as QElement>::MIN..=<Self as QElement>::MAX).contains(&v),
                    "{v} outside {}",
                    Self::DTYPE
                );
                v as $t
            }
        }
    };
}

impl_qelement!(u8, DType::U8);
impl_qelement!(i8, DType::I8);
impl_qelement!(i32, DType::I32);
