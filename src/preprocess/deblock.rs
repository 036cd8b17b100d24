//! Softening a small, blocky picture before the detector looks for its
//! faces: a picture no larger than the classifier's input is blown up on
//! its way into the detector, and the edges of the 8x8 blocks a heavy JPEG
//! compression left in it, blown up with it, hide faces. A light Gaussian
//! blur takes them out of the copy the detector first looks at; the mirror
//! confirmation and the crop are made on the picture as decoded
//! ([`crate::preprocess::Preprocessor::seen`]).
//!
//! Which pictures are softened is read from their pixels, not from their
//! file: a small upload has often been compressed hard once and saved
//! again finely since (a platform's re-encode, a screenshot, a PNG), so its
//! file's quantisation tables say nothing of the blocks it carries.
//! [`blockiness`] compares the steps between neighbouring pixels across the
//! 8-pixel grid's lines with the steps inside its blocks. The settings live
//! in the weights' metadata ([`crate::face::FaceCrop::deblock`]).
//!
//! Must not touch any picture the settings do not name.

use serde::{Deserialize, Serialize};

/// The settings `train` writes into the weights' metadata: pictures at most
/// 64 pixels on their longer side (the classifier's input and the
/// detector's quick look, so every look blows them up) whose steps across
/// the block grid are at least 1.4 times those inside blocks, blurred with
/// sigma 0.6 pixel.
pub const DEBLOCK: Deblock = Deblock {
    longest: 64,
    blockiness: 1.4,
    sigma: 0.6,
};

/// Which pictures are softened before faces are looked for, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Deblock {
    /// Longest side, in pixels, at or under which a picture may be softened.
    pub longest: u32,
    /// Least [`blockiness`] for it to be.
    pub blockiness: f32,
    /// Standard deviation of the Gaussian blur, in pixels.
    pub sigma: f32,
}

impl Deblock {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.longest == 0 || self.longest > 4096 {
            return Err(format!(
                "deblocking side {} is not in [1, 4096] pixels",
                self.longest
            ));
        }
        if !(self.blockiness.is_finite() && self.blockiness > 0.0) {
            return Err(format!(
                "deblocking blockiness {} is not positive",
                self.blockiness
            ));
        }
        if !(self.sigma.is_normal() && self.sigma > 0.0 && self.sigma <= 5.0) {
            return Err(format!("deblocking sigma {} is not in (0, 5]", self.sigma));
        }
        Ok(())
    }

    /// Whether a `w` x `h` picture is small enough to be softened (at most
    /// [`Deblock::longest`] on its longer side), before its pixels are read.
    pub fn fits(&self, w: u32, h: u32) -> bool {
        w.max(h) <= self.longest
    }

    /// Whether a `w` x `h` RGB picture is one to soften: it
    /// [`fits`](Deblock::fits), and is at least [`Deblock::blockiness`]
    /// blocky.
    pub fn applies(&self, pixels: &[u8], w: u32, h: u32) -> bool {
        self.fits(w, h) && blockiness(pixels, w, h).is_some_and(|b| b >= self.blockiness)
    }

    /// Blurs `pixels` (interleaved RGB, `w` x `h`) in place, whatever the
    /// picture; false (nothing done) when they are not `w` x `h`.
    pub fn blur(&self, pixels: &mut [u8], w: u32, h: u32) -> bool {
        let n = w as usize * h as usize * 3;
        let Some(view) = pixels
            .get(..n)
            .and_then(|p| image::ImageBuffer::<image::Rgb<u8>, &[u8]>::from_raw(w, h, p))
        else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let soft = image::imageops::blur(&view, self.sigma);
        pixels[..n].copy_from_slice(soft.as_raw());
        true
    }
}

/// How blocky a `w` x `h` RGB picture is: the mean step in brightness
/// (the sum of the three channels) between neighbours on either side of
/// the 8-pixel grid's lines, over the mean step between neighbours inside
/// the blocks, across and down, averaged. About 1 for a picture with no
/// grid in it; `None` when there is no grid line (under 9 pixels either
/// way) or the pixels are not `w` x `h`. A flat picture's inside steps are
/// taken as at least 1/64 of a level.
pub fn blockiness(pixels: &[u8], w: u32, h: u32) -> Option<f32> {
    let (w, h) = (w as usize, h as usize);
    if w < 9 || h < 9 || pixels.len() < w * h * 3 {
        return None;
    }
    let luma = |x: usize, y: usize| {
        let p = &pixels[(y * w + x) * 3..][..3];
        i32::from(p[0]) + i32::from(p[1]) + i32::from(p[2])
    };
    // Sums and counts of the steps across grid lines and inside blocks.
    let mut across = [[0u64; 2]; 2];
    let mut down = [[0u64; 2]; 2];
    for y in 0..h {
        for x in 0..w {
            if x + 1 < w {
                let on_line = usize::from(x % 8 == 7);
                across[on_line][0] += luma(x, y).abs_diff(luma(x + 1, y)) as u64;
                across[on_line][1] += 1;
            }
            if y + 1 < h {
                let on_line = usize::from(y % 8 == 7);
                down[on_line][0] += luma(x, y).abs_diff(luma(x, y + 1)) as u64;
                down[on_line][1] += 1;
            }
        }
    }
    let ratio = |[inside, line]: [[u64; 2]; 2]| {
        let mean = |[sum, n]: [u64; 2]| sum as f32 / n.max(1) as f32;
        mean(line) / mean(inside).max(1.0 / 64.0)
    };
    Some((ratio(across) + ratio(down)) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;

    const SETTINGS: Deblock = DEBLOCK;

    /// A smooth picture: gentle gradients, no grid.
    fn picture(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            let v = |k: f32| {
                (128.0 + 60.0 * ((x as f32 * k).sin() + (y as f32 * 0.21).cos()) / 2.0) as u8
            };
            image::Rgb([v(0.17), v(0.23), v(0.31)])
        })
    }

    /// `img` through a JPEG at `quality` and back.
    fn jpeg(img: &image::RgbImage, quality: u8) -> image::RgbImage {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(img)
            .unwrap();
        image::load_from_memory(&out).unwrap().into_rgb8()
    }

    fn blocky(img: &image::RgbImage) -> f32 {
        blockiness(img.as_raw(), img.width(), img.height()).unwrap()
    }

    #[test]
    fn blockiness_sees_the_grid_a_heavy_compression_leaves() {
        let img = picture(48, 40);
        assert!(blocky(&img) < 1.2, "no grid: {}", blocky(&img));
        assert!(
            blocky(&jpeg(&img, 95)) < 1.2,
            "fine: {}",
            blocky(&jpeg(&img, 95))
        );
        let heavy = jpeg(&img, 8);
        assert!(blocky(&heavy) > 1.6, "heavy: {}", blocky(&heavy));
        // Saved again finely, it keeps its blocks.
        assert!(blocky(&jpeg(&heavy, 90)) > 1.5);
        assert_eq!(blockiness(&[0; 8 * 20 * 3], 8, 20), None, "no grid line");
        assert_eq!(blockiness(&[0; 10], 20, 20), None, "not 20 x 20");
        // Flat: no step inside, none across.
        assert_eq!(blockiness(&[7; 16 * 16 * 3], 16, 16), Some(0.0));
    }

    #[test]
    fn only_small_blocky_pictures_are_softened() {
        let applies =
            |img: &image::RgbImage| SETTINGS.applies(img.as_raw(), img.width(), img.height());
        assert!(applies(&jpeg(&picture(48, 40), 8)));
        assert!(!applies(&picture(48, 40)), "no blocks");
        assert!(
            !applies(&jpeg(&picture(200, 120), 8)),
            "larger than `longest`"
        );
    }

    #[test]
    fn blurring_keeps_a_flat_picture_and_smooths_a_block_edge() {
        let flat = image::RgbImage::from_pixel(32, 32, image::Rgb([90, 120, 200]));
        let mut pixels = flat.as_raw().clone();
        assert!(SETTINGS.blur(&mut pixels, 32, 32));
        assert_eq!(&pixels, flat.as_raw());
        // A step between two 8-pixel blocks becomes a ramp.
        let step =
            image::RgbImage::from_fn(16, 8, |x, _| image::Rgb([if x < 8 { 60 } else { 180 }; 3]));
        let mut pixels = step.as_raw().clone();
        assert!(SETTINGS.blur(&mut pixels, 16, 8));
        let at = |x: usize| pixels[(4 * 16 + x) * 3];
        assert!(
            at(7) > 60 && at(8) < 180 && at(7) < at(8),
            "{} {}",
            at(7),
            at(8)
        );
        assert_eq!((at(0), at(15)), (60, 180), "far from the edge: unchanged");
        assert!(!SETTINGS.blur(&mut [0u8; 5], 2, 2), "not 2 x 2");
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            Deblock {
                longest: 0,
                ..SETTINGS
            },
            Deblock {
                blockiness: f32::NAN,
                ..SETTINGS
            },
            Deblock {
                sigma: 0.0,
                ..SETTINGS
            },
            Deblock {
                sigma: 9.0,
                ..SETTINGS
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(SETTINGS.validate().is_ok());
    }
}
