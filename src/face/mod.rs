//! Finding the face in a picture: the BlazeFace detector ([`blazeface`]),
//! the decoding of its outputs ([`decode`]), and the one alignment function
//! that cuts the face out for the classifier ([`mod@align`]).
//!
//! [`FaceFinder`] puts them together for a decoded picture: letterbox it (or,
//! on the closer look, a tile of it) into the detector's square, run the
//! network, decode, map the faces back to the picture's own pixels, largest
//! first; and, for small faces, look again at the mirror image to confirm
//! them. Nothing here decodes image files,
//! speaks NATS or runs the classifier.

pub mod align;
pub mod blazeface;
pub mod decode;

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

pub use align::{Face, FaceCrop, Rgb, align};
pub use blazeface::{BlazeFace, DetectorError, Kernels};
pub use decode::Detection;

use crate::model::Precision;

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

/// Shares of the detector's square a picture fills on the zoomed-out
/// looks, in turn until one finds a face: each shrinks the picture by 0.7
/// again. The short-range detector misses faces that fill the frame or run
/// past it; a small upload is often a face cropped that tight.
pub const ZOOM_OUT: [f32; 3] = [0.7, 0.5, 0.35];

/// The detector input a face is first looked for at. Stored in a
/// classifier's metadata as the side in pixels (64 or 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum Look {
    /// 64x64: a quarter of the full look's work, enough for a face that
    /// fills a good part of the picture (the usual profile picture).
    Quick,
    /// 128x128, the network's own input (what files without the field
    /// were measured with).
    #[default]
    Full,
}

impl Look {
    /// Side of the detector's square, in pixels.
    pub const fn side(self) -> u32 {
        match self {
            Look::Quick => 64,
            Look::Full => 128,
        }
    }
}

impl TryFrom<u32> for Look {
    type Error = String;

    fn try_from(side: u32) -> Result<Self, String> {
        match side {
            64 => Ok(Look::Quick),
            128 => Ok(Look::Full),
            _ => Err(format!(
                "a first look at {side} pixels: 64 or 128 are known"
            )),
        }
    }
}

impl From<Look> for u32 {
    fn from(look: Look) -> u32 {
        look.side()
    }
}

/// The quick look is taken only when its largest face spans at least this
/// share of the picture's longer side (26 of its 64 pixels: about the
/// smallest face the full look sees well). A smaller one is near the edge of
/// what 64 pixels show, and other faces beside it may be missed: the full
/// look decides.
pub const QUICK_MIN_SHARE: f32 = 0.4;

/// Side of a tile of the closer look, as a share of the picture's longer
/// side: a face spanning a fifth of the picture fills a third of a tile.
pub const TILE_SHARE: f32 = 0.6;

/// Shortest tile side, in pixels, for which the closer look is taken: a
/// smaller picture has no face too small for the whole-picture looks.
pub const MIN_TILE: u32 = 96;

/// Overlap (intersection over union) at which a face found in the mirror
/// image is the same face ([`FaceFinder::confirmed`]).
const SAME_FACE: f32 = 0.3;

/// Which way round the detector sees a picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    /// The picture as it is.
    AsIs,
    /// Mirrored left to right, to confirm a face ([`FaceFinder::confirmed`]).
    Mirrored,
}

/// Reverses a row of RGB pixels in place.
pub(crate) fn mirror_row(row: &mut [u8]) {
    row.as_chunks_mut::<3>().0.reverse();
}

/// A rectangle of a picture, in its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

impl Window {
    fn whole(picture: Rgb<'_>) -> Self {
        Self {
            x: 0,
            y: 0,
            w: picture.w.max(1),
            h: picture.h.max(1),
        }
    }

    /// The closer look's tiles: squares of [`TILE_SHARE`] of the longer
    /// side (clipped to the picture) at both ends of each axis, overlapping
    /// in the middle; none when a tile would be under [`MIN_TILE`].
    fn tiles(picture: Rgb<'_>) -> Vec<Self> {
        let (w, h) = (picture.w.max(1), picture.h.max(1));
        let t = (TILE_SHARE * w.max(h) as f32).round() as u32;
        if t < MIN_TILE {
            return Vec::new();
        }
        let starts = |len: u32| {
            if len <= t {
                vec![(0, len)]
            } else {
                vec![(0, t), (len - t, t)]
            }
        };
        let mut tiles = Vec::with_capacity(4);
        for &(y, th) in &starts(h) {
            for &(x, tw) in &starts(w) {
                tiles.push(Self { x, y, w: tw, h: th });
            }
        }
        tiles
    }
}

/// The detector, ready to find faces in decoded pictures.
pub struct FaceFinder {
    net: BlazeFace,
    quick: BlazeFace,
}

impl FaceFinder {
    /// Loads the detector's weights file, to run at `precision` (as
    /// [`Kernels::for_precision`] says).
    pub fn load(path: &Path, precision: Precision) -> Result<Self, DetectorError> {
        Ok(Self::new(BlazeFace::load(
            path,
            Kernels::for_precision(precision),
        )?))
    }

    /// Wraps a built network (at its full 128x128 input).
    pub fn new(net: BlazeFace) -> Self {
        let quick = net
            .at_side(Look::Quick.side() as usize)
            .expect("the quick look's side is a multiple of 16");
        Self { net, quick }
    }

    /// The network at its full input.
    pub fn net(&self) -> &BlazeFace {
        &self.net
    }

    /// Every face scoring at least `threshold`, in the picture's pixels,
    /// largest first. The picture is shrunk to fit the detector's square,
    /// keeping its aspect ratio, and centred on black; the first look is
    /// `first_look`. When the quick look finds no face spanning
    /// [`QUICK_MIN_SHARE`] of the picture, the full look follows; when that
    /// finds nothing, the picture is looked at again, smaller each time
    /// ([`ZOOM_OUT`] of the square): the short-range detector misses faces
    /// that fill the whole frame or run past its edges (tight crops). When
    /// those find nothing either and `closer_look` is given, the closer
    /// look: the full look at each of four overlapping tiles
    /// ([`TILE_SHARE`] of the picture), for faces too small in the whole
    /// picture for the detector's square, each scoring at least
    /// `closer_look` (four more looks find more false faces, so they must
    /// be surer).
    pub fn find(
        &self,
        picture: Rgb<'_>,
        threshold: f32,
        first_look: Look,
        closer_look: Option<f32>,
    ) -> Vec<Face> {
        self.find_in(picture, threshold, first_look, closer_look, View::AsIs)
    }

    /// `faces` less those `crop` does not take: smaller than
    /// [`FaceCrop::min_face`], or smaller than [`FaceCrop::confirm_below`]
    /// and not found again, at `threshold`, by the same looks at the mirror
    /// image (a face is near symmetric; the blocks of an over-compressed
    /// small picture the detector takes for a face seldom are). A face
    /// confirmed so is the mean of its two sightings ([`Face::averaged`]):
    /// the box and eyes of a small face are noisy, and two looks halve the
    /// noise at no more cost. `scale` is
    /// the picture's own pixels per pixel of `picture` (a JPEG decoded
    /// reduced). Borrowed when nothing had to be looked at again or left.
    pub fn confirmed<'f>(
        &self,
        picture: Rgb<'_>,
        faces: &'f [Face],
        crop: &FaceCrop,
        threshold: f32,
        scale: f32,
    ) -> Cow<'f, [Face]> {
        let px = |face: &Face| face.size() * scale;
        let big_enough = |face: &Face| crop.min_face.is_none_or(|least| px(face) >= least);
        let doubtful = |face: &Face| crop.confirm_below.is_some_and(|below| px(face) < below);
        if faces.iter().all(|f| big_enough(f) && !doubtful(f)) {
            return Cow::Borrowed(faces);
        }
        let kept = faces.iter().filter(|f| big_enough(f));
        if !faces.iter().any(|f| big_enough(f) && doubtful(f)) {
            return Cow::Owned(kept.copied().collect());
        }
        let seen = self.find_in(
            picture,
            threshold,
            crop.first_look,
            crop.closer_look,
            View::Mirrored,
        );
        let again = |face: &Face| {
            seen.iter()
                .map(|s| (s.overlap(face), s))
                .filter(|(o, _)| *o >= SAME_FACE)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, s)| face.averaged(s))
        };
        Cow::Owned(
            kept.filter_map(|f| if doubtful(f) { again(f) } else { Some(*f) })
                .collect(),
        )
    }

    /// [`FaceFinder::find`] on the picture as it is or on its mirror image
    /// (faces in the picture's own pixels either way).
    fn find_in(
        &self,
        picture: Rgb<'_>,
        threshold: f32,
        first_look: Look,
        closer_look: Option<f32>,
        view: View,
    ) -> Vec<Face> {
        let whole = Window::whole(picture);
        if first_look == Look::Quick
            && let Some(faces) = self.quick_look_in(picture, threshold, view)
        {
            return faces;
        }
        let faces = self.find_at(&self.net, picture, whole, threshold, 1.0, view);
        if !faces.is_empty() {
            return faces;
        }
        let faces = ZOOM_OUT
            .iter()
            .map(|&zoom| self.find_at(&self.net, picture, whole, threshold, zoom, view))
            .find(|faces| !faces.is_empty())
            .unwrap_or_default();
        match closer_look {
            Some(sure) if faces.is_empty() => self.closer_look_in(picture, sure, view),
            _ => faces,
        }
    }

    /// The quick look alone: its faces, largest first, when the largest is
    /// at least [`QUICK_MIN_SHARE`] of the picture's longer side (what
    /// [`FaceFinder::find`] takes from it); `None` otherwise.
    pub fn quick_look(&self, picture: Rgb<'_>, threshold: f32) -> Option<Vec<Face>> {
        self.quick_look_in(picture, threshold, View::AsIs)
    }

    fn quick_look_in(&self, picture: Rgb<'_>, threshold: f32, view: View) -> Option<Vec<Face>> {
        let faces = self.find_at(
            &self.quick,
            picture,
            Window::whole(picture),
            threshold,
            1.0,
            view,
        );
        let longer = picture.w.max(picture.h) as f32;
        faces
            .first()
            .is_some_and(|f| f.size() >= QUICK_MIN_SHARE * longer)
            .then_some(faces)
    }

    /// The full look at every tile of `Window::tiles`; a face seen in two
    /// overlapping tiles is kept once (the larger box), largest first.
    pub fn closer_look(&self, picture: Rgb<'_>, threshold: f32) -> Vec<Face> {
        self.closer_look_in(picture, threshold, View::AsIs)
    }

    fn closer_look_in(&self, picture: Rgb<'_>, threshold: f32, view: View) -> Vec<Face> {
        let mut seen: Vec<Face> = Window::tiles(picture)
            .into_iter()
            .flat_map(|tile| self.find_at(&self.net, picture, tile, threshold, 1.0, view))
            .collect();
        seen.sort_by(|a, b| b.area().total_cmp(&a.area()));
        let mut faces: Vec<Face> = Vec::with_capacity(seen.len());
        for face in seen {
            if faces.iter().all(|kept| kept.overlap(&face) < 0.5) {
                faces.push(face);
            }
        }
        faces
    }

    /// One look by `net` at `window` of the picture, fitted into `zoom` of
    /// the detector's square, mirrored there when `view` says so; faces in
    /// the picture's pixels.
    fn find_at(
        &self,
        net: &BlazeFace,
        picture: Rgb<'_>,
        window: Window,
        threshold: f32,
        zoom: f32,
        view: View,
    ) -> Vec<Face> {
        let side = net.input_side();
        let (w, h) = (window.w, window.h);
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
                let src = ImageRef::new(
                    picture.w.max(1),
                    picture.h.max(1),
                    picture.pixels,
                    PixelType::U8x3,
                )
                .ok()?;
                let mut dst = Image::from_slice_u8(sw, sh, small, PixelType::U8x3).ok()?;
                let mut options =
                    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
                if window != Window::whole(picture) {
                    options = options.crop(
                        f64::from(window.x),
                        f64::from(window.y),
                        f64::from(w),
                        f64::from(h),
                    );
                }
                resizer.resize(&src, &mut dst, &options).ok()
            })();
            if resized.is_none() {
                return Vec::new();
            }
            for (y, row) in small.chunks_exact((sw * 3) as usize).enumerate() {
                let at = ((oy as usize + y) * side + ox as usize) * 3;
                square[at..at + row.len()].copy_from_slice(row);
            }
            if view == View::Mirrored {
                for row in square.chunks_exact_mut(side * 3) {
                    mirror_row(row);
                }
            }
            let anchors = net.anchors();
            boxes.resize(anchors.len() * blazeface::COORDS, 0.0);
            logits.resize(anchors.len(), 0.0);
            net.raw_u8(square, boxes, logits);
            let mut found = decode::detections(boxes, logits, anchors, side as f32, threshold);
            if view == View::Mirrored {
                found.iter_mut().for_each(|d| *d = d.unmirrored());
            }
            found
        });
        // Relative to the square -> the picture's pixels.
        let (kx, ky) = (w as f32 / sw as f32, h as f32 / sh as f32);
        let to_x = |r: f32| window.x as f32 + (r * side as f32 - ox as f32) * kx;
        let to_y = |r: f32| window.y as f32 + (r * side as f32 - oy as f32) * ky;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Tight crops of the fixture faces (the central `share` of each 200x200
    /// crop, so the face runs past the frame) made `side` pixels square.
    fn tight_crops(share: f32, side: u32) -> Vec<image::RgbImage> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faces");
        let labels = ["female".to_owned(), "male".to_owned()];
        let (listed, _) = crate::train::dataset::list(&dir, &labels).expect("the fixture faces");
        listed
            .iter()
            .map(|(_, path)| {
                let face = image::open(path).expect("a fixture face").to_rgb8();
                let cut = (face.width() as f32 * share) as u32;
                let at = (face.width() - cut) / 2;
                let face = image::imageops::crop_imm(&face, at, at, cut, cut).to_image();
                image::imageops::resize(&face, side, side, image::imageops::FilterType::Triangle)
            })
            .collect()
    }

    #[test]
    fn smaller_looks_find_faces_that_fill_the_frame() {
        let weights =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/blazeface-front.safetensors");
        let finder = FaceFinder::load(&weights, Precision::F32).expect("the detector's weights");
        // The central 40% of each fixture crop, at 48 pixels: a face cut
        // past its chin and brow, as a small upload often is.
        let crops = tight_crops(0.4, 48);
        let (mut before, mut found) = (0, 0);
        for img in &crops {
            let picture = Rgb {
                pixels: img.as_raw(),
                w: img.width(),
                h: img.height(),
            };
            let whole = Window::whole(picture);
            let look = |zoom| finder.find_at(&finder.net, picture, whole, 0.85, zoom, View::AsIs);
            // What the looks before the smaller ones find.
            before += usize::from(
                finder.quick_look(picture, 0.85).is_some()
                    || !look(1.0).is_empty()
                    || !look(ZOOM_OUT[0]).is_empty(),
            );
            let faces = finder.find(picture, 0.85, Look::Quick, None);
            if let Some(face) = faces.first() {
                found += 1;
                // The box covers the picture's middle, whatever look found it.
                let covers = |at: f32, len: f32| at < 24.0 && 24.0 < at + len;
                assert!(covers(face.x, face.w) && covers(face.y, face.h), "{face:?}");
            }
        }
        assert!(
            found >= before + 4,
            "{found} of {} found with the smaller looks, {before} without",
            crops.len()
        );
    }
}
