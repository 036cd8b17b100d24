//! Settings shared by the binaries: device selection and label lists.
//!
//! Parsing only; nothing here opens connections or files.

use candle_core::Device;

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
}
