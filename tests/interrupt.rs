//! Interrupted training, end to end: the real binary is stopped mid-run by
//! SIGINT or SIGKILL, resumed with `--resume`, and must end with the same
//! `model.safetensors`, byte for byte, as a run that was never stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use isonn::checkpoint;

/// A small run on the embedded subset: 3 epochs of 500 batches.
const SETTINGS: [(&str, &str); 8] = [
    ("--dataset", "fashion-mnist-subset"),
    ("--epochs", "3"),
    ("--hidden", "16"),
    ("--batch-size", "20"),
    ("--lr", "0.02"),
    ("--momentum", "0.5"),
    ("--seed", "3"),
    ("--activation", "photonic-sigmoid"),
];

/// Returns `isonn train` with [`SETTINGS`], where `changed` replaces some
/// values, and the flags `extra`.
fn command_with(out: &Path, changed: &[(&str, &str)], extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_isonn"));
    // One thread makes the floating-point sums, and so the weights, the
    // same from run to run.
    cmd.env("RAYON_NUM_THREADS", "1").env_remove("ISONN_DATA");
    cmd.arg("train");
    for (flag, value) in SETTINGS {
        let value = changed.iter().find(|(f, _)| *f == flag).map_or(value, |(_, v)| *v);
        cmd.args([flag, value]);
    }
    cmd.arg("--out").arg(out).args(extra);
    cmd
}

fn command(out: &Path, extra: &[&str]) -> Command {
    command_with(out, &[], extra)
}

fn run(out: &Path, extra: &[&str]) -> Output {
    let output = command(out, extra).output().unwrap();
    assert!(
        output.status.success(),
        "isonn {extra:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Starts a run and waits until its first epoch checkpoint exists.
fn start_and_wait(out: &Path) -> Child {
    let mut child = command(out, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let checkpoint = checkpoint::path_in(out);
    while !checkpoint.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before writing {}", checkpoint.display());
        }
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn uninterrupted(tmp: &Path) -> Vec<u8> {
    let out = tmp.join("uninterrupted");
    run(&out, &[]);
    std::fs::read(out.join("model.safetensors")).unwrap()
}

fn resumed_weights(out: &Path) -> Vec<u8> {
    let output = run(out, &["--resume"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("resuming from"), "{stderr}");
    std::fs::read(out.join("model.safetensors")).unwrap()
}

#[test]
fn sigint_then_resume_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = uninterrupted(tmp.path());
    let out: PathBuf = tmp.path().join("interrupted");
    let child = start_and_wait(&out);
    // SAFETY: kill(2) with a pid this test spawned and has not reaped.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "kill(SIGINT) failed");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("training interrupted at epoch"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!out.join("model.safetensors").exists(), "an interrupted run wrote a model");
    let position = checkpoint::load(&checkpoint::path_in(&out)).unwrap().position;
    assert!(position.batches_done > 0, "the interrupt did not land mid-epoch: {position:?}");
    assert_eq!(resumed_weights(&out), expected, "resumed weights differ from the uninterrupted run");
}

#[test]
fn sigkill_then_resume_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = uninterrupted(tmp.path());
    let out = tmp.path().join("killed");
    let mut child = start_and_wait(&out);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    let position = checkpoint::load(&checkpoint::path_in(&out)).unwrap().position;
    assert!(position.epochs_done >= 1, "{position:?}");
    assert_eq!(resumed_weights(&out), expected, "resumed weights differ from the uninterrupted run");
}

#[test]
fn resume_rejects_changed_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut child = start_and_wait(&out);
    child.kill().unwrap();
    child.wait().unwrap();
    let output = command_with(&out, &[("--lr", "0.5")], &["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the checkpoint was written with settings lr 0.02, this run has lr 0.5"), "{stderr}");

    // Another sample order would replay other shuffles than the run saw.
    let output = command(&out, &["--resume", "--no-shuffle"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("shuffle true, this run has shuffle false"), "{stderr}");
}

#[test]
fn resume_without_checkpoint_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let output = command(&tmp.path().join("new"), &["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("there is no run to continue"), "{stderr}");
}

#[test]
fn non_empty_output_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mine");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "user data").unwrap();
    let output = command(&out, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already exists and is not empty"), "{stderr}");
    assert!(!out.join("model.json").exists());
    // --force writes the model and keeps the user's file.
    let output = command_with(&out, &[("--epochs", "1")], &["--force"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(out.join("model.json").exists());
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "user data");
}

#[test]
fn resume_and_force_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let output = command(&tmp.path().join("x"), &["--resume", "--force"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// `isonn eval` warns when the test files differ from the training data.
#[test]
fn eval_warns_on_other_data() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    run(&model, &[]);
    // The subset with one test label changed: same format, other checksum.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-subset");
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().trim_end_matches(".gz").to_string();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(entry.path()).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        if name == "t10k-labels-idx1-ubyte" {
            raw[8] = (raw[8] + 1) % 10;
        }
        std::fs::write(other.join(name), raw).unwrap();
    }
    let eval = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_isonn"))
            .arg("eval")
            .arg(&model)
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let same = eval(&["--dataset", "fashion-mnist-subset"]);
    assert!(!same.contains("was trained on"), "{same}");
    let other = eval(&["--dataset", "mnist", "--data", other.to_str().unwrap()]);
    assert!(other.contains("was trained on fashion-mnist-subset"), "{other}");
}
