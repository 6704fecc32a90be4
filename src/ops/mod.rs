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
pub mod pad;
pub mod update;

#[cfg(test)]
mod test_util;

pub use activation::{bias_activation, bias_activation_fuses, shifted_activation, ShiftedActivation};
pub use bias::add_channel_bias;
pub use conv::conv2d;
pub use conv1d::conv1d_rows;
pub use linear::linear;
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
