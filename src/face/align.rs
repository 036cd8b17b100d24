//! The one alignment function: from a face's box and eyes, rotate so the
//! eyes are level and cut the square the classifier was trained on, resized
//! to its input. The worker, `train`, `eval` and `predict` all call
//! [`align`], so what the model learns is what it serves.
//!
//! Works on RGB bytes; knows nothing of the detector's network or of models.

use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

/// Where the classifier's square sits around a detected face, in units of
/// the face box's size, in the face's own (eyes-level) frame; the detector
/// score a face needs, and the [`contrast`] its crop needs; and the detector
/// input the faces are first looked for at. Stored in the classifier's
/// metadata.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaceCrop {
    /// Detector score at or above which a face counts.
    pub threshold: f32,
    /// Side of the crop over the face box's side.
    pub side: f32,
    /// Crop centre minus box centre, along the eye line, over the box side.
    pub dx: f32,
    /// Crop centre minus box centre, across the eye line (down), over the box side.
    pub dy: f32,
    /// The detector input faces are first looked for at. The geometry above
    /// was measured with it; files written before it existed measured at
    /// the full look.
    #[serde(default)]
    pub first_look: super::Look,
    /// Detector score a face found by the closer look (tiles of the
    /// picture, after the whole-picture looks found nothing) needs; `None`
    /// takes no closer look (files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closer_look: Option<f32>,
    /// The [`contrast`] below which a detection's aligned crop is taken for
    /// no face (a featureless disc or flat colour); `None` takes every
    /// detection (files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_contrast: Option<f32>,
    /// Side of a face's box, in the picture's pixels, below which a
    /// detection is not taken for a face; `None` takes any (files written
    /// before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_face: Option<f32>,
    /// Side of a face's box, in the picture's pixels, below which a face
    /// counts only when the detector finds it in the mirror image too
    /// (`FaceFinder::confirmed`); `None` confirms none (files written
    /// before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_below: Option<f32>,
    /// Which small blocky pictures are first looked for faces in a
    /// softened copy, and how much they are softened
    /// (`Preprocessor::seen`); `None` softens none (files written before it
    /// existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deblock: Option<crate::preprocess::Deblock>,
}

impl FaceCrop {
    /// Whether an aligned `n x n` RGB crop has the contrast of a face.
    pub fn has_features(&self, crop: &[u8], n: usize) -> bool {
        self.min_contrast
            .is_none_or(|least| contrast(crop, n) >= least)
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(format!(
                "face threshold {} is not in (0, 1)",
                self.threshold
            ));
        }
        if let Some(t) = self.closer_look
            && !(t > 0.0 && t < 1.0)
        {
            return Err(format!("closer-look threshold {t} is not in (0, 1)"));
        }
        if let Some(c) = self.min_contrast
            && !(0.0..1.0).contains(&c)
        {
            return Err(format!("least face contrast {c} is not in [0, 1)"));
        }
        for (what, px) in [
            ("least face side", self.min_face),
            ("side below which faces are confirmed", self.confirm_below),
        ] {
            if let Some(px) = px
                && !(0.0..=MAX_FACE_PX).contains(&px)
            {
                return Err(format!("{what} {px} is not in [0, {MAX_FACE_PX}] pixels"));
            }
        }
        if let Some(deblock) = &self.deblock {
            deblock.validate()?;
        }
        if !(self.side.is_finite() && self.side > 0.1 && self.side < 20.0) {
            return Err(format!("face crop side {} is not in (0.1, 20)", self.side));
        }
        if !(self.dx.is_finite()
            && self.dy.is_finite()
            && self.dx.abs() < 5.0
            && self.dy.abs() < 5.0)
        {
            return Err(format!(
                "face crop offset ({}, {}) is out of range",
                self.dx, self.dy
            ));
        }
        Ok(())
    }
}

/// A face in a picture's own pixels (after EXIF orientation), origin top left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Face {
    /// Detector confidence.
    pub score: f32,
    /// Box left edge.
    pub x: f32,
    /// Box top edge.
    pub y: f32,
    /// Box width.
    pub w: f32,
    /// Box height.
    pub h: f32,
    /// The person's right eye (left in the picture), then the left eye.
    pub eyes: [[f32; 2]; 2],
}

impl Face {
    /// Side of the face box (the mean of width and height).
    pub fn size(&self) -> f32 {
        (self.w + self.h) / 2.0
    }

    /// Centre of the box.
    pub fn centre(&self) -> [f32; 2] {
        [self.x + self.w / 2.0, self.y + self.h / 2.0]
    }

    /// Angle of the line from the right eye to the left eye, in radians
    /// (0: eyes level; positive: clockwise in the picture).
    pub fn roll(&self) -> f32 {
        let [r, l] = self.eyes;
        let (dx, dy) = (l[0] - r[0], l[1] - r[1]);
        if dx == 0.0 && dy == 0.0 {
            0.0
        } else {
            dy.atan2(dx)
        }
    }

    /// Box area, for choosing the largest face.
    pub fn area(&self) -> f32 {
        self.w.max(0.0) * self.h.max(0.0)
    }

    /// Intersection over union of the two boxes ([`super::decode::iou`]).
    pub fn overlap(&self, other: &Face) -> f32 {
        let corners = |f: &Face| [f.x, f.y, f.x + f.w, f.y + f.h];
        super::decode::iou(corners(self), corners(other))
    }

    /// The same face moved, scaled about its centre and turned (training
    /// augmentation: what an imperfect detection of an upload looks like).
    pub fn jittered(&self, scale: f32, shift: [f32; 2], roll: f32) -> Face {
        let s = self.size();
        let [cx, cy] = self.centre();
        let (cx, cy) = (cx + shift[0] * s, cy + shift[1] * s);
        let (w, h) = (self.w * scale, self.h * scale);
        let turn = |p: [f32; 2]| {
            let (c, sn) = (roll.cos(), roll.sin());
            let (dx, dy) = (p[0] - cx, p[1] - cy);
            [cx + c * dx - sn * dy, cy + sn * dx + c * dy]
        };
        let ex = |p: [f32; 2]| {
            let [ox, oy] = self.centre();
            turn([cx + (p[0] - ox) * scale, cy + (p[1] - oy) * scale])
        };
        Face {
            score: self.score,
            x: cx - w / 2.0,
            y: cy - h / 2.0,
            w,
            h,
            eyes: [ex(self.eyes[0]), ex(self.eyes[1])],
        }
    }

    /// The mean of two sightings of one face (its box and eyes), scored as
    /// the surer of them.
    pub fn averaged(&self, other: &Face) -> Face {
        let mid = |a: f32, b: f32| (a + b) / 2.0;
        let eye = |i: usize| {
            [
                mid(self.eyes[i][0], other.eyes[i][0]),
                mid(self.eyes[i][1], other.eyes[i][1]),
            ]
        };
        Face {
            score: self.score.max(other.score),
            x: mid(self.x, other.x),
            y: mid(self.y, other.y),
            w: mid(self.w, other.w),
            h: mid(self.h, other.h),
            eyes: [eye(0), eye(1)],
        }
    }

    /// The same face in a picture stretched by `sx` across and `sy` down
    /// (from a picture decoded at reduced scale to its full size).
    pub fn stretched(&self, sx: f32, sy: f32) -> Face {
        let at = |p: [f32; 2]| [p[0] * sx, p[1] * sy];
        Face {
            score: self.score,
            x: self.x * sx,
            y: self.y * sy,
            w: self.w * sx,
            h: self.h * sy,
            eyes: [at(self.eyes[0]), at(self.eyes[1])],
        }
    }

    /// The same face in a picture whose origin moved by `-dx`, `-dy` (the
    /// face `dx` across and `dy` down from where it was).
    pub fn moved(&self, dx: f32, dy: f32) -> Face {
        Face {
            x: self.x + dx,
            y: self.y + dy,
            eyes: self.eyes.map(|[ex, ey]| [ex + dx, ey + dy]),
            ..*self
        }
    }
}

/// An RGB picture borrowed as bytes.
#[derive(Debug, Clone, Copy)]
pub struct Rgb<'a> {
    /// Interleaved RGB, `w * h * 3` bytes.
    pub pixels: &'a [u8],
    /// Width in pixels.
    pub w: u32,
    /// Height in pixels.
    pub h: u32,
}

thread_local! {
    /// Each thread's resizer and shrunk-region buffer.
    static SHRINK: RefCell<(Resizer, Vec<u8>)> = RefCell::new((Resizer::new(), Vec::new()));
}

/// Shrink the region first when the crop is this much larger than the output.
const SHRINK_ABOVE: f32 = 1.25;

/// The least [`contrast`] new models write into their metadata: the faces
/// of the shared data's test set and of every kind of the upload-like set
/// measured 0.06 and above, the detections of flat colours and default
/// avatars 0.007 and below.
pub const MIN_CONTRAST: f32 = 0.02;

/// The least face side new models write into their metadata, in pixels:
/// a box of 20 pixels makes a crop of about a third of the classifier's
/// 64-pixel input. Over-compressed pictures of 40-80 pixels without a face
/// had most of their false faces under it; `tiny` faces (40-80 pixel
/// pictures) measured 31 pixels and above (the model card).
pub const MIN_FACE: f32 = 20.0;

/// The side below which new models confirm a face in the mirror image, in
/// pixels: faces smaller than the classifier's 64-pixel input, which the
/// alignment enlarges.
pub const CONFIRM_BELOW: f32 = 64.0;

/// Largest face side [`FaceCrop::validate`] takes for the two above.
const MAX_FACE_PX: f32 = 100_000.0;

/// Share of an aligned crop's side, around its centre, that [`contrast`]
/// reads: the middle of the face (eyes, nose, mouth) at the crop geometry
/// the classifier was trained with.
const CONTRAST_SHARE: f32 = 0.4;

/// Mean luma below which [`contrast`] divides by this instead (0-255): a
/// dark face keeps its features' relative contrast, a black disc has none.
const CONTRAST_DARK: f32 = 16.0;

/// How much the middle of an aligned `n x n` RGB crop varies: the standard
/// deviation of its luma over its mean (at least `CONTRAST_DARK`). A face
/// has features there; a flat disc or a single colour the detector took for
/// a face (default avatars, flat pictures) has next to none.
pub fn contrast(crop: &[u8], n: usize) -> f32 {
    let m = ((n as f32 * CONTRAST_SHARE).round() as usize).clamp(1, n);
    let from = (n - m) / 2;
    let (mut sum, mut sq) = (0f64, 0f64);
    for y in from..from + m {
        for px in crop[(y * n + from) * 3..][..m * 3].chunks_exact(3) {
            let l = f64::from(luma(px));
            sum += l;
            sq += l * l;
        }
    }
    let count = (m * m) as f64;
    let mean = sum / count;
    let std = (sq / count - mean * mean).max(0.0).sqrt();
    (std / mean.max(f64::from(CONTRAST_DARK))) as f32
}

/// The luma (ITU-R BT.601 weights, 0-255) of an RGB pixel's first three
/// bytes.
pub fn luma(px: &[u8]) -> f32 {
    0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2])
}

/// Cuts the face's square, eyes level, as `crop` places it, into `out`
/// (`n x n` RGB bytes). Pixels past the picture's edge repeat the edge.
///
/// A crop much larger than `n` is first shrunk (a SIMD triangle filter over
/// the region it covers), then sampled bilinearly, so large pictures do not
/// alias.
pub fn align(picture: Rgb<'_>, face: &Face, crop: &FaceCrop, n: usize, out: &mut [u8]) {
    let s = face.size().max(1.0);
    let theta = face.roll();
    let (sin, cos) = theta.sin_cos();
    let side = crop.side * s;
    let [bx, by] = face.centre();
    let (ox, oy) = (crop.dx * s, crop.dy * s);
    let centre = [bx + cos * ox - sin * oy, by + sin * ox + cos * oy];
    let ratio = side / n as f32;
    let sample = |src: Rgb<'_>, x0: f32, y0: f32, fx: f32, fy: f32, out: &mut [u8]| {
        warp(src, centre, side, (sin, cos), n, [x0, y0], [fx, fy], out)
    };
    if ratio > SHRINK_ABOVE {
        let reach = side / 2.0 * (cos.abs() + sin.abs()) + 2.0;
        let x0 = (centre[0] - reach).floor().clamp(0.0, picture.w as f32) as u32;
        let x1 = (centre[0] + reach).ceil().clamp(0.0, picture.w as f32) as u32;
        let y0 = (centre[1] - reach).floor().clamp(0.0, picture.h as f32) as u32;
        let y1 = (centre[1] + reach).ceil().clamp(0.0, picture.h as f32) as u32;
        if x1 > x0 && y1 > y0 {
            let (rw, rh) = (x1 - x0, y1 - y0);
            let sw = ((rw as f32 / ratio).ceil() as u32).max(1);
            let sh = ((rh as f32 / ratio).ceil() as u32).max(1);
            let done = SHRINK.with_borrow_mut(|(resizer, buf)| {
                buf.resize((sw * sh * 3) as usize, 0);
                let ok = (|| {
                    let src = ImageRef::new(picture.w, picture.h, picture.pixels, PixelType::U8x3)
                        .ok()?;
                    let mut dst = Image::from_slice_u8(sw, sh, buf, PixelType::U8x3).ok()?;
                    let options = ResizeOptions::new()
                        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
                        .crop(f64::from(x0), f64::from(y0), f64::from(rw), f64::from(rh));
                    resizer.resize(&src, &mut dst, &options).ok()
                })();
                if ok.is_some() {
                    let small = Rgb {
                        pixels: buf,
                        w: sw,
                        h: sh,
                    };
                    sample(
                        small,
                        x0 as f32,
                        y0 as f32,
                        sw as f32 / rw as f32,
                        sh as f32 / rh as f32,
                        out,
                    );
                }
                ok.is_some()
            });
            if done {
                return;
            }
        }
    }
    sample(picture, 0.0, 0.0, 1.0, 1.0, out);
}

/// Bilinear sampling of the rotated square into `out`. `src` covers the
/// picture from `origin` at `scale` source pixels per picture pixel.
///
/// The source position is affine in the output pixel: each row starts from
/// one point and steps by a fixed increment (`x = row + u * step`, the same
/// arithmetic in the vector path, so both give the same bytes). On CPUs
/// with AVX2 eight pixels are sampled at a time.
#[allow(clippy::too_many_arguments)]
fn warp(
    src: Rgb<'_>,
    centre: [f32; 2],
    side: f32,
    (sin, cos): (f32, f32),
    n: usize,
    origin: [f32; 2],
    scale: [f32; 2],
    out: &mut [u8],
) {
    let (w, h) = (src.w as usize, src.h as usize);
    if w == 0 || h == 0 || src.pixels.len() < w * h * 3 {
        out[..n * n * 3].fill(0);
        return;
    }
    let step = side / n as f32;
    // Output pixel (u, v) sits at f = (u + 0.5) * step - side / 2 (and the
    // same in v) in the face's frame; turned into the picture, then into
    // the source's grid (pixel centres at +0.5).
    let f0 = 0.5 * step - side / 2.0;
    let du = [cos * step * scale[0], sin * step * scale[1]];
    let dv = [-sin * step * scale[0], cos * step * scale[1]];
    let p0 = [
        (centre[0] + cos * f0 - sin * f0 - origin[0]) * scale[0] - 0.5,
        (centre[1] + sin * f0 + cos * f0 - origin[1]) * scale[1] - 0.5,
    ];
    let vector = simd::available();
    for (v, row) in out[..n * n * 3].chunks_exact_mut(n * 3).enumerate() {
        let start = [p0[0] + v as f32 * dv[0], p0[1] + v as f32 * dv[1]];
        let mut u = 0;
        while vector && u + simd::LANES <= n {
            // SAFETY: `simd::available` says the CPU has AVX2; the eight
            // pixels' 24 bytes lie inside `row`.
            let done = unsafe { simd::sample8(src, start, du, u, row[u * 3..].as_mut_ptr()) };
            if !done {
                break;
            }
            u += simd::LANES;
        }
        for (u, o) in (u..n).zip(row[u * 3..].chunks_exact_mut(3)) {
            let x = start[0] + u as f32 * du[0];
            let y = start[1] + u as f32 * du[1];
            o.copy_from_slice(&bilinear(src, x, y));
        }
    }
}

/// The RGB value at source position (x, y), clamped to the picture, by
/// bilinear interpolation (rounded to the nearest level).
fn bilinear(src: Rgb<'_>, x: f32, y: f32) -> [u8; 3] {
    let (w, h) = (src.w as usize, src.h as usize);
    let (sx, sy) = (x.clamp(0.0, (w - 1) as f32), y.clamp(0.0, (h - 1) as f32));
    let (x0, y0) = (sx as usize, sy as usize);
    let stride = w * 3;
    let dx = if x0 + 1 < w { 3 } else { 0 };
    let dy = if y0 + 1 < h { stride } else { 0 };
    let (ax, ay) = (sx - x0 as f32, sy - y0 as f32);
    let i = y0 * stride + x0 * 3;
    let px = src.pixels;
    let (p00, p10) = (&px[i..i + 3], &px[i + dx..i + dx + 3]);
    let (p01, p11) = (&px[i + dy..i + dy + 3], &px[i + dy + dx..i + dy + dx + 3]);
    std::array::from_fn(|c| {
        let top = f32::from(p00[c]) + (f32::from(p10[c]) - f32::from(p00[c])) * ax;
        let bottom = f32::from(p01[c]) + (f32::from(p11[c]) - f32::from(p01[c])) * ax;
        (top + (bottom - top) * ay + 0.5) as u8
    })
}

/// [`bilinear`] for eight output pixels at once with AVX2.
mod simd {
    use super::Rgb;

    /// Pixels per call of [`sample8`].
    pub const LANES: usize = 8;

    /// Whether this CPU runs [`sample8`] (it has AVX2). An AVX-512 twin of
    /// 16 pixels measured no faster (docs/PERFORMANCE.md, "What is left" of
    /// the ninth round).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Samples output pixels `u..u + 8` of a row starting at source
    /// position `start` and stepping by `du`, into `out` (24 bytes), as
    /// [`super::bilinear`] does each; `false` (nothing written) when a
    /// 4-byte read of the last source pixel would pass the picture's end.
    ///
    /// # Safety
    /// The CPU supports AVX2; `out` has room for 24 bytes; `src` holds
    /// `w * h * 3` bytes, `w` and `h` at least 1.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub unsafe fn sample8(
        src: Rgb<'_>,
        start: [f32; 2],
        du: [f32; 2],
        u: usize,
        out: *mut u8,
    ) -> bool {
        use std::arch::x86_64::*;
        let (w, h) = (src.w as i32, src.h as i32);
        let stride = w * 3;
        let iota = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let us = _mm256_add_ps(_mm256_set1_ps(u as f32), iota);
        // The scalar path's arithmetic: a multiply, then an add (no FMA).
        let xs = _mm256_add_ps(
            _mm256_set1_ps(start[0]),
            _mm256_mul_ps(us, _mm256_set1_ps(du[0])),
        );
        let ys = _mm256_add_ps(
            _mm256_set1_ps(start[1]),
            _mm256_mul_ps(us, _mm256_set1_ps(du[1])),
        );
        let zero = _mm256_setzero_ps();
        let sx = _mm256_min_ps(_mm256_max_ps(xs, zero), _mm256_set1_ps((w - 1) as f32));
        let sy = _mm256_min_ps(_mm256_max_ps(ys, zero), _mm256_set1_ps((h - 1) as f32));
        let (x0, y0) = (_mm256_cvttps_epi32(sx), _mm256_cvttps_epi32(sy));
        let ax = _mm256_sub_ps(sx, _mm256_cvtepi32_ps(x0));
        let ay = _mm256_sub_ps(sy, _mm256_cvtepi32_ps(y0));
        let one = _mm256_set1_epi32(1);
        let dx = _mm256_and_si256(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_add_epi32(x0, one)),
            _mm256_set1_epi32(3),
        );
        let dy = _mm256_and_si256(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(h), _mm256_add_epi32(y0, one)),
            _mm256_set1_epi32(stride),
        );
        let i00 = _mm256_add_epi32(
            _mm256_mullo_epi32(y0, _mm256_set1_epi32(stride)),
            _mm256_mullo_epi32(x0, _mm256_set1_epi32(3)),
        );
        let i10 = _mm256_add_epi32(i00, dx);
        let i01 = _mm256_add_epi32(i00, dy);
        let i11 = _mm256_add_epi32(i01, dx);
        // Each gather reads four bytes (RGB and the next pixel's red); the
        // largest offset is i11's (offsets grow with x0, y0, dx and dy).
        let mut last = [0i32; 8];
        // SAFETY: 8 i32 written into `last`.
        unsafe { _mm256_storeu_si256(last.as_mut_ptr().cast(), i11) };
        if last.iter().max().map_or(0, |&m| m as usize) + 4 > src.pixels.len() {
            return false;
        }
        let base = src.pixels.as_ptr().cast::<i32>();
        // SAFETY: every offset is at most `i11`'s largest, checked above.
        let (g00, g10, g01, g11) = unsafe {
            (
                _mm256_i32gather_epi32::<1>(base, i00),
                _mm256_i32gather_epi32::<1>(base, i10),
                _mm256_i32gather_epi32::<1>(base, i01),
                _mm256_i32gather_epi32::<1>(base, i11),
            )
        };
        let byte = _mm256_set1_epi32(0xff);
        let half = _mm256_set1_ps(0.5);
        let mut packed = _mm256_setzero_si256();
        for c in 0..3 {
            let level = |g: __m256i| -> __m256 {
                let shifted = match c {
                    0 => g,
                    1 => _mm256_srli_epi32::<8>(g),
                    _ => _mm256_srli_epi32::<16>(g),
                };
                _mm256_cvtepi32_ps(_mm256_and_si256(shifted, byte))
            };
            let (p00, p10, p01, p11) = (level(g00), level(g10), level(g01), level(g11));
            let top = _mm256_add_ps(p00, _mm256_mul_ps(_mm256_sub_ps(p10, p00), ax));
            let bottom = _mm256_add_ps(p01, _mm256_mul_ps(_mm256_sub_ps(p11, p01), ax));
            let v = _mm256_add_ps(
                _mm256_add_ps(top, _mm256_mul_ps(_mm256_sub_ps(bottom, top), ay)),
                half,
            );
            let q = _mm256_cvttps_epi32(v);
            let q = match c {
                0 => q,
                1 => _mm256_slli_epi32::<8>(q),
                _ => _mm256_slli_epi32::<16>(q),
            };
            packed = _mm256_or_si256(packed, q);
        }
        // Each 128-bit half: four RGBx pixels to 12 bytes of RGB.
        let order = _mm256_setr_epi8(
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5, 6, 8, 9, 10, 12,
            13, 14, -1, -1, -1, -1,
        );
        let mut bytes = [0u8; 32];
        // SAFETY: 32 bytes written into `bytes`; 24 copied into `out`, which
        // has room for them.
        unsafe {
            _mm256_storeu_si256(
                bytes.as_mut_ptr().cast(),
                _mm256_shuffle_epi8(packed, order),
            );
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, 12);
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(16), out.add(12), 12);
        }
        true
    }

    /// Never called: [`available`] is false off x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn sample8(_: Rgb<'_>, _: [f32; 2], _: [f32; 2], _: usize, _: *mut u8) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sightings_average_to_their_middle() {
        let a = Face {
            score: 0.9,
            x: 10.0,
            y: 20.0,
            w: 30.0,
            h: 32.0,
            eyes: [[18.0, 30.0], [32.0, 28.0]],
        };
        let b = Face {
            score: 0.95,
            x: 12.0,
            y: 18.0,
            w: 34.0,
            h: 30.0,
            eyes: [[20.0, 30.0], [34.0, 32.0]],
        };
        assert_eq!(a.averaged(&a), a);
        let m = a.averaged(&b);
        assert_eq!(
            (m.score, m.x, m.y, m.w, m.h),
            (0.95, 11.0, 19.0, 32.0, 31.0)
        );
        assert_eq!(m.eyes, [[19.0, 30.0], [33.0, 30.0]]);
        // Eyes that tilt opposite ways in the two sightings come out level.
        assert_eq!(m.roll(), 0.0);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn eight_pixel_sampling_matches_the_scalar_one() {
        // The AVX2 sampler: every row start and step of a turned crop, each
        // byte as `bilinear` says, and no write where a read would pass the
        // end of a tiny source.
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has no AVX2: nothing to compare");
            return;
        }
        let (w, h) = (29u32, 17u32);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 89 % 253) as u8).collect();
        let src = Rgb {
            pixels: &pixels,
            w,
            h,
        };
        let (sin, cos) = 0.35f32.sin_cos();
        for v in 0..24 {
            let start = [-3.0 + 0.9 * v as f32, 2.0 - 0.4 * v as f32];
            let du = [cos * 1.3, sin * 1.3];
            for u in [0usize, 5, 8, 16] {
                let mut out = [0u8; 24];
                // SAFETY: AVX2 checked above; 24 bytes of room.
                if unsafe { simd::sample8(src, start, du, u, out.as_mut_ptr()) } {
                    for (i, px) in out.chunks_exact(3).enumerate() {
                        let x = start[0] + (u + i) as f32 * du[0];
                        let y = start[1] + (u + i) as f32 * du[1];
                        assert_eq!(px, bilinear(src, x, y), "row {v}, pixel {}", u + i);
                    }
                }
            }
        }
        let tiny = [7u8, 200, 31];
        let one = Rgb {
            pixels: &tiny,
            w: 1,
            h: 1,
        };
        let mut out = [0u8; 24];
        // SAFETY: as above; the 4-byte read of the only pixel passes the end.
        let done = unsafe { simd::sample8(one, [0.0, 0.0], [0.5, 0.0], 0, out.as_mut_ptr()) };
        assert!(!done && out == [0u8; 24]);
    }

    #[test]
    fn vector_sampling_matches_the_scalar_one() {
        // Odd sizes, turns, crops past the edges, and sources too small for
        // the 4-byte reads near their end: every byte as `bilinear` says.
        let (w, h) = (37u32, 23u32);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 97 % 251) as u8).collect();
        let src = Rgb {
            pixels: &pixels,
            w,
            h,
        };
        let tiny = [7u8, 200, 31];
        let one = Rgb {
            pixels: &tiny,
            w: 1,
            h: 1,
        };
        let n = 40;
        for (k, picture) in [src, src, src, one].into_iter().enumerate() {
            let angle = 0.3 * k as f32 - 0.4;
            let centre = [5.0 + 9.0 * k as f32, 20.0 - 4.0 * k as f32];
            let side = 10.0 + 17.0 * k as f32;
            let mut out = vec![0u8; n * n * 3];
            warp(
                picture,
                centre,
                side,
                angle.sin_cos(),
                n,
                [0.0, 0.0],
                [1.0, 1.0],
                &mut out,
            );
            let step = side / n as f32;
            let f0 = 0.5 * step - side / 2.0;
            let (sin, cos) = angle.sin_cos();
            let p0 = [
                (centre[0] + cos * f0 - sin * f0) - 0.5,
                (centre[1] + sin * f0 + cos * f0) - 0.5,
            ];
            let (du, dv) = ([cos * step, sin * step], [-sin * step, cos * step]);
            for v in 0..n {
                let start = [p0[0] + v as f32 * dv[0], p0[1] + v as f32 * dv[1]];
                for u in 0..n {
                    let x = start[0] + u as f32 * du[0];
                    let y = start[1] + u as f32 * du[1];
                    let want = bilinear(picture, x, y);
                    assert_eq!(
                        &out[(v * n + u) * 3..][..3],
                        &want,
                        "case {k}, pixel ({u}, {v})"
                    );
                }
            }
        }
    }

    /// A picture with one bright square at a known place.
    fn marked(w: u32, h: u32, at: (u32, u32, u32)) -> Vec<u8> {
        let mut p = vec![20u8; (w * h * 3) as usize];
        for y in at.1..at.1 + at.2 {
            for x in at.0..at.0 + at.2 {
                p[((y * w + x) * 3) as usize..][..3].copy_from_slice(&[250, 250, 250]);
            }
        }
        p
    }

    const PLAIN: FaceCrop = FaceCrop {
        threshold: 0.75,
        side: 1.0,
        dx: 0.0,
        dy: 0.0,
        first_look: super::super::Look::Full,
        closer_look: None,
        min_contrast: None,
        min_face: None,
        confirm_below: None,
        deblock: None,
    };

    #[test]
    fn contrast_tells_a_flat_crop_from_a_textured_one() {
        let n = 64;
        let flat = vec![180u8; n * n * 3];
        assert_eq!(contrast(&flat, n), 0.0);
        assert_eq!(contrast(&vec![0u8; n * n * 3], n), 0.0);
        // Stripes of two greys 40 levels apart in the middle: std 20 over a
        // mean of 120.
        let stripes: Vec<u8> = (0..n * n)
            .flat_map(|i| [if (i % n) % 2 == 0 { 100u8 } else { 140 }; 3])
            .collect();
        assert!((contrast(&stripes, n) - 20.0 / 120.0).abs() < 1e-3);
        // Dark: divided by the floor, not by a mean near zero.
        let dark: Vec<u8> = (0..n * n)
            .flat_map(|i| [if (i % n) % 2 == 0 { 0u8 } else { 2 }; 3])
            .collect();
        assert!((contrast(&dark, n) - 1.0 / CONTRAST_DARK).abs() < 1e-3);
        let crop = FaceCrop {
            min_contrast: Some(MIN_CONTRAST),
            ..PLAIN
        };
        assert!(!crop.has_features(&flat, n) && crop.has_features(&stripes, n));
        assert!(PLAIN.has_features(&flat, n), "no least contrast: any crop");
        assert!(
            FaceCrop {
                min_contrast: Some(1.5),
                ..PLAIN
            }
            .validate()
            .is_err()
        );
        for (min_face, confirm_below) in [(Some(-1.0), None), (None, Some(f32::NAN))] {
            let crop = FaceCrop {
                min_face,
                confirm_below,
                ..PLAIN
            };
            assert!(crop.validate().is_err(), "{crop:?}");
        }
    }

    #[test]
    fn the_first_look_is_read_from_metadata() {
        let old = r#"{"threshold":0.85,"side":1.1,"dx":0.0,"dy":0.0}"#;
        let crop: FaceCrop = serde_json::from_str(old).unwrap();
        assert_eq!(crop.first_look, super::super::Look::Full);
        let quick = r#"{"threshold":0.85,"side":1.1,"dx":0.0,"dy":0.0,"first_look":64}"#;
        let crop: FaceCrop = serde_json::from_str(quick).unwrap();
        assert_eq!(crop.first_look, super::super::Look::Quick);
        assert_eq!(serde_json::to_value(crop).unwrap()["first_look"], 64);
        let odd = r#"{"threshold":0.85,"side":1.1,"dx":0.0,"dy":0.0,"first_look":96}"#;
        assert!(serde_json::from_str::<FaceCrop>(odd).is_err());
    }

    #[test]
    fn the_closer_look_is_read_from_metadata() {
        let old = r#"{"threshold":0.85,"side":1.1,"dx":0.0,"dy":0.0,"first_look":64}"#;
        let crop: FaceCrop = serde_json::from_str(old).unwrap();
        assert_eq!(crop.closer_look, None);
        assert!(
            serde_json::to_value(crop)
                .unwrap()
                .get("closer_look")
                .is_none()
        );
        let closer = r#"{"threshold":0.85,"side":1.1,"dx":0.0,"dy":0.0,"closer_look":0.98}"#;
        let crop: FaceCrop = serde_json::from_str(closer).unwrap();
        assert_eq!(crop.closer_look, Some(0.98));
        assert!(crop.validate().is_ok());
        let sure = FaceCrop {
            closer_look: Some(1.0),
            ..crop
        };
        assert!(sure.validate().is_err());
    }

    #[test]
    fn a_face_at_a_known_place_is_cut_there() {
        // A 40-pixel "face" at (300, 120) in a 640x480 picture.
        let pixels = marked(640, 480, (300, 120, 40));
        let face = Face {
            score: 0.9,
            x: 300.0,
            y: 120.0,
            w: 40.0,
            h: 40.0,
            eyes: [[310.0, 135.0], [330.0, 135.0]],
        };
        let mut out = vec![0u8; 32 * 32 * 3];
        let picture = Rgb {
            pixels: &pixels,
            w: 640,
            h: 480,
        };
        align(picture, &face, &PLAIN, 32, &mut out);
        // The crop is the square itself: bright all over but the outermost ring.
        let mut inner = (2..30).flat_map(|y| (2..30).map(move |x| (x, y)));
        assert!(inner.all(|(x, y)| out[(y * 32 + x) * 3] > 200));
        // Twice as wide: the square fills the middle half, dark around it.
        let loose = FaceCrop { side: 2.0, ..PLAIN };
        align(picture, &face, &loose, 32, &mut out);
        assert!(out[(16 * 32 + 16) * 3] > 200);
        assert!(out[(2 * 32 + 2) * 3] < 40 && out[(29 * 32 + 29) * 3] < 40);
    }

    #[test]
    fn a_turned_face_comes_back_level() {
        // A horizontal bar (the "eye line") turned by 20 degrees about (100, 100).
        let (w, h) = (200usize, 200usize);
        let angle = 20f32.to_radians();
        let mut pixels = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                // Undo the turn: is this pixel on the level bar?
                let (dx, dy) = (x as f32 + 0.5 - 100.0, y as f32 + 0.5 - 100.0);
                let (c, s) = (angle.cos(), angle.sin());
                let (lx, ly) = (c * dx + s * dy, -s * dx + c * dy);
                if lx.abs() < 40.0 && ly.abs() < 4.0 {
                    pixels[(y * w + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
                }
            }
        }
        let eye = |d: f32| [100.0 + d * angle.cos(), 100.0 + d * angle.sin()];
        let face = Face {
            score: 0.9,
            x: 60.0,
            y: 60.0,
            w: 80.0,
            h: 80.0,
            eyes: [eye(-30.0), eye(30.0)],
        };
        assert!((face.roll() - angle).abs() < 1e-5);
        let mut out = vec![0u8; 64 * 64 * 3];
        let picture = Rgb {
            pixels: &pixels,
            w: 200,
            h: 200,
        };
        align(picture, &face, &PLAIN, 64, &mut out);
        // Level again: the middle row is bright across, rows 8 px away are dark.
        let row = |y: usize| {
            (12..52)
                .map(|x| u32::from(out[(y * 64 + x) * 3]))
                .sum::<u32>()
                / 40
        };
        assert!(row(32) > 200, "middle row {}", row(32));
        assert!(row(24) < 30 && row(40) < 30, "rows {} {}", row(24), row(40));
    }

    #[test]
    fn large_crops_are_shrunk_before_sampling() {
        // Fine stripes average to grey when shrunk; plain sampling would alias.
        let (w, h) = (800usize, 800usize);
        let mut pixels = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in (0..w).filter(|x| x % 2 == 0) {
                pixels[(y * w + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let face = Face {
            score: 0.9,
            x: 0.0,
            y: 0.0,
            w: 800.0,
            h: 800.0,
            eyes: [[300.0, 300.0], [500.0, 300.0]],
        };
        let mut out = vec![0u8; 32 * 32 * 3];
        let picture = Rgb {
            pixels: &pixels,
            w: 800,
            h: 800,
        };
        align(picture, &face, &PLAIN, 32, &mut out);
        assert!(
            out.iter().all(|&v| (100..=155).contains(&v)),
            "{:?}",
            &out[..12]
        );
    }
}
