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
pub mod linear;
pub mod pad;
pub mod update;

#[cfg(test)]
mod test_util;

pub use activation::{shifted_activation, ShiftedActivation};
pub use bias::add_channel_bias;
pub use conv::conv2d;
pub use conv1d::conv1d_rows;
pub use linear::linear;
pub use pad::{pad_constant, pad_width_constant};
pub use update::sign_preserving_update;
