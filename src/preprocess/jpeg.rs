//! The direct path for the usual profile picture, a colour (YCbCr or RGB)
//! JPEG without an EXIF rotation: decoded straight into the caller's
//! buffer.
//!
//! When the caller needs fewer pixels (a picture shrunk to the model's
//! input), libjpeg-turbo reads the headers and decodes it at 1/2, 1/4 or
//! 1/8 scale with its reduced inverse DCTs, which skips most of the
//! decoding work. Otherwise, or should libjpeg-turbo report anything at
//! all, zune-jpeg decodes it at full scale with the options `image` gives
//! zune-jpeg, so the pixels are those of the general path, after the
//! general path's checks (a truncated file is refused there).
//!
//! Must not decode anything the limits have not let through, nor any other
//! JPEG (grey, CMYK, rotated): the general path handles those.

use std::cell::RefCell;

use image::ImageFormat;
use image::metadata::Orientation;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use super::{DecodeBudget, Limits, PreprocessError, Reservation};
use super::{check_pixels, check_size, reserve, undecodable};
use crate::protocol::ErrorCode;

/// The reductions libjpeg-turbo decodes with reduced inverse DCTs, largest
/// first.
const REDUCTIONS: [u32; 3] = [8, 4, 2];

/// Progressive scans libjpeg-turbo reads before giving up (a bound on the
/// work a hostile progressive file can cause; ordinary files have under 20).
const SCAN_LIMIT: u32 = 500;

thread_local! {
    /// Each decoding thread's libjpeg-turbo decompressor.
    static TURBO: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// How far a picture may be reduced while it is decoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shrink {
    /// Neither side may end up under this many pixels (or under its own
    /// side).
    pub need: u32,
    /// The largest reduction allowed (1, 2, 4 or 8).
    pub most: u32,
}

/// A decoded picture's size; its memory stays reserved in the budget until
/// this is dropped.
pub(super) struct Decoded {
    /// Width in pixels, after any reduction.
    pub w: u32,
    /// Height in pixels, after any reduction.
    pub h: u32,
    /// The picture's full size (as its header says).
    pub full: (u32, u32),
    /// The reservation, held while the caller uses the pixels.
    _reserved: Reservation,
}

/// Decodes a plain colour JPEG into `pixels` as interleaved RGB, with the
/// checks of the general path; `None` (nothing decoded) for any other JPEG.
/// With a [`Shrink`], the picture may come out reduced by 2, 4 or 8 as it
/// allows.
pub(super) fn decode_plain(
    bytes: &[u8],
    limits: Limits,
    budget: Option<&DecodeBudget>,
    pixels: &mut Vec<u8>,
    shrink: Option<Shrink>,
) -> Result<Option<Decoded>, PreprocessError> {
    if let Some(shrink) = shrink
        && let Some(decoded) = decode_reduced(bytes, limits, budget, pixels, shrink)?
    {
        return Ok(Some(decoded));
    }
    decode_full(bytes, limits, budget, pixels)
}

/// The full-scale path of [`decode_plain`], through zune-jpeg.
fn decode_full(
    bytes: &[u8],
    limits: Limits,
    budget: Option<&DecodeBudget>,
    pixels: &mut Vec<u8>,
) -> Result<Option<Decoded>, PreprocessError> {
    use zune_core::colorspace::ColorSpace;
    let jpeg_error = |e: zune_jpeg::errors::DecodeErrors| match e {
        zune_jpeg::errors::DecodeErrors::Unsupported(u) => PreprocessError::new(
            ErrorCode::UnsupportedFormat,
            format!("Jpeg: the decoder does not support the feature {u:?}"),
        ),
        zune_jpeg::errors::DecodeErrors::LargeDimensions(d) => PreprocessError::new(
            ErrorCode::ImageTooLarge,
            format!("Jpeg: dimension {d} is too large"),
        ),
        other => undecodable(ImageFormat::Jpeg, other),
    };
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    decoder.decode_headers().map_err(jpeg_error)?;
    let plain_colour = matches!(
        decoder.input_colorspace(),
        Some(ColorSpace::YCbCr | ColorSpace::RGB)
    );
    let upright = decoder
        .exif()
        .and_then(|exif| image::metadata::Orientation::from_exif_chunk(exif))
        .is_none_or(|o| o == image::metadata::Orientation::NoTransforms);
    let Some((w, h)) = decoder.dimensions() else {
        return Ok(None);
    };
    if !plain_colour || !upright {
        return Ok(None);
    }
    let (w, h) = (w as u32, h as u32);
    check_pixels(ImageFormat::Jpeg, bytes, w, h, limits)?;
    let len = decoder
        .output_buffer_size()
        .ok_or_else(|| undecodable(ImageFormat::Jpeg, "picture too large for memory"))?;
    let reserved = reserve(budget, ImageFormat::Jpeg, w, h, "8-bit RGB", len as u64)?;
    pixels.resize(len, 0);
    decoder.decode_into(pixels).map_err(jpeg_error)?;
    let full = (w, h);
    Ok(Some(Decoded {
        w,
        h,
        full,
        _reserved: reserved,
    }))
}

/// The largest reduction (8, 4 or 2; else 1) after which both sides of a
/// `w` x `h` picture are still at least `need` pixels (sides round up, as
/// libjpeg-turbo's do).
pub(super) fn reduction(w: u32, h: u32, need: u32) -> u32 {
    REDUCTIONS
        .into_iter()
        .find(|&by| w.div_ceil(by) >= need && h.div_ceil(by) >= need)
        .unwrap_or(1)
}

/// Decodes at reduced scale with libjpeg-turbo into `pixels`, headers
/// read by libjpeg-turbo alone. `None` (nothing decoded, the full-scale
/// path decides) when the picture is not a plain colour upright JPEG, does
/// not reduce under `shrink`, fails the size checks (the full-scale path
/// then gives the error), or libjpeg-turbo reports anything at all (a
/// warning included: a truncated file, say).
/// The full-scale size is reserved in the budget: it also covers what
/// libjpeg-turbo buffers for a progressive file.
fn decode_reduced(
    bytes: &[u8],
    limits: Limits,
    budget: Option<&DecodeBudget>,
    pixels: &mut Vec<u8>,
    shrink: Shrink,
) -> Result<Option<Decoded>, PreprocessError> {
    TURBO.with_borrow_mut(|slot| {
        if slot.is_none() {
            let Ok(mut fresh) = Decompressor::new() else {
                return Ok(None);
            };
            if fresh.set_scan_limit(SCAN_LIMIT).is_err() {
                return Ok(None);
            }
            *slot = Some(fresh);
        }
        let Some(turbo) = slot.as_mut() else {
            return Ok(None);
        };
        let Ok(header) = turbo.read_header(bytes) else {
            return Ok(None);
        };
        let plain_colour = matches!(header.colorspace, Colorspace::YCbCr | Colorspace::RGB);
        let (Ok(w), Ok(h)) = (u32::try_from(header.width), u32::try_from(header.height)) else {
            return Ok(None);
        };
        let within = check_size(ImageFormat::Jpeg, w, h, limits).is_ok();
        if !plain_colour || !within || !upright(bytes) {
            return Ok(None);
        }
        let by = reduction(w, h, shrink.need).min(shrink.most);
        if by == 1 {
            return Ok(None);
        }
        let reserved = reserve(
            budget,
            ImageFormat::Jpeg,
            w,
            h,
            "8-bit RGB",
            u64::from(w) * u64::from(h) * 3,
        )?;
        let factor = ScalingFactor::new(1, by as usize);
        if turbo.set_scaling_factor(factor).is_err() {
            return Ok(None);
        }
        let scaled = header.scaled(factor);
        let len = 3 * scaled.width * scaled.height;
        pixels.resize(len, 0);
        let image = Image {
            pixels: &mut pixels[..len],
            width: scaled.width,
            pitch: 3 * scaled.width,
            height: scaled.height,
            format: PixelFormat::RGB,
        };
        if turbo.decompress(bytes, image).is_err() {
            return Ok(None);
        }
        Ok(Some(Decoded {
            w: scaled.width as u32,
            h: scaled.height as u32,
            full: (w, h),
            _reserved: reserved,
        }))
    })
}

/// True unless an EXIF segment before the first scan gives an orientation
/// other than "no transforms"; also false for headers it cannot walk (the
/// full-scale path then decides). Walks the marker segments only.
fn upright(bytes: &[u8]) -> bool {
    let mut at = 2; // after the start-of-image marker
    loop {
        let Some(&[0xFF, marker, hi, lo]) = bytes.get(at..at + 4) else {
            return false;
        };
        match marker {
            0xDA => return true, // start of scan: the headers are over
            0xFF => {
                at += 1; // a fill byte
                continue;
            }
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(body) = bytes.get(at + 4..at + 2 + len).filter(|_| len >= 2) else {
            return false;
        };
        if marker == 0xE1
            && let Some(exif) = body.strip_prefix(b"Exif\0\0")
            && Orientation::from_exif_chunk(exif).is_some_and(|o| o != Orientation::NoTransforms)
        {
            return false;
        }
        at += 2 + len;
    }
}
