//! The ONNX importer on damaged files: the committed fixtures truncated,
//! with bytes flipped, and spliced with pieces of each other. Each import
//! must return `Ok` or `Err`, never panic, and must not allocate much more
//! than the file's size. A counting allocator measures the peak of the
//! bytes allocated by the importing thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use isonn::interop::{decode_model, import_model};
use isonn::model::Range;
use proptest::prelude::*;

/// Counts the bytes each thread has allocated and not freed, and the peak.
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn record(change: isize) {
    // try_with: the thread-local may be gone while a thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + change;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counters
// are const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Bytes an import may allocate per byte of the file: prost's copy of the
/// file (1), tensors as f64 (2 per f32 byte), the candle tensors (1), and
/// headroom for the bookkeeping around them.
const BYTES_PER_FILE_BYTE: isize = 16;

/// Bytes an import may allocate whatever the file: the expression grid of
/// the activation recogniser (10,002 points), folded constants (at most
/// 65,536 values) and candle's small tensors.
const FIXED_BYTES: isize = 8 << 20;

fn fixtures() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// One damage to a file, at positions given as fractions of its length.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep the bytes before this fraction.
    Truncate(f64),
    /// XOR the byte at this fraction with a non-zero mask.
    Flip(f64, u8),
    /// Replace the bytes from `at` on with `length` bytes of another
    /// fixture, taken from `from`.
    Splice { at: f64, other: usize, from: f64, length: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0..1.0).prop_map(Mutation::Truncate),
        (0.0..1.0, 1u8..=255).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        (0.0..1.0, any::<usize>(), 0.0..1.0, 1usize..4096)
            .prop_map(|(at, other, from, length)| Mutation::Splice { at, other, from, length }),
    ]
}

fn position(fraction: f64, len: usize) -> usize {
    ((fraction * len as f64) as usize).min(len.saturating_sub(1))
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation, files: &[(PathBuf, Vec<u8>)]) {
    match *mutation {
        Mutation::Truncate(at) => bytes.truncate(position(at, bytes.len())),
        Mutation::Flip(at, mask) => {
            if !bytes.is_empty() {
                let i = position(at, bytes.len());
                bytes[i] ^= mask;
            }
        }
        Mutation::Splice { at, other, from, length } => {
            let source = &files[other % files.len()].1;
            let start = position(from, source.len());
            let piece = &source[start..(start + length).min(source.len())];
            let at = position(at, bytes.len());
            bytes.truncate(at);
            bytes.extend_from_slice(piece);
        }
    }
}

/// Imports `bytes` and returns the peak of the bytes allocated meanwhile.
fn import_peak(bytes: &[u8], path: &Path) -> isize {
    let before = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let ranges = [Range::new(0.0, 1.0).unwrap()];
    if let Ok(model) = decode_model(bytes, path) {
        let _ = import_model(&model, path, &ranges);
    }
    PEAK.with(Cell::get) - before
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn damaged_fixtures_import_without_panic(file in any::<usize>(), mutations in prop::collection::vec(mutation(), 1..4)) {
        let files = fixtures();
        let (path, original) = &files[file % files.len()];
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m, &files);
        }
        let peak = import_peak(&bytes, path);
        let limit = BYTES_PER_FILE_BYTE * bytes.len() as isize + FIXED_BYTES;
        prop_assert!(peak <= limit, "{}: {} bytes allocated {peak} bytes, limit {limit}", path.display(), bytes.len());
    }
}

/// The undamaged fixtures import within the same allocation limit, which
/// shows that the limit is not too tight for real files.
#[test]
fn fixtures_import_within_allocation_limit() {
    for (path, bytes) in fixtures() {
        let peak = import_peak(&bytes, &path);
        let limit = BYTES_PER_FILE_BYTE * bytes.len() as isize + FIXED_BYTES;
        assert!(peak <= limit, "{}: {} bytes allocated {peak} bytes, limit {limit}", path.display(), bytes.len());
        eprintln!("{}: {} bytes, peak allocation {peak} bytes", path.display(), bytes.len());
    }
}

/// A `ConstantOfShape` asking for 2^40 values is rejected before anything
/// is allocated for it.
#[test]
fn huge_constant_of_shape_is_rejected() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_pad_nodes.onnx");
    let mut model = isonn::interop::read_model(&path).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let shape_input = graph.node.iter().find(|n| n.op_type.as_deref() == Some("ConstantOfShape")).unwrap().input[0].clone();
    let constant = graph.node.iter_mut().find(|n| n.output.first() == Some(&shape_input)).unwrap();
    constant.attribute[0].t = Some(isonn::interop::int64_tensor("huge", &[1 << 40]));
    let bytes = isonn::interop::encode_model(&model);

    let peak = import_peak(&bytes, &path);
    assert!(peak <= FIXED_BYTES, "peak allocation {peak} bytes");
    let model = decode_model(&bytes, &path).unwrap();
    let message = import_model(&model, &path, &[Range::new(0.0, 1.0).unwrap()]).unwrap_err().to_string();
    assert!(message.contains("ConstantOfShape"), "{message}");
    assert!(message.contains("invalid dimension"), "{message}");
}
