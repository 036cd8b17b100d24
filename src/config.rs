//! Settings shared by the binaries: the protocol's subjects, device
//! selection, the face detection flags and the kernels' precision.
//!
//! Parsing only; nothing here opens connections or files.

use std::path::PathBuf;

use candle_core::Device;

use crate::model::Precision;

/// The protocol's three subjects (PROTOCOL §1), shared by `profile-worker`
/// and `profile-loadgen` so both ends default to the same names.
#[derive(Debug, Clone, clap::Args)]
pub struct SubjectArgs {
    /// Subject of the requests.
    #[arg(
        long,
        env = "PROFILE_REQUEST_SUBJECT",
        default_value = "profiles.images"
    )]
    pub request_subject: String,
    /// Subject of the results.
    #[arg(
        long,
        env = "PROFILE_RESULT_SUBJECT",
        default_value = "profiles.gender"
    )]
    pub result_subject: String,
    /// Subject of the errors.
    #[arg(long, env = "PROFILE_ERROR_SUBJECT", default_value = "profiles.errors")]
    pub error_subject: String,
}

/// The face detection and kernel precision flags, shared by
/// `profile-worker` and `profile-trainer eval`/`predict` so they frame and
/// classify pictures alike.
#[derive(Debug, Clone, clap::Args)]
pub struct FaceArgs {
    /// Find the face and classify it (on), or classify the whole picture (off,
    /// for pipelines that already send aligned face crops).
    #[arg(long, env = "PROFILE_FACE_DETECTION", default_value = "on", value_parser = ["on", "off"])]
    pub face_detection: String,
    /// Face detector weights (BlazeFace front, safetensors).
    #[arg(
        long,
        env = "PROFILE_DETECTOR",
        default_value = "weights/blazeface-front.safetensors"
    )]
    pub detector: PathBuf,
    /// Detector score (0-1) a face needs (default: the model's metadata, 0.85 in the shipped model).
    #[arg(long, env = "PROFILE_FACE_THRESHOLD", value_parser = parse_threshold)]
    pub face_threshold: Option<f32>,
    /// Arithmetic of the CPU kernels' products: auto (the faster of the two
    /// on this CPU), bf16 (bfloat16 products, f32 sums, on CPUs with
    /// AVX512-BF16; others run f32) or f32.
    #[arg(long, env = "PROFILE_PRECISION", default_value = "auto", value_parser = parse_precision)]
    pub precision: Precision,
}

impl FaceArgs {
    /// The detector file to load, `None` when detection is off.
    pub fn detector(&self) -> Option<&PathBuf> {
        (self.face_detection == "on").then_some(&self.detector)
    }
}

/// An error and its causes on one line, each said once: a cause whose
/// text is already part of what was said is left out (several libraries
/// repeat their source's text in their own message).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A count of at least one (batch size, threads).
pub fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0: must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s}: {e} (a whole number of at least 1)")),
    }
}

/// A whole number of milliseconds, zero or more.
pub fn parse_millis(s: &str) -> Result<u64, String> {
    match s.trim().parse::<i64>() {
        Ok(v) if v < 0 => Err(format!("{s}: a wait cannot be negative")),
        Ok(v) => Ok(v as u64),
        Err(e) => Err(format!("{s}: {e} (whole milliseconds)")),
    }
}

/// Seconds, finite, zero or more, at most a year (a wait, an interval).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 86_400.0;
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s}: {e} (seconds)"))?;
    if !v.is_finite() || !(0.0..=YEAR).contains(&v) {
        return Err(format!(
            "{s}: seconds must be a finite number from 0 to {YEAR} (a year)"
        ));
    }
    Ok(v)
}

/// A size in bytes, at least one: a whole number, optionally with a
/// binary suffix (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{s}: a size is a whole number of bytes, e.g. 8M or 65536"
        ));
    }
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("{s}: unknown unit `{other}` (use K, M or G)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s}: a size is a whole number of bytes, e.g. 8M or 65536"))?;
    match n.checked_mul(scale).and_then(|b| usize::try_from(b).ok()) {
        Some(0) => Err(format!("{s}: must be at least one byte")),
        Some(b) => Ok(b),
        None => Err(format!("{s}: too large")),
    }
}

/// `--precision`: `auto` (the faster on this CPU, [`Precision::fastest`]),
/// `bf16` or `f32`.
pub fn parse_precision(s: &str) -> Result<Precision, String> {
    match s {
        "auto" => Ok(Precision::fastest()),
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        _ => Err(format!("{s}: the precision is auto, bf16 or f32")),
    }
}

/// A detector score strictly between 0 and 1.
pub fn parse_threshold(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!(
            "{s}: a face threshold is a score between 0 and 1 (exclusive)"
        ))
    }
}

/// Errors in a `--device` value or an unusable device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The text is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}`: use cpu, cuda or cuda:N")]
    Unknown(String),
    /// CUDA asked for, but this build has no `cuda` feature.
    #[error("device `{0}` needs a build with `--features cuda`")]
    NoCudaSupport(String),
    /// CUDA asked for, but the device could not be opened.
    #[error("device `{0}` is not available: {1}")]
    Unavailable(String, candle_core::Error),
}

/// Opens the device named `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    let ordinal = match name.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => return Err(DeviceError::Unknown(name.to_owned())),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCudaSupport(name.to_owned()));
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable(name.to_owned(), e))
}

/// A short name of a device for logs and the `device` metric label.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(matches!(parse_device("tpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(DeviceError::Unknown(_))
        ));
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            parse_device("cuda:0"),
            Err(DeviceError::NoCudaSupport(_))
        ));
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("reading x: No such file");
        assert_eq!(error_line(&e), "reading x: No such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&e), "outer: inner");
    }

    #[test]
    fn meaningless_values_are_refused() {
        assert!(parse_count("0").is_err() && parse_count("-1").is_err());
        assert_eq!(parse_count("32"), Ok(32));
        assert!(parse_millis("-5").unwrap_err().contains("negative"));
        assert_eq!(parse_millis("0"), Ok(0));
        for bad in ["inf", "NaN", "-1", "1e300"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        for bad in ["0", "1", "1.5", "-0.1", "nan"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_bytes("8M"), Ok(8 << 20));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        for bad in ["0", "-1", "1.5M", "12X", "", "M"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_precision("auto"), Ok(Precision::fastest()));
        assert_eq!(parse_precision("f32"), Ok(Precision::F32));
        assert!(parse_precision("fp16").is_err());
    }
}
