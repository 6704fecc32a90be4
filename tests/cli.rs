//! The command line, end to end on the embedded Fashion-MNIST subset, and
//! its errors on bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{isonn, train_small};
use predicates::prelude::*;

fn subset_copy(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-subset");
    let target = dir.join("idx");
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    target
}

#[test]
fn train_transform_verify_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular, "photonic-sinusoidal");
    for file in ["model.json", "model.safetensors", "metrics.json"] {
        assert!(regular.join(file).exists(), "{file} written");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(regular.join("metrics.json")).unwrap()).unwrap();
    let accuracy = metrics["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "test_accuracy {accuracy} is a fraction");
    assert!(accuracy > 0.5, "one epoch on the subset learns something: {accuracy}");

    isonn()
        .args(["transform"])
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .success()
        .stdout(predicate::str::contains("verification passed"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(nonneg.join("equivalence.json")).unwrap()).unwrap();
    for key in [
        "max_abs_diff",
        "max_rel_diff",
        "argmax_agreement",
        "accuracy_original",
        "accuracy_isomorphic",
        "negative_weights",
        "negative_biases",
        "min_signal",
        "samples",
    ] {
        assert!(report.get(key).is_some(), "equivalence.json has {key}");
    }
    assert_eq!(report["argmax_agreement"].as_f64(), Some(1.0));
    assert_eq!(report["negative_weights"].as_u64(), Some(0));
    assert_eq!(report["negative_biases"].as_u64(), Some(0));
    assert_eq!(report["samples"].as_u64(), Some(2000));
    assert!(report["max_rel_diff"].as_f64().unwrap() < 1e-4);
    assert!(report["min_signal"].as_f64().unwrap() >= 0.0);
    assert_eq!(report["accuracy_original"], report["accuracy_isomorphic"]);

    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--precision", "f64"])
        .assert()
        .success()
        .stdout(predicate::str::contains("precision          f64"));

    for dir in [&regular, &nonneg] {
        isonn()
            .arg("eval")
            .arg(dir)
            .args(["--dataset", "fashion-mnist-subset"])
            .assert()
            .success()
            .stdout(predicate::str::contains("accuracy"));
    }
}

/// A non-negative model whose weights were tampered with fails verification.
#[test]
fn verify_detects_tampered_model() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular, "photonic-sigmoid");
    isonn().arg("transform").arg(&regular).arg("--out").arg(&nonneg).assert().success();

    // Flip the sign of one stored bias.
    let path = nonneg.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let bias = tensors.get("layers.1.bias").unwrap();
    let mut values: Vec<f32> = bias.to_vec1().unwrap();
    values[0] = -values[0] - 1.0;
    let n = values.len();
    tensors.insert(
        "layers.1.bias".into(),
        candle_core::Tensor::from_vec(values, n, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();

    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("negative_biases    1"))
        .stdout(predicate::str::contains("verification FAILED"));
}

#[test]
fn unknown_activation_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .args(["train", "--activation", "sigmoid", "--out"])
        .arg(tmp.path().join("m"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid activation sigmoid"))
        .stderr(predicate::str::contains("photonic-sigmoid"));
}

#[test]
fn zero_epochs_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .args(["train", "--epochs", "0", "--dataset", "fashion-mnist-subset", "--out"])
        .arg(tmp.path().join("m"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid --epochs 0: must be at least 1"));
}

#[test]
fn missing_idx_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = subset_copy(tmp.path());
    std::fs::remove_file(idx.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    isonn()
        .args(["eval", "/nonexistent-model", "--data"])
        .arg(&idx)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("/nonexistent-model"));
    let regular = tmp.path().join("regular");
    isonn()
        .args(["train", "--epochs", "1", "--data"])
        .arg(&idx)
        .arg("--out")
        .arg(&regular)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("t10k-labels-idx1-ubyte"));
}

#[test]
fn truncated_idx_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = subset_copy(tmp.path());
    let raw = idx.join("t10k-images-idx3-ubyte");
    let bytes = {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(idx.join("t10k-images-idx3-ubyte.gz")).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    std::fs::remove_file(idx.join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(&raw, &bytes[..5000]).unwrap();
    isonn()
        .args(["train", "--epochs", "1", "--data"])
        .arg(&idx)
        .arg("--out")
        .arg(tmp.path().join("m"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("t10k-images-idx3-ubyte"))
        .stderr(predicate::str::contains("truncated"));
}

#[test]
fn wrong_magic_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = subset_copy(tmp.path());
    std::fs::remove_file(idx.join("train-labels-idx1-ubyte.gz")).unwrap();
    std::fs::write(idx.join("train-labels-idx1-ubyte"), [0u8, 0, 9, 9, 0, 0, 0, 1, 3]).unwrap();
    isonn()
        .args(["train", "--epochs", "1", "--data"])
        .arg(&idx)
        .arg("--out")
        .arg(tmp.path().join("m"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("train-labels-idx1-ubyte"))
        .stderr(predicate::str::contains("magic"));
}

#[test]
fn model_from_other_version_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular, "relu-n:2");
    let json_path = regular.join("model.json");
    let text = std::fs::read_to_string(&json_path).unwrap();
    std::fs::write(&json_path, text.replace("\"schema_version\": 1", "\"schema_version\": 7")).unwrap();
    isonn()
        .arg("eval")
        .arg(&regular)
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("schema_version 7"))
        .stderr(predicate::str::contains("model.json"));
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular, "photonic-sinusoidal");
    isonn()
        .args(["train", "--epochs", "1", "--dataset", "fashion-mnist-subset", "--out"])
        .arg(&regular)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--force"));
}

#[test]
fn relu_model_cannot_be_transformed() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular, "relu");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(tmp.path().join("nonneg"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unbounded"));
}

/// A small grid runs end to end, refuses to overwrite itself, resumes
/// without rerunning finished cells, and tabulates an unfinished run.
#[test]
fn reproduce_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let grid = |extra: &[&str], scenarios: &str| {
        let mut cmd = isonn();
        cmd.args(["reproduce", "--dataset", "fashion-mnist-subset", "--epochs", "1", "--post-epochs", "1"])
            .args(["--activations", "photonic-sinusoidal", "--scenarios", scenarios, "--out"])
            .arg(&out)
            .args(extra);
        cmd
    };
    grid(&[], "transformation,post-training-sign-preserving")
        .assert()
        .success()
        .stdout(predicate::str::contains("Transformation of a regularly trained network"))
        .stdout(predicate::str::contains("proposed + sign-preserving"))
        // One regular epoch serves both the transformation and the post-training.
        .stderr(predicate::str::contains("reusing the regular training"));
    for file in ["results.json", "results.md", "curves-mlp-photonic-sinusoidal.png", "histogram-mlp-photonic-sinusoidal.png"] {
        assert!(out.join(file).exists(), "{file} written");
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    let transformation = &cells[0]["result"]["equivalence"];
    assert_eq!(transformation["argmax_agreement"].as_f64(), Some(1.0));
    assert_eq!(cells[1]["result"]["negative_after_steps"].as_u64(), Some(0));
    assert_eq!(results["config"]["shuffle"].as_bool(), Some(false), "file order by default");
    assert_eq!(cells[1]["result"]["settings"]["shuffle"].as_bool(), Some(false));

    grid(&[], "transformation")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--resume"));
    grid(&["--resume"], "transformation,post-training-sign-preserving")
        .assert()
        .success()
        .stderr(predicate::str::contains("kept from the earlier run"));
    for other in [&["--resume", "--init", "photonic"][..], &["--resume", "--shuffle"]] {
        grid(other, "transformation")
            .assert()
            .code(2)
            .stderr(predicate::str::contains("other settings or data"));
    }
    grid(&["--report-only"], "transformation,from-scratch-projected")
        .assert()
        .success()
        .stderr(predicate::str::contains("not finished, left out of the table"));
}

/// Hand-edited model descriptions that used to load (or panic later) are
/// rejected when the model is read, naming the layer.
#[test]
fn malformed_model_json_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular, "photonic-sinusoidal");
    let original = std::fs::read_to_string(regular.join("model.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&original).unwrap();
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, &str)> = vec![
        (
            "empty layers",
            Box::new(|v| v["layers"] = serde_json::json!([])),
            "vector of logits",
        ),
        (
            "negative relu-n bound",
            Box::new(|v| v["layers"][2]["activation"] = serde_json::json!({"name": "relu-n", "n": -1.0})),
            "relu-n bound -1",
        ),
        (
            "zero-size conv kernel",
            Box::new(|v| {
                v["layers"][0] = serde_json::json!({"type": "conv2d", "in_channels": 1, "out_channels": 1,
                    "kernel": [0, 0], "stride": 1, "padding": 0, "dilation": 1, "groups": 1});
            }),
            "kernel size",
        ),
        (
            "huge padding",
            Box::new(|v| {
                v["layers"][0] = serde_json::json!({"type": "conv2d", "in_channels": 1, "out_channels": 1,
                    "kernel": [3, 3], "stride": 1, "padding": 4611686018427387904u64, "dilation": 1, "groups": 1});
            }),
            "at most",
        ),
    ];
    for (case, edit, expected) in cases {
        let mut broken = value.clone();
        edit(&mut broken);
        std::fs::write(regular.join("model.json"), serde_json::to_string(&broken).unwrap()).unwrap();
        isonn()
            .arg("eval")
            .arg(&regular)
            .args(["--dataset", "fashion-mnist-subset"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(expected).and(predicate::str::contains("panicked").not()))
            .stderr(predicate::str::contains("model.json"));
        println!("{case}: rejected");
    }
}

/// A bad --dataset is found before anything is written.
#[test]
fn transform_checks_data_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular, "photonic-sigmoid");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .args(["--dataset", "cifar"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown data set"));
    assert!(!nonneg.join("model.json").exists(), "nothing written on a bad --dataset");
}

#[test]
fn missing_model_json_names_fix() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .arg("eval")
        .arg(tmp.path())
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no model.json"))
        .stderr(predicate::str::contains("isonn train"));
}

/// Each optimizer takes only its own learning rates.
#[test]
fn optimizer_flags_must_match() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("unused");
    for (optimizer, flag, value) in [("projected", "--lr-out", "0.5"), ("sign-preserving", "--lr", "0.1")] {
        isonn()
            .arg("train-nonneg")
            .arg(&model)
            .args(["--optimizer", optimizer, flag, value, "--out"])
            .arg(tmp.path().join("out"))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(flag));
    }
    isonn()
        .arg("train-nonneg")
        .arg(&model)
        .args(["--lr-out", "1.5", "--out"])
        .arg(tmp.path().join("out"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("(0, 1]"));
}

#[test]
fn hardware_training_cannot_resume() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .arg("train-nonneg")
        .arg(tmp.path().join("unused"))
        .args(["--weight-bits", "4", "--resume", "--out"])
        .arg(tmp.path().join("out"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("only runs without hardware effects"));
}

#[test]
fn bench_writes_json_report() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("bench.json");
    isonn()
        .args(["bench", "--models", "mlp", "--workloads", "regular-train,nonneg-train"])
        .args(["--batches", "1", "--batch-size", "8", "--repetitions", "2", "--json"])
        .arg(&report)
        .env("RAYON_NUM_THREADS", "1")
        .assert()
        .success()
        .stdout(predicate::str::contains("| mlp | nonneg-train | 1 x 8 |"))
        .stdout(predicate::str::contains("GFLOP/s"));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let measurements = json["measurements"].as_array().unwrap();
    assert_eq!(measurements.len(), 2, "one entry per workload");
    assert_eq!(measurements[1]["workload"], "nonneg-train");
    assert_eq!(measurements[1]["seconds"].as_array().unwrap().len(), 2, "one time per repetition");
    assert!(measurements[0]["images_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(json["environment"]["threads"], 1);
    assert_eq!(json["gemm"].as_array().unwrap().len(), 4, "one entry per GEMM shape");
}

#[test]
fn bench_rejects_unknown_workload() {
    isonn()
        .args(["bench", "--workloads", "regular-training"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("regular-training"));
}

#[test]
fn bench_names_zero_setting() {
    for option in ["--batches", "--batch-size", "--repetitions"] {
        isonn()
            .args(["bench", "--models", "mlp", option, "0"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(format!("invalid {option} 0: must be at least 1")));
    }
}

/// A `--json` path that cannot be written is rejected before the runs, so
/// no measurement is lost at the end.
#[test]
fn bench_checks_json_path_first() {
    let tmp = tempfile::tempdir().unwrap();
    isonn()
        .args(["bench", "--models", "mlp", "--json"])
        .arg(tmp.path())
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("is a directory; give the path of the file to write"));
    isonn()
        .args(["bench", "--models", "mlp", "--json"])
        .arg(tmp.path().join("missing").join("bench.json"))
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("does not exist; create it first"));
}

#[test]
fn thread_variables_are_checked() {
    for (name, value) in [
        ("RAYON_NUM_THREADS", "abc"),
        ("RAYON_NUM_THREADS", "0"),
        ("RAYON_NUM_THREADS", "100000"),
        ("CANDLE_NUM_THREADS", "-1"),
    ] {
        isonn()
            .args(["bench", "--models", "mlp", "--batches", "1", "--repetitions", "1"])
            .env(name, value)
            .assert()
            .code(2)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains(format!("invalid {name} \"{value}\": expected a whole number")));
    }
}

/// A reader that closes the pipe early (`| head`) does not stop the run:
/// the JSON report is still written.
#[test]
fn bench_survives_closed_stdout() {
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("bench.json");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_isonn"))
        .args(["bench", "--models", "mlp", "--workloads", "regular-train"])
        .args(["--batches", "1", "--batch-size", "8", "--repetitions", "1", "--json"])
        .arg(&report)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "bench exited with {status}");
    assert!(report.is_file(), "the JSON report was not written");
}

/// An Elman network's recurrence amplifies the f32 rounding of the shifted
/// biases; `transform --f64` stores the non-negative model in f64, and the
/// comparison with the regular f32 model then meets the f64 tolerance.
#[test]
fn transform_f64_stores_exact_biases() {
    let dir = tempfile::tempdir().unwrap();
    let regular = dir.path().join("elman");
    isonn()
        .args(["train", "--arch", "elman", "--hidden", "16", "--activation", "tanh"])
        .args(["--dataset", "fashion-mnist-subset", "--epochs", "1", "--lr", "0.05", "--out"])
        .arg(&regular)
        .assert()
        .success();
    let nonneg = dir.path().join("elman-f64");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .args(["--f64", "--dataset", "fashion-mnist-subset"])
        .assert()
        .success()
        .stdout(predicate::str::contains("verification passed (relative tolerance 1e-9)"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(nonneg.join("equivalence.json")).unwrap()).unwrap();
    assert_eq!(report["precision"].as_str(), Some("f64"));
    assert_eq!(report["argmax_agreement"].as_f64(), Some(1.0));
    assert!(report["max_rel_diff"].as_f64().unwrap() < 1e-9, "{report}");
    let (model, _) = isonn::store::load(&nonneg).unwrap();
    assert_eq!(model.dtype(), candle_core::DType::F64);
}
