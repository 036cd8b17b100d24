//! The weights file: one safetensors file whose `__metadata__` carries the
//! [`ModelMeta`] (labels, input size, normalisation, architecture, training
//! summary, probe outputs). This is the only module that knows the file format.
//!
//! Writing is atomic (temporary file in the same folder, then rename), so a
//! reader never sees a half-written file. Nothing here runs the network.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Errors raised while reading or writing a weights file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The bytes are not a safetensors file.
    #[error("{path}: not a safetensors file: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// `__metadata__` is missing a key or holds a bad value.
    #[error("{path}: bad metadata: {detail}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor is missing or has the wrong shape for the architecture.
    #[error("{path}: {detail}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Everything about a model except its tensors: written by the trainer, read
/// by the worker. Label names, input size and normalisation live here only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Label names in the order of the network's outputs.
    pub labels: Vec<String>,
    /// Side of the square input picture, in pixels.
    pub input_size: usize,
    /// Input channels (3: RGB).
    pub input_channels: usize,
    /// Per-channel mean subtracted from pixel values scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation the centred values are divided by.
    pub std: Vec<f32>,
    /// Output channels of each conv block (conv 3x3, batch norm, 2x2 max-pool, ReLU).
    pub channels: Vec<usize>,
    /// Model family and training time, e.g. `gender-cnn/2026-11-27T22:00:00Z`.
    pub version: String,
    /// Free-form training summary (data folder, counts, epochs, accuracy).
    pub training: serde_json::Value,
    /// Expected outputs of the network on [`super::probe_input`], row by row,
    /// used to validate a file before serving it.
    pub probe: Vec<Vec<f32>>,
    /// Where the classifier's input sits around a detected face, and the
    /// detector threshold; `None` for a model trained on whole pictures.
    #[serde(default)]
    pub face: Option<crate::face::FaceCrop>,
}

const KEYS: [&str; 9] = [
    "labels",
    "input_size",
    "input_channels",
    "mean",
    "std",
    "channels",
    "version",
    "training",
    "probe",
];

impl ModelMeta {
    /// The metadata of a small untrained network for tests and examples:
    /// labels `female,male`, RGB input of `input_size`, conv blocks of
    /// `channels`, normalisation 0.5/0.5, no training record, no probe, no
    /// face crop. Override fields with struct update syntax.
    pub fn sketch(input_size: usize, channels: &[usize]) -> Self {
        Self {
            labels: vec!["female".into(), "male".into()],
            input_size,
            input_channels: 3,
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
            channels: channels.to_vec(),
            version: "test".into(),
            training: serde_json::Value::Null,
            probe: vec![],
            face: None,
        }
    }

    /// Checks internal consistency (label count, normalisation vectors, sizes).
    pub fn validate(&self) -> Result<(), String> {
        if self.labels.len() < 2 {
            return Err(format!(
                "need at least two labels, got {}",
                self.labels.len()
            ));
        }
        if self.input_channels != 3 {
            return Err(format!(
                "input_channels must be 3, got {}",
                self.input_channels
            ));
        }
        if self.mean.len() != self.input_channels || self.std.len() != self.input_channels {
            return Err("mean and std need one value per input channel".into());
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err("std values must be positive".into());
        }
        if self.channels.is_empty() {
            return Err("channels is empty".into());
        }
        if let Some(face) = &self.face {
            face.validate()?;
        }
        let shrink = 1usize << self.channels.len().min(16);
        if self.input_size < shrink
            || !self.input_size.is_multiple_of(shrink)
            || self.input_size > 1024
        {
            return Err(format!(
                "input_size {} is not a multiple of 2^{} (one halving per block) up to 1024",
                self.input_size,
                self.channels.len()
            ));
        }
        Ok(())
    }

    fn to_strings(&self) -> HashMap<String, String> {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut out = HashMap::new();
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(k, s);
            }
        }
        out
    }

    fn from_strings(map: &HashMap<String, String>) -> Result<Self, String> {
        let mut obj = serde_json::Map::new();
        for key in KEYS {
            let raw = map.get(key).ok_or_else(|| format!("missing key `{key}`"))?;
            let value = if key == "version" {
                serde_json::Value::String(raw.clone())
            } else {
                serde_json::from_str(raw).map_err(|e| format!("key `{key}`: {e}"))?
            };
            obj.insert(key.to_string(), value);
        }
        if let Some(raw) = map.get("face") {
            let value = serde_json::from_str(raw).map_err(|e| format!("key `face`: {e}"))?;
            obj.insert("face".into(), value);
        }
        let meta: Self =
            serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| e.to_string())?;
        meta.validate()?;
        Ok(meta)
    }
}

/// Reads a weights file: its metadata and every tensor (as f32, on `device`).
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(ModelMeta, HashMap<String, Tensor>), WeightsError> {
    let bytes = std::fs::read(path).map_err(|cause| WeightsError::Io {
        path: path.to_owned(),
        cause,
    })?;
    load_bytes(path, &bytes, device)
}

/// Parses weights already in memory; `path` only names them in errors.
pub fn load_bytes(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<(ModelMeta, HashMap<String, Tensor>), WeightsError> {
    let format = |detail: String| WeightsError::Format {
        path: path.to_owned(),
        detail,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
    let strings = header
        .metadata()
        .clone()
        .ok_or_else(|| WeightsError::Metadata {
            path: path.to_owned(),
            detail: "no __metadata__".into(),
        })?;
    let meta = ModelMeta::from_strings(&strings).map_err(|detail| WeightsError::Metadata {
        path: path.to_owned(),
        detail,
    })?;
    let tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| format(e.to_string()))?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| t.to_dtype(DType::F32).map(|t| (k, t)))
        .collect::<candle_core::Result<HashMap<_, _>>>()
        .map_err(|e| format(e.to_string()))?;
    Ok((meta, tensors))
}

/// Writes tensors and metadata atomically: a temporary file beside `path`,
/// synced, then renamed over it.
pub fn save(
    path: &Path,
    meta: &ModelMeta,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), WeightsError> {
    let io = |cause| WeightsError::Io {
        path: path.to_owned(),
        cause,
    };
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| {
                t.flatten_all()
                    .and_then(|f| f.to_vec1::<f32>())
                    .map(|v| (t.dims().to_vec(), v))
            })
            .map_err(|e| WeightsError::Tensors {
                path: path.to_owned(),
                detail: format!("{name}: {e}"),
            })?;
        owned.push((name.clone(), t));
    }
    let views = owned
        .iter()
        .map(|(name, (dims, data))| {
            let bytes: &[u8] = bytemuck_f32(data);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WeightsError::Format {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    let bytes = safetensors::serialize(views, Some(meta.to_strings())).map_err(|e| {
        WeightsError::Format {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the slice
    // covers exactly the same memory. safetensors stores little-endian, which
    // is what every target this crate builds for uses.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMeta {
        ModelMeta {
            std: vec![0.25; 3],
            version: "gender-cnn/test".into(),
            training: serde_json::json!({"epochs": 1}),
            probe: vec![vec![0.25, 0.75]],
            ..ModelMeta::sketch(16, &[4, 8])
        }
    }

    #[test]
    fn metadata_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a".to_string(),
            Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap(),
        );
        save(&path, &meta(), &tensors).unwrap();
        let (m, t) = load(&path, &Device::Cpu).unwrap();
        assert_eq!(m, meta());
        assert_eq!(t["a"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
        // Nothing but the file itself is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // The face crop geometry travels too, and a bad one is refused.
        let crop = crate::face::FaceCrop {
            threshold: 0.7,
            side: 1.1,
            dx: -0.01,
            dy: 0.02,
            first_look: crate::face::Look::Quick,
            closer_look: Some(0.98),
            min_contrast: Some(0.02),
            min_face: Some(20.0),
            confirm_below: Some(64.0),
            deblock: Some(crate::preprocess::DEBLOCK),
        };
        let with_face = ModelMeta {
            face: Some(crop),
            ..meta()
        };
        save(&path, &with_face, &tensors).unwrap();
        assert_eq!(load(&path, &Device::Cpu).unwrap().0, with_face);
        let bad = ModelMeta {
            face: Some(crate::face::FaceCrop {
                threshold: 1.5,
                ..crop
            }),
            ..meta()
        };
        save(&path, &bad, &tensors).unwrap();
        assert!(matches!(
            load(&path, &Device::Cpu),
            Err(WeightsError::Metadata { .. })
        ));
    }

    #[test]
    fn missing_metadata_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), t)]), &path).unwrap();
        let err = load(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(err, WeightsError::Metadata { .. }), "{err}");
    }

    #[test]
    fn garbage_and_bad_values_are_errors() {
        let p = Path::new("x");
        assert!(matches!(
            load_bytes(p, b"not a file", &Device::Cpu),
            Err(WeightsError::Format { .. })
        ));
        let mut strings = meta().to_strings();
        strings.insert("labels".into(), "[\"only\"]".into());
        assert!(ModelMeta::from_strings(&strings).is_err());
        strings.remove("labels");
        assert!(
            ModelMeta::from_strings(&strings)
                .unwrap_err()
                .contains("labels")
        );
    }
}
