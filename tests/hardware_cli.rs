//! `isonn hardware` and noise-aware `train-nonneg`, end to end on the
//! embedded Fashion-MNIST subset.

use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn isonn() -> Command {
    let mut cmd = Command::cargo_bin("isonn").unwrap();
    cmd.env_remove("ISONN_DATA");
    cmd
}

/// Trains a one-epoch MLP on the embedded subset into `regular` and
/// transforms it into `nonneg`.
fn small_models(regular: &Path, nonneg: &Path) {
    isonn()
        .args(["train", "--dataset", "fashion-mnist-subset", "--epochs", "1", "--lr", "0.16"])
        .args(["--hidden", "16", "--out"])
        .arg(regular)
        .assert()
        .success();
    isonn().arg("transform").arg(regular).arg("--out").arg(nonneg).assert().success();
}

#[test]
fn hardware_evaluates_sweeps_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let (regular, nonneg) = (tmp.path().join("regular"), tmp.path().join("nonneg"));
    small_models(&regular, &nonneg);
    let subset = ["--dataset", "fashion-mnist-subset", "--test-images", "200"];

    // Without effects, hardware accuracy is the model's own accuracy.
    let eval = isonn().arg("eval").arg(&nonneg).args(&subset[..2]).assert().success();
    let ideal = isonn().arg("hardware").arg(&nonneg).args(&subset[..2]).assert().success();
    let accuracy_of = |output: &[u8]| {
        let text = String::from_utf8(output.to_vec()).unwrap();
        let after = text.split("accuracy ").nth(1).unwrap_or_else(|| panic!("no accuracy in {text:?}"));
        after.split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(
        accuracy_of(&eval.get_output().stdout),
        accuracy_of(&ideal.get_output().stdout),
        "ideal hardware and eval disagree"
    );
    // --gain comes from the options shared with `isonn export`.
    let per_output = isonn().arg("hardware").arg(&nonneg).args(&subset[..2]).args(["--gain", "per-output"]).assert().success();
    assert_eq!(
        accuracy_of(&eval.get_output().stdout),
        accuracy_of(&per_output.get_output().stdout),
        "ideal per-output hardware and eval disagree"
    );
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(subset)
        .args(["--weight-bits", "6", "--detector-noise", "0.001", "--seeds", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("200 test images, accuracy").and(predicate::str::contains("2 seed(s)")));
    // Quantisation alone is deterministic: one evaluation, and the output explains why.
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(subset)
        .args(["--weight-bits", "4", "--seeds", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 seed(s)"))
        .stdout(predicate::str::contains("draw no noise, so one evaluation stands for all 2 seeds"));

    // A train-nonneg resume pointed at a train run's folder names the command.
    isonn()
        .arg("train-nonneg")
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--resume", "--out"])
        .arg(&regular)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("written by `isonn train`, not `isonn train-nonneg`"));

    let sweep = tmp.path().join("sweep");
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(subset)
        .args(["--sweep", "weight-bits=2..4", "--seeds", "1", "--out"])
        .arg(&sweep)
        .assert()
        .success();
    for file in ["sweep.md", "sweep.json", "sweep.png"] {
        assert!(sweep.join(file).exists(), "{file} written");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(sweep.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(report["series"][0]["points"].as_array().unwrap().len(), 3, "one point per bit width");

    isonn()
        .arg("hardware")
        .arg(&regular)
        .args(subset)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("regular model").and(predicate::str::contains("isonn transform")));
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(subset)
        .args(["--sweep", "weight-bits=2..4"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--out"));
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(subset)
        .args(["--adc-bits", "0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--adc-bits 0"));

    let cost = isonn().arg("hardware").arg(&regular).arg("--cost").assert().success();
    let table = String::from_utf8(cost.get_output().stdout.clone()).unwrap();
    assert!(table.contains("| total | | | | | non-negative isomorphic | 1600 | 800 | 25408 |"), "{table}");
    let energies = tmp.path().join("energies.json");
    std::fs::write(&energies, r#"{"modulator_j": 1e-12}"#).unwrap();
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(["--cost", "--energy"])
        .arg(&energies)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("energies.json").and(predicate::str::contains("weight_element_j")));
}

#[test]
fn train_nonneg_through_hardware() {
    let tmp = tempfile::tempdir().unwrap();
    let (regular, nonneg) = (tmp.path().join("regular"), tmp.path().join("nonneg"));
    small_models(&regular, &nonneg);
    let tuned = tmp.path().join("tuned");
    isonn()
        .arg("train-nonneg")
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--epochs", "1", "--weight-bits", "3", "--detector-noise", "0.001"])
        .arg("--out")
        .arg(&tuned)
        .assert()
        .success()
        .stdout(predicate::str::contains("test_accuracy"));
    let model: serde_json::Value = serde_json::from_slice(&std::fs::read(tuned.join("model.json")).unwrap()).unwrap();
    let hardware = &model["provenance"]["hardware_training"];
    assert_eq!(hardware["effects"]["weight_bits"], 3, "provenance records the effects: {model}");
}
