//! PyTorch state dicts saved as safetensors (tests/fixtures/state_dict,
//! made by make_fixtures.py with torch 2.15.0): each imports with its
//! architecture file, computes PyTorch's logits, and transforms into a
//! non-negative network that agrees with it. Bad files are errors that name
//! the tensor or layer.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{isonn, max_abs};
use isonn::interop::npy;
use isonn::interop::samples::images_from_npy;
use isonn::interop::state_dict::import_state_dict;
use isonn::model::Network;
use isonn::nonneg::{transform, TransformOptions};
use isonn::progress::Progress;
use isonn::verify::{self, Precision};
use predicates::prelude::*;

/// Largest difference between isonn's and PyTorch's logits, relative to
/// the largest logit (at least 1).
const PYTORCH_TOLERANCE: f64 = 1e-5;

/// The equivalence tolerance of `isonn verify` for float32 models.
const EQUIVALENCE_TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/state_dict")
        .join(name)
}

fn load_npy(path: &Path) -> Tensor {
    let data = npy::read_npy(path).unwrap();
    Tensor::from_vec(data.values, data.dims, &Device::Cpu).unwrap()
}

/// Imports `weights` with the architecture of fixture `name` and returns
/// the largest relative difference from PyTorch's logits.
fn pytorch_difference(name: &str, weights: &str) -> (Network, f64) {
    let network = import_state_dict(
        &fixture(weights),
        &fixture(&format!("{name}.model.json")),
        &[],
    )
    .unwrap();
    let inputs = load_npy(&fixture(&format!("{name}.inputs.npy")));
    let expected = load_npy(&fixture(&format!("{name}.outputs.npy")));
    let logits = network
        .forward(&inputs.to_dtype(network.dtype()).unwrap())
        .unwrap();
    let logits = logits.to_dtype(DType::F64).unwrap();
    let difference = max_abs(&logits.sub(&expected).unwrap()) / max_abs(&expected).max(1.0);
    (network, difference)
}

/// Transforms `network` and verifies the non-negative network on the
/// inputs of fixture `name`.
fn check_equivalence(name: &str, network: &Network) {
    let nonneg = transform(network, &TransformOptions::default()).unwrap();
    let images = images_from_npy(&fixture(&format!("{name}.inputs.npy")), network).unwrap();
    let report = verify::verify(
        network,
        &nonneg,
        &images,
        1000,
        Precision::Model,
        &Progress::hidden(),
    )
    .unwrap();
    assert_eq!(report.argmax_agreement, 1.0, "{name}: {}", report.summary());
    assert!(
        report.max_rel_diff < EQUIVALENCE_TOLERANCE,
        "{name}: {}",
        report.summary()
    );
    assert_eq!(report.negative_weights, 0);
    assert_eq!(report.negative_biases, 0);
}

#[test]
fn mlp_matches_pytorch() {
    let (network, difference) = pytorch_difference("mlp", "mlp.safetensors");
    assert!(
        difference < PYTORCH_TOLERANCE,
        "relative difference {difference:e}"
    );
    assert_eq!(network.dtype(), DType::F32);
    check_equivalence("mlp", &network);
}

#[test]
fn cnn_with_batch_norm_matches_pytorch() {
    let (network, difference) = pytorch_difference("cnn", "cnn.safetensors");
    assert!(
        difference < PYTORCH_TOLERANCE,
        "relative difference {difference:e}"
    );
    let kinds: Vec<&str> = network.layers.iter().map(|l| l.kind()).collect();
    assert_eq!(kinds[..2], ["conv2d", "batch-norm"]);
    check_equivalence("cnn", &network);
}

#[test]
fn half_and_double_precision_convert() {
    for (weights, dtype) in [
        ("mlp.f64.safetensors", DType::F64),
        ("mlp.f16.safetensors", DType::F32),
        ("mlp.bf16.safetensors", DType::F32),
    ] {
        let (network, difference) = pytorch_difference("mlp", weights);
        assert!(
            difference < PYTORCH_TOLERANCE,
            "{weights}: relative difference {difference:e}"
        );
        assert_eq!(network.dtype(), dtype, "{weights}");
    }
}

#[test]
fn import_command_then_transform() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    isonn()
        .arg("import")
        .arg(fixture("cnn.safetensors"))
        .arg("--model")
        .arg(fixture("cnn.model.json"))
        .arg("--out")
        .arg(&regular)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "conv2d, batch-norm, activation, avg-pool2d, flatten, linear",
        ));
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .arg("--inputs")
        .arg(fixture("cnn.inputs.npy"))
        .assert()
        .success()
        .stdout(predicate::str::contains("verification passed"));
    let model: serde_json::Value =
        serde_json::from_slice(&std::fs::read(regular.join("model.json")).unwrap()).unwrap();
    let provenance = &model["provenance"];
    assert!(provenance["imported_from"]
        .as_str()
        .unwrap()
        .ends_with("cnn.safetensors"));
    assert!(provenance["architecture"]
        .as_str()
        .unwrap()
        .ends_with("cnn.model.json"));

    // --input-range replaces the architecture's range.
    let widened = tmp.path().join("widened");
    isonn()
        .arg("import")
        .arg(fixture("mlp.safetensors"))
        .arg("--model")
        .arg(fixture("mlp.model.json"))
        .args(["--input-range=-1,2", "--out"])
        .arg(&widened)
        .assert()
        .success();
    let model: serde_json::Value =
        serde_json::from_slice(&std::fs::read(widened.join("model.json")).unwrap()).unwrap();
    assert_eq!(
        model["input"]["range"],
        serde_json::json!({ "lo": -1.0, "hi": 2.0 })
    );
}

/// Reads the tensors of a fixture's state dict.
fn tensors(weights: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(weights), &Device::Cpu).unwrap()
}

/// Writes `tensors` and `architecture` (JSON text) to files in `dir`,
/// returning the paths of the state dict and the architecture.
fn write_state_dict(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    architecture: &str,
) -> (PathBuf, PathBuf) {
    let weights = dir.join("weights.safetensors");
    let json = dir.join("model.json");
    candle_core::safetensors::save(tensors, &weights).unwrap();
    std::fs::write(&json, architecture).unwrap();
    (weights, json)
}

/// Imports `tensors` with `architecture` (JSON text) from files in `dir`,
/// returning the error message.
fn import_error(dir: &Path, tensors: &HashMap<String, Tensor>, architecture: &str) -> String {
    let (weights, json) = write_state_dict(dir, tensors, architecture);
    import_state_dict(&weights, &json, &[])
        .unwrap_err()
        .to_string()
}

/// Removes the torch_name of the top-level layers `indices` from the
/// architecture `json`.
fn without_torch_names(json: &str, indices: &[usize]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
    for &i in indices {
        value["layers"][i]
            .as_object_mut()
            .unwrap()
            .remove("torch_name");
    }
    value.to_string()
}

#[test]
fn bad_state_dicts_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mlp_json = std::fs::read_to_string(fixture("mlp.model.json")).unwrap();
    let cnn_json = std::fs::read_to_string(fixture("cnn.model.json")).unwrap();

    let mut missing = tensors("mlp.safetensors");
    missing.remove("3.bias");
    let message = import_error(tmp.path(), &missing, &mlp_json);
    assert!(
        message.contains("missing tensor 3.bias for layer layers.3 (linear)"),
        "{message}"
    );

    let mut extra = tensors("mlp.safetensors");
    extra.insert(
        "9.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let message = import_error(tmp.path(), &extra, &mlp_json);
    assert!(
        message.contains("the state dict has 4 modules with parameters (1, 3, 5, 9)"),
        "{message}"
    );

    let mut stray = tensors("cnn.safetensors");
    stray.insert(
        "fc.scale".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let message = import_error(tmp.path(), &stray, &cnn_json);
    assert!(message.contains("unused tensor fc.scale"), "{message}");

    let mut wrong_shape = tensors("mlp.safetensors");
    let weight = wrong_shape["1.weight"].t().unwrap().contiguous().unwrap();
    wrong_shape.insert("1.weight".into(), weight);
    let message = import_error(tmp.path(), &wrong_shape, &mlp_json);
    assert!(
        message.contains(
            "tensor 1.weight has shape [16, 12], but layer layers.1 (linear) expects [12, 16]"
        ),
        "{message}"
    );

    let mut integers = tensors("mlp.safetensors");
    integers.insert(
        "1.bias".into(),
        Tensor::zeros(12, DType::I64, &Device::Cpu).unwrap(),
    );
    let message = import_error(tmp.path(), &integers, &mlp_json);
    assert!(message.contains("tensor 1.bias has type I64"), "{message}");

    let unknown = mlp_json.replace("\"flatten\"", "\"lstm\"");
    let message = import_error(tmp.path(), &tensors("mlp.safetensors"), &unknown);
    assert!(message.contains("unknown variant `lstm`"), "{message}");

    let misnamed = cnn_json.replace("\"torch_name\": \"bn\"", "\"torch_name\": \"norm\"");
    let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &misnamed);
    assert!(
        message.contains("missing tensor norm.weight for layer layers.1 (batch-norm)"),
        "{message}"
    );

    let partly_named = without_torch_names(&cnn_json, &[1]);
    let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &partly_named);
    assert!(
        message.contains("only some layers name their module with torch_name"),
        "{message}"
    );

    // Without torch_name, sorted keys put bn before conv.
    let unnamed = without_torch_names(&cnn_json, &[0, 1, 5]);
    let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &unnamed);
    assert!(
        message.contains("natural order are bn, conv, fc"),
        "{message}"
    );
}

#[test]
fn layer_without_bias_gets_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mlp.model.json")).unwrap()).unwrap();
    value["layers"][3]["bias"] = false.into();
    // The zero bias takes the model's dtype, so float64 stays float64.
    for (file, dtype) in [("mlp.safetensors", DType::F32), ("mlp.f64.safetensors", DType::F64)] {
        let mut state = tensors(file);
        state.remove("3.bias");
        let (weights, json) = write_state_dict(tmp.path(), &state, &value.to_string());

        let network = import_state_dict(&weights, &json, &[]).unwrap();
        assert_eq!(network.dtype(), dtype, "{file}");
        let (_, bias) = network.layers[3].weight_and_bias().unwrap();
        assert_eq!(max_abs(bias), 0.0, "{file}");
        assert_eq!(bias.dtype(), dtype, "{file}");
    }
}

#[test]
fn truncated_state_dict_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("mlp.safetensors")).unwrap();
    let weights = tmp.path().join("cut.safetensors");
    for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&weights, &bytes[..cut]).unwrap();
        let message = import_state_dict(&weights, &fixture("mlp.model.json"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("cut.safetensors"),
            "cut at {cut}: {message}"
        );
        assert!(
            message.contains("truncated or not safetensors"),
            "cut at {cut}: {message}"
        );
    }
}

#[test]
fn import_command_rejects_bad_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cases: [(&str, Vec<PathBuf>, &str); 3] = [
        (
            "state dict without architecture",
            vec![fixture("mlp.safetensors")],
            "pass it with --model FILE.json",
        ),
        (
            "architecture with an ONNX file",
            vec![
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/onnx/mlp_photonic_sigmoid.onnx"),
                "--model".into(),
                fixture("mlp.model.json"),
                "--input-range=0,1".into(),
            ],
            "leave --model out",
        ),
        (
            "architecture of another network",
            vec![
                fixture("mlp.safetensors"),
                "--model".into(),
                fixture("cnn.model.json"),
            ],
            "missing tensor conv.weight for layer layers.0 (conv2d)",
        ),
    ];
    for (name, args, message) in cases {
        isonn()
            .arg("import")
            .args(&args)
            .arg("--out")
            .arg(&out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message).name(name));
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Damaged state dicts give an error or a network, never a panic.
    #[test]
    fn damaged_state_dict_never_panics(
        flips in proptest::collection::vec((0usize..1740, proptest::num::u8::ANY), 1..8),
    ) {
        let mut bytes = std::fs::read(fixture("mlp.safetensors")).unwrap();
        for (offset, value) in flips {
            let index = offset % bytes.len();
            bytes[index] = value;
        }
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("damaged.safetensors");
        std::fs::write(&weights, &bytes).unwrap();
        if let Err(e) = import_state_dict(&weights, &fixture("mlp.model.json"), &[]) {
            proptest::prop_assert!(e.to_string().contains("damaged.safetensors"), "{}", e);
        }
    }
}

#[test]
fn non_finite_tensor_names_the_pytorch_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cnn_json = std::fs::read_to_string(fixture("cnn.model.json")).unwrap();
    let mut state = tensors("cnn.safetensors");
    let bias = state["fc.bias"].to_vec1::<f32>().unwrap();
    let mut damaged = bias.clone();
    damaged[1] = f32::INFINITY;
    state.insert("fc.bias".into(), Tensor::new(damaged.as_slice(), &Device::Cpu).unwrap());
    let message = import_error(tmp.path(), &state, &cnn_json);
    assert!(
        message.contains("tensor fc.bias has the non-finite value inf at flat index 1"),
        "{message}"
    );
}

#[test]
fn calibration_inputs_must_be_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = npy::read_npy(&fixture("cnn.inputs.npy")).unwrap();
    let per_sample = inputs.values.len() / inputs.dims[0];
    inputs.values[per_sample + 2] = f64::NAN;
    let values: Vec<f32> = inputs.values.iter().map(|&v| v as f32).collect();
    let calibration = tmp.path().join("nan.npy");
    std::fs::write(&calibration, npy::encode_npy_f32(&inputs.dims, &values)).unwrap();
    // --calibrate bounds ReLU layers only, so the CNN gets a plain ReLU.
    let mut architecture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cnn.model.json")).unwrap()).unwrap();
    architecture["layers"][2]["activation"] = serde_json::json!({ "name": "relu" });
    let json = tmp.path().join("relu.model.json");
    std::fs::write(&json, architecture.to_string()).unwrap();
    let out = tmp.path().join("out");
    isonn()
        .arg("import")
        .arg(fixture("cnn.safetensors"))
        .arg("--model")
        .arg(&json)
        .arg("--calibrate")
        .arg(&calibration)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "nan.npy: sample 1 has the non-finite value NaN at element 2",
        ));
    assert!(!out.exists(), "import wrote {}", out.display());
}

/// Runs `isonn import` of the MLP fixture into `out` with `extra`
/// arguments.
fn import_mlp(out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    isonn()
        .arg("import")
        .arg(fixture("mlp.safetensors"))
        .arg("--model")
        .arg(fixture("mlp.model.json"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
}

#[test]
fn import_checks_out_as_transform_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "kept").unwrap();
    import_mlp(&out, &[])
        .code(2)
        .stderr(predicate::str::contains("already exists and is not empty"))
        .stderr(predicate::str::contains("pass --force"));
    assert!(!out.join("model.json").exists(), "import wrote into {}", out.display());

    import_mlp(&out, &["--force"]).success();
    assert!(out.join("model.json").exists());
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "kept");

    let file = tmp.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    import_mlp(&file, &[])
        .code(2)
        .stderr(predicate::str::contains("exists and is not a directory"));
}

#[test]
fn transform_hint_offers_no_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    import_mlp(&regular, &[]).success();
    let out = tmp.path().join("nonneg");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(isonn::checkpoint::path_in(&out), "").unwrap();
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("pass --force"))
        .stderr(predicate::str::contains("--resume").not());
}

#[test]
fn more_than_256_classes_name_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mlp.model.json")).unwrap()).unwrap();
    value["layers"][5]["out_features"] = 300.into();
    let mut state = tensors("mlp.safetensors");
    state.insert("5.weight".into(), Tensor::zeros((300, 8), DType::F32, &Device::Cpu).unwrap());
    state.insert("5.bias".into(), Tensor::zeros(300, DType::F32, &Device::Cpu).unwrap());
    let (weights, json) = write_state_dict(tmp.path(), &state, &value.to_string());
    let regular = tmp.path().join("regular");
    isonn()
        .arg("import")
        .arg(&weights)
        .arg("--model")
        .arg(&json)
        .arg("--out")
        .arg(&regular)
        .assert()
        .success();

    let out = tmp.path().join("nonneg");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&out)
        .arg("--inputs")
        .arg(fixture("mlp.inputs.npy"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("mlp.inputs.npy"))
        .stderr(predicate::str::contains("the model has 300 classes"))
        .stderr(predicate::str::contains("at most 256 classes"))
        .stderr(predicate::str::contains("isonn predict"));
}

#[test]
fn architecture_errors_name_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let cnn_json = std::fs::read_to_string(fixture("cnn.model.json")).unwrap();

    let mut negative = tensors("cnn.safetensors");
    let variance = negative["bn.running_var"].to_vec1::<f32>().unwrap();
    let mut damaged = variance.clone();
    damaged[2] = -0.5;
    negative.insert("bn.running_var".into(), Tensor::new(damaged.as_slice(), &Device::Cpu).unwrap());
    let message = import_error(tmp.path(), &negative, &cnn_json);
    assert!(message.contains("weights.safetensors"), "{message}");
    assert!(
        message.contains("tensor bn.running_var has the negative variance -0.5 at index 2"),
        "{message}"
    );

    let mut value: serde_json::Value = serde_json::from_str(&cnn_json).unwrap();
    value["layers"][1].as_object_mut().unwrap().remove("eps");
    let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &value.to_string());
    assert!(
        message.contains("layer layers.1 (batch-norm): missing or invalid number field \"eps\""),
        "{message}"
    );

    let duplicate = cnn_json.replace("\"torch_name\": \"bn\"", "\"torch_name\": \"conv\"");
    let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &duplicate);
    assert!(
        message.contains("layers layers.0 and layers.1 both name the module \"conv\""),
        "{message}"
    );
}

#[test]
fn directory_as_weights_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .arg("import")
        .arg(tmp.path())
        .arg("--model")
        .arg(fixture("mlp.model.json"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("is a directory; pass the ONNX file or the PyTorch state dict"))
        .stderr(predicate::str::contains("os error").not());
}

#[test]
fn unknown_layer_fields_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cnn_json = std::fs::read_to_string(fixture("cnn.model.json")).unwrap();
    for (layer, field) in [(5, "torchname"), (0, "use_bias")] {
        let mut value: serde_json::Value = serde_json::from_str(&cnn_json).unwrap();
        value["layers"][layer][field] = "fc".into();
        let message = import_error(tmp.path(), &tensors("cnn.safetensors"), &value.to_string());
        assert!(message.contains("model.json"), "{message}");
        assert!(
            message.contains(&format!("layer layers.{layer}")),
            "{message}"
        );
        assert!(
            message.contains(&format!("unknown field \"{field}\"")),
            "{message}"
        );
    }
}
