//! An ONNX model PyTorch exported, imported and dynamically quantized with qrust's PyTorch
//! presets: the same bits as `quantize_dynamic` on the original module
//! (`scripts/onnx/qonnx_dynamic_fixture.py`), with no calibration data.

use qnn::{prepare, Mode, QConfigMapping};
use qobserve::QConfig;
use qonnx::tensor::read_pb;
use qonnx::ImportOptions;

use crate::data;

#[test]
fn an_imported_token_perceptron_is_pytorchs_quantize_dynamic_bit_for_bit() {
    let d = data().join("dynamic/token_mlp");
    let x = read_pb(d.join("input_0.pb")).unwrap();
    assert_eq!(x.shape(), &[2, 10, 16]);
    for (cfg, file) in [
        (QConfig::pytorch_dynamic(), "output_dynamic.pb"),
        (QConfig::pytorch_dynamic_per_channel(), "output_dynamic_per_channel.pb"),
    ] {
        let m = qonnx::load(d.join("model.onnx"), &ImportOptions::default()).unwrap();
        let q = prepare(m.graph, &QConfigMapping::new(cfg)).unwrap().convert().unwrap();
        assert_eq!(q.plan().iter().filter(|e| e.mode == Mode::Dynamic).count(), 2, "{:?}", q.plan());
        let want = read_pb(d.join(file)).unwrap();
        let got = q.forward(&x).unwrap();
        assert_eq!(got.shape(), want.shape());
        let same = got.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
        assert_eq!(same, got.len(), "{file}: {same} of {} identical to PyTorch", got.len());
    }
}
