//! The model the worker serves, behind an atomic pointer that reloads swap,
//! and the reload itself: load, validate, swap or refuse.
//!
//! Loading runs on a blocking thread; requests in flight keep the model they
//! started with, and the next batch picks up the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use candle_core::Device;

use crate::config::device_name;
use crate::metrics::Metrics;
use crate::model::{Classifier, ConvImpl, ModelError, Precision};
use crate::preprocess::{Preparation, Preprocessor};

/// A loaded, validated model with what the worker needs next to it.
pub struct LoadedModel {
    /// The network.
    pub classifier: Classifier,
    /// Preprocessing for its input size and normalisation.
    pub pre: Preprocessor,
    /// Identifies the exact weights: metadata version plus a content hash.
    pub id: Arc<str>,
    /// Label names in output order.
    pub labels: Arc<[String]>,
}

impl LoadedModel {
    /// Reads and validates a weights file (tensors, shapes, probe batch),
    /// builds it for `device` at `precision`, and sets up its preprocessing
    /// as `prep` says.
    pub fn load(
        path: &Path,
        device: &Device,
        precision: Precision,
        prep: &Preparation,
    ) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|cause| {
            ModelError::Weights(crate::model::WeightsError::Io {
                path: path.to_owned(),
                cause,
            })
        })?;
        let (meta, tensors) = crate::model::weights::load_bytes(path, &bytes, device)?;
        let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        let id: Arc<str> = format!("{}#{:08x}", meta.version, hash as u32).into();
        let classifier =
            Classifier::from_parts(meta, &tensors, ConvImpl::for_device(device, precision))?;
        let pre = Preprocessor::for_model(classifier.meta(), prep).map_err(ModelError::Invalid)?;
        let labels = classifier.meta().labels.clone().into();
        Ok(Self {
            classifier,
            pre,
            id,
            labels,
        })
    }
}

/// The current model, shared by the pipeline stages, and how to replace it.
#[derive(Clone)]
pub struct ModelSlot {
    current: Arc<ArcSwap<LoadedModel>>,
    path: PathBuf,
    device: Device,
    precision: Precision,
    prep: Preparation,
    metrics: Metrics,
    reload_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Outcome of a reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new weights serve from the next batch on.
    Swapped(String),
    /// The file holds the weights already served.
    Unchanged,
    /// The file was refused; the old model keeps serving.
    Rejected(String),
}

impl ModelSlot {
    /// Loads the initial model; failure is a start-up error.
    pub fn open(
        path: PathBuf,
        device: Device,
        precision: Precision,
        prep: Preparation,
        metrics: Metrics,
    ) -> Result<Self, ModelError> {
        let model = LoadedModel::load(&path, &device, precision, &prep)?;
        metrics.set_model(&model.id, &device_name(&device));
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(model)),
            path,
            device,
            precision,
            prep,
            metrics,
            reload_lock: Arc::default(),
        })
    }

    /// The model to use for the next batch.
    pub fn current(&self) -> Arc<LoadedModel> {
        self.current.load_full()
    }

    /// The weights file watched for changes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the weights file again and swaps it in if it validates and keeps
    /// the label count; otherwise logs, counts and keeps the old model.
    pub async fn reload(&self) -> ReloadOutcome {
        let _one_at_a_time = self.reload_lock.lock().await;
        let (path, device, prep) = (self.path.clone(), self.device.clone(), self.prep.clone());
        let precision = self.precision;
        let loaded = tokio::task::spawn_blocking(move || {
            LoadedModel::load(&path, &device, precision, &prep)
        })
        .await
        .unwrap_or_else(|e| Err(ModelError::Invalid(format!("loader panicked: {e}"))));
        let old = self.current();
        let outcome = match loaded {
            Ok(new) if new.id == old.id => ReloadOutcome::Unchanged,
            Ok(new) if new.labels.len() != old.labels.len() => ReloadOutcome::Rejected(format!(
                "{} labels, the serving model has {}",
                new.labels.len(),
                old.labels.len()
            )),
            Ok(new) => {
                let id = new.id.to_string();
                self.metrics.set_model(&id, &device_name(&self.device));
                self.current.store(Arc::new(new));
                ReloadOutcome::Swapped(id)
            }
            Err(e) => ReloadOutcome::Rejected(e.to_string()),
        };
        match &outcome {
            ReloadOutcome::Swapped(id) => {
                self.metrics.model_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(model = %id, "weights reloaded");
            }
            ReloadOutcome::Unchanged => {
                tracing::info!(model = %old.id, "reload: weights unchanged")
            }
            ReloadOutcome::Rejected(why) => {
                self.metrics
                    .model_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::error!(path = %self.path.display(), "reload rejected, old model keeps serving: {why}");
            }
        }
        outcome
    }
}

/// What identifies a version of the file on disk (an atomic rename changes
/// the inode; an in-place write changes the time or size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// Reads the stamp of `path`, `None` while it does not exist.
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}
