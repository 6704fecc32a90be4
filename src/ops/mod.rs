//! Differentiable tensor operations that candle 0.11 runs slowly on the CPU.

/// Calls `$method::<f32>` or `$method::<f64>` on `$self` for the dtype `$dtype`,
/// and returns an unsupported-dtype error naming `$op` for any other dtype.
macro_rules! dispatch_float {
    ($self:ident.$method:ident($($arg:expr),*), $dtype:expr, $op:expr) => {
        match $dtype {
            DType::F32 => $self.$method::<f32>($($arg),*),
            DType::F64 => $self.$method::<f64>($($arg),*),
            dtype => Err(candle_core::Error::UnsupportedDTypeForOp(dtype, $op)),
        }
    };
}

pub mod activation;
pub mod bias;
pub mod conv;
pub mod conv1d;
mod fastmath;
pub mod linear;
pub mod nonneg_linear;
pub mod pad;
pub mod update;

#[cfg(test)]
mod test_util;

pub use activation::{bias_activation, bias_activation_fuses, shifted_activation, ShiftedActivation};
pub use bias::add_channel_bias;
pub use conv::conv2d;
pub use conv1d::conv1d_rows;
pub use linear::linear;
pub use nonneg_linear::nonneg_linear;
pub use pad::{pad_constant, pad_width_constant};
pub use update::sign_preserving_update;

/// Makes glibc's malloc keep freed memory for reuse instead of returning it
/// to the system, which the training loop's tensors need.
///
/// Each training step allocates and frees the same tensors, many of them
/// above glibc's mmap threshold (128 KiB at the start), so each one was
/// mapped fresh, zeroed by the kernel page by page and unmapped again. In
/// a profile of CNN training, page faults and their zeroing took about 12%
/// of the time. With every allocation below 1 GiB on the heap and the heap
/// not trimmed below 2 GiB, the median CPU seconds of `isonn bench` fell by
/// 30% (CNN) and 15% (non-negative MLP). That is one run on a loaded 2-core
/// machine, so take it as an estimate.
///
/// The cost is memory: the process keeps its peak heap until it exits.
/// Call it once, at the start of a program that trains; it does nothing on
/// platforms other than glibc on Linux.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's parameters; the values are
        // within the documented ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 1 << 28);
        }
    }
}

/// Makes candle run its element-wise operations on the calling thread,
/// unless the user set `CANDLE_NUM_THREADS`.
///
/// Candle 0.11 splits element-wise operations of 64 Ki elements or more
/// over a pool of its own next to rayon's, and its idle workers spin for
/// 25,000 rounds before sleeping. On a 2-core machine that spinning took
/// 31% of the samples in a profile of MLP training at two threads, and it
/// slowed the rayon threads of the GEMMs. With the pool off, the regular
/// MLP step at two threads took 1.45 ms instead of 1.64 ms
/// (docs/BENCHMARKS.md, third round).
///
/// Call it once, at the start of `main`, before any thread is started:
/// candle reads the variable when it first builds the pool.
pub fn keep_elementwise_ops_inline() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `f` on one of rayon's worker threads and returns its result.
///
/// The fast ops split their GEMMs over rayon's threads. Called from a thread
/// outside the pool, every split hands its blocks to the pool and sleeps
/// until they finish. A training step then runs on three threads where the
/// pool has two, and the idle workers spin against the caller between
/// GEMMs. Inside the pool the calling worker computes one of the blocks
/// itself. `isonn::train::fit` trains this way, and the binary runs every
/// command this way.
///
/// `f` must not wait for another thread that waits for rayon's pool: on a
/// pool of one thread the two would wait for each other. The training
/// loader thread uses no rayon for that reason.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
