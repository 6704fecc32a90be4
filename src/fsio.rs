//! Atomic file writes: a crash or Ctrl-C never leaves a half-written file
//! in place of a good one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// flushed to disk and then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Writes `path` atomically with `write`, which fills the temporary file.
///
/// When `write` fails, the temporary file is removed and `path` keeps its
/// previous contents, so a writer that stops halfway (a full disk, a crash
/// simulated by a test) never leaves a partial file under `path`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let temporary = temporary_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(path, source));
    }
    sync_parent(path);
    Ok(())
}

/// Flushes the directory entry of a rename to disk, so that the new name
/// survives a power loss. Best effort: some file systems cannot open a
/// directory for syncing, and the rename itself has already succeeded.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Serialises `value` as pretty JSON and writes it atomically to `path`.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("cannot serialise JSON: {e}"),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Returns the temporary sibling used while `path` is being written.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Creates `dir` and its parents, naming `dir` in the error.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole file of at most `max_bytes`, rejecting a larger one before
/// reading it. `what` names the kind of file in the error (`"model.json"`).
pub fn read_capped(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
    if !metadata.is_file() {
        return Err(Error::data(path, format!("not a regular file (a directory or a device); pass a file path for the {what}")));
    }
    let len = metadata.len();
    if len > max_bytes {
        return Err(Error::data(
            path,
            format!(
                "{what} is {len} bytes, more than the maximum of {max_bytes} bytes isonn reads; \
                 the file is damaged or not a {what}"
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The `take` keeps a file that grows while it is read within the cap.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Error::data(path, format!("{what} grew past {max_bytes} bytes while it was read")));
    }
    Ok(bytes)
}

/// Largest JSON file (results, reports, cells) that [`read_json`] accepts.
pub const MAX_JSON_BYTES: u64 = 256 << 20;

/// Reads and parses a JSON file written by isonn. `what` names the kind of
/// file in the error message, which also names the usual cause (a truncated
/// or damaged file) and the way to recover.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = read_capped(path, MAX_JSON_BYTES, what)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::data(
            path,
            format!(
                "invalid {what} ({e}); the file is truncated or damaged, so restore it from a \
                 backup or run the command that writes it again"
            ),
        )
    })
}
