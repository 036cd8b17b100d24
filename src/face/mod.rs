//! Finding the face in a picture: the BlazeFace detector ([`blazeface`]),
//! the decoding of its outputs ([`decode`]), and the one alignment function
//! that cuts the face out for the classifier ([`align`]).
//!
//! [`FaceFinder`] puts them together for a decoded picture: letterbox it into
//! the detector's square, run the network, decode, map the faces back to the
//! picture's own pixels, largest first. Nothing here decodes image files,
//! speaks NATS or runs the classifier.

pub mod align;
pub mod blazeface;
pub mod decode;

use std::cell::RefCell;
use std::path::Path;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

pub use align::{Face, FaceCrop, Rgb, align};
pub use blazeface::{BlazeFace, DetectorError, Kernels};
pub use decode::Detection;

thread_local! {
    /// Each thread's resizer, letterboxed detector input and raw outputs.
    static LETTERBOX: RefCell<Letterbox> = RefCell::new(Letterbox::default());
}

#[derive(Default)]
struct Letterbox {
    resizer: Option<Resizer>,
    small: Vec<u8>,
    square: Vec<u8>,
    boxes: Vec<f32>,
    logits: Vec<f32>,
}

/// Share of the detector's square a picture fills on the second look.
pub const ZOOM_OUT: f32 = 0.7;

/// The detector, ready to find faces in decoded pictures.
pub struct FaceFinder {
    net: BlazeFace,
}

impl FaceFinder {
    /// Loads the detector's weights file.
    pub fn load(path: &Path) -> Result<Self, DetectorError> {
        Ok(Self {
            net: BlazeFace::load(path)?,
        })
    }

    /// Wraps a built network.
    pub fn new(net: BlazeFace) -> Self {
        Self { net }
    }

    /// The network.
    pub fn net(&self) -> &BlazeFace {
        &self.net
    }

    /// Every face scoring at least `threshold`, in the picture's pixels,
    /// largest first. The picture is shrunk to fit the detector's square,
    /// keeping its aspect ratio, and centred on black. When that finds
    /// nothing, the picture is looked at once more, smaller
    /// ([`ZOOM_OUT`] of the square): the short-range detector misses faces
    /// that fill the whole frame or run past its edges (tight crops).
    pub fn find(&self, picture: Rgb<'_>, threshold: f32) -> Vec<Face> {
        let faces = self.find_at(picture, threshold, 1.0);
        if !faces.is_empty() {
            return faces;
        }
        self.find_at(picture, threshold, ZOOM_OUT)
    }

    /// [`FaceFinder::find`] with the picture fitted into `zoom` of the square.
    fn find_at(&self, picture: Rgb<'_>, threshold: f32, zoom: f32) -> Vec<Face> {
        let side = self.net.input_side();
        let (w, h) = (picture.w.max(1), picture.h.max(1));
        let fit = zoom * side as f32 / w.max(h) as f32;
        let sw = ((w as f32 * fit).round() as u32).clamp(1, side as u32);
        let sh = ((h as f32 * fit).round() as u32).clamp(1, side as u32);
        let (ox, oy) = ((side as u32 - sw) / 2, (side as u32 - sh) / 2);
        let detections = LETTERBOX.with_borrow_mut(|lb| {
            let Letterbox {
                resizer,
                small,
                square,
                boxes,
                logits,
            } = lb;
            square.clear();
            square.resize(side * side * 3, 0);
            small.resize((sw * sh * 3) as usize, 0);
            let resizer = resizer.get_or_insert_with(Resizer::new);
            let resized = (|| {
                let src = ImageRef::new(w, h, picture.pixels, PixelType::U8x3).ok()?;
                let mut dst = Image::from_slice_u8(sw, sh, small, PixelType::U8x3).ok()?;
                let options =
                    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
                resizer.resize(&src, &mut dst, &options).ok()
            })();
            if resized.is_none() {
                return Vec::new();
            }
            for (y, row) in small.chunks_exact((sw * 3) as usize).enumerate() {
                let at = ((oy as usize + y) * side + ox as usize) * 3;
                square[at..at + row.len()].copy_from_slice(row);
            }
            boxes.resize(blazeface::ANCHORS * blazeface::COORDS, 0.0);
            logits.resize(blazeface::ANCHORS, 0.0);
            self.net.raw_u8(square, boxes, logits);
            decode::detections(boxes, logits, self.net.anchors(), side as f32, threshold)
        });
        // Relative to the square -> the picture's pixels.
        let (kx, ky) = (w as f32 / sw as f32, h as f32 / sh as f32);
        let to_x = |r: f32| (r * side as f32 - ox as f32) * kx;
        let to_y = |r: f32| (r * side as f32 - oy as f32) * ky;
        let mut faces: Vec<Face> = detections
            .iter()
            .map(|d| Face {
                score: d.score,
                x: to_x(d.xmin),
                y: to_y(d.ymin),
                w: to_x(d.xmax) - to_x(d.xmin),
                h: to_y(d.ymax) - to_y(d.ymin),
                eyes: [
                    [to_x(d.landmarks[0][0]), to_y(d.landmarks[0][1])],
                    [to_x(d.landmarks[1][0]), to_y(d.landmarks[1][1])],
                ],
            })
            .collect();
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()));
        faces
    }
}
