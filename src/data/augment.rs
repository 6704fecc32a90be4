//! Random crops and horizontal flips of training images, the augmentation
//! of the CIFAR-10 protocol.
//!
//! A crop of the image's own size, taken from the image padded with
//! [`CROP_PADDING`] black pixels on every side, shifts the image by up to
//! that many pixels each way. The flip mirrors the crop left to right with
//! probability one half. The offsets and flips have the distribution of
//! torchvision's `RandomCrop(32, padding=4)` followed by
//! `RandomHorizontalFlip()`, not its random stream.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Black pixels added on every side of an image before the random crop.
pub const CROP_PADDING: i32 = 4;

/// The crop offset and flip of one image.
///
/// Output pixel `(y, x)` of an image with `cols` columns is input pixel
/// `(y + shift_y, x' + shift_x)`, where `x' = x` without the flip and
/// `x' = cols - 1 - x` with it. Input pixels outside the image are black.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Vertical offset of the crop in pixels, in
    /// `[-CROP_PADDING, CROP_PADDING]`.
    pub shift_y: i32,
    /// Horizontal offset of the crop in pixels, in
    /// `[-CROP_PADDING, CROP_PADDING]`.
    pub shift_x: i32,
    /// Whether the crop is mirrored left to right.
    pub flip: bool,
}

impl Augmentation {
    /// The augmentation that leaves an image as it is.
    pub const IDENTITY: Augmentation = Augmentation {
        shift_y: 0,
        shift_x: 0,
        flip: false,
    };

    /// Draws offsets uniformly from `[-CROP_PADDING, CROP_PADDING]` and a
    /// flip with probability one half.
    pub fn draw(rng: &mut impl Rng) -> Self {
        Augmentation {
            shift_y: rng.gen_range(-CROP_PADDING..=CROP_PADDING),
            shift_x: rng.gen_range(-CROP_PADDING..=CROP_PADDING),
            flip: rng.gen_bool(0.5),
        }
    }

    /// Appends the augmented `image` to `out`.
    ///
    /// `image` contains `channels * rows * cols` values in `[c, h, w]` order, as
    /// `shape` gives them, and `fill[c]` is the value of a black pixel in
    /// channel `c`.
    pub fn apply(&self, image: &[f32], shape: [usize; 3], fill: &[f32], out: &mut Vec<f32>) {
        let [channels, rows, cols] = shape;
        debug_assert_eq!(image.len(), channels * rows * cols);
        debug_assert_eq!(fill.len(), channels);
        for (plane, &black) in image.chunks_exact(rows * cols).zip(fill) {
            for y in 0..rows {
                let Some(source_y) = shifted(y, self.shift_y, rows) else {
                    out.extend(std::iter::repeat_n(black, cols));
                    continue;
                };
                let row = &plane[source_y * cols..(source_y + 1) * cols];
                for x in 0..cols {
                    let mirrored = if self.flip { cols - 1 - x } else { x };
                    let value = shifted(mirrored, self.shift_x, cols).map_or(black, |source_x| row[source_x]);
                    out.push(value);
                }
            }
        }
    }
}

/// Returns `index + shift` when it lies in `0..len`.
fn shifted(index: usize, shift: i32, len: usize) -> Option<usize> {
    let source = index as i64 + i64::from(shift);
    (0..len as i64).contains(&source).then_some(source as usize)
}

/// Draws the augmentations of the `count` images of one batch.
///
/// The draws depend only on the run's `seed`, the 1-based `epoch` and the
/// 0-based `batch` index within it. Every batch has its own random stream,
/// so a resumed run draws the same augmentations as an uninterrupted one
/// without storing the generator's state.
pub fn for_batch(seed: u64, epoch: usize, batch: usize, count: usize) -> Vec<Augmentation> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(batch as u64).to_le_bytes());
    key[24..].copy_from_slice(b"augment\0");
    let mut rng = StdRng::from_seed(key);
    (0..count).map(|_| Augmentation::draw(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x2x3 image with values 1..=6 in row-major order.
    const IMAGE: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    const SHAPE: [usize; 3] = [1, 2, 3];

    fn augmented(augmentation: Augmentation) -> Vec<f32> {
        let mut out = Vec::new();
        augmentation.apply(&IMAGE, SHAPE, &[-1.0], &mut out);
        out
    }

    #[test]
    fn identity_keeps_image() {
        assert_eq!(augmented(Augmentation::IDENTITY), IMAGE);
    }

    #[test]
    fn shift_reads_from_offset() {
        let right = Augmentation { shift_y: 0, shift_x: 1, flip: false };
        assert_eq!(augmented(right), [2.0, 3.0, -1.0, 5.0, 6.0, -1.0]);
        let down = Augmentation { shift_y: -1, shift_x: 0, flip: false };
        assert_eq!(augmented(down), [-1.0, -1.0, -1.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn flip_mirrors_after_crop() {
        let flip = Augmentation { flip: true, ..Augmentation::IDENTITY };
        assert_eq!(augmented(flip), [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
        // Output x reads input column (cols - 1 - x) + shift_x.
        let both = Augmentation { shift_y: 0, shift_x: 1, flip: true };
        assert_eq!(augmented(both), [-1.0, 3.0, 2.0, -1.0, 6.0, 5.0]);
    }

    #[test]
    fn shift_past_image_is_black() {
        let away = Augmentation { shift_y: 2, shift_x: 0, flip: false };
        assert_eq!(augmented(away), [-1.0; 6]);
    }

    #[test]
    fn draws_cover_every_offset() {
        let draws = for_batch(0, 1, 0, 2000);
        for shift in -CROP_PADDING..=CROP_PADDING {
            assert!(draws.iter().any(|a| a.shift_y == shift), "shift_y {shift} drawn");
            assert!(draws.iter().any(|a| a.shift_x == shift), "shift_x {shift} drawn");
        }
        let flips = draws.iter().filter(|a| a.flip).count();
        assert!((800..1200).contains(&flips), "{flips} flips of 2000");
    }

    #[test]
    fn batches_draw_distinct_streams() {
        assert_eq!(for_batch(3, 2, 5, 64), for_batch(3, 2, 5, 64));
        assert_ne!(for_batch(3, 2, 5, 64), for_batch(4, 2, 5, 64));
        assert_ne!(for_batch(3, 2, 5, 64), for_batch(3, 3, 5, 64));
        assert_ne!(for_batch(3, 2, 5, 64), for_batch(3, 2, 6, 64));
    }
}
