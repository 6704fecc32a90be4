//! `isonn bound` end to end on the embedded Fashion-MNIST subset: a ReLU
//! MLP bounded in both modes, transformed and verified, and the errors on
//! bad input.

use std::ffi::OsStr;
use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn isonn() -> Command {
    let mut cmd = Command::cargo_bin("isonn").unwrap();
    cmd.env_remove("ISONN_DATA");
    cmd
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Bounds `regular` into `out` with the extra arguments `mode`.
fn bound(regular: &Path, out: &Path, mode: &[&str]) -> assert_cmd::assert::Assert {
    isonn()
        .arg("bound")
        .arg(regular)
        .arg("--out")
        .arg(out)
        .args(["--dataset", "fashion-mnist-subset", "--calibration-samples", "2000"])
        .args(mode)
        .assert()
}

/// Transforms the bounded model in `bounded` and verifies the result,
/// checking that both reports name `reference`.
fn transform_and_verify(bounded: &Path, nonneg: &Path, reference: &str) {
    let word = OsStr::new;
    let transform = [word("transform"), bounded.as_os_str(), word("--out"), nonneg.as_os_str()];
    let verify = [word("verify"), bounded.as_os_str(), nonneg.as_os_str()];
    for args in [&transform[..], &verify[..]] {
        isonn()
            .args(args)
            .args(["--dataset", "fashion-mnist-subset"])
            .assert()
            .success()
            .stdout(predicate::str::contains("verification passed"))
            .stdout(predicate::str::contains(format!("reference          {reference}")));
    }
    let report = read_json(&nonneg.join("equivalence.json"));
    assert_eq!(report["argmax_agreement"].as_f64(), Some(1.0));
    assert_eq!(report["reference"].as_str(), Some(reference));
}

#[test]
fn bound_both_modes_then_transform() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    isonn()
        .args(["train", "--dataset", "fashion-mnist-subset", "--epochs", "1", "--lr", "0.1"])
        .args(["--activation", "relu", "--hidden", "32,16", "--out"])
        .arg(&regular)
        .assert()
        .success();

    // Fixed N.
    let fixed = tmp.path().join("fixed");
    bound(&regular, &fixed, &["--relu-n", "4"])
        .success()
        .stdout(predicate::str::contains("clip rate"));
    for file in ["model.json", "model.safetensors", "bound.json"] {
        assert!(fixed.join(file).exists(), "{file} written");
    }
    let record = read_json(&fixed.join("bound.json"));
    assert_eq!(record["format"], "isonn-bound");
    assert_eq!(record["mode"]["mode"], "fixed");
    assert_eq!(record["mode"]["n"].as_f64(), Some(4.0));
    assert_eq!(record["layers"].as_array().unwrap().len(), 2);
    assert_eq!(record["layers"][0]["bounds"], serde_json::json!([4.0]));
    assert_eq!(record["calibration_samples"].as_u64(), Some(2000));
    assert_eq!(record["test_samples"].as_u64(), Some(2000));
    let model = read_json(&fixed.join("model.json"));
    assert_eq!(model["layers"][2]["activation"]["name"], "relu-n");
    assert_eq!(model["layers"][2]["activation"]["n"].as_f64(), Some(4.0));
    let fixed_reference = "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N with N = 4)";
    transform_and_verify(&fixed, &tmp.path().join("fixed-nonneg"), fixed_reference);

    // Calibrated per channel.
    let channel = tmp.path().join("channel");
    bound(&regular, &channel, &["--calibrate", "max", "--margin", "0.05", "--per", "channel"]).success();
    let record = read_json(&channel.join("bound.json"));
    assert_eq!(record["mode"]["mode"], "calibrate");
    assert_eq!(record["mode"]["statistic"], "max");
    assert_eq!(record["mode"]["margin"].as_f64(), Some(0.05));
    assert_eq!(record["mode"]["granularity"], "channel");
    let layers = record["layers"].as_array().unwrap();
    assert_eq!(layers[0]["bounds"].as_array().unwrap().len(), 32);
    assert_eq!(layers[1]["bounds"].as_array().unwrap().len(), 16);
    assert_eq!(layers[0]["rescaling"]["rows_of"].as_u64(), Some(1));
    assert_eq!(layers[0]["rescaling"]["columns_of"].as_u64(), Some(3));
    assert_eq!(record["clip_rate_calibration"].as_f64(), Some(0.0), "max with a margin clips nothing");
    let clip_test = record["clip_rate_test"].as_f64().unwrap();
    assert!((0.0..0.01).contains(&clip_test), "clip rate on test {clip_test}");
    let unbounded = record["accuracy_unbounded"].as_f64().unwrap();
    let bounded = record["accuracy_bounded"].as_f64().unwrap();
    assert!(unbounded > 0.5, "the ReLU MLP learned: {unbounded}");
    assert!((unbounded - bounded).abs() < 0.02, "unbounded {unbounded}, bounded {bounded}");
    let model = read_json(&channel.join("model.json"));
    assert_eq!(model["layers"][2]["activation"]["n"].as_f64(), Some(1.0));
    let channel_reference = "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N, calibrated max per channel, margin 0.05)";
    transform_and_verify(&channel, &tmp.path().join("channel-nonneg"), channel_reference);

    // Calibrated percentile per layer.
    let layer = tmp.path().join("layer");
    bound(&regular, &layer, &["--calibrate", "percentile:99"]).success();
    let record = read_json(&layer.join("bound.json"));
    assert_eq!(record["mode"]["statistic"], "percentile:99");
    assert_eq!(record["mode"]["granularity"], "layer");
    assert_eq!(record["mode"]["margin"].as_f64(), Some(0.0));
    let first = &record["layers"][0]["calibration"];
    let rate = first["rate"].as_f64().unwrap();
    assert!(rate > 0.0, "percentile 99 clips some values of layer 2: {rate}");
    assert!(rate <= 0.01, "percentile 99 clips at most 1% of layer 2: {rate}");
    let reference = "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N, calibrated percentile 99 per layer, margin 0)";
    transform_and_verify(&layer, &tmp.path().join("layer-nonneg"), reference);

    // A bounded model has no ReLU left.
    bound(&fixed, &tmp.path().join("again"), &["--relu-n", "2"])
        .failure()
        .stderr(predicate::str::contains("has no ReLU or GELU layer"))
        .stderr(predicate::str::contains("isonn transform"));
    // A non-negative model is not bounded.
    bound(&tmp.path().join("fixed-nonneg"), &tmp.path().join("again"), &["--relu-n", "2"])
        .failure()
        .stderr(predicate::str::contains("non-negative model"));

    // Bad values name the flag, the value and the fix; nothing is written.
    let bad_cases: [(&[&str], &[&str]); 6] = [
        (&["--relu-n", "-1"], &["--relu-n -1", "> 0"]),
        (&["--relu-n=0"], &["--relu-n 0", "> 0"]),
        (&["--calibrate", "percentile:0"], &["percentile:0", "0 < P <= 100"]),
        (&["--calibrate", "percentile:101"], &["percentile:101", "0 < P <= 100"]),
        (&["--calibrate", "mean"], &["--calibrate mean", "max or percentile:P"]),
        (&["--calibrate", "max", "--margin", "-0.5"], &["--margin -0.5", ">= 0"]),
    ];
    for (args, expected) in bad_cases {
        let out = tmp.path().join("bad");
        let mut assert = bound(&regular, &out, args).failure().code(2);
        for text in expected {
            assert = assert.stderr(predicate::str::contains(*text));
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    isonn()
        .arg("bound")
        .arg(&regular)
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .args(["--relu-n", "2", "--calibration-samples", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--calibration-samples 0"));
}

#[test]
fn bound_rejects_flag_combinations() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("missing");
    let out = tmp.path().join("out");
    for args in [
        vec![],
        vec!["--relu-n", "2", "--calibrate", "max"],
        vec!["--relu-n", "2", "--margin", "0.1"],
        vec!["--relu-n", "2", "--per", "channel"],
    ] {
        isonn()
            .arg("bound")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(&args)
            .assert()
            .failure()
            .stderr(predicate::str::contains("--relu-n").or(predicate::str::contains("--calibrate")));
    }
}

/// A ReLU that no affine layer follows cannot take per-channel bounds.
#[test]
fn per_channel_needs_following_affine() {
    use isonn::activation::Activation;
    use isonn::model::{Layer, Linear, Network, Range};
    use isonn::store::{self, Model};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relu-last");
    let network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 28, 28],
        input_range: Range { lo: 0.0, hi: 1.0 },
        layers: vec![
            Layer::Flatten,
            Layer::Linear(Linear::zeros(784, 10).unwrap()),
            Layer::Activation(Activation::Relu),
        ],
    };
    store::save(&dir, &Model::Regular(network), &serde_json::json!({})).unwrap();
    let out = tmp.path().join("out");
    bound(&dir, &out, &["--calibrate", "max", "--per", "channel"])
        .failure()
        .stderr(predicate::str::contains("layer 2 (ReLU) is the last layer"))
        .stderr(predicate::str::contains("--per layer"));
    assert!(!out.exists());
}
