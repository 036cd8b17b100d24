//! Training-time augmentation that makes aligned training faces look like
//! uploads: the picture set into a larger one on a plain, gradient, striped
//! or noisy background (so a crop around the face reaches past the original
//! picture as it does in an upload) or, when asked for, cut down as a tight
//! upload is (the crop then runs past its edges), an imperfect detection (the crop moved,
//! scaled and turned before alignment), a mirror image, a small picture blown
//! up or a blurred one, light (brightness, contrast, a dim room), greyscale,
//! and JPEG re-compression. Deterministic for a given random generator; never
//! used at serving.

use std::io::Cursor;

use image::{ImageFormat, RgbImage};
use rand::Rng;

use crate::face::Face;

/// How strongly to augment. Probabilities are per picture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Largest move of the face centre, in face sizes, each axis.
    pub shift: f32,
    /// Face size drawn from `1 ± scale`.
    pub scale: f32,
    /// Largest error of the eye-line angle, in degrees.
    pub roll_degrees: f32,
    /// Chance of setting the picture on a larger background first.
    pub backdrop: f64,
    /// Chance of cutting the picture down to 62-90% of its sides where it
    /// is not set on a background (a tight upload: the crop around the face
    /// runs past its edges). Off by default; drawing nothing when off, so
    /// the default recipe's pictures are the same with or without it.
    pub tight: f64,
    /// Chance of greyscale.
    pub grey: f64,
    /// Chance of a blur.
    pub blur: f64,
    /// Chance of shrinking to a small picture and back.
    pub small: f64,
    /// Chance of JPEG re-compression at quality 10-70.
    pub jpeg: f64,
    /// Chance of dim light (values scaled by 0.3-0.8).
    pub dim: f64,
    /// Contrast factor drawn from `1 ± contrast`.
    pub contrast: f32,
    /// Brightness offset drawn from `± brightness` (0-255 scale).
    pub brightness: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            shift: 0.06,
            scale: 0.12,
            roll_degrees: 10.0,
            backdrop: 0.3,
            tight: 0.0,
            grey: 0.15,
            blur: 0.15,
            small: 0.15,
            jpeg: 0.25,
            dim: 0.15,
            contrast: 0.25,
            brightness: 25.0,
        }
    }
}

impl Augment {
    /// No augmentation at all (validation, tests).
    pub fn none() -> Self {
        Self {
            shift: 0.0,
            scale: 0.0,
            roll_degrees: 0.0,
            backdrop: 0.0,
            tight: 0.0,
            grey: 0.0,
            blur: 0.0,
            small: 0.0,
            jpeg: 0.0,
            dim: 0.0,
            contrast: 0.0,
            brightness: 0.0,
        }
    }

    /// The face as an imperfect detection would report it.
    pub fn face<R: Rng>(&self, face: &Face, rng: &mut R) -> Face {
        let mut sym = |r: f32| {
            if r > 0.0 {
                rng.random_range(-r..=r)
            } else {
                0.0
            }
        };
        let scale = 1.0 + sym(self.scale);
        let shift = [sym(self.shift), sym(self.shift)];
        let roll = sym(self.roll_degrees).to_radians();
        face.jittered(scale, shift, roll)
    }

    /// Sometimes (`backdrop`) the picture set at a random place into one 1.2
    /// to 2 times its size, on a random background, its edge hard or
    /// feathered, and the face moved with it; `None` otherwise.
    pub fn backdrop<R: Rng>(
        &self,
        img: &RgbImage,
        face: &Face,
        rng: &mut R,
    ) -> Option<(RgbImage, Face)> {
        if !drawn(self.backdrop, rng) {
            return None;
        }
        let (w, h) = (img.width(), img.height());
        let k = rng.random_range(1.2f32..2.0);
        let (cw, ch) = ((w as f32 * k) as u32, (h as f32 * k) as u32);
        let (x0, y0) = (rng.random_range(0..=cw - w), rng.random_range(0..=ch - h));
        let mut canvas = background(cw, ch, rng);
        let feather = if rng.random_bool(0.5) {
            rng.random_range(1..=(w.min(h) / 10).max(1))
        } else {
            0
        };
        for y in 0..h {
            for x in 0..w {
                let edge = x.min(y).min(w - 1 - x).min(h - 1 - y);
                let a = if feather == 0 || edge >= feather {
                    1.0
                } else {
                    (edge as f32 + 0.5) / feather as f32
                };
                let src = img.get_pixel(x, y);
                let dst = canvas.get_pixel_mut(x + x0, y + y0);
                for c in 0..3 {
                    dst[c] = (f32::from(src[c]) * a + f32::from(dst[c]) * (1.0 - a)) as u8;
                }
            }
        }
        Some((canvas, face.moved(x0 as f32, y0 as f32)))
    }

    /// Sometimes (`tight`) the picture cut down to a random 62-90% of its
    /// sides at a random place, and the face moved with it; `None`
    /// otherwise.
    pub fn tighten<R: Rng>(
        &self,
        img: &RgbImage,
        face: &Face,
        rng: &mut R,
    ) -> Option<(RgbImage, Face)> {
        if !drawn(self.tight, rng) {
            return None;
        }
        let (w, h) = (img.width(), img.height());
        let k = rng.random_range(0.62f32..0.9);
        let (cw, ch) = (
            ((w as f32 * k) as u32).max(1),
            ((h as f32 * k) as u32).max(1),
        );
        let (x0, y0) = (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch));
        let cut = image::imageops::crop_imm(img, x0, y0, cw, ch).to_image();
        Some((cut, face.moved(-(x0 as f32), -(y0 as f32))))
    }

    /// Changes an aligned `n x n` RGB crop in place.
    pub fn pixels<R: Rng>(&self, rgb: &mut [u8], n: usize, rng: &mut R) {
        if rng.random_bool(0.5) {
            rgb.chunks_exact_mut(n * 3)
                .for_each(crate::face::mirror_row);
        }
        if drawn(self.small, rng) {
            let m = rng.random_range((n / 5).max(8)..=(n / 2).max(8)) as u32;
            resample(rgb, n, m);
        } else if drawn(self.blur, rng) {
            box_blur(rgb, n);
        }
        let contrast = 1.0
            + if self.contrast > 0.0 {
                rng.random_range(-self.contrast..=self.contrast)
            } else {
                0.0
            };
        let brightness = if self.brightness > 0.0 {
            rng.random_range(-self.brightness..=self.brightness)
        } else {
            0.0
        };
        let dim = if drawn(self.dim, rng) {
            rng.random_range(0.3..0.8)
        } else {
            1.0
        };
        if contrast != 1.0 || brightness != 0.0 || dim != 1.0 {
            for v in rgb.iter_mut() {
                let x = ((f32::from(*v) - 128.0) * contrast + 128.0 + brightness) * dim;
                *v = x.clamp(0.0, 255.0) as u8;
            }
        }
        if drawn(self.grey, rng) {
            for px in rgb.chunks_exact_mut(3) {
                let y = crate::face::align::luma(px).round() as u8;
                px.fill(y);
            }
        }
        if drawn(self.jpeg, rng) {
            recompress(rgb, n, rng.random_range(10..=70));
        }
    }
}

/// Whether an augmentation of chance `p` happens to this picture; a chance
/// of 0 draws nothing, so switching one off leaves the others' draws as
/// they were.
fn drawn<R: Rng>(p: f64, rng: &mut R) -> bool {
    p > 0.0 && rng.random_bool(p)
}

/// A `w x h` background: a flat colour, a gradient, stripes or smooth noise.
fn background<R: Rng>(w: u32, h: u32, rng: &mut R) -> RgbImage {
    let mut colour = || [rng.random::<u8>(), rng.random::<u8>(), rng.random::<u8>()];
    let (a, b) = (colour(), colour());
    let kind = rng.random_range(0..4);
    let period = rng.random_range(6..40u32);
    let noise: Vec<u8> = (0..((w / 16 + 2) * (h / 16 + 2) * 3))
        .map(|_| rng.random())
        .collect();
    RgbImage::from_fn(w, h, |x, y| {
        let t = match kind {
            0 => 0.0,
            1 => x as f32 / w.max(1) as f32,
            2 => f32::from(u8::from((x + y) / period % 2 == 0)),
            _ => {
                let i = (((y / 16) * (w / 16 + 2) + x / 16) * 3) as usize;
                return image::Rgb([noise[i], noise[i + 1], noise[i + 2]]);
            }
        };
        let mix = |c: usize| (f32::from(a[c]) * (1.0 - t) + f32::from(b[c]) * t) as u8;
        image::Rgb([mix(0), mix(1), mix(2)])
    })
}

/// Shrinks to `m x m` and blows back up (a small upload).
fn resample(rgb: &mut [u8], n: usize, m: u32) {
    let Some(img) = RgbImage::from_raw(n as u32, n as u32, rgb.to_vec()) else {
        return;
    };
    let small = image::imageops::resize(&img, m, m, image::imageops::FilterType::Triangle);
    let big = image::imageops::resize(
        &small,
        n as u32,
        n as u32,
        image::imageops::FilterType::Triangle,
    );
    rgb.copy_from_slice(big.as_raw());
}

/// A 3x3 box blur, edges repeated.
fn box_blur(rgb: &mut [u8], n: usize) {
    let src = rgb.to_vec();
    let at = |x: isize, y: isize, c: usize| {
        let (x, y) = (
            x.clamp(0, n as isize - 1) as usize,
            y.clamp(0, n as isize - 1) as usize,
        );
        u32::from(src[(y * n + x) * 3 + c])
    };
    for y in 0..n as isize {
        for x in 0..n as isize {
            for c in 0..3 {
                let mut sum = 0;
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        sum += at(x + dx, y + dy, c);
                    }
                }
                rgb[(y as usize * n + x as usize) * 3 + c] = ((sum + 4) / 9) as u8;
            }
        }
    }
}

/// Encodes as JPEG at `quality` and decodes again.
fn recompress(rgb: &mut [u8], n: usize, quality: u8) {
    let mut bytes = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality);
    if image::ImageEncoder::write_image(
        encoder,
        rgb,
        n as u32,
        n as u32,
        image::ExtendedColorType::Rgb8,
    )
    .is_err()
    {
        return;
    }
    if let Ok(img) = image::load(Cursor::new(&bytes), ImageFormat::Jpeg) {
        let img = img.to_rgb8();
        if img.as_raw().len() == rgb.len() {
            rgb.copy_from_slice(img.as_raw());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn face() -> Face {
        Face {
            score: 0.9,
            x: 50.0,
            y: 50.0,
            w: 100.0,
            h: 100.0,
            eyes: [[80.0, 90.0], [120.0, 90.0]],
        }
    }

    #[test]
    fn nothing_changes_without_augmentation_but_the_mirror() {
        let n = 8;
        let src: Vec<u8> = (0..n * n * 3).map(|v| (v * 7 % 256) as u8).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let none = Augment::none();
        for _ in 0..8 {
            let mut dst = src.clone();
            none.pixels(&mut dst, n, &mut rng);
            let mut mirrored = src.clone();
            for row in mirrored.chunks_exact_mut(n * 3) {
                let px: Vec<[u8; 3]> = row
                    .chunks_exact(3)
                    .rev()
                    .map(|p| [p[0], p[1], p[2]])
                    .collect();
                row.copy_from_slice(&px.concat());
            }
            assert!(dst == src || dst == mirrored);
            assert_eq!(none.face(&face(), &mut rng), face());
        }
    }

    #[test]
    fn a_tight_cut_moves_the_face_with_it() {
        let img = RgbImage::from_fn(200, 200, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let aug = Augment {
            tight: 1.0,
            ..Augment::none()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..16 {
            let Some((cut, moved)) = aug.tighten(&img, &face(), &mut rng) else {
                panic!("tight 1.0 always cuts");
            };
            let (w, h) = cut.dimensions();
            assert!(
                (124..=180).contains(&w) && (124..=180).contains(&h),
                "{w}x{h}"
            );
            // The cut starts where the face moved from: its first pixel is
            // the picture's at that offset.
            let (x0, y0) = (face().x - moved.x, face().y - moved.y);
            assert_eq!(*cut.get_pixel(0, 0), *img.get_pixel(x0 as u32, y0 as u32));
            assert_eq!(moved.eyes[0][0] - moved.x, face().eyes[0][0] - face().x);
            assert_eq!((moved.w, moved.h), (face().w, face().h));
        }
    }

    #[test]
    fn no_tight_cut_draws_nothing() {
        let img = RgbImage::new(50, 50);
        let mut used = rand::rngs::StdRng::seed_from_u64(5);
        let mut fresh = rand::rngs::StdRng::seed_from_u64(5);
        assert!(
            Augment::default()
                .tighten(&img, &face(), &mut used)
                .is_none()
        );
        assert_eq!(used.random::<u64>(), fresh.random::<u64>());
    }

    #[test]
    fn same_seed_same_output() {
        let n = 16;
        let src: Vec<u8> = (0..n * n * 3).map(|v| (v * 13 % 256) as u8).collect();
        let run = || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let aug = Augment {
                jpeg: 1.0,
                grey: 1.0,
                ..Augment::default()
            };
            let mut dst = src.clone();
            aug.pixels(&mut dst, n, &mut rng);
            (dst, aug.face(&face(), &mut rng))
        };
        assert_eq!(run(), run());
        assert_ne!(run().0, src);
    }
}
