//! Runs exported ONNX files through onnx.checker and ONNX Runtime with
//! tests/ort/check.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use isonn::interop::npy;

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
