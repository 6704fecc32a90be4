//! 2-D convolution as im2col + GEMM, so that its backward pass is GEMMs too.
//!
//! On the CPU, candle 0.11 computes the gradients of `Tensor::conv2d` with
//! `conv_transpose2d` and a convolution over transposed tensors, both plain
//! loops. [`conv2d`] unfolds the input into a column matrix (im2col) and
//! multiplies the kernel with it through the `gemm` crate, which candle's
//! CPU matmul also calls. Its backward pass is two such products plus the
//! scatter-add of the column gradient back into the image (col2im).
//!
//! The column matrix is `[C * KH * KW, B * OH * OW]`. Its rows are
//! channel-major, so the rows of one channel group are a contiguous range, and
//! the forward product `[O, B * OH * OW]` reaches `[B, O, OH, OW]` by copying
//! contiguous blocks of `OH * OW` values.
//!
//! [`conv2d`] is a single autograd node (the `Conv2dIm2col` op) rather than a chain of
//! im2col, matmul, reshape and permute nodes, and it processes the batch in
//! chunks of images. Both keep the column matrix, which is up to `KH * KW` times
//! larger than the input, out of candle's backward pass, which allocates a zero
//! tensor and adds into it for every node. Each call allocates one column
//! buffer and one product buffer for its largest chunk and reuses them for
//! every chunk, without zeroing them.
//! [`im2col`] and [`col2im`] are the same kernels as differentiable tensor ops.

use std::ops::{AddAssign, Range};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::linear::{gemm_into, Operand};
use crate::{Error, Result};

/// The maximum elements of the column matrix, and of its product with the kernel,
/// for one chunk of images (4 MiB of f32). A chunk contains at least one image.
///
/// This size keeps the GEMMs thousands of columns wide for the layers of small
/// CNNs. It also stays below the largest mmap threshold of glibc's malloc (32 MiB
/// on 64-bit systems, see mallopt(3)), and each allocation above the threshold
/// maps and zeroes fresh pages. NOTE: the value comes from one 2-core AVX-512
/// machine, where forward + backward of the `cnn_conv_benchmark` layers took the
/// same CPU time with 2^18 and 2^20 and about 20% more with 2^16 and 2^22. It was
/// not tuned for other cache sizes.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// The op name in unsupported-dtype errors.
const IM2COL_OP: &str = "im2col convolution (supports f32 and f64)";

/// Applies a 2-D convolution with zero padding, like candle's `Tensor::conv2d`,
/// computed as im2col + GEMM so that the backward pass is also GEMMs.
///
/// `x` is `[B, C, H, W]` and `kernel` is `[O, C / groups, KH, KW]`. The result is
/// `[B, O, OH, OW]` with `OH = (H + 2 * padding - dilation * (KH - 1) - 1) / stride + 1`
/// and the same for `OW`. The argument order matches `Tensor::conv2d`.
///
/// The im2col path runs for f32 and f64 tensors on the CPU and supports first-order
/// gradients only. Other devices and dtypes fall back to `Tensor::conv2d`.
///
/// # Errors
///
/// Returns [`Error::Shape`] when a tensor is not 4-D or `x` and `kernel` differ in
/// dtype. It also does so when stride, dilation or groups is 0, when the kernel has
/// a zero-size dimension or the channels do not match the groups, and when the
/// dilated kernel is larger than the padded input.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geometry = check_conv2d_args(x, kernel, padding, stride, dilation, groups)?;
    let is_im2col_dtype = matches!(x.dtype(), DType::F32 | DType::F64);
    if !x.device().is_cpu() || !is_im2col_dtype {
        return Ok(x.conv2d(kernel, padding, stride, dilation, groups)?);
    }

    // Conv2dIm2col reads the kernel as row-major [O / groups, C / groups * KH * KW] blocks.
    let kernel = kernel.contiguous()?;
    let op = Conv2dIm2col {
        window: geometry.window,
        groups,
    };
    Ok(x.apply_op2(&kernel, op)?)
}

/// Unfolds `x` `[B, C, H, W]` into the column matrix `[C * KH * KW, B * OH * OW]`
/// of a `(KH, KW)` kernel, reading zeros in the padding.
///
/// Row `(c * KH + kh) * KW + kw` contains the input value under kernel tap `(kh, kw)`
/// of channel `c`, for each image and output position in row-major order. This op
/// runs on the CPU for f32 and f64 tensors, and its backward pass is [`col2im`].
///
/// # Errors
///
/// Returns [`Error::Shape`] when `x` is not 4-D, stride or dilation is 0, the
/// kernel has a zero-size dimension, or the dilated kernel is larger than the
/// padded input.
pub fn im2col(
    x: &Tensor,
    kernel: (usize, usize),
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let window = check_window("im2col", kernel, padding, stride, dilation)?;
    let &[batch, channels, height, width] = x.dims() else {
        return Err(Error::Shape(format!(
            "im2col input must have shape [batch, channels, height, width], got {:?}",
            x.dims()
        )));
    };
    fit_window("im2col", (batch, channels, height, width), window)?;
    Ok(x.apply_op1(Im2Col { window })?)
}

/// Sums the column matrix `cols` `[C * KH * KW, B * OH * OW]` back into an image
/// of `image_dims` `[B, C, H, W]`, adding up the entries that several kernel taps
/// read from one pixel and dropping those in the padding.
///
/// It is the adjoint of [`im2col`] with the same window, and each is the other's
/// backward pass. This op runs on the CPU for f32 and f64 tensors.
///
/// # Errors
///
/// Returns [`Error::Shape`] for the window errors of [`im2col`] and when `cols`
/// does not have the shape that [`im2col`] gives for `image_dims`.
pub fn col2im(
    cols: &Tensor,
    image_dims: (usize, usize, usize, usize),
    kernel: (usize, usize),
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let window = check_window("col2im", kernel, padding, stride, dilation)?;
    let geometry = fit_window("col2im", image_dims, window)?;
    let expected = [geometry.col_rows(), geometry.col_len()];
    if cols.dims() != expected {
        return Err(Error::Shape(format!(
            "col2im expects columns of shape {expected:?} for the image {image_dims:?}, got {:?}",
            cols.dims()
        )));
    }
    Ok(cols.apply_op1(Col2Im { geometry })?)
}

/// Validates the arguments of [`conv2d`] and returns the geometry of its im2col.
fn check_conv2d_args(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Geometry> {
    let &[batch, channels, height, width] = x.dims() else {
        return Err(Error::Shape(format!(
            "conv2d input must have shape [batch, channels, height, width], got {:?}",
            x.dims()
        )));
    };
    let &[out_channels, group_channels, kernel_h, kernel_w] = kernel.dims() else {
        return Err(Error::Shape(format!(
            "conv2d kernel must have shape [out_channels, in_channels / groups, kernel_h, \
             kernel_w], got {:?}",
            kernel.dims()
        )));
    };
    if x.dtype() != kernel.dtype() {
        return Err(Error::Shape(format!(
            "conv2d input is {:?} but the kernel is {:?}. Convert both to the same dtype",
            x.dtype(),
            kernel.dtype()
        )));
    }
    if groups == 0 {
        return Err(Error::Shape(
            "conv2d groups must be at least 1, got 0".into(),
        ));
    }
    let window = check_window("conv2d", (kernel_h, kernel_w), padding, stride, dilation)?;
    if out_channels == 0 || group_channels == 0 {
        return Err(Error::Shape(format!(
            "conv2d kernel {:?} has a zero-size dimension",
            kernel.dims()
        )));
    }
    if group_channels * groups != channels {
        return Err(Error::Shape(format!(
            "conv2d input has {channels} channels, but the kernel {:?} with {groups} groups \
             expects {group_channels} x {groups} = {}",
            kernel.dims(),
            group_channels * groups
        )));
    }
    if out_channels % groups != 0 {
        return Err(Error::Shape(format!(
            "conv2d kernel has {out_channels} output channels, which {groups} groups do not \
             divide"
        )));
    }
    fit_window("conv2d", (batch, channels, height, width), window)
}

/// Validates the window settings of the op `op_name`.
fn check_window(
    op_name: &str,
    (kernel_h, kernel_w): (usize, usize),
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Window> {
    if stride == 0 || dilation == 0 {
        return Err(Error::Shape(format!(
            "{op_name} stride and dilation must be at least 1, got stride {stride}, dilation \
             {dilation}"
        )));
    }
    if kernel_h == 0 || kernel_w == 0 {
        return Err(Error::Shape(format!(
            "{op_name} kernel {kernel_h}x{kernel_w} has a zero-size dimension"
        )));
    }
    Ok(Window {
        kernel_h,
        kernel_w,
        padding,
        stride,
        dilation,
    })
}

/// Returns the geometry of `window` over an image of `image_dims`, or an error
/// when the dilated kernel is larger than the padded image.
fn fit_window(
    op_name: &str,
    image_dims: (usize, usize, usize, usize),
    window: Window,
) -> Result<Geometry> {
    Geometry::new(image_dims, window).ok_or_else(|| {
        let (_, _, height, width) = image_dims;
        let padding = window.padding;
        Error::Shape(format!(
            "{op_name} kernel {}x{} with dilation {} spans {}x{}, more than the {}x{} padded \
             input ({height}x{width} with padding {padding}). Increase the padding or use a \
             smaller kernel",
            window.kernel_h,
            window.kernel_w,
            window.dilation,
            window.span(window.kernel_h),
            window.span(window.kernel_w),
            height + 2 * padding,
            width + 2 * padding,
        ))
    })
}

/// The sliding window of a convolution: kernel size, zero padding, stride and dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    kernel_h: usize,
    kernel_w: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Window {
    /// Returns the extent of a dilated kernel of `kernel_len` taps along one axis.
    fn span(&self, kernel_len: usize) -> usize {
        self.dilation * (kernel_len - 1) + 1
    }

    /// Returns the output length along an axis of `input_len`, or `None` when the
    /// dilated kernel is longer than the padded input.
    fn output_len(&self, input_len: usize, kernel_len: usize) -> Option<usize> {
        let padded = input_len + 2 * self.padding;
        let span = self.span(kernel_len);
        (padded >= span).then(|| (padded - span) / self.stride + 1)
    }

    /// Returns the signed input index of output 0 for kernel tap `tap`. Negative
    /// and too large indices fall into the zero padding.
    fn tap_offset(&self, tap: usize) -> isize {
        (tap * self.dilation) as isize - self.padding as isize
    }
}

/// The shapes around one im2col: the image `[B, C, H, W]`, the output size and the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
    window: Window,
}

impl Geometry {
    /// Returns `None` when the window does not fit into the padded image.
    fn new(image_dims: (usize, usize, usize, usize), window: Window) -> Option<Self> {
        let (batch, channels, height, width) = image_dims;
        Some(Self {
            batch,
            channels,
            height,
            width,
            out_h: window.output_len(height, window.kernel_h)?,
            out_w: window.output_len(width, window.kernel_w)?,
            window,
        })
    }

    fn from_image_layout(layout: &Layout, window: Window) -> candle_core::Result<Self> {
        let dims = layout.shape().dims4()?;
        Self::new(dims, window).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "im2col window {window:?} does not fit into an image of shape {dims:?}"
            ))
        })
    }

    /// Returns the rows of the column matrix, one per channel and kernel tap.
    fn col_rows(&self) -> usize {
        self.channels * self.window.kernel_h * self.window.kernel_w
    }

    /// Returns the columns of the column matrix, one per image and output position.
    fn col_len(&self) -> usize {
        self.batch * self.out_area()
    }

    fn out_area(&self) -> usize {
        self.out_h * self.out_w
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn image_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.channels, self.height, self.width)
    }

    /// Splits the batch into ranges of images whose column matrix and product with
    /// a kernel of `out_channels` each have at most about [`CHUNK_ELEMENTS`]
    /// elements. A range contains at least one image.
    fn chunks(&self, out_channels: usize) -> impl Iterator<Item = Range<usize>> {
        let per_image = (self.col_rows().max(out_channels) * self.out_area()).max(1);
        let step = (CHUNK_ELEMENTS / per_image).max(1);
        let batch = self.batch;
        (0..batch)
            .step_by(step)
            .map(move |start| start..(start + step).min(batch))
    }

    /// Returns the geometry of the images `images` alone.
    fn chunk(&self, images: &Range<usize>) -> Self {
        Self {
            batch: images.len(),
            ..*self
        }
    }
}

/// Returns the layout of the images `images` within the image layout `layout`.
fn chunk_layout(layout: &Layout, images: &Range<usize>) -> candle_core::Result<Layout> {
    let (_, channels, height, width) = layout.shape().dims4()?;
    let image_stride = layout.stride()[0];
    Ok(Layout::new(
        Shape::from((images.len(), channels, height, width)),
        layout.stride().to_vec(),
        layout.start_offset() + images.start * image_stride,
    ))
}

/// Returns the outputs `o` in `0..output_len` whose input index
/// `o * stride + offset` lies in `0..input_len`, that is, outside the padding.
fn unpadded_outputs(
    output_len: usize,
    input_len: usize,
    offset: isize,
    stride: usize,
) -> Range<usize> {
    let stride = stride as isize;
    let start = if offset >= 0 {
        0
    } else {
        (-offset + stride - 1) / stride
    };
    let last_input = input_len as isize - 1 - offset;
    let end = if last_input < 0 {
        0
    } else {
        last_input / stride + 1
    };
    let end = (end as usize).min(output_len);
    (start as usize).min(end)..end
}

/// A float type that the fused CPU kernels of this module and its siblings
/// support, with access to its `CpuStorage` variant.
pub(crate) trait Float:
    Copy + Default + AddAssign + Send + Sync + 'static + num_traits::Float + super::fastmath::FastMath
{
    const DTYPE: DType;

    fn values(storage: &CpuStorage) -> candle_core::Result<&[Self]>;

    fn values_mut(storage: &mut CpuStorage) -> candle_core::Result<&mut [Self]>;

    fn into_storage(values: Vec<Self>) -> CpuStorage;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;

    fn values(storage: &CpuStorage) -> candle_core::Result<&[Self]> {
        match storage {
            CpuStorage::F32(values) => Ok(values),
            other => Err(dtype_mismatch(Self::DTYPE, other.dtype())),
        }
    }

    fn values_mut(storage: &mut CpuStorage) -> candle_core::Result<&mut [Self]> {
        match storage {
            CpuStorage::F32(values) => Ok(values),
            other => Err(dtype_mismatch(Self::DTYPE, other.dtype())),
        }
    }

    fn into_storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;

    fn values(storage: &CpuStorage) -> candle_core::Result<&[Self]> {
        match storage {
            CpuStorage::F64(values) => Ok(values),
            other => Err(dtype_mismatch(Self::DTYPE, other.dtype())),
        }
    }

    fn values_mut(storage: &mut CpuStorage) -> candle_core::Result<&mut [Self]> {
        match storage {
            CpuStorage::F64(values) => Ok(values),
            other => Err(dtype_mismatch(Self::DTYPE, other.dtype())),
        }
    }

    fn into_storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
}

fn dtype_mismatch(expected: DType, actual: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "im2col kernels expected {expected:?} storage, got {actual:?}"
    ))
}

/// The kernel `[O, C / groups, KH, KW]` of a convolution, read as `groups`
/// row-major blocks `[O / groups, C / groups * KH * KW]`.
struct GroupedKernel {
    out_channels: usize,
    group_out: usize,
    group_rows: usize,
    start_offset: usize,
}

impl GroupedKernel {
    fn new(layout: &Layout, groups: usize) -> candle_core::Result<Self> {
        let (out_channels, group_channels, kernel_h, kernel_w) = layout.shape().dims4()?;
        if !layout.is_contiguous() {
            candle_core::bail!(
                "im2col convolution expects a contiguous kernel, got strides {:?}",
                layout.stride()
            );
        }
        Ok(Self {
            out_channels,
            group_out: out_channels / groups,
            group_rows: group_channels * kernel_h * kernel_w,
            start_offset: layout.start_offset(),
        })
    }

    fn group_offset(&self, group: usize) -> usize {
        self.start_offset + group * self.group_out * self.group_rows
    }

    /// Returns group `group` of the kernel's `values` (its whole storage) as
    /// a `[O / groups, C / groups * KH * KW]` GEMM operand, read transposed
    /// when `transposed`.
    fn group_operand<'a, T>(
        &self,
        values: &'a [T],
        group: usize,
        transposed: bool,
    ) -> Operand<'a, T> {
        Operand {
            values: &values[self.group_offset(group)..],
            rows: self.group_out,
            cols: self.group_rows,
            transposed,
        }
    }
}

/// Returns the values of a contiguous output gradient, checking its shape.
fn output_grad_values<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
    dims: (usize, usize, usize, usize),
) -> candle_core::Result<&'a [T]> {
    if layout.shape().dims4()? != dims {
        candle_core::bail!(
            "im2col convolution expects an output gradient of shape {dims:?}, got {:?}",
            layout.shape()
        );
    }
    if !layout.is_contiguous() {
        candle_core::bail!(
            "im2col convolution expects a contiguous output gradient, got strides {:?}",
            layout.stride()
        );
    }
    let start = layout.start_offset();
    Ok(&T::values(storage)?[start..start + layout.shape().elem_count()])
}

/// The convolution of an image `[B, C, H, W]` (first argument) with a contiguous
/// kernel `[O, C / groups, KH, KW]` (second argument), computed per chunk of
/// images as `kernel @ im2col(x)` for each channel group.
struct Conv2dIm2col {
    window: Window,
    groups: usize,
}

impl Conv2dIm2col {
    fn forward<T: Float>(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = Geometry::from_image_layout(x_layout, self.window)?;
        let grouped = GroupedKernel::new(kernel_layout, self.groups)?;
        let x_values = T::values(x)?;
        let kernel_values = T::values(kernel)?;
        let out_image_len = grouped.out_channels * geometry.out_area();
        let mut out = vec![T::default(); geometry.batch * out_image_len];
        // One column buffer and one product buffer, sized for the largest
        // chunk and reused, so that no chunk allocates or zeroes memory.
        let mut buffers = ChunkBuffers::new(&geometry, grouped.out_channels);

        for images in geometry.chunks(grouped.out_channels) {
            let chunk = geometry.chunk(&images);
            let chunk_cols = chunk.col_len();
            let cols = buffers.cols(&chunk);
            im2col_into(x_values, &chunk_layout(x_layout, &images)?, &chunk, cols);
            let out_chunk = &mut out[images.start * out_image_len..images.end * out_image_len];
            for group in 0..self.groups {
                let group_cols = &buffers.cols[group * grouped.group_rows * chunk_cols..];
                // product: [O / groups, images, OH * OW]
                let product = &mut buffers.product[..grouped.group_out * chunk_cols];
                gemm_into(
                    product,
                    grouped.group_operand(kernel_values, group, false),
                    Operand {
                        values: group_cols,
                        rows: grouped.group_rows,
                        cols: chunk_cols,
                        transposed: false,
                    },
                    false,
                );
                scatter_channels(
                    product,
                    out_chunk,
                    grouped.out_channels,
                    group * grouped.group_out,
                    geometry.out_area(),
                );
            }
        }

        let shape = (
            geometry.batch,
            grouped.out_channels,
            geometry.out_h,
            geometry.out_w,
        );
        Ok((T::into_storage(out), Shape::from(shape)))
    }
}

impl CustomOp2 for Conv2dIm2col {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.forward(x, x_layout, kernel, kernel_layout),
            x.dtype(),
            IM2COL_OP
        )
    }

    // NOTE: the gradients come from ops without a backward pass, so a second
    // backward pass through this node treats them as constants.
    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let geometry = Geometry::from_image_layout(x.layout(), self.window)?;
        let grad = grad_res.contiguous()?;
        // An input that is not tracked, such as the images fed to a first layer,
        // needs no gradient, which saves a GEMM and the col2im.
        let x_grad = if x.track_op() {
            let op = Conv2dInputGrad {
                geometry,
                groups: self.groups,
            };
            Some(grad.apply_op2_no_bwd(kernel, &op)?)
        } else {
            None
        };
        let kernel_grad = if kernel.track_op() {
            let op = Conv2dKernelGrad {
                window: self.window,
                groups: self.groups,
                kernel_dims: kernel.dims4()?,
            };
            Some(x.apply_op2_no_bwd(&grad, &op)?)
        } else {
            None
        };
        Ok((x_grad, kernel_grad))
    }
}

/// The input gradient of [`Conv2dIm2col`], `col2im(kernel^T @ grad)`, from the output
/// gradient `[B, O, OH, OW]` (first argument) and the kernel (second argument).
struct Conv2dInputGrad {
    geometry: Geometry,
    groups: usize,
}

impl Conv2dInputGrad {
    fn input_grad<T: Float>(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = self.geometry;
        let grouped = GroupedKernel::new(kernel_layout, self.groups)?;
        let out_area = geometry.out_area();
        let out_dims = (
            geometry.batch,
            grouped.out_channels,
            geometry.out_h,
            geometry.out_w,
        );
        let grad_values = output_grad_values::<T>(grad, grad_layout, out_dims)?;
        let out_image_len = grouped.out_channels * out_area;
        let image_len = geometry.image_len();
        let kernel_values = T::values(kernel)?;
        let mut x_grad = vec![T::default(); geometry.batch * image_len];
        let mut buffers = ChunkBuffers::new(&geometry, grouped.out_channels);

        for images in geometry.chunks(grouped.out_channels) {
            let chunk = geometry.chunk(&images);
            let chunk_cols = chunk.col_len();
            let grad_chunk = &grad_values[images.start * out_image_len..images.end * out_image_len];
            // [O, images * OH * OW], the layout of the forward product.
            let grad_t = &mut buffers.product[..grouped.out_channels * chunk_cols];
            gather_channels_into(grad_chunk, grouped.out_channels, out_area, grad_t);

            // Column gradients of the groups, stacked by rows as in the column matrix.
            let col_grad = &mut buffers.cols[..chunk.col_rows() * chunk_cols];
            for group in 0..self.groups {
                let group_grad = &buffers.product[group * grouped.group_out * chunk_cols..];
                gemm_into(
                    &mut col_grad[group * grouped.group_rows * chunk_cols..],
                    grouped.group_operand(kernel_values, group, true),
                    Operand {
                        values: group_grad,
                        rows: grouped.group_out,
                        cols: chunk_cols,
                        transposed: false,
                    },
                    false,
                );
            }

            let col_layout = Layout::contiguous((chunk.col_rows(), chunk_cols));
            let x_grad_chunk = &mut x_grad[images.start * image_len..images.end * image_len];
            col2im_values(col_grad, &col_layout, &chunk, x_grad_chunk);
        }
        Ok((T::into_storage(x_grad), Shape::from(geometry.image_dims())))
    }
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-input-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.input_grad(grad, grad_layout, kernel, kernel_layout),
            grad.dtype(),
            IM2COL_OP
        )
    }
}

/// The kernel gradient of [`Conv2dIm2col`], `grad @ im2col(x)^T`, from the image
/// `[B, C, H, W]` (first argument) and the output gradient (second argument).
struct Conv2dKernelGrad {
    window: Window,
    groups: usize,
    kernel_dims: (usize, usize, usize, usize),
}

impl Conv2dKernelGrad {
    fn kernel_grad<T: Float>(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = Geometry::from_image_layout(x_layout, self.window)?;
        let (out_channels, group_channels, kernel_h, kernel_w) = self.kernel_dims;
        let group_out = out_channels / self.groups;
        let group_rows = group_channels * kernel_h * kernel_w;
        let out_area = geometry.out_area();
        let out_dims = (geometry.batch, out_channels, geometry.out_h, geometry.out_w);
        let grad_values = output_grad_values::<T>(grad, grad_layout, out_dims)?;
        let x_values = T::values(x)?;
        let out_image_len = out_channels * out_area;
        let group_len = group_out * group_rows;
        let mut kernel_grad = vec![T::default(); out_channels * group_rows];
        let mut buffers = ChunkBuffers::new(&geometry, out_channels);

        for images in geometry.chunks(out_channels) {
            let chunk = geometry.chunk(&images);
            let chunk_cols = chunk.col_len();
            im2col_into(
                x_values,
                &chunk_layout(x_layout, &images)?,
                &chunk,
                buffers.cols(&chunk),
            );
            let grad_chunk = &grad_values[images.start * out_image_len..images.end * out_image_len];
            let grad_t = &mut buffers.product[..out_channels * chunk_cols];
            gather_channels_into(grad_chunk, out_channels, out_area, grad_t);
            for group in 0..self.groups {
                // This group's rows of the output gradient times the transpose
                // of its rows of the column matrix, added over the chunks.
                gemm_into(
                    &mut kernel_grad[group * group_len..(group + 1) * group_len],
                    Operand {
                        values: &buffers.product[group * group_out * chunk_cols..],
                        rows: group_out,
                        cols: chunk_cols,
                        transposed: false,
                    },
                    Operand {
                        values: &buffers.cols[group * group_rows * chunk_cols..],
                        rows: group_rows,
                        cols: chunk_cols,
                        transposed: true,
                    },
                    true,
                );
            }
        }
        Ok((T::into_storage(kernel_grad), Shape::from(self.kernel_dims)))
    }
}

impl CustomOp2 for Conv2dKernelGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.kernel_grad(x, x_layout, grad, grad_layout),
            x.dtype(),
            IM2COL_OP
        )
    }
}

/// Copies `product` `[G, N, A]` into channels `first_channel..first_channel + G`
/// of `out` `[N, O, A]`, where `A` is `area`.
fn scatter_channels<T: Copy + Send + Sync>(
    product: &[T],
    out: &mut [T],
    out_channels: usize,
    first_channel: usize,
    area: usize,
) {
    let images = out.len() / (out_channels * area);
    let group_out = product.len() / (images * area);
    out.par_chunks_mut(out_channels * area)
        .enumerate()
        .for_each(|(image, out_image)| {
            for channel in 0..group_out {
                let src = (channel * images + image) * area;
                let dst = (first_channel + channel) * area;
                out_image[dst..dst + area].copy_from_slice(&product[src..src + area]);
            }
        });
}

/// Writes `grad` `[N, O, A]` transposed to `[O, N, A]` into `transposed`,
/// where `A` is `area`.
fn gather_channels_into<T: Copy + Send + Sync>(
    grad: &[T],
    channels: usize,
    area: usize,
    transposed: &mut [T],
) {
    let images = grad.len() / (channels * area).max(1);
    if images * area == 0 {
        return;
    }
    transposed[..grad.len()]
        .par_chunks_mut(images * area)
        .enumerate()
        .for_each(|(channel, row)| {
            for image in 0..images {
                let src = (image * channels + channel) * area;
                row[image * area..(image + 1) * area].copy_from_slice(&grad[src..src + area]);
            }
        });
}

/// The column matrix and product of the largest chunk of a convolution,
/// allocated once per call and reused for every chunk.
struct ChunkBuffers<T> {
    /// The column matrix (or its gradient), `[C * KH * KW, images * OH * OW]`.
    cols: Vec<T>,
    /// The product with the kernel (or the transposed output gradient),
    /// `[O, images * OH * OW]`.
    product: Vec<T>,
}

impl<T: Copy + Default> ChunkBuffers<T> {
    fn new(geometry: &Geometry, out_channels: usize) -> Self {
        let images = geometry
            .chunks(out_channels)
            .map(|r| r.len())
            .max()
            .unwrap_or(0);
        let cols = images * geometry.out_area();
        Self {
            cols: vec![T::default(); geometry.col_rows() * cols],
            product: vec![T::default(); out_channels * cols],
        }
    }

    /// Returns the column buffer of `chunk`.
    fn cols(&mut self, chunk: &Geometry) -> &mut [T] {
        &mut self.cols[..chunk.col_rows() * chunk.col_len()]
    }
}

/// The unfolding behind [`im2col`]: `[B, C, H, W]` to `[C * KH * KW, B * OH * OW]`.
struct Im2Col {
    window: Window,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = Geometry::from_image_layout(layout, self.window)?;
        let cols = match storage {
            CpuStorage::F32(values) => CpuStorage::F32(im2col_values(values, layout, &geometry)),
            CpuStorage::F64(values) => CpuStorage::F64(im2col_values(values, layout, &geometry)),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    storage.dtype(),
                    "im2col (supports f32 and f64)",
                ))
            }
        };
        Ok((cols, Shape::from((geometry.col_rows(), geometry.col_len()))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let geometry = Geometry::from_image_layout(arg.layout(), self.window)?;
        Ok(Some(grad_res.apply_op1(Col2Im { geometry })?))
    }
}

/// The scatter-add behind [`col2im`]: `[C * KH * KW, B * OH * OW]` to `[B, C, H, W]`.
struct Col2Im {
    geometry: Geometry,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = &self.geometry;
        let expected = (geometry.col_rows(), geometry.col_len());
        if layout.shape().dims2()? != expected {
            candle_core::bail!(
                "col2im expects columns of shape {expected:?} for the image {:?}, got {:?}",
                geometry.image_dims(),
                layout.shape()
            );
        }
        let image_len = geometry.batch * geometry.image_len();
        let image = match storage {
            CpuStorage::F32(values) => {
                let mut image = vec![0.0; image_len];
                col2im_values(values, layout, geometry, &mut image);
                CpuStorage::F32(image)
            }
            CpuStorage::F64(values) => {
                let mut image = vec![0.0; image_len];
                col2im_values(values, layout, geometry, &mut image);
                CpuStorage::F64(image)
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    storage.dtype(),
                    "col2im (supports f32 and f64)",
                ))
            }
        };
        Ok((image, Shape::from(geometry.image_dims())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.apply_op1(Im2Col {
            window: self.geometry.window,
        })?))
    }
}

/// Unfolds the image `values` with `layout` (any strides and offset) into a new
/// column matrix, as described at [`im2col`]. Threads split the rows.
fn im2col_values<T>(values: &[T], layout: &Layout, geometry: &Geometry) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let mut cols = vec![T::default(); geometry.col_rows() * geometry.col_len()];
    im2col_into(values, layout, geometry, &mut cols);
    cols
}

/// Unfolds like [`im2col_values`] into `cols`, which has exactly the
/// column matrix's length. Entries that fall into the padding are set to 0.
fn im2col_into<T>(values: &[T], layout: &Layout, geometry: &Geometry, cols: &mut [T])
where
    T: Copy + Default + Send + Sync,
{
    let &[stride_b, stride_c, stride_h, stride_w] = layout.stride() else {
        unreachable!("Geometry::from_image_layout or chunk_layout checked that the layout is 4-D")
    };
    let values = &values[layout.start_offset()..];
    let Geometry {
        batch,
        height,
        width,
        out_h,
        out_w,
        window,
        ..
    } = *geometry;
    let out_area = geometry.out_area();
    let col_len = geometry.col_len();

    if cols.is_empty() || col_len == 0 {
        return;
    }
    if window.padding > 0 {
        cols.fill(T::default());
    }
    cols.par_chunks_mut(col_len)
        .enumerate()
        .for_each(|(row, col_row)| {
            let taps = window.kernel_h * window.kernel_w;
            let channel = row / taps;
            let offset_h = window.tap_offset(row % taps / window.kernel_w);
            let offset_w = window.tap_offset(row % window.kernel_w);
            let valid_h = unpadded_outputs(out_h, height, offset_h, window.stride);
            let valid_w = unpadded_outputs(out_w, width, offset_w, window.stride);
            if valid_w.is_empty() {
                return;
            }
            let first_iw = ((valid_w.start * window.stride) as isize + offset_w) as usize;
            let src_step = window.stride * stride_w;
            for image in 0..batch {
                let plane_start = image * stride_b + channel * stride_c;
                for oh in valid_h.clone() {
                    let ih = ((oh * window.stride) as isize + offset_h) as usize;
                    let src = &values[plane_start + ih * stride_h + first_iw * stride_w..];
                    let dst_start = image * out_area + oh * out_w;
                    let dst = &mut col_row[dst_start + valid_w.start..dst_start + valid_w.end];
                    // A broadcast input has stride 0, and a width of 1 can have any stride.
                    if src_step == 1 || dst.len() <= 1 {
                        dst.copy_from_slice(&src[..dst.len()]);
                    } else if src_step == 0 {
                        dst.fill(src[0]);
                    } else {
                        let src = &src[..(dst.len() - 1) * src_step + 1];
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = src[i * src_step];
                        }
                    }
                }
            }
        });
}

/// Adds the column matrix `values` with `layout` (any strides and offset) into
/// `image` `[B, C, H, W]`, as described at [`col2im`]. Threads split the image
/// planes, so no two threads add into the same pixel.
fn col2im_values<T>(values: &[T], layout: &Layout, geometry: &Geometry, image: &mut [T])
where
    T: Copy + AddAssign + Send + Sync,
{
    let &[stride_row, stride_col] = layout.stride() else {
        unreachable!("callers pass a 2-D column layout")
    };
    let values = &values[layout.start_offset()..];
    let Geometry {
        channels,
        height,
        width,
        out_h,
        out_w,
        window,
        ..
    } = *geometry;
    let out_area = geometry.out_area();
    let plane_len = height * width;
    if plane_len == 0 {
        return;
    }
    image
        .par_chunks_mut(plane_len)
        .enumerate()
        .for_each(|(plane_index, plane)| {
            let image_index = plane_index / channels;
            let channel = plane_index % channels;
            for kh in 0..window.kernel_h {
                let offset_h = window.tap_offset(kh);
                let valid_h = unpadded_outputs(out_h, height, offset_h, window.stride);
                for kw in 0..window.kernel_w {
                    let offset_w = window.tap_offset(kw);
                    let valid_w = unpadded_outputs(out_w, width, offset_w, window.stride);
                    if valid_w.is_empty() {
                        continue;
                    }
                    let first_iw = ((valid_w.start * window.stride) as isize + offset_w) as usize;
                    let row = (channel * window.kernel_h + kh) * window.kernel_w + kw;
                    let row_start = row * stride_row + image_index * out_area * stride_col;
                    for oh in valid_h.clone() {
                        let ih = ((oh * window.stride) as isize + offset_h) as usize;
                        let src_start = row_start + (oh * out_w + valid_w.start) * stride_col;
                        let dst = &mut plane[ih * width + first_iw..(ih + 1) * width];
                        let count = valid_w.len();
                        // Slicing first lets the compiler drop the bounds checks.
                        let dst = &mut dst[..(count - 1) * window.stride + 1];
                        match (stride_col, window.stride) {
                            (1, 1) => {
                                let src = &values[src_start..src_start + count];
                                for (d, s) in dst.iter_mut().zip(src) {
                                    *d += *s;
                                }
                            }
                            (1, step) => {
                                let src = &values[src_start..src_start + count];
                                for (i, s) in src.iter().enumerate() {
                                    dst[i * step] += *s;
                                }
                            }
                            (col_step, step) => {
                                for i in 0..count {
                                    dst[i * step] += values[src_start + i * col_step];
                                }
                            }
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::relative_error;
    use candle_core::{Device, Var};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// One convolution setting: shapes and window.
    #[derive(Debug, Clone)]
    struct Case {
        batch: usize,
        groups: usize,
        group_channels: usize,
        group_out: usize,
        kernel_h: usize,
        kernel_w: usize,
        height: usize,
        width: usize,
        padding: usize,
        stride: usize,
        dilation: usize,
        seed: u64,
    }

    impl Case {
        fn x_dims(&self) -> (usize, usize, usize, usize) {
            let channels = self.group_channels * self.groups;
            (self.batch, channels, self.height, self.width)
        }

        fn kernel_dims(&self) -> (usize, usize, usize, usize) {
            let out_channels = self.group_out * self.groups;
            (
                out_channels,
                self.group_channels,
                self.kernel_h,
                self.kernel_w,
            )
        }

        /// Returns random `x` and `kernel` tensors of this case.
        fn tensors(&self, dtype: DType) -> (Tensor, Tensor) {
            let mut rng = StdRng::seed_from_u64(self.seed);
            let x = random_tensor(&mut rng, self.x_dims(), dtype);
            let kernel = random_tensor(&mut rng, self.kernel_dims(), dtype);
            (x, kernel)
        }

        fn ours(&self, x: &Tensor, kernel: &Tensor) -> Tensor {
            conv2d(
                x,
                kernel,
                self.padding,
                self.stride,
                self.dilation,
                self.groups,
            )
            .unwrap()
        }

        fn candle(&self, x: &Tensor, kernel: &Tensor) -> Tensor {
            x.conv2d(
                kernel,
                self.padding,
                self.stride,
                self.dilation,
                self.groups,
            )
            .unwrap()
        }

        /// Computes the same convolution as [`Case::candle`], with the padding applied
        /// explicitly and the rows and columns that no window reaches cropped.
        ///
        /// The backward pass of candle 0.11's conv2d derives the output padding of its
        /// `conv_transpose2d` from the height alone, so it fails with a shape mismatch
        /// when `(H + 2 * padding - span) % stride` differs from the same term for the
        /// width. Without padding or unreached pixels, both terms are 0.
        fn candle_cropped(&self, x: &Tensor, kernel: &Tensor) -> Tensor {
            let p = self.padding;
            let out = self.ours(x, kernel);
            let (_, _, out_h, out_w) = out.dims4().unwrap();
            let reached = |out_len: usize, kernel_len: usize| {
                (out_len - 1) * self.stride + self.dilation * (kernel_len - 1) + 1
            };
            x.pad_with_zeros(2, p, p)
                .unwrap()
                .pad_with_zeros(3, p, p)
                .unwrap()
                .narrow(2, 0, reached(out_h, self.kernel_h))
                .unwrap()
                .narrow(3, 0, reached(out_w, self.kernel_w))
                .unwrap()
                .conv2d(kernel, 0, self.stride, self.dilation, self.groups)
                .unwrap()
        }
    }

    /// Generates cases whose window always fits: the input is at least as large as the
    /// dilated kernel minus the padding.
    fn cases() -> impl Strategy<Value = Case> {
        (
            (
                1usize..=3,
                prop_oneof![Just(1usize), Just(2), Just(4)],
                1usize..=3,
                1usize..=3,
            ),
            (1usize..=4, 1usize..=4, 0usize..=4, 0usize..=4),
            (0usize..=2, 1usize..=3, 1usize..=2, any::<u64>()),
        )
            .prop_map(|(channel_args, kernel_args, window_args)| {
                let (batch, groups, group_channels, group_out) = channel_args;
                let (kernel_h, kernel_w, extra_h, extra_w) = kernel_args;
                let (padding, stride, dilation, seed) = window_args;
                let min_len = |kernel_len: usize| {
                    (dilation * (kernel_len - 1) + 1)
                        .saturating_sub(2 * padding)
                        .max(1)
                };
                Case {
                    batch,
                    groups,
                    group_channels,
                    group_out,
                    kernel_h,
                    kernel_w,
                    height: min_len(kernel_h) + extra_h,
                    width: min_len(kernel_w) + extra_w,
                    padding,
                    stride,
                    dilation,
                    seed,
                }
            })
    }

    fn random_tensor(rng: &mut StdRng, dims: (usize, usize, usize, usize), dtype: DType) -> Tensor {
        let len = dims.0 * dims.1 * dims.2 * dims.3;
        let values: Vec<f64> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn to_f64_vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Returns `sum(out * weights)` with random weights fixed by the case's seed.
    fn weighted_sum(case: &Case, out: &Tensor) -> Tensor {
        let mut rng = StdRng::seed_from_u64(case.seed ^ 0x5eed);
        let weights = random_tensor(&mut rng, out.dims4().unwrap(), out.dtype());
        (out * weights).unwrap().sum_all().unwrap()
    }

    /// Returns the gradients of `sum(conv(x, kernel) * weights)` wrt `x` and `kernel`.
    fn gradients(
        case: &Case,
        x: &Tensor,
        kernel: &Tensor,
        conv: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> (Tensor, Tensor) {
        let x = Var::from_tensor(x).unwrap();
        let kernel = Var::from_tensor(kernel).unwrap();
        let out = conv(x.as_tensor(), kernel.as_tensor());
        let grads = weighted_sum(case, &out).backward().unwrap();
        let grad_x = grads.get(x.as_tensor()).unwrap().clone();
        let grad_kernel = grads.get(kernel.as_tensor()).unwrap().clone();
        (grad_x, grad_kernel)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn conv2d_matches_candle_f32(case in cases()) {
            let (x, kernel) = case.tensors(DType::F32);
            let error = relative_error(&case.ours(&x, &kernel), &case.candle(&x, &kernel));
            prop_assert!(error <= 1e-5, "relative error {error}");
        }

        #[test]
        fn conv2d_matches_candle_f64(case in cases()) {
            let (x, kernel) = case.tensors(DType::F64);
            let error = relative_error(&case.ours(&x, &kernel), &case.candle(&x, &kernel));
            prop_assert!(error <= 1e-12, "relative error {error}");
        }

        #[test]
        fn conv2d_gradients_match_candle(case in cases()) {
            let (x, kernel) = case.tensors(DType::F64);
            let (ours_x, ours_kernel) = gradients(&case, &x, &kernel, |x, k| case.ours(x, k));
            let (candle_x, candle_kernel) =
                gradients(&case, &x, &kernel, |x, k| case.candle_cropped(x, k));
            let error_x = relative_error(&ours_x, &candle_x);
            prop_assert!(error_x <= 1e-12, "input gradient relative error {error_x}");
            let error_kernel = relative_error(&ours_kernel, &candle_kernel);
            prop_assert!(error_kernel <= 1e-12, "kernel gradient relative error {error_kernel}");
        }
    }

    fn small_case() -> Case {
        Case {
            batch: 2,
            groups: 1,
            group_channels: 2,
            group_out: 3,
            kernel_h: 3,
            kernel_w: 2,
            height: 6,
            width: 4,
            padding: 1,
            stride: 2,
            dilation: 1,
            seed: 7,
        }
    }

    #[test]
    fn conv2d_gradient_matches_finite_differences() {
        let case = small_case();
        let (x, kernel) = case.tensors(DType::F64);
        let mut rng = StdRng::seed_from_u64(11);
        let out_dims = case.ours(&x, &kernel).dims4().unwrap();
        let weights = random_tensor(&mut rng, out_dims, DType::F64);
        let loss = |x: &Tensor, kernel: &Tensor| -> f64 {
            let out = case.ours(x, kernel);
            (out * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };

        let x_var = Var::from_tensor(&x).unwrap();
        let kernel_var = Var::from_tensor(&kernel).unwrap();
        let out = case.ours(x_var.as_tensor(), kernel_var.as_tensor());
        let grads = (out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        // Central differences over every element of one argument, with the other fixed.
        let eps = 1e-6;
        let numeric_gradient = |arg: &Tensor, eval: &dyn Fn(&Tensor) -> f64| -> Vec<f64> {
            let values = to_f64_vec(arg);
            (0..values.len())
                .map(|i| {
                    let mut shifted = values.clone();
                    shifted[i] = values[i] + eps;
                    let plus =
                        eval(&Tensor::from_vec(shifted.clone(), arg.dims(), &Device::Cpu).unwrap());
                    shifted[i] = values[i] - eps;
                    let minus = eval(&Tensor::from_vec(shifted, arg.dims(), &Device::Cpu).unwrap());
                    (plus - minus) / (2.0 * eps)
                })
                .collect()
        };
        let numeric_x = numeric_gradient(&x, &|x| loss(x, &kernel));
        let numeric_kernel = numeric_gradient(&kernel, &|k| loss(&x, k));

        let analytic_x = to_f64_vec(grads.get(x_var.as_tensor()).unwrap());
        let analytic_kernel = to_f64_vec(grads.get(kernel_var.as_tensor()).unwrap());
        for (i, (a, n)) in analytic_x.iter().zip(&numeric_x).enumerate() {
            assert!(
                (a - n).abs() <= 1e-7,
                "input gradient {i}: analytic {a}, numeric {n}"
            );
        }
        for (i, (a, n)) in analytic_kernel.iter().zip(&numeric_kernel).enumerate() {
            assert!(
                (a - n).abs() <= 1e-7,
                "kernel gradient {i}: analytic {a}, numeric {n}"
            );
        }
    }

    #[test]
    fn conv2d_non_contiguous_input() {
        let case = Case {
            groups: 2,
            group_channels: 2,
            ..small_case()
        };
        let (b, c, h, w) = case.x_dims();
        let (o, group_c, kh, kw) = case.kernel_dims();
        let mut rng = StdRng::seed_from_u64(3);
        // Swapping the spatial axes and dropping a leading channel gives strides
        // that are not row-major and a nonzero start offset.
        let x_base =
            Var::from_tensor(&random_tensor(&mut rng, (b, c + 1, w, h), DType::F64)).unwrap();
        let kernel_base =
            Var::from_tensor(&random_tensor(&mut rng, (o, group_c, kw, kh), DType::F64)).unwrap();
        let x = x_base.narrow(1, 1, c).unwrap().transpose(2, 3).unwrap();
        let kernel = kernel_base.transpose(2, 3).unwrap();
        assert!(!x.is_contiguous());
        assert!(!kernel.is_contiguous());

        let ours = case.ours(&x, &kernel);
        let x_copy = x.contiguous().unwrap();
        let kernel_copy = kernel.contiguous().unwrap();
        let expected = case.candle_cropped(&x_copy, &kernel_copy);
        let error = relative_error(&ours, &expected);
        assert!(error <= 1e-12, "relative error {error}");

        let ours_grads = weighted_sum(&case, &ours).backward().unwrap();
        let candle_grads = weighted_sum(&case, &expected).backward().unwrap();
        for (name, var) in [("input", &x_base), ("kernel", &kernel_base)] {
            let ours_grad = ours_grads.get(var.as_tensor()).unwrap();
            let candle_grad = candle_grads.get(var.as_tensor()).unwrap();
            let error = relative_error(ours_grad, candle_grad);
            assert!(error <= 1e-12, "{name} gradient relative error {error}");
        }
    }

    #[test]
    fn conv2d_broadcast_input() {
        // Stride 0 in every dimension but the channels, and a width of 1.
        let kernel = Tensor::new(
            &[[[[1.0f64, 2.0], [3.0, 4.0]]], [[[0.5, 0.0], [0.0, -1.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        for shape in [(2, 1, 3, 3), (1, 1, 2, 1)] {
            let x = Tensor::new(&[[[[0.25f64]]]], &Device::Cpu)
                .unwrap()
                .broadcast_as(shape)
                .unwrap();
            let kernel = kernel.narrow(3, 0, shape.3.min(2)).unwrap();
            let ours = conv2d(&x, &kernel, 0, 1, 1, 1).unwrap();
            let expected = x.contiguous().unwrap().conv2d(&kernel, 0, 1, 1, 1).unwrap();
            assert!(relative_error(&ours, &expected) <= 1e-12, "input {shape:?}");
        }
    }

    #[test]
    fn conv2d_other_dtypes_fall_back_to_candle() {
        let case = small_case();
        let (x, kernel) = case.tensors(DType::F16);
        let error = relative_error(&case.ours(&x, &kernel), &case.candle(&x, &kernel));
        assert!(error <= 1e-2, "relative error {error}");
    }

    #[test]
    fn im2col_rejects_integer_dtype() {
        let x = Tensor::zeros((1, 1, 3, 3), DType::U32, &Device::Cpu).unwrap();
        let window = Window {
            kernel_h: 2,
            kernel_w: 2,
            padding: 0,
            stride: 1,
            dilation: 1,
        };
        let error = x.apply_op1_no_bwd(&Im2Col { window }).unwrap_err();
        assert!(error.to_string().contains("im2col"), "{error}");
    }

    fn small_window(case: &Case) -> Window {
        Window {
            kernel_h: case.kernel_h,
            kernel_w: case.kernel_w,
            padding: case.padding,
            stride: case.stride,
            dilation: case.dilation,
        }
    }

    #[test]
    fn im2col_backward_is_col2im() {
        let case = small_case();
        let window = small_window(&case);
        let geometry = Geometry::new(case.x_dims(), window).unwrap();
        let x = Var::zeros(case.x_dims(), DType::F64, &Device::Cpu).unwrap();
        let cols = x.as_tensor().apply_op1(Im2Col { window }).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, len) = cols.dims2().unwrap();
        let weights = random_tensor(&mut rng, (1, 1, rows, len), DType::F64)
            .reshape((rows, len))
            .unwrap();
        let grads = (cols * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad_x = grads.get(x.as_tensor()).unwrap();
        let expected = weights.apply_op1_no_bwd(&Col2Im { geometry }).unwrap();
        let error = relative_error(grad_x, &expected);
        assert!(error == 0.0, "relative error {error}");
    }

    #[test]
    fn col2im_backward_is_im2col() {
        let case = small_case();
        let (x, _) = case.tensors(DType::F64);
        let window = small_window(&case);
        let geometry = Geometry::new(case.x_dims(), window).unwrap();
        let cols = x.apply_op1_no_bwd(&Im2Col { window }).unwrap();
        let cols_var = Var::zeros(cols.dims(), DType::F64, &Device::Cpu).unwrap();
        let image = cols_var.as_tensor().apply_op1(Col2Im { geometry }).unwrap();
        let grads = (image * &x).unwrap().sum_all().unwrap().backward().unwrap();
        let grad_cols = grads.get(cols_var.as_tensor()).unwrap();
        let error = relative_error(grad_cols, &cols);
        assert!(error == 0.0, "relative error {error}");
    }

    #[test]
    fn conv2d_gradient_of_one_argument() {
        let case = Case {
            groups: 2,
            group_channels: 2,
            ..small_case()
        };
        let (x, kernel) = case.tensors(DType::F64);
        let (expected_x, expected_kernel) =
            gradients(&case, &x, &kernel, |x, k| case.candle_cropped(x, k));

        // Only the kernel is a variable, as for the first layer of a network.
        let kernel_var = Var::from_tensor(&kernel).unwrap();
        let out = case.ours(&x, kernel_var.as_tensor());
        let grads = weighted_sum(&case, &out).backward().unwrap();
        let error = relative_error(grads.get(kernel_var.as_tensor()).unwrap(), &expected_kernel);
        assert!(error <= 1e-12, "kernel gradient relative error {error}");
        assert!(grads.get(&x).is_none(), "untracked input got a gradient");

        let x_var = Var::from_tensor(&x).unwrap();
        let out = case.ours(x_var.as_tensor(), &kernel);
        let grads = weighted_sum(&case, &out).backward().unwrap();
        let error = relative_error(grads.get(x_var.as_tensor()).unwrap(), &expected_x);
        assert!(error <= 1e-12, "input gradient relative error {error}");
    }

    #[test]
    fn conv2d_spans_several_chunks() {
        let case = Case {
            batch: 50,
            group_channels: 8,
            group_out: 4,
            kernel_h: 3,
            kernel_w: 3,
            height: 20,
            width: 19,
            padding: 1,
            stride: 1,
            ..small_case()
        };
        let window = small_window(&case);
        let geometry = Geometry::new(case.x_dims(), window).unwrap();
        let chunks: Vec<_> = geometry.chunks(case.group_out).collect();
        assert!(chunks.len() > 1, "one chunk: {chunks:?}");
        assert_eq!(chunks.last().unwrap().end, case.batch);

        let (x, kernel) = case.tensors(DType::F64);
        let error = relative_error(&case.ours(&x, &kernel), &case.candle(&x, &kernel));
        assert!(error <= 1e-12, "relative error {error}");
        let (ours_x, ours_kernel) = gradients(&case, &x, &kernel, |x, k| case.ours(x, k));
        let (candle_x, candle_kernel) =
            gradients(&case, &x, &kernel, |x, k| case.candle_cropped(x, k));
        let error_x = relative_error(&ours_x, &candle_x);
        assert!(error_x <= 1e-12, "input gradient relative error {error_x}");
        let error_kernel = relative_error(&ours_kernel, &candle_kernel);
        assert!(
            error_kernel <= 1e-12,
            "kernel gradient relative error {error_kernel}"
        );
    }

    #[test]
    fn conv2d_empty_batch() {
        let case = Case {
            batch: 0,
            ..small_case()
        };
        let (x, kernel) = case.tensors(DType::F32);
        let out = case.ours(&x, &kernel);
        assert_eq!(out.dims(), &[0, 3, 3, 3]);
    }

    #[test]
    fn im2col_and_col2im_reject_bad_arguments() {
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let cols = im2col(&x, (3, 3), 0, 1, 1).unwrap();
        assert_eq!(cols.dims(), &[18, 4]);

        let bad_results = [
            (
                "3-D input",
                im2col(&x.squeeze(0).unwrap(), (3, 3), 0, 1, 1),
                "must have shape",
            ),
            ("zero stride", im2col(&x, (3, 3), 0, 0, 1), "at least 1"),
            ("zero-size kernel", im2col(&x, (0, 3), 0, 1, 1), "zero-size"),
            ("kernel too large", im2col(&x, (5, 3), 0, 1, 1), "spans 5x3"),
            (
                "wrong columns",
                col2im(&cols, (1, 2, 5, 4), (3, 3), 0, 1, 1),
                "expects columns",
            ),
            (
                "col2im window",
                col2im(&cols, (1, 2, 4, 4), (3, 3), 0, 1, 0),
                "at least 1",
            ),
        ];
        for (name, result, message) in bad_results {
            match result {
                Err(Error::Shape(text)) => {
                    assert!(
                        text.contains(message),
                        "{name}: message {text:?} lacks {message:?}"
                    )
                }
                other => panic!("{name}: expected Error::Shape, got {other:?}"),
            }
        }
        let image = col2im(&cols, (1, 2, 4, 4), (3, 3), 0, 1, 1).unwrap();
        assert_eq!(image.dims(), &[1, 2, 4, 4]);
    }

    #[test]
    fn conv2d_rejects_bad_arguments() {
        let x = Tensor::zeros((2, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let kernel = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let x3 = Tensor::zeros((4, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let x_f64 = x.to_dtype(DType::F64).unwrap();
        let k3 = kernel(&[2, 4, 3, 3]);
        // Arguments after the kernel: padding, stride, dilation, groups.
        let bad_results = [
            (
                "3-D input",
                conv2d(&x3, &k3, 0, 1, 1, 1),
                "input must have shape",
            ),
            (
                "3-D kernel",
                conv2d(&x, &kernel(&[2, 4, 3]), 0, 1, 1, 1),
                "kernel must have shape",
            ),
            (
                "dtype mismatch",
                conv2d(&x_f64, &k3, 0, 1, 1, 1),
                "same dtype",
            ),
            ("zero stride", conv2d(&x, &k3, 0, 0, 1, 1), "at least 1"),
            ("zero dilation", conv2d(&x, &k3, 0, 1, 0, 1), "at least 1"),
            ("zero groups", conv2d(&x, &k3, 0, 1, 1, 0), "at least 1"),
            (
                "zero-size kernel",
                conv2d(&x, &kernel(&[2, 4, 0, 3]), 0, 1, 1, 1),
                "zero-size",
            ),
            (
                "channel mismatch",
                conv2d(&x, &kernel(&[2, 3, 3, 3]), 0, 1, 1, 1),
                "4 channels",
            ),
            ("group mismatch", conv2d(&x, &k3, 0, 1, 1, 2), "4 channels"),
            (
                "groups not dividing outputs",
                conv2d(&x, &kernel(&[3, 2, 3, 3]), 0, 1, 1, 2),
                "do not divide",
            ),
            (
                "kernel too large",
                conv2d(&x, &kernel(&[2, 4, 6, 3]), 0, 1, 1, 1),
                "spans 6x3",
            ),
            (
                "dilated kernel too large",
                conv2d(&x, &k3, 0, 1, 3, 1),
                "spans 7x7",
            ),
        ];
        for (name, result, message) in bad_results {
            match result {
                Err(Error::Shape(text)) => {
                    assert!(
                        text.contains(message),
                        "{name}: message {text:?} lacks {message:?}"
                    )
                }
                other => panic!("{name}: expected Error::Shape, got {other:?}"),
            }
        }
    }

    #[test]
    fn conv2d_padding_lets_large_kernel_fit() {
        // A 6x6 kernel fits a 5x5 input once padding 1 makes it 7x7.
        let x = Tensor::ones((1, 1, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let kernel = Tensor::ones((1, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
        let out = conv2d(&x, &kernel, 1, 1, 1, 1).unwrap();
        assert_eq!(out.dims(), &[1, 1, 2, 2]);
        let expected = x.conv2d(&kernel, 1, 1, 1, 1).unwrap();
        assert_eq!(relative_error(&out, &expected), 0.0);
    }

    /// Times forward and forward + backward of the four convolutions of the MNIST CNN
    /// (1->32 k3, 32->32 k3 s2, 32->64 k3, 64->64 k3 s2 on 28x28, batch 256) for
    /// candle's conv2d and this module's. Run with
    /// `cargo test --release --lib ops::conv::tests::cnn_conv_benchmark -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark, takes tens of seconds"]
    fn cnn_conv_benchmark() {
        use std::time::{Duration, Instant};

        let mut rng = StdRng::seed_from_u64(1);
        let batch = 256;
        let x = random_tensor(&mut rng, (batch, 1, 28, 28), DType::F32);
        // (in_channels, out_channels, stride)
        let layers = [(1, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 2)];
        let kernels: Vec<Var> = layers
            .iter()
            .map(|&(c_in, c_out, _)| {
                let kernel = random_tensor(&mut rng, (c_out, c_in, 3, 3), DType::F32);
                Var::from_tensor(&(kernel * 0.2).unwrap()).unwrap()
            })
            .collect();

        type Conv = fn(&Tensor, &Tensor, usize) -> Tensor;
        let candle_conv: Conv = |x, k, stride| x.conv2d(k, 0, stride, 1, 1).unwrap();
        let im2col_conv: Conv = |x, k, stride| conv2d(x, k, 0, stride, 1, 1).unwrap();
        let forward = |conv: Conv| -> Tensor {
            let mut h = x.clone();
            for (kernel, &(_, _, stride)) in kernels.iter().zip(&layers) {
                h = conv(&h, kernel.as_tensor(), stride).relu().unwrap();
            }
            h.sum_all().unwrap()
        };
        let time = |run: &dyn Fn()| -> Duration {
            let start = Instant::now();
            run();
            start.elapsed()
        };
        let median = |mut times: Vec<Duration>| -> Duration {
            times.sort();
            times[times.len() / 2]
        };

        // The two implementations alternate within each round, so that load from
        // other processes affects both alike.
        let implementations = [
            ("candle conv2d", candle_conv),
            ("im2col conv2d", im2col_conv),
        ];
        let mut forward_times = vec![Vec::new(); implementations.len()];
        let mut training_times = vec![Vec::new(); implementations.len()];
        for round in 0..6 {
            for (i, &(_, conv)) in implementations.iter().enumerate() {
                let fwd = time(&|| {
                    forward(conv).to_scalar::<f32>().unwrap();
                });
                let fwd_bwd = time(&|| {
                    forward(conv).backward().unwrap();
                });
                // Round 0 warms up the allocator and the thread pool.
                if round > 0 {
                    forward_times[i].push(fwd);
                    training_times[i].push(fwd_bwd);
                }
            }
        }

        println!("rayon threads: {}", rayon::current_num_threads());
        for (i, &(name, _)) in implementations.iter().enumerate() {
            let fwd = median(forward_times[i].clone());
            let fwd_bwd = median(training_times[i].clone());
            println!(
                "{name}: forward {:.1} ms, forward + backward {:.1} ms ({:.0} images/s), \
                 median of 5",
                fwd.as_secs_f64() * 1e3,
                fwd_bwd.as_secs_f64() * 1e3,
                batch as f64 / fwd_bwd.as_secs_f64()
            );
        }
    }
}
