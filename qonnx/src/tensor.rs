//! Constant tensors: ONNX `TensorProto`s (initializers, `Constant` nodes, test data) decoded
//! into `f32` or `i64` values, with every size checked against the bytes that hold it, so a
//! damaged or hostile file allocates no more than it contains.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{OnnxError, Result};
use crate::proto::{data_type as dt, TensorProto};

/// A constant's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Floating-point data (`FLOAT`, `DOUBLE` and `FLOAT16` are read as `f32`).
    F32(Vec<f32>),
    /// Integer and boolean data, with flags per element ([`BATCH`], [`TOKENS`]) that say it
    /// follows the batch size or the sequence length: read off a value's shape at the axis
    /// that holds it, or computed from such an element (`batch * heads`), so that a `Reshape`
    /// or `Slice` built from it keeps that size whatever it is at run time.
    I64 {
        /// The values.
        v: Vec<i64>,
        /// The flags (one per value).
        flags: Vec<u8>,
    },
}

/// The flag of an integer that follows the batch size.
pub const BATCH: u8 = 1;
/// The flag of an integer that follows the sequence length (a symbolic size the import
/// follows besides the batch).
pub const TOKENS: u8 = 2;

/// A constant tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Const {
    /// Its shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Its values, in row-major order.
    pub data: Data,
}

impl Const {
    /// Integers without flags.
    pub fn ints(shape: Vec<usize>, v: Vec<i64>) -> Const {
        let flags = vec![0; v.len()];
        Const { shape, data: Data::I64 { v, flags } }
    }

    /// Floats.
    pub fn floats(shape: Vec<usize>, v: Vec<f32>) -> Const {
        Const { shape, data: Data::F32(v) }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::I64 { v, .. } => v.len(),
        }
    }

    /// No elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f32` (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I64 { v, .. } => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as integers, or `None` for float data.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64 { v, .. } => Some(v),
            Data::F32(_) => None,
        }
    }

    /// The flags of each element (all 0 for float data).
    pub fn flags(&self) -> Vec<u8> {
        match &self.data {
            Data::I64 { flags, .. } => flags.clone(),
            Data::F32(v) => vec![0; v.len()],
        }
    }

    /// Which elements follow the batch size.
    pub fn batch_flags(&self) -> Vec<bool> {
        self.flags().iter().map(|&f| f & BATCH != 0).collect()
    }

    /// Which elements follow the sequence length.
    pub fn token_flags(&self) -> Vec<bool> {
        self.flags().iter().map(|&f| f & TOKENS != 0).collect()
    }

    /// The values as an `f32` array of its shape.
    pub fn to_array(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_f32()).expect("a constant's length matches its shape")
    }
}

/// The number of elements of `dims`, or an error for negative or overflowing sizes.
fn element_count(dims: &[i64], what: &str) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut n: usize = 1;
    for &d in dims {
        let d = usize::try_from(d)
            .map_err(|_| OnnxError::Model(format!("tensor '{what}': negative dimension in {dims:?}")))?;
        n = n.checked_mul(d).ok_or_else(|| {
            OnnxError::Model(format!("tensor '{what}': {dims:?} has more elements than memory holds"))
        })?;
        shape.push(d);
    }
    Ok((shape, n))
}

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise the mantissa.
            let mut e: i32 = -14;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Where a tensor's bytes are read from when they are stored outside the model.
fn external_bytes(t: &TensorProto, name: &str, base: Option<&Path>) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for e in &t.external_data {
        let v = e.value.as_deref().unwrap_or("");
        let num = || {
            v.parse::<u64>().map_err(|_| {
                OnnxError::Model(format!("tensor '{name}': external_data {} = '{v}' is not a number", e.key()))
            })
        };
        match e.key.as_deref().unwrap_or("") {
            "location" => location = Some(v.to_string()),
            "offset" => offset = num()?,
            "length" => length = Some(num()?),
            _ => {}
        }
    }
    let location =
        location.ok_or_else(|| OnnxError::Model(format!("tensor '{name}': external data without a location")))?;
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(OnnxError::Model(format!(
            "tensor '{name}': external data location '{location}' must be a plain path relative to the model's folder"
        )));
    }
    let base = base.ok_or_else(|| {
        OnnxError::Model(format!(
            "tensor '{name}' keeps its data in the file '{location}'; load the model from its path (qonnx::load) so \
             that the file can be found beside it"
        ))
    })?;
    let path = base.join(rel);
    let io = |source| OnnxError::Io { path: path.display().to_string(), source };
    // Only the tensor's own range is read: a model keeps all its weights in one file, which
    // each of its tensors would otherwise read whole.
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(size),
    };
    let len = match end {
        Some(e) if offset <= size && e <= size => usize::try_from(e - offset).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        OnnxError::Model(format!(
            "tensor '{name}': external data offset {offset} length {length:?} reach past the end of '{}' ({size} \
             bytes)",
            path.display()
        ))
    })?;
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// Decodes a tensor. `base` is the model's folder, for external data.
pub fn decode(t: &TensorProto, base: Option<&Path>) -> Result<Const> {
    let name = t.name.as_deref().unwrap_or("<unnamed>");
    let (shape, n) = element_count(&t.dims, name)?;
    let ty = t.data_type.unwrap_or(0);
    let external = t.data_location == Some(1);
    let raw_owned;
    let raw: Option<&[u8]> = if external {
        raw_owned = external_bytes(t, name, base)?;
        Some(&raw_owned)
    } else {
        t.raw_data.as_deref()
    };
    let size = match ty {
        dt::FLOAT | dt::INT32 => 4,
        dt::DOUBLE | dt::INT64 => 8,
        dt::FLOAT16 => 2,
        dt::UINT8 | dt::INT8 | dt::BOOL => 1,
        other => {
            return Err(OnnxError::Model(format!(
                "tensor '{name}' is of data type {} ({other}); qonnx reads FLOAT, DOUBLE, FLOAT16, INT64, INT32, \
                 INT8, UINT8 and BOOL",
                dt::name(other)
            )))
        }
    };
    let mismatch = |got: usize, unit: &str| {
        OnnxError::Model(format!(
            "tensor '{name}' of shape {shape:?} ({}) needs {n} elements but holds {got} {unit}",
            dt::name(ty)
        ))
    };
    if let Some(raw) = raw {
        if Some(raw.len()) != n.checked_mul(size) {
            return Err(mismatch(raw.len(), "bytes"));
        }
        let chunks = raw.chunks_exact(size);
        let data = match ty {
            dt::FLOAT => Data::F32(chunks.map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()),
            dt::DOUBLE => {
                Data::F32(chunks.map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect())
            }
            dt::FLOAT16 => Data::F32(chunks.map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()),
            dt::INT64 => ints(chunks.map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
            dt::INT32 => ints(chunks.map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()),
            dt::INT8 => ints(raw.iter().map(|&b| i64::from(b as i8)).collect()),
            _ => ints(raw.iter().map(|&b| i64::from(b)).collect()),
        };
        return Ok(Const { shape, data });
    }
    let data = match ty {
        dt::FLOAT if t.float_data.len() == n => Data::F32(t.float_data.clone()),
        dt::FLOAT => return Err(mismatch(t.float_data.len(), "values in float_data")),
        dt::DOUBLE if t.double_data.len() == n => Data::F32(t.double_data.iter().map(|&v| v as f32).collect()),
        dt::DOUBLE => return Err(mismatch(t.double_data.len(), "values in double_data")),
        dt::INT64 if t.int64_data.len() == n => ints(t.int64_data.clone()),
        dt::INT64 => return Err(mismatch(t.int64_data.len(), "values in int64_data")),
        // FLOAT16 keeps its bits in int32_data, as do the 8-bit types and BOOL.
        dt::FLOAT16 if t.int32_data.len() == n => {
            Data::F32(t.int32_data.iter().map(|&v| f16_to_f32(v as u16)).collect())
        }
        _ if t.int32_data.len() == n => ints(t.int32_data.iter().map(|&v| i64::from(v)).collect()),
        _ => return Err(mismatch(t.int32_data.len(), "values in int32_data")),
    };
    Ok(Const { shape, data })
}

fn ints(v: Vec<i64>) -> Data {
    let flags = vec![0; v.len()];
    Data::I64 { v, flags }
}

/// An `f32` array as a `TensorProto` (raw little-endian data).
pub fn encode_f32(name: &str, a: &ArrayD<f32>) -> TensorProto {
    let raw: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    TensorProto {
        dims: a.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(dt::FLOAT),
        name: Some(name.to_string()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// Reads a `TensorProto` file (ONNX's test-data `.pb` format) as an `f32` array.
///
/// # Errors
/// The file cannot be read or decoded, or its data type is not a number.
pub fn read_pb(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io { path: path.display().to_string(), source })?;
    let t: TensorProto = prost::Message::decode(bytes.as_slice())
        .map_err(|e| OnnxError::Format { file: path.display().to_string(), reason: e.to_string() })?;
    Ok(decode(&t, path.parent())?.to_array())
}

/// Writes an `f32` array as a `TensorProto` file.
///
/// # Errors
/// The file cannot be written.
pub fn write_pb(path: impl AsRef<Path>, name: &str, a: &ArrayD<f32>) -> Result<()> {
    let path = path.as_ref();
    let bytes = prost::Message::encode_to_vec(&encode_f32(name, a));
    std::fs::write(path, bytes).map_err(|source| OnnxError::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn sizes_must_match_the_bytes() {
        let t = TensorProto {
            dims: vec![1 << 20, 1 << 20],
            data_type: Some(dt::FLOAT),
            raw_data: Some(vec![0; 8]),
            ..Default::default()
        };
        let e = decode(&t, None).unwrap_err().to_string();
        assert!(e.contains("needs"), "{e}");
        let t = TensorProto { dims: vec![-1], data_type: Some(dt::FLOAT), ..Default::default() };
        assert!(decode(&t, None).unwrap_err().to_string().contains("negative"));
        let t = TensorProto { dims: vec![i64::MAX, 4], data_type: Some(dt::FLOAT), ..Default::default() };
        assert!(decode(&t, None).unwrap_err().to_string().contains("more elements"));
    }

    #[test]
    fn external_data_cannot_leave_the_folder() {
        let t = TensorProto {
            dims: vec![1],
            data_type: Some(dt::FLOAT),
            data_location: Some(1),
            external_data: vec![crate::proto::StringStringEntryProto {
                key: Some("location".into()),
                value: Some("../secret".into()),
            }],
            ..Default::default()
        };
        let e = decode(&t, Some(Path::new("/tmp"))).unwrap_err().to_string();
        assert!(e.contains("relative to the model's folder"), "{e}");
    }
}
