//! Runs exported ONNX files through onnx.checker and ONNX Runtime with
//! tests/ort/check.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use isonn::interop::proto::ModelProto;
use isonn::interop::{decode_tensor, export_network, export_nonneg, npy, write_model};
use isonn::model::Network;
use isonn::nonneg::{transform, TransformOptions};

use super::max_abs;

/// Returns the Python interpreter: `ISONN_PYTHON`, or `python3`.
fn python() -> String {
    std::env::var("ISONN_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Returns whether Python with onnx, onnxruntime and numpy is available.
/// With `ISONN_REQUIRE_ORT=1` (set by .ci/run) a missing package fails the
/// test instead; without it the caller prints a skip notice and returns.
pub fn available(test: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var("ISONN_REQUIRE_ORT").as_deref() == Ok("1") {
        panic!(
            "{test}: ISONN_REQUIRE_ORT=1 but `{} -c 'import onnx, onnxruntime, numpy'` failed; \
             install them with pip install onnx onnxruntime numpy",
            python()
        );
    }
    eprintln!(
        "SKIPPED {test}: python with onnx, onnxruntime and numpy not found (set ISONN_PYTHON or \
         pip install onnx onnxruntime numpy; ISONN_REQUIRE_ORT=1 makes this a failure)"
    );
    false
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort/check.py")
}

/// Checks `model` with onnx.checker (full check) and runs it with ONNX
/// Runtime on `inputs`; returns the outputs as f64.
pub fn run(model: &Path, inputs: &Tensor) -> Tensor {
    let dir = model.parent().unwrap();
    let stem = model.file_stem().unwrap().to_string_lossy();
    let inputs_path = dir.join(format!("{stem}.inputs.npy"));
    let outputs_path = dir.join(format!("{stem}.outputs.npy"));
    let values: Vec<f32> = inputs.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    npy::write_npy_f32(&inputs_path, inputs.dims(), &values).unwrap();
    let output = Command::new(python())
        .arg(script())
        .args([model, &inputs_path, &outputs_path])
        .output()
        .expect("python starts");
    assert!(
        output.status.success(),
        "check.py failed on {}:\n{}",
        model.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let out = npy::read_npy(&outputs_path).unwrap();
    Tensor::from_vec(out.values, out.dims, &Device::Cpu).unwrap()
}

/// Largest difference between ONNX Runtime's and isonn's logits, relative
/// to the largest isonn logit (at least 1). Both run in float32; the
/// differences come from the order of summation and from ONNX Runtime's
/// sigmoid and sine approximations. The largest measured was 1.5e-6 here
/// and 4.1e-6 on the PyTorch fixtures (onnxruntime 1.31.1, x86-64).
pub const TOLERANCE: f64 = 1e-5;

pub fn relative_difference(isonn: &Tensor, runtime: &Tensor) -> f64 {
    let isonn = isonn.to_dtype(DType::F64).unwrap();
    let runtime = runtime.to_dtype(DType::F64).unwrap();
    assert_eq!(isonn.dims(), runtime.dims(), "output shapes differ");
    max_abs(&isonn.sub(&runtime).unwrap()) / max_abs(&isonn).max(1.0)
}

/// Exports `network` and its transformation, runs both with ONNX Runtime
/// on `inputs` and returns the two relative differences.
pub fn check_both(dir: &std::path::Path, label: &str, network: &Network, inputs: &Tensor) -> (f64, f64) {
    let regular_path = dir.join(format!("{label}-regular.onnx"));
    write_model(&regular_path, &export_network(network).unwrap()).unwrap();
    let regular = relative_difference(&network.forward(inputs).unwrap(), &run(&regular_path, inputs));

    let nonneg = transform(network, &TransformOptions::default()).unwrap();
    let onnx = export_nonneg(&nonneg).unwrap();
    check_nonneg_layout(&onnx, label);
    let nonneg_path = dir.join(format!("{label}-nonneg.onnx"));
    write_model(&nonneg_path, &onnx).unwrap();
    let physical = relative_difference(&nonneg.forward(inputs).unwrap(), &run(&nonneg_path, inputs));
    eprintln!("{label}: regular {regular:.2e}, non-negative {physical:.2e}");
    (regular, physical)
}

/// Checks that every weight and bias initializer is >= 0 and that the
/// modulator, complement and shift nodes are present.
pub fn check_nonneg_layout(model: &ModelProto, label: &str) {
    let graph = model.graph.as_ref().unwrap();
    let mut parameters = 0;
    for tensor in &graph.initializer {
        let name = tensor.name.clone().unwrap();
        if [".positive", ".negative", ".bias"].iter().any(|s| name.ends_with(s)) {
            parameters += 1;
            let values = decode_tensor(tensor).unwrap().values;
            let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
            assert!(min >= 0.0, "{label}: initializer {name} has value {min} < 0");
        }
    }
    assert!(parameters >= 3, "{label}: only {parameters} weight and bias initializers");
    let names: Vec<&str> = graph.node.iter().map(|n| n.name.as_deref().unwrap()).collect();
    assert!(names.contains(&"input/modulator"), "{label}: no input/modulator node");
    assert!(names.iter().any(|n| n.ends_with("/complement")), "{label}: no complement node");
    assert!(names.iter().any(|n| n.ends_with("/signal_weights")), "{label}: no signal_weights node");
    let ops: HashMap<&str, usize> = graph.node.iter().fold(HashMap::new(), |mut m, n| {
        *m.entry(n.op_type.as_deref().unwrap()).or_default() += 1;
        m
    });
    assert!(!ops.contains_key("BatchNormalization"), "{label}: a signed BatchNormalization remains");
}
