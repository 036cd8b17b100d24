//! Picture bytes to model input: sniff the format, enforce the size limits
//! before any pixel is decoded, decode (colour JPEGs without EXIF rotation
//! straight into a per-thread buffer by `jpeg`, at a reduced scale where
//! the picture stays at least the model's input; everything else through
//! `image`, with limits
//! set in the decoder itself and EXIF orientation applied), convert to RGB,
//! frame the picture (find the face, in a softened copy where `deblock`
//! says, and cut it out with [`crate::face`], or
//! take the whole picture when face detection is off), resize to the model's
//! input and normalise as the model's metadata says.
//!
//! Every decode first reserves its pixels' bytes in the [`DecodeBudget`]
//! when there is one (the worker's `--decode-memory`).
//!
//! Plain functions over bytes and slices: no NATS, no tensors, no classifier.
//! The trainer and the worker share this code, so the network sees the same
//! input at training and at serving time.

mod budget;
mod deblock;
mod jpeg;

pub use budget::{DecodeBudget, Reservation};
pub use deblock::{DEBLOCK, Deblock, blockiness};

use std::cell::RefCell;
use std::io::Cursor;
use std::panic::AssertUnwindSafe;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType as ResizeFilter, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::face::{Face, FaceCrop, FaceFinder, Look, Rgb};
use crate::model::ModelMeta;
use crate::protocol::ErrorCode;
use std::sync::Arc;

/// Size limits of PROTOCOL §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded picture accepted, in bytes.
    pub max_bytes: usize,
    /// Largest decoded picture accepted, in pixels (width x height).
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

/// Why a picture could not be turned into model input: an error code of
/// PROTOCOL §3 and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct PreprocessError {
    /// The protocol error code.
    pub code: ErrorCode,
    /// What went wrong, for the `detail` field.
    pub detail: String,
}

impl PreprocessError {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

thread_local! {
    /// Each decoding thread's SIMD resizer and its output buffer.
    static RESIZER: RefCell<(Resizer, Vec<u8>)> = RefCell::new((Resizer::new(), Vec::new()));
    /// Each decoding thread's buffer for the pixels of a decoded JPEG.
    static PIXELS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Largest decoded-pixel buffer a thread keeps between pictures, in bytes.
const KEEP_PIXELS: usize = 16 << 20;

/// Formats the worker accepts (PROTOCOL §1).
const SUPPORTED: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

/// How pictures are prepared for whichever model is served: size limits
/// and, when face detection is on, the detector and a threshold other than
/// the model's own.
#[derive(Clone, Default)]
pub struct Preparation {
    /// Size limits of PROTOCOL §3.
    pub limits: Limits,
    /// The face detector; `None` classifies whole pictures.
    pub detector: Option<Arc<FaceFinder>>,
    /// Detector score a face needs, instead of the model's metadata.
    pub face_threshold: Option<f32>,
    /// Memory all decodes together may hold; `None`: unbounded.
    pub budget: Option<DecodeBudget>,
}

/// Finding and cutting out the face before classifying it.
#[derive(Clone)]
pub struct FaceStage {
    /// The detector.
    pub finder: Arc<FaceFinder>,
    /// Where the crop sits around the face (from the model's metadata).
    pub crop: FaceCrop,
    /// Detector score a face needs.
    pub threshold: f32,
}

impl std::fmt::Debug for FaceStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceStage")
            .field("crop", &self.crop)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// What part of the picture became the model input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    /// The whole picture (face detection off).
    Whole,
    /// The largest of `faces` faces, aligned.
    Face {
        /// Faces found.
        faces: usize,
        /// The one classified.
        face: Face,
    },
    /// No face found: the input was not written and must not be classified.
    NoFace,
}

impl Framing {
    /// The same framing of the picture stretched by `sx` across and `sy`
    /// down (a face's box moved from a reduced picture to the full one).
    fn stretched(self, sx: f32, sy: f32) -> Framing {
        match self {
            Framing::Face { faces, face } => Framing::Face {
                faces,
                face: face.stretched(sx, sy),
            },
            other => other,
        }
    }
}

/// What the looks at a reduced picture made of it.
enum Reduced {
    /// A face found and cut out there (its box in the reduced picture).
    Framed(Framing),
    /// Faces found, too small there to cut out (boxes in the reduced
    /// picture).
    Found(Vec<Face>),
    /// Every whole-picture look found nothing (the closer look is left).
    NotFound,
    /// The looks that ran cannot stand for the full-scale ones.
    Unsure,
}

/// Turns picture bytes into normalised NHWC input for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    size: u32,
    mean: [f32; 3],
    inv_std: [f32; 3],
    limits: Limits,
    face: Option<FaceStage>,
    deblock: Option<Deblock>,
    budget: Option<DecodeBudget>,
}

thread_local! {
    /// Each thread's aligned face, as RGB bytes.
    static ALIGNED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Each thread's softened copy of a small picture ([`Preprocessor::seen`]).
    static SEEN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Preprocessor {
    /// A preprocessor for the input size and normalisation in `meta`.
    pub fn new(meta: &ModelMeta, limits: Limits) -> Self {
        let ch = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(1.0);
        Self {
            size: meta.input_size as u32,
            mean: [ch(&meta.mean, 0), ch(&meta.mean, 1), ch(&meta.mean, 2)],
            inv_std: [
                1.0 / ch(&meta.std, 0),
                1.0 / ch(&meta.std, 1),
                1.0 / ch(&meta.std, 2),
            ],
            limits,
            face: None,
            deblock: None,
            budget: None,
        }
    }

    /// The preprocessing `meta`'s model is served with, as `prep` says.
    pub fn for_model(meta: &ModelMeta, prep: &Preparation) -> Result<Self, String> {
        let pre = Self {
            budget: prep.budget.clone(),
            ..Self::new(meta, prep.limits)
        };
        let Some(finder) = &prep.detector else {
            return Ok(pre);
        };
        let crop = meta.face.ok_or_else(|| {
            format!(
                "model {} was trained on whole pictures (no face crop in its metadata): \
                 serve it with face detection off",
                meta.version
            )
        })?;
        let threshold = prep.face_threshold.unwrap_or(crop.threshold);
        Ok(pre.with_faces(FaceStage {
            finder: finder.clone(),
            crop,
            threshold,
        }))
    }

    /// The same preprocessing with face detection in front: pictures are
    /// framed by [`fn@crate::face::align`] around their largest face.
    pub fn with_faces(mut self, stage: FaceStage) -> Self {
        self.deblock = stage.crop.deblock;
        self.face = Some(stage);
        self
    }

    /// The same preprocessing looking for faces in a softened copy of the
    /// small blocky pictures `deblock` names ([`Preprocessor::seen`]); the
    /// face stage sets its crop's own.
    pub fn with_deblock(mut self, deblock: Option<Deblock>) -> Self {
        self.deblock = deblock;
        self
    }

    /// Number of f32 values one picture occupies (`size * size * 3`).
    pub fn input_len(&self) -> usize {
        (self.size * self.size * 3) as usize
    }

    /// Side of the square model input.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Decodes `bytes`, frames the picture and writes `input_len()`
    /// normalised values into `out` (HWC order), except for
    /// [`Framing::NoFace`]. Never panics: a panic inside a decoder becomes
    /// `internal`.
    ///
    /// A colour JPEG with no EXIF rotation (the usual profile picture) is
    /// decoded straight into a per-thread buffer (module `jpeg`); everything
    /// else goes through [`Preprocessor::decode`]. At full scale both give
    /// the same pixels (tested). Such a JPEG is first decoded reduced where
    /// the model's input allows, and framed there when it can be (see
    /// `Preprocessor::run_plain_jpeg`); for whole pictures the input
    /// differs from a full-scale decode's by 0.5/255 per value on average
    /// on the fixture faces, and by under 1/255 on each (tested).
    pub fn run(&self, bytes: &[u8], out: &mut [f32]) -> Result<Framing, PreprocessError> {
        let format = self.check(bytes)?;
        if format == ImageFormat::Jpeg {
            let done = PIXELS.with_borrow_mut(|pixels| {
                let framed = self.run_plain_jpeg(bytes, pixels, out);
                // Keep no huge buffer after a huge (but allowed) picture.
                if pixels.capacity() > KEEP_PIXELS {
                    *pixels = Vec::new();
                }
                framed
            })?;
            if let Some(framing) = done {
                return Ok(framing);
            }
        }
        let budget = self.budget.as_ref();
        let (rgb, reserved) = guarded(format, || {
            decode_with_limits(bytes, format, self.limits, budget)
        })?;
        let framing = self.frame(rgb_view(&rgb), out);
        drop((rgb, reserved));
        Ok(framing)
    }

    /// [`Preprocessor::run`] for a plain colour JPEG ([`jpeg`]). It is
    /// first decoded reduced where both sides stay at least the model's
    /// input: by up to 8 for a whole picture, which is framed there; by up
    /// to 2 with detection on ([`Preprocessor::frame_reduced`]).
    /// `None` (nothing decoded) for the JPEGs the general path handles.
    fn run_plain_jpeg(
        &self,
        bytes: &[u8],
        pixels: &mut Vec<u8>,
        out: &mut [f32],
    ) -> Result<Option<Framing>, PreprocessError> {
        let decode = |pixels: &mut Vec<u8>, shrink| {
            guarded(ImageFormat::Jpeg, || {
                jpeg::decode_plain(bytes, self.limits, self.budget.as_ref(), pixels, shrink)
            })
        };
        let shrink = jpeg::Shrink {
            need: self.size,
            most: if self.face.is_some() { 2 } else { 8 },
        };
        let Some(first) = decode(pixels, Some(shrink))? else {
            return Ok(None);
        };
        let picture = Rgb {
            pixels,
            w: first.w,
            h: first.h,
        };
        let (Some(stage), true) = (&self.face, (first.w, first.h) != first.full) else {
            return Ok(Some(self.frame(picture, out)));
        };
        let (sx, sy) = (
            first.full.0 as f32 / first.w as f32,
            first.full.1 as f32 / first.h as f32,
        );
        let (fw, fh) = first.full;
        let looked = if self.deblock.is_some_and(|d| d.fits(fw, fh)) {
            // A picture that may be softened is looked at for blocks at its
            // own scale only.
            Reduced::Unsure
        } else {
            match self.frame_reduced(stage, (picture, sx.max(sy)), out) {
                Reduced::Framed(framing) => return Ok(Some(framing.stretched(sx, sy))),
                other => other,
            }
        };
        drop(first);
        let Some(again) = decode(pixels, None)? else {
            return Ok(None);
        };
        let picture = Rgb {
            pixels,
            w: again.w,
            h: again.h,
        };
        let faces = match looked {
            Reduced::Found(faces) => faces.iter().map(|f| f.stretched(sx, sy)).collect(),
            Reduced::NotFound => match stage.crop.closer_look {
                Some(sure) => stage.finder.closer_look(picture, sure),
                None => Vec::new(),
            },
            Reduced::Unsure | Reduced::Framed(_) => return Ok(Some(self.frame(picture, out))),
        };
        Ok(Some(self.cut_out(stage, (picture, 1.0), &faces, out)))
    }

    /// The looks at a picture decoded at half scale, where they can stand
    /// for the looks at full scale:
    /// - when its shorter side is at least the detector's full look, every
    ///   whole-picture look shrinks it at either scale, so they all run
    ///   here ([`FaceFinder::find`] without the closer look);
    /// - otherwise only the quick look ([`FaceFinder::quick_look`]), when
    ///   the model's first look is the quick one: the faces it takes fill
    ///   a good part of the picture (the usual profile picture).
    ///
    /// A face found whose crop is at least the model's input here is cut
    /// out here. `scale`: the full picture's pixels per pixel of `picture`.
    fn frame_reduced(
        &self,
        stage: &FaceStage,
        (picture, scale): (Rgb<'_>, f32),
        out: &mut [f32],
    ) -> Reduced {
        let (finder, threshold, first_look) =
            (&stage.finder, stage.threshold, stage.crop.first_look);
        let faces = if picture.w.min(picture.h) >= Look::Full.side() {
            finder.find(picture, threshold, first_look, None)
        } else if first_look == Look::Quick {
            match finder.quick_look(picture, threshold) {
                Some(faces) => faces,
                None => return Reduced::Unsure,
            }
        } else {
            return Reduced::Unsure;
        };
        match faces.first() {
            None => Reduced::NotFound,
            Some(face) if face.size() * stage.crop.side >= self.size as f32 => {
                Reduced::Framed(self.cut_out(stage, (picture, scale), &faces, out))
            }
            Some(_) => Reduced::Found(faces),
        }
    }

    /// The largest of `faces` that `stage` takes ([`FaceFinder::confirmed`]
    /// in `picture` itself, whatever the faces were found in) and that has
    /// the contrast of a face ([`FaceCrop::has_features`]) aligned into
    /// `out`, or [`Framing::NoFace`]; the faces counted are those taken with
    /// it. `scale`: the picture's own pixels per pixel of `picture`.
    fn cut_out(
        &self,
        stage: &FaceStage,
        (picture, scale): (Rgb<'_>, f32),
        faces: &[Face],
        out: &mut [f32],
    ) -> Framing {
        let crop = &stage.crop;
        let taken = stage
            .finder
            .confirmed(picture, faces, crop, stage.threshold, scale);
        let mut faces = taken.iter();
        let face = loop {
            match faces.next() {
                None => return Framing::NoFace,
                Some(face) if self.align_face(picture, face, crop, Some(&mut *out)) => break *face,
                Some(_) => {}
            }
        };
        let others = faces.filter(|face| self.align_face(picture, face, crop, None));
        Framing::Face {
            faces: 1 + others.count(),
            face,
        }
    }

    /// Frames a decoded picture into `out`: around its largest face when
    /// detection is on (looked for in what [`Preprocessor::seen`] makes of
    /// it, confirmed and cut out of the picture itself), the whole picture
    /// otherwise.
    pub fn frame(&self, picture: Rgb<'_>, out: &mut [f32]) -> Framing {
        let Some(stage) = &self.face else {
            self.resize_normalise_raw(picture.pixels, picture.w, picture.h, out);
            return Framing::Whole;
        };
        SEEN.with_borrow_mut(|buf| {
            let seen = self.seen(picture, buf);
            let faces = stage.finder.find(
                seen,
                stage.threshold,
                stage.crop.first_look,
                stage.crop.closer_look,
            );
            self.cut_out(stage, (picture, 1.0), &faces, out)
        })
    }

    /// [`crate::face::align`] into the model's input size, the one way a
    /// face becomes model input: whether the crop has the contrast of a face
    /// ([`FaceCrop::has_features`]), and where it has, the crop normalised
    /// into `out` when given. Without `out` or a least contrast to check,
    /// there is nothing to cut.
    fn align_face(
        &self,
        picture: Rgb<'_>,
        face: &Face,
        crop: &FaceCrop,
        out: Option<&mut [f32]>,
    ) -> bool {
        if out.is_none() && crop.min_contrast.is_none() {
            return true;
        }
        ALIGNED.with_borrow_mut(|buf| {
            let n = self.size as usize;
            buf.resize(n * n * 3, 0);
            crate::face::align(picture, face, crop, n, buf);
            let face = crop.has_features(buf, n);
            if let (true, Some(out)) = (face, out) {
                self.normalise(buf, out);
            }
            face
        })
    }

    /// Decodes to an RGB picture of any size, with every limit checked.
    pub fn decode(&self, bytes: &[u8]) -> Result<image::RgbImage, PreprocessError> {
        let format = self.check(bytes)?;
        let budget = self.budget.as_ref();
        guarded(format, || {
            decode_with_limits(bytes, format, self.limits, budget)
        })
        .map(|(rgb, _)| rgb)
    }

    /// What the detector first looks for faces in: a softened copy of
    /// `picture` in `buf` where the picture is one
    /// [`Preprocessor::with_deblock`]'s settings name ([`Deblock`]), the
    /// picture itself otherwise. The mirror confirmation of a small face
    /// and the crop are made on the picture itself either way.
    pub fn seen<'a>(&self, picture: Rgb<'a>, buf: &'a mut Vec<u8>) -> Rgb<'a> {
        let Some(deblock) = self
            .deblock
            .filter(|d| d.applies(picture.pixels, picture.w, picture.h))
        else {
            return picture;
        };
        let n = picture.w as usize * picture.h as usize * 3;
        buf.clear();
        buf.extend_from_slice(&picture.pixels[..n.min(picture.pixels.len())]);
        if !deblock.blur(buf, picture.w, picture.h) {
            return picture;
        }
        Rgb {
            pixels: buf,
            w: picture.w,
            h: picture.h,
        }
    }

    /// The checks made before any decoder sees the bytes: not empty, not
    /// over the byte limit, a supported format.
    fn check(&self, bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
        if bytes.is_empty() {
            return Err(PreprocessError::new(
                ErrorCode::EmptyImage,
                "the picture has zero bytes",
            ));
        }
        if bytes.len() > self.limits.max_bytes {
            return Err(PreprocessError::new(
                ErrorCode::ImageTooLarge,
                format!(
                    "{} bytes, the limit is {}",
                    bytes.len(),
                    self.limits.max_bytes
                ),
            ));
        }
        sniff(bytes)
    }

    /// Resizes to the model input with a triangle (bilinear) filter, run by
    /// `fast_image_resize`'s SIMD convolution, and normalises into `out`.
    /// Within 1/255 per value (rounding; mean 0.11/255 on the fixture faces)
    /// of `image`'s own `resize(.., Triangle)`, which the tests check.
    pub fn resize_normalise(&self, rgb: &image::RgbImage, out: &mut [f32]) {
        let (w, h) = rgb.dimensions();
        self.resize_normalise_raw(rgb.as_raw(), w, h, out);
    }

    /// [`Preprocessor::resize_normalise`] over interleaved RGB bytes of a
    /// `w` x `h` picture.
    fn resize_normalise_raw(&self, rgb: &[u8], w: u32, h: u32, out: &mut [f32]) {
        if (w, h) == (self.size, self.size) {
            self.normalise(rgb, out);
            return;
        }
        RESIZER.with_borrow_mut(|(resizer, buf)| {
            let side = self.size;
            buf.resize((side * side * 3) as usize, 0);
            let options =
                ResizeOptions::new().resize_alg(ResizeAlg::Convolution(ResizeFilter::Bilinear));
            let done = (|| {
                let src = ImageRef::new(w, h, rgb, PixelType::U8x3).ok()?;
                let mut dst = Image::from_slice_u8(side, side, buf, PixelType::U8x3).ok()?;
                resizer.resize(&src, &mut dst, &options).ok()
            })();
            let plain = || {
                let img = image::RgbImage::from_raw(w, h, rgb.to_vec())?;
                Some(image::imageops::resize(
                    &img,
                    side,
                    side,
                    FilterType::Triangle,
                ))
            };
            match done {
                Some(()) => self.normalise(buf, out),
                // Unreachable for a well-formed buffer; stay correct anyway.
                None => match plain() {
                    Some(small) => self.normalise(&small, out),
                    None => out.fill(0.0),
                },
            }
        })
    }

    /// Scales interleaved RGB bytes to the model's normalised floats.
    pub fn normalise(&self, rgb: &[u8], out: &mut [f32]) {
        // Sixteen pixels at a time with the channels' constants laid out
        // alike, so the loop vectorises; the same arithmetic as per value.
        const RUN: usize = 48;
        let mean: [f32; RUN] = std::array::from_fn(|i| self.mean[i % 3]);
        let inv_std: [f32; RUN] = std::array::from_fn(|i| self.inv_std[i % 3]);
        let n = rgb.len().min(out.len()) / 3 * 3;
        let mut src = rgb[..n].chunks_exact(RUN);
        let mut dst = out[..n].chunks_exact_mut(RUN);
        for (s, d) in (&mut src).zip(&mut dst) {
            for i in 0..RUN {
                d[i] = (f32::from(s[i]) * (1.0 / 255.0) - mean[i]) * inv_std[i];
            }
        }
        // The rest starts on a whole pixel, so channel i % 3 still holds.
        for (i, (s, d)) in src.remainder().iter().zip(dst.into_remainder()).enumerate() {
            *d = (f32::from(*s) * (1.0 / 255.0) - mean[i]) * inv_std[i];
        }
    }
}

/// An `image` picture as borrowed RGB bytes.
pub fn rgb_view(img: &image::RgbImage) -> Rgb<'_> {
    Rgb {
        pixels: img.as_raw(),
        w: img.width(),
        h: img.height(),
    }
}

/// Tells the format from the first bytes; only the formats of PROTOCOL §1.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
    match image::guess_format(bytes) {
        Ok(f) if SUPPORTED.contains(&f) => Ok(f),
        Ok(f) => Err(PreprocessError::new(
            ErrorCode::UnsupportedFormat,
            format!("{f:?} pictures are not supported (JPEG, PNG, WebP, GIF, BMP are)"),
        )),
        Err(_) => Err(PreprocessError::new(
            ErrorCode::UnsupportedFormat,
            "the bytes are not a JPEG, PNG, WebP, GIF or BMP picture",
        )),
    }
}

/// Runs a decoder; a panic inside it becomes `internal`.
fn guarded<T>(
    format: ImageFormat,
    decode: impl FnOnce() -> Result<T, PreprocessError>,
) -> Result<T, PreprocessError> {
    std::panic::catch_unwind(AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(PreprocessError::new(
            ErrorCode::Internal,
            format!("{format:?} decoder panicked: {msg}"),
        ))
    })
}

fn undecodable(format: ImageFormat, e: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::new(ErrorCode::UndecodableImage, format!("{format:?}: {e}"))
}

/// Decodes any supported picture to RGB with every limit checked, its
/// memory reserved in `budget` first; the reservation is held until the
/// caller is done with the pixels.
fn decode_with_limits(
    bytes: &[u8],
    format: ImageFormat,
    limits: Limits,
    budget: Option<&DecodeBudget>,
) -> Result<(image::RgbImage, Reservation), PreprocessError> {
    // Header first: the dimensions are known before any pixel is decoded.
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| map_image_error(format, e))?;
    check_pixels(format, bytes, w, h, limits)?;
    let pixels = u64::from(w) * u64::from(h);
    // The same limits again inside the decoder, which also bounds what it
    // allocates beyond the pixels (16 bytes a pixel covers 16-bit RGBA).
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(w);
    decoder_limits.max_image_height = Some(h);
    decoder_limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(format, e))?;
    let orientation = decoder.orientation().ok();
    // The decoded pixels at their real type, plus the copy a rotation or
    // the conversion to 8-bit RGB makes while they are still held.
    let colour = decoder.color_type();
    let decoded = decoder.total_bytes();
    let rotates = orientation.is_some_and(|o| o != image::metadata::Orientation::NoTransforms);
    let converts = colour != image::ColorType::Rgb8;
    let copy = if rotates { decoded } else { 0 }.max(if converts { pixels * 3 } else { 0 });
    let kind = format!("{colour:?}");
    let reserved = reserve(budget, format, w, h, &kind, decoded.saturating_add(copy))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(format, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok((img.into_rgb8(), reserved))
}

/// Reserves `bytes` for decoding a `w` x `h` picture of pixel type `kind`;
/// `image_too_large` when they exceed the whole budget.
fn reserve(
    budget: Option<&DecodeBudget>,
    format: ImageFormat,
    w: u32,
    h: u32,
    kind: &str,
    bytes: u64,
) -> Result<Reservation, PreprocessError> {
    let Some(budget) = budget else {
        return Ok(Reservation::unbounded());
    };
    budget.reserve(bytes).ok_or_else(|| {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        PreprocessError::new(
            ErrorCode::ImageTooLarge,
            format!(
                "{format:?} {w}x{h} {kind}: decoding needs {:.0} MiB, more than the decode \
                 memory budget of {:.0} MiB (--decode-memory)",
                mib(bytes),
                mib(budget.total())
            ),
        )
    })
}

/// The checks between reading a picture's header and decoding its pixels:
/// a JPEG must be complete, and the size within the pixel limit, not empty.
fn check_pixels(
    format: ImageFormat,
    bytes: &[u8],
    w: u32,
    h: u32,
    limits: Limits,
) -> Result<(), PreprocessError> {
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // zune-jpeg fills missing scan data with grey instead of failing.
        return Err(undecodable(
            format,
            "premature end of data (no end-of-image marker after the last scan)",
        ));
    }
    check_size(format, w, h, limits)
}

/// The size checks of [`check_pixels`]: within the pixel limit, not empty.
fn check_size(format: ImageFormat, w: u32, h: u32, limits: Limits) -> Result<(), PreprocessError> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_pixels {
        return Err(PreprocessError::new(
            ErrorCode::ImageTooLarge,
            format!(
                "{w}x{h} is {pixels} pixels, the limit is {}",
                limits.max_pixels
            ),
        ));
    }
    if pixels == 0 {
        return Err(PreprocessError::new(
            ErrorCode::UndecodableImage,
            format!("{format:?}: {w}x{h} picture"),
        ));
    }
    Ok(())
}

/// True when an end-of-image marker (`FF D9`) follows the last start-of-scan
/// marker (`FF DA`). In entropy-coded data `FF` is always followed by `00` or
/// a restart marker, so `FF D9` there can only be the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_sos, last_eoi), (Some(s), Some(e)) if e > s)
}

fn map_image_error(format: ImageFormat, e: image::ImageError) -> PreprocessError {
    match e {
        image::ImageError::Limits(l) => {
            PreprocessError::new(ErrorCode::ImageTooLarge, format!("{format:?}: {l}"))
        }
        image::ImageError::Unsupported(u) => {
            PreprocessError::new(ErrorCode::UnsupportedFormat, format!("{format:?}: {u}"))
        }
        other => undecodable(format, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMeta {
        ModelMeta::sketch(8, &[4])
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 10) as u8, 255])
        });
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        buf
    }

    /// The JPEGs of `tests/fixtures/faces`.
    fn fixture_faces() -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faces");
        std::fs::read_dir(&dir)
            .expect("tests/fixtures/faces")
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "jpg"))
            .map(|path| std::fs::read(path).unwrap())
            .collect()
    }

    #[test]
    fn normalises_as_the_metadata_says() {
        let p = Preprocessor::new(&meta(), Limits::default());
        let mut out = vec![0f32; p.input_len()];
        p.run(&png(8, 8), &mut out).unwrap();
        // Pixel (0,0) is (0, 0, 255): -1, -1, +1 after (v/255 - 0.5) / 0.5.
        assert_eq!(&out[..3], &[-1.0, -1.0, 1.0]);
        p.run(&png(40, 23), &mut out).unwrap();
        assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    /// Whole-picture preprocessing for a model input of `side` pixels.
    fn whole(side: usize) -> Preprocessor {
        let meta = ModelMeta {
            input_size: side,
            ..meta()
        };
        Preprocessor::new(&meta, Limits::default())
    }

    /// The SIMD resize stays within the documented tolerance of `image`'s
    /// own triangle filter on real 200x200 faces.
    #[test]
    fn simd_resize_matches_the_plain_filter() {
        let p = whole(64);
        let mut fast = vec![0f32; p.input_len()];
        let (mut worst, mut sum, mut count) = (0f32, 0f32, 0usize);
        for bytes in fixture_faces() {
            let rgb = p.decode(&bytes).unwrap();
            p.resize_normalise(&rgb, &mut fast);
            let plain = image::imageops::resize(&rgb, 64, 64, FilterType::Triangle);
            for (f, v) in fast.iter().zip(plain.as_raw()) {
                // Back to 0..255 levels: value * std + mean, times 255.
                let d = ((f * 0.5 + 0.5) * 255.0 - *v as f32).abs();
                worst = worst.max(d);
                sum += d;
                count += 1;
            }
        }
        assert!(count > 10 * 64 * 64 * 3, "too few fixture faces");
        let mean = sum / count as f32;
        assert!(worst <= 1.01 && mean < 0.25, "worst {worst}, mean {mean}");
    }

    /// `jpeg` with an EXIF APP1 segment saying `orientation`, after SOI.
    fn with_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, orientation, 0, 0]);
        exif.extend_from_slice(&[0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&exif);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    /// The direct path of `run` at full scale gives exactly the input of
    /// the general path (`decode` through `image`, then `resize_normalise`);
    /// grey and EXIF-rotated JPEGs, which take the general path, come out
    /// right too. (An input of 128 keeps the 200x200 faces at full scale.)
    #[test]
    fn direct_jpeg_path_matches_the_general_one() {
        let p = whole(128);
        let (mut fast, mut general) = (vec![0f32; p.input_len()], vec![0f32; p.input_len()]);
        let mut same = |bytes: &[u8]| {
            p.run(bytes, &mut fast).unwrap();
            p.resize_normalise(&p.decode(bytes).unwrap(), &mut general);
            assert_eq!(fast, general);
            fast.clone()
        };
        let faces = fixture_faces();
        assert!(faces.len() > 10, "too few fixture faces");
        for bytes in &faces {
            same(bytes);
        }
        let bytes = &faces[0];
        let upright = same(bytes);
        // Rotated by EXIF: the general path turns it.
        assert_ne!(same(&with_orientation(bytes, 6)), upright);
        assert_eq!(same(&with_orientation(bytes, 1)), upright);
        // Grey.
        let grey =
            image::DynamicImage::ImageLuma8(image::load_from_memory(bytes).unwrap().to_luma8());
        let mut buf = Vec::new();
        grey.write_to(&mut Cursor::new(&mut buf), ImageFormat::Jpeg)
            .unwrap();
        let g = same(&buf);
        assert!(g.chunks(3).all(|px| px[0] == px[1] && px[1] == px[2]));
    }

    /// Whole pictures that stay at least the input on both sides when
    /// halved are decoded reduced, and the input stays close to that of a
    /// full-scale decode.
    #[test]
    fn reduced_jpeg_decoding_stays_close_to_full_scale() {
        let p = whole(64);
        let (mut reduced, mut full) = (vec![0f32; p.input_len()], vec![0f32; p.input_len()]);
        let (mut worst, mut sum, mut count) = (0f32, 0f32, 0usize);
        for bytes in fixture_faces() {
            p.run(&bytes, &mut reduced).unwrap();
            p.resize_normalise(&p.decode(&bytes).unwrap(), &mut full);
            assert_ne!(reduced, full, "a 200x200 face is decoded at 1/2 scale");
            let levels = |v: f32| (v * 0.5 + 0.5) * 255.0;
            let d: f32 = reduced
                .iter()
                .zip(&full)
                .map(|(r, f)| (levels(*r) - levels(*f)).abs())
                .sum();
            worst = worst.max(d / reduced.len() as f32);
            sum += d;
            count += reduced.len();
        }
        let mean = sum / count as f32;
        assert!(
            mean < 1.0 && worst < 1.5,
            "mean {mean}, worst picture {worst}"
        );
        // A picture turned by EXIF is never decoded reduced: the general
        // path turns it.
        let turned = with_orientation(&fixture_faces()[0], 6);
        p.run(&turned, &mut reduced).unwrap();
        p.resize_normalise(&p.decode(&turned).unwrap(), &mut full);
        assert_eq!(reduced, full);
    }

    #[test]
    fn reductions_keep_the_needed_side() {
        assert_eq!(jpeg::reduction(200, 200, 64), 2);
        assert_eq!(jpeg::reduction(126, 200, 64), 1);
        assert_eq!(jpeg::reduction(127, 200, 64), 2);
        assert_eq!(jpeg::reduction(4000, 3000, 64), 8);
        assert_eq!(jpeg::reduction(1000, 300, 64), 4);
        assert_eq!(jpeg::reduction(64, 64, 64), 1);
        assert_eq!(jpeg::reduction(10, 10, 64), 1);
    }

    #[test]
    fn error_codes() {
        let p = Preprocessor::new(&meta(), Limits::default());
        let mut out = vec![0f32; p.input_len()];
        let code = |b: &[u8]| p.clone().run(b, &mut out.clone()).unwrap_err().code;
        assert_eq!(code(b""), ErrorCode::EmptyImage);
        assert_eq!(
            code(b"hello world, not a picture"),
            ErrorCode::UnsupportedFormat
        );
        let good = png(16, 16);
        assert_eq!(code(&good[..good.len() / 2]), ErrorCode::UndecodableImage);
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(32, 32, image::Rgb([9, 99, 199]))
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(p.run(&jpeg, &mut out.clone()).is_ok());
        assert_eq!(code(&jpeg[..jpeg.len() - 10]), ErrorCode::UndecodableImage);
        let small = Preprocessor::new(
            &meta(),
            Limits {
                max_bytes: 100,
                max_pixels: 40,
            },
        );
        assert_eq!(
            small.run(&good, &mut out).unwrap_err().code,
            ErrorCode::ImageTooLarge
        );
        let tiny = Preprocessor::new(
            &meta(),
            Limits {
                max_bytes: 1 << 20,
                max_pixels: 40,
            },
        );
        assert_eq!(
            tiny.run(&good, &mut out).unwrap_err().code,
            ErrorCode::ImageTooLarge
        );
    }
}
