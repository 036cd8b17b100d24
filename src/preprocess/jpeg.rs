//! The direct path for the usual profile picture, a colour (YCbCr or RGB)
//! JPEG without an EXIF rotation: decoded straight into the caller's buffer,
//! headers parsed once.
//!
//! At full scale zune-jpeg decodes it, with the options `image` gives
//! zune-jpeg, so the pixels are those of the general path. When the caller
//! needs fewer pixels (a picture shrunk to the model's input),
//! libjpeg-turbo decodes it at 1/2, 1/4 or 1/8 scale with its reduced
//! inverse DCTs, which skips most of the decoding work; should that fail
//! for any reason, the picture is decoded at full scale as before.
//!
//! Must not decode anything the limits have not let through, nor any other
//! JPEG (grey, CMYK, rotated): the general path handles those.

use std::cell::RefCell;

use image::ImageFormat;
use turbojpeg::{Decompressor, Image, PixelFormat, ScalingFactor};

use super::{DecodeBudget, Limits, PreprocessError, Reservation};
use super::{check_pixels, reserve, undecodable};
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
    // The full-scale size is reserved either way: it also covers what
    // libjpeg-turbo buffers for a progressive file.
    let reserved = reserve(budget, ImageFormat::Jpeg, w, h, "8-bit RGB", len as u64)?;
    let by = shrink.map_or(1, |s| reduction(w, h, s.need).min(s.most));
    if by > 1
        && let Some((rw, rh)) = decode_reduced(bytes, (w, h), by, pixels)
    {
        let (w, h, full) = (rw, rh, (w, h));
        return Ok(Some(Decoded {
            w,
            h,
            full,
            _reserved: reserved,
        }));
    }
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

/// Decodes at 1/`by` scale with libjpeg-turbo into `pixels`; the reduced
/// size, or `None` when libjpeg-turbo reports anything at all (a warning
/// included) or reads another size than `size` from the header.
fn decode_reduced(
    bytes: &[u8],
    size: (u32, u32),
    by: u32,
    pixels: &mut Vec<u8>,
) -> Option<(u32, u32)> {
    TURBO.with_borrow_mut(|slot| {
        if slot.is_none() {
            let mut fresh = Decompressor::new().ok()?;
            fresh.set_scan_limit(SCAN_LIMIT).ok()?;
            *slot = Some(fresh);
        }
        let turbo = slot.as_mut()?;
        let factor = ScalingFactor::new(1, by as usize);
        turbo.set_scaling_factor(factor).ok()?;
        let header = turbo.read_header(bytes).ok()?;
        if (header.width, header.height) != (size.0 as usize, size.1 as usize) {
            return None;
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
        turbo.decompress(bytes, image).ok()?;
        Some((scaled.width as u32, scaled.height as u32))
    })
}
