//! Input data: `.npy` / `.npz` arrays, ONNX TensorProto files (`.pb`), or images (one file or
//! a folder) decoded, resized, cropped and normalized as torchvision's ImageNet transforms do.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{ArrayD, Axis, IxDyn};
use ndarray_npy::{NpzReader, ReadNpyExt};

/// How images become tensors.
#[derive(Debug, Clone)]
pub struct ImagePrep {
    /// The shorter side is resized to this (bilinear), before cropping.
    pub resize: u32,
    /// The centre crop's side.
    pub crop: u32,
    /// Per-channel mean, on values in [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

const IMAGE_EXT: &[&str] = &["png", "jpg", "jpeg"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXT.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads `path` as batches of one model input of `batch` items each (the last may be
/// smaller): an `.npy` array `[N, ...]`, an `.npz` whose arrays are each `[N, ...]`, an image,
/// or a folder of images (sorted by name).
pub fn batches(path: &Path, batch: usize, prep: &ImagePrep) -> Result<Vec<ArrayD<f32>>, String> {
    let whole = read(path, prep)?;
    Ok(split(whole, batch.max(1)))
}

/// Reads `path` as one array (see [`batches`]).
pub fn read(path: &Path, prep: &ImagePrep) -> Result<ArrayD<f32>, String> {
    let shown = path.display();
    if !path.exists() {
        return Err(format!("{shown}: no such file or folder"));
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{shown}: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!("{shown}: no .png or .jpg images in this folder"));
        }
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(ProgressStyle::with_template("decoding {pos}/{len} images {bar:30} {eta}").expect("template"));
        let mut all = Vec::with_capacity(files.len());
        for f in &files {
            all.push(image(f, prep)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let views: Vec<_> = all.iter().map(|a| a.view()).collect();
        return ndarray::concatenate(Axis(0), &views).map_err(|e| format!("{shown}: {e}"));
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("npy") => {
            let open = || std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"));
            match ArrayD::<f32>::read_npy(open()?) {
                Ok(a) => Ok(a),
                Err(_) => match ArrayD::<i64>::read_npy(open()?) {
                    Ok(a) => Ok(a.mapv(|v| v as f32)),
                    Err(_) => ArrayD::<i32>::read_npy(open()?)
                        .map(|a| a.mapv(|v| v as f32))
                        .map_err(|e| format!("{shown}: {e} (qrust reads float32, int64 and int32 arrays in C order)")),
                },
            }
        }
        Some("npz") => {
            let f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
            let mut z = NpzReader::new(f).map_err(|e| format!("{shown}: {e}"))?;
            let names = z.names().map_err(|e| format!("{shown}: {e}"))?;
            let mut arrays = Vec::new();
            for n in &names {
                arrays.push(npz_array(&mut z, n, &shown)?);
            }
            if arrays.is_empty() {
                return Err(format!("{shown}: no arrays"));
            }
            let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|e| format!("{shown}: its arrays differ in shape beyond the first axis ({e})"))
        }
        // ONNX's test-data form (a TensorProto), as ONNX model zoos ship inputs.
        Some("pb") => qonnx::tensor::read_pb(path).map_err(|e| e.to_string()),
        _ if is_image(path) => image(path, prep),
        _ => Err(format!(
            "{shown}: expected a .npy or .npz file, an ONNX TensorProto (.pb), a .png / .jpg image, or a folder of \
             images"
        )),
    }
}

/// Array `n` of an `.npz` as `f32`: float32 as it is, int64 and int32 (token ids) converted.
fn npz_array<R: std::io::Read + std::io::Seek>(
    z: &mut NpzReader<R>,
    n: &str,
    shown: &impl std::fmt::Display,
) -> Result<ArrayD<f32>, String> {
    match z.by_name::<ndarray::OwnedRepr<f32>, IxDyn>(n) {
        Ok(a) => Ok(a),
        Err(_) => match z.by_name::<ndarray::OwnedRepr<i64>, IxDyn>(n) {
            Ok(a) => Ok(a.mapv(|v| v as f32)),
            Err(_) => z
                .by_name::<ndarray::OwnedRepr<i32>, IxDyn>(n)
                .map(|a| a.mapv(|v| v as f32))
                .map_err(|e| format!("{shown}: array '{n}': {e} (qrust reads float32, int64 and int32 arrays)")),
        },
    }
}

/// Splits along axis 0 into batches.
fn split(a: ArrayD<f32>, batch: usize) -> Vec<ArrayD<f32>> {
    let n = a.shape().first().copied().unwrap_or(0);
    (0..n)
        .step_by(batch)
        .map(|s| a.slice_axis(Axis(0), ndarray::Slice::from(s..(s + batch).min(n))).to_owned())
        .collect()
}

/// One image as `[1, 3, crop, crop]`.
fn image(path: &Path, p: &ImagePrep) -> Result<ArrayD<f32>, String> {
    let shown = path.display();
    if p.crop == 0 || p.resize < p.crop {
        return Err(format!("--resize {} must be at least --crop {} (and the crop positive)", p.resize, p.crop));
    }
    let img = image::open(path).map_err(|e| format!("{shown}: {e}"))?.to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("{shown}: an empty image"));
    }
    // The shorter side to `resize`, the other in proportion (torchvision's Resize(int)).
    let (nw, nh) = if w <= h {
        (p.resize, ((u64::from(h) * u64::from(p.resize)) / u64::from(w)) as u32)
    } else {
        (((u64::from(w) * u64::from(p.resize)) / u64::from(h)) as u32, p.resize)
    };
    let img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    let (x0, y0) = ((nw - p.crop) / 2, (nh - p.crop) / 2);
    let c = p.crop as usize;
    Ok(ArrayD::from_shape_fn(IxDyn(&[1, 3, c, c]), |i| {
        let px = img.get_pixel(x0 + i[3] as u32, y0 + i[2] as u32);
        (f32::from(px[i[1]]) / 255.0 - p.mean[i[1]]) / p.std[i[1]]
    }))
}

/// Reads the inputs of a model with several (`names`, in its order) from an `.npz` holding
/// one array `[N, ...]` per input, named as the input (`numpy.savez(path, input_ids=...,
/// attention_mask=...)`); integer arrays (token ids) are read as `f32` values, exact up to
/// 2^24. Every array must hold the same number of items.
pub fn read_inputs(path: &Path, names: &[String]) -> Result<Vec<ArrayD<f32>>, String> {
    let shown = path.display();
    let hint = || {
        format!(
            "the model has {} inputs ({}): give an .npz with one array [N, ...] per input, named as the inputs \
             (numpy.savez(path, {}))",
            names.len(),
            names.join(", "),
            names.iter().map(|n| format!("{n}=...")).collect::<Vec<_>>().join(", ")
        )
    };
    if path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() != Some("npz") {
        return Err(format!("{shown}: {}", hint()));
    }
    let f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut z = NpzReader::new(f).map_err(|e| format!("{shown}: {e}"))?;
    let have = z.names().map_err(|e| format!("{shown}: {e}"))?;
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if !have.contains(n) {
            return Err(format!("{shown}: no array '{n}' (it holds {}); {}", have.join(", "), hint()));
        }
        out.push(npz_array(&mut z, n, &shown)?);
    }
    let items: Vec<usize> = out.iter().map(|a| a.shape().first().copied().unwrap_or(0)).collect();
    if items.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "{shown}: the arrays hold different numbers of items ({items:?} for {})",
            names.join(", ")
        ));
    }
    Ok(out)
}

/// The inputs' items in batches of `batch` (the last may be smaller), each batch one array
/// per input.
pub fn input_batches(xs: &[ArrayD<f32>], batch: usize) -> Vec<Vec<ArrayD<f32>>> {
    let n = xs.first().map_or(0, |x| x.shape()[0]);
    let batch = batch.max(1);
    (0..n).step_by(batch).map(|s| items(xs, s, (s + batch).min(n))).collect()
}

/// Items `start..end` (along axis 0) of each input.
pub fn items(xs: &[ArrayD<f32>], start: usize, end: usize) -> Vec<ArrayD<f32>> {
    xs.iter().map(|a| a.slice_axis(Axis(0), ndarray::Slice::from(start..end)).to_owned()).collect()
}

/// Writes an array as `.npy`.
pub fn write_npy(path: &Path, a: &ArrayD<f32>) -> Result<(), String> {
    use ndarray_npy::WriteNpyExt;
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    a.write_npy(std::io::BufWriter::new(f)).map_err(|e| format!("{}: {e}", path.display()))
}
