//! ONNX's own backend test cases (from the `onnx` wheel, copied by
//! `scripts/onnx/onnx_backend_cases.py`) for the ops qonnx imports: each model imported, run
//! on the case's inputs and compared with the case's outputs.

use qonnx::tensor::read_pb;
use qonnx::ImportOptions;

use crate::{data, rel_err};

#[test]
fn backend_cases_match_their_outputs() {
    let dir = data().join("backend");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let (mut pass, mut refused) = (Vec::new(), Vec::new());
    for case in index.as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let d = dir.join(name);
        let m = match qonnx::load(d.join("model.onnx"), &ImportOptions::default()) {
            Ok(m) => m,
            Err(e) => {
                refused.push(format!("{name}: {e}"));
                continue;
            }
        };
        let inputs: Vec<_> =
            (0..m.inputs.len()).map(|i| read_pb(d.join(format!("test_data_set_0/input_{i}.pb"))).unwrap()).collect();
        let got = m.graph.run(&inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, y) in got.iter().enumerate() {
            let want = read_pb(d.join(format!("test_data_set_0/output_{i}.pb"))).unwrap();
            let err = rel_err(y, &want);
            assert!(err <= 1e-4, "{name}: output {i} differs from ONNX's by {err:e} (relative)");
        }
        pass.push(name.to_string());
    }
    eprintln!("ONNX backend cases: {} pass, {} refused with an error:", pass.len(), refused.len());
    for r in &refused {
        eprintln!("  {r}");
    }
    // What is refused, and why: a bias computed at run time added to a product of computed
    // matrices (`addmm`; `mm`, the same product without it, imports and matches). Everything
    // else imports and matches (the means over one spatial axis too).
    let mut names: Vec<&str> = refused.iter().map(|r| r.split(':').next().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["test_operator_addmm"]);
    assert!(pass.iter().any(|p| p == "test_operator_reduced_mean_keepdim"), "{pass:?}");
    assert!(refused[0].contains("computed at run time"), "{refused:?}");
    assert!(pass.iter().any(|p| p == "test_operator_mm"), "{pass:?}");
    assert_eq!(pass.len() + refused.len(), index.as_array().unwrap().len());
}
