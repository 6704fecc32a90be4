//! Provenance of output directories: the isonn version and git commit, the
//! command line, the seed and the checksums of the data read.

use serde::{Deserialize, Serialize};

use crate::data::{Dataset, FileDigest};

/// The isonn version that is running.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit HEAD named when isonn was built, or `unknown` outside a
/// git checkout. Uncommitted changes are not recorded.
pub const GIT_COMMIT: &str = match option_env!("ISONN_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// The data a command read: the data set's name, where it came from and
/// the checksum of every file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    /// Data set name (`fashion-mnist`, `fashion-mnist-subset`, `mnist`), or
    /// the path of the `.npy` inputs given with `--inputs`.
    pub dataset: String,
    /// Origin of the files, in isonn's description (`--data`, the
    /// environment variable, the system package, the embedded subset or
    /// the user's `.npy` files).
    pub source: String,
    /// The files read (a data set's IDX or CIFAR-10 files, or the `.npy`
    /// inputs and labels) and their SHA-256 checksums.
    pub files: Vec<FileDigest>,
}

impl DataRecord {
    /// Describes `data`.
    pub fn of(data: &Dataset) -> Self {
        DataRecord {
            dataset: data.name.to_string(),
            source: data.source.to_string(),
            files: data.files.clone(),
        }
    }

    /// Returns true when both records have the same file checksums, the
    /// files' paths aside.
    pub fn same_files(&self, other: &DataRecord) -> bool {
        let sums = |r: &DataRecord| r.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>();
        sums(self) == sums(other)
    }
}

/// Builds the provenance object of an output directory. `extra` (a JSON
/// object) adds the command's own fields.
pub fn record(
    command: &[String],
    seed: Option<u64>,
    data: Option<&DataRecord>,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut value = serde_json::json!({
        "isonn_version": VERSION,
        "git_commit": GIT_COMMIT,
        "command": command,
        "seed": seed,
        "data": data,
    });
    if let (Some(object), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        object.extend(extra);
    }
    value
}

/// Reads the record of the data a model was trained on from its provenance
/// (the `trained_on` field), if it has one.
pub fn trained_on(provenance: &serde_json::Value) -> Option<DataRecord> {
    serde_json::from_value(provenance.get("trained_on")?.clone()).ok()
}

/// Returns a warning when a model trained on `trained` is used with `used`,
/// a data set with other files. `model` names the model in the message.
pub fn data_mismatch(model: &str, trained: &DataRecord, used: &DataRecord) -> Option<String> {
    if trained.same_files(used) {
        return None;
    }
    Some(format!(
        "{model} was trained on {} from {}, but this run uses {} from {}, whose files have other \
         checksums; accuracy figures are not comparable with the training run",
        trained.dataset, trained.source, used.dataset, used.source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_with(sum: &str, path: &str) -> DataRecord {
        DataRecord {
            dataset: "fashion-mnist".into(),
            source: "somewhere".into(),
            files: vec![FileDigest {
                path: path.into(),
                sha256: sum.into(),
            }],
        }
    }

    #[test]
    fn mismatch_ignores_paths() {
        let a = record_with("00ff", "/a/train-images-idx3-ubyte");
        let b = record_with("00ff", "/b/train-images-idx3-ubyte.gz");
        assert!(data_mismatch("m", &a, &b).is_none());
    }

    #[test]
    fn mismatch_names_both_data_sets() {
        let a = record_with("00ff", "x");
        let mut b = record_with("11ee", "x");
        b.dataset = "mnist".into();
        let warning = data_mismatch("model m", &a, &b).expect("different checksums");
        assert!(warning.contains("fashion-mnist"), "{warning}");
        assert!(warning.contains("mnist from"), "{warning}");
    }

    #[test]
    fn sha256_matches_known_digest() {
        // SHA-256 of "abc" from FIPS 180-2, appendix B.1.
        assert_eq!(
            crate::data::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
