//! SVG pictures of a quantization, written by hand (a few rectangles, lines and labels need
//! no plotting crate): the per-module SQNR of a report as a bar chart, and an activation's
//! calibration histogram with the range its observer chose marked. `cargo xtask demo --plots`
//! and the command line's `--plots` draw them.

use std::fmt::Write as _;
use std::path::Path;

use qobserve::{HistogramObserver, Observer};

const W: f64 = 720.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 40.0;
const TOP: f64 = 40.0;

fn svg(title: &str, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n{body}</svg>\n",
        W / 2.0,
        escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Bars of output SQNR (and weight SQNR where there are weights) per module.
pub fn sqnr_chart(rows: &[(String, Option<f64>, Option<f64>)]) -> String {
    let rows: Vec<_> = rows.iter().filter(|r| r.1.is_some_and(f64::is_finite)).collect();
    let top = rows.iter().flat_map(|r| [r.1, r.2]).flatten().filter(|v| v.is_finite()).fold(10.0f64, f64::max);
    let top = (top / 10.0).ceil() * 10.0;
    let (pw, ph) = (W - LEFT - 20.0, H - TOP - BOTTOM - 30.0);
    let slot = pw / rows.len().max(1) as f64;
    let y = |v: f64| TOP + ph * (1.0 - v / top);
    let mut b = String::new();
    for t in (0..=top as usize).step_by(10) {
        let yy = y(t as f64);
        let _ = writeln!(
            b,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{t}</text>",
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    for (i, (name, out, weight)) in rows.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + slot * 0.1;
        let bw = slot * 0.4;
        for (k, (v, colour)) in [(*out, "#3b6fb6"), (*weight, "#e08a2c")].into_iter().enumerate() {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                let _ = writeln!(
                    b,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{} {v:.1} dB</title></rect>",
                    x0 + bw * k as f64,
                    y(v),
                    y(0.0) - y(v),
                    escape(name)
                );
            }
        }
        let _ = writeln!(
            b,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + bw,
            y(0.0) + 16.0,
            escape(name)
        );
    }
    let _ = writeln!(
        b,
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">SQNR, dB</text>\n\
         <rect x=\"{LEFT}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"#3b6fb6\"/><text x=\"{}\" y=\"{}\">output vs float</text>\n\
         <rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"#e08a2c\"/><text x=\"{}\" y=\"{}\">weights vs float</text>",
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        H - 22.0,
        LEFT + 16.0,
        H - 12.0,
        LEFT + 150.0,
        H - 22.0,
        LEFT + 166.0,
        H - 12.0
    );
    svg("int8 vs float, per module (higher is better)", &b)
}

/// A histogram observer's counts (log scale, merged to at most 256 bars) with the observed
/// range and the range the quantization keeps (`[scale (qmin - zp), scale (qmax - zp)]`).
/// `None` for other observers.
pub fn histogram_chart(name: &str, obs: &dyn Observer) -> Option<String> {
    let h = obs.as_any().downcast_ref::<HistogramObserver>()?;
    let c = h.collector();
    if c.is_empty() {
        return None;
    }
    let (lo, hi) = c.range();
    let p = obs.qparams().ok()?;
    let range = obs.spec().range;
    let (s, zp) = (p.scale(0), p.zero_point(0));
    let (clip_lo, clip_hi) = (s * (range.qmin() - zp) as f32, s * (range.qmax() - zp) as f32);
    let counts = c.counts();
    let group = counts.len().div_ceil(256);
    let bars: Vec<f64> = counts.chunks(group).map(|g| g.iter().map(|&v| v as f64).sum()).collect();
    let peak = bars.iter().copied().fold(1.0, f64::max).log10().max(1.0);
    let (xmin, xmax) = (lo.min(clip_lo) as f64, hi.max(clip_hi) as f64);
    let pad = (xmax - xmin).max(f64::EPSILON) * 0.03;
    let (xmin, xmax) = (xmin - pad, xmax + pad);
    let span = xmax - xmin;
    let (pw, ph) = (W - LEFT - 20.0, H - TOP - BOTTOM - 30.0);
    let x = |v: f64| LEFT + pw * (v - xmin) / span;
    let y = |count: f64| TOP + ph * (1.0 - (1.0 + count).log10() / peak);
    let bin_w = (hi - lo) as f64 / bars.len() as f64;
    let mut b = String::new();
    for (i, &count) in bars.iter().enumerate() {
        if count > 0.0 {
            let x0 = x(lo as f64 + bin_w * i as f64);
            let _ = writeln!(
                b,
                "<rect x=\"{x0:.2}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"#3b6fb6\"/>",
                y(count),
                (x(lo as f64 + bin_w * (i + 1) as f64) - x0).max(0.5),
                y(0.0) - y(count)
            );
        }
    }
    for (v, label, anchor, dx) in [(clip_lo, "kept from", "start", 4.0), (clip_hi, "kept to", "end", -4.0)] {
        let xx = x(v as f64);
        let _ = writeln!(
            b,
            "<line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#c0392b\" stroke-width=\"2\" stroke-dasharray=\"6 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#c0392b\">{label} {v:.3}</text>",
            y(0.0),
            xx + dx,
            TOP + 12.0
        );
    }
    let _ = writeln!(
        b,
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{lo:.3}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{hi:.3}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">observed values (counts on a log scale); scale {s:.5}, zero point {zp}</text>",
        LEFT + pw,
        y(0.0),
        y(0.0),
        x(lo as f64),
        y(0.0) + 16.0,
        x(hi as f64),
        y(0.0) + 16.0,
        W / 2.0,
        H - 12.0
    );
    Some(svg(&format!("{name}: calibration histogram and the range int8 keeps"), &b))
}

/// Writes the named SVG files into `dir` (created if missing).
///
/// # Errors
/// [`crate::NnError::File`] naming the folder or file that cannot be written.
pub fn write_files(dir: &Path, files: &[(String, String)]) -> crate::Result<()> {
    let io =
        |p: &Path, e: std::io::Error| crate::NnError::File { file: p.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (file, text) in files {
        let p = dir.join(file);
        std::fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qobserve::{MinMaxObserver, QuantSpec};

    #[test]
    fn histograms_are_drawn_for_histogram_observers_only() {
        let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[1000]), |i| (i[0] as f32 / 100.0).sin() * 3.0);
        let mut h = HistogramObserver::new(QuantSpec::u8_affine()).unwrap();
        h.observe(x.view()).unwrap();
        let svg = histogram_chart("act", &h).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("kept from") && svg.contains("kept to") && svg.contains("act: calibration"));
        let mut m = MinMaxObserver::new(QuantSpec::u8_affine());
        m.observe(x.view()).unwrap();
        assert!(histogram_chart("act", &m).is_none());
        let empty = HistogramObserver::new(QuantSpec::u8_affine()).unwrap();
        assert!(histogram_chart("act", &empty).is_none());
    }

    #[test]
    fn the_sqnr_chart_has_a_bar_per_value_and_escapes_names() {
        let rows = vec![
            ("a<b".to_string(), Some(30.0), Some(40.0)),
            ("pool".to_string(), Some(25.0), None),
            ("bn".to_string(), None, None),
        ];
        let svg = sqnr_chart(&rows);
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
    }
}
