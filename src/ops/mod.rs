//! Differentiable tensor operations that candle 0.11 runs slowly on the CPU.

pub mod conv;

pub use conv::conv2d;
