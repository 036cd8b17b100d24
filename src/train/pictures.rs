//! The training pictures decoded once and held in memory with the face the
//! detector finds in each, so that every epoch cuts them out anew through
//! [`fn@crate::face::align`] (with augmentation), and the crop geometry that
//! makes a detected face look like the training crops.
//!
//! Reads folders in the seed layout through [`super::dataset::list`]; runs
//! no classifier.

use std::path::PathBuf;

use image::RgbImage;

use super::dataset::{self, Dataset, Sample, Skipped};
use crate::face::{Face, FaceCrop, FaceFinder, Look};
use crate::preprocess::{Preprocessor, rgb_view};

/// Decoded pictures, their labels and faces.
pub struct Pictures {
    /// Labels, in the order of `images`.
    pub samples: Vec<Sample>,
    /// The decoded pictures.
    pub images: Vec<RgbImage>,
    /// The largest face the detector found in each, if any.
    pub faces: Vec<Option<Face>>,
    /// What was left out (all folders).
    pub skipped: Vec<Skipped>,
}

impl Pictures {
    /// Reads every folder: pictures decoded with `pre`'s limits, faces found
    /// by `finder` in what [`Preprocessor::seen`] makes of them, at
    /// `threshold`, first looked for at `first_look`, then closer at
    /// `closer_look` ([`FaceFinder::find`]). Rows labelled `none` are left
    /// out.
    pub fn load(
        dirs: &[PathBuf],
        labels: &[String],
        pre: &Preprocessor,
        finder: &FaceFinder,
        threshold: f32,
        (first_look, closer_look): (Look, Option<f32>),
    ) -> Result<Self, dataset::DatasetError> {
        let mut out = Pictures {
            samples: Vec::new(),
            images: Vec::new(),
            faces: Vec::new(),
            skipped: Vec::new(),
        };
        for dir in dirs {
            let (todo, skipped) = dataset::list(dir, labels)?;
            out.skipped.extend(skipped);
            let decoded = dataset::par_map(&todo, |path| {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let img = pre.decode(&bytes).map_err(|e| e.to_string())?;
                let mut soft = Vec::new();
                let face = finder
                    .find(
                        pre.seen(rgb_view(&img), &mut soft),
                        threshold,
                        first_look,
                        closer_look,
                    )
                    .first()
                    .copied();
                Ok((img, face))
            });
            for ((sample, _), result) in todo.into_iter().zip(decoded) {
                match result {
                    Ok(_) if sample.label.is_none() => out.skipped.push(Skipped {
                        userid: sample.userid,
                        reason: "a picture without a face has nothing to train on".into(),
                    }),
                    Ok((img, face)) => {
                        out.samples.push(sample);
                        out.images.push(img);
                        out.faces.push(face);
                    }
                    Err(reason) => out.skipped.push(Skipped {
                        userid: sample.userid,
                        reason,
                    }),
                }
            }
        }
        Ok(out)
    }

    /// Number of pictures.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Pictures in which a face was found.
    pub fn with_face(&self) -> usize {
        self.faces.iter().filter(|f| f.is_some()).count()
    }

    /// Count of pictures per label index.
    pub fn label_counts(&self, n_labels: usize) -> Vec<usize> {
        let mut counts = vec![0; n_labels];
        for l in self.samples.iter().filter_map(|s| s.label) {
            counts[l] += 1;
        }
        counts
    }

    /// Where the detector puts faces inside these pictures, taken as crops:
    /// the median, over pictures with a face, of the picture's square around
    /// the face in the face's own frame. `None` without any face.
    pub fn measure_crop(
        &self,
        threshold: f32,
        (first_look, closer_look): (Look, Option<f32>),
    ) -> Option<FaceCrop> {
        let (mut sides, mut dxs, mut dys) = (Vec::new(), Vec::new(), Vec::new());
        for (img, face) in self.images.iter().zip(&self.faces) {
            let Some(face) = face else { continue };
            let s = face.size();
            if s <= 1.0 {
                continue;
            }
            let (w, h) = (img.width() as f32, img.height() as f32);
            let [cx, cy] = face.centre();
            let (dx, dy) = (w / 2.0 - cx, h / 2.0 - cy);
            let (sin, cos) = face.roll().sin_cos();
            sides.push(w.min(h) / s);
            dxs.push((cos * dx + sin * dy) / s);
            dys.push((-sin * dx + cos * dy) / s);
        }
        let crop = FaceCrop {
            threshold,
            first_look,
            closer_look,
            min_contrast: Some(crate::face::align::MIN_CONTRAST),
            min_face: Some(crate::face::align::MIN_FACE),
            confirm_below: Some(crate::face::align::CONFIRM_BELOW),
            deblock: Some(crate::preprocess::DEBLOCK),
            side: median(&mut sides)?,
            dx: median(&mut dxs)?,
            dy: median(&mut dys)?,
        };
        Some(crop)
    }

    /// The face to cut picture `i` around: the one found, or, where none was,
    /// the face `crop` would frame as the whole picture.
    pub fn face_or_whole(&self, i: usize, crop: &FaceCrop) -> Face {
        if let Some(face) = self.faces[i] {
            return face;
        }
        let img = &self.images[i];
        let s = img.width().min(img.height()) as f32 / crop.side;
        let (cx, cy) = (
            img.width() as f32 / 2.0 - crop.dx * s,
            img.height() as f32 / 2.0 - crop.dy * s,
        );
        Face {
            score: 0.0,
            x: cx - s / 2.0,
            y: cy - s / 2.0,
            w: s,
            h: s,
            eyes: [[cx - s / 4.0, cy], [cx + s / 4.0, cy]],
        }
    }

    /// Splits off a validation share by a hash of the user id (stable
    /// whatever the seed), as [`Dataset::split`] does.
    pub fn split(self, fraction: f64) -> (Pictures, Pictures) {
        let empty = || Pictures {
            samples: Vec::new(),
            images: Vec::new(),
            faces: Vec::new(),
            skipped: Vec::new(),
        };
        let (mut train, mut val) = (empty(), empty());
        train.skipped = self.skipped;
        for ((s, img), face) in self.samples.into_iter().zip(self.images).zip(self.faces) {
            let to = if dataset::held_out(&s.userid, fraction) {
                &mut val
            } else {
                &mut train
            };
            to.samples.push(s);
            to.images.push(img);
            to.faces.push(face);
        }
        (train, val)
    }

    /// Every picture framed as the worker frames it (detector, alignment),
    /// as a dataset for validation.
    pub fn to_dataset(&self, pre: &Preprocessor) -> Dataset {
        let len = pre.input_len();
        let mut inputs = vec![0f32; self.len() * len];
        let mut found = Vec::with_capacity(self.len());
        for (img, out) in self.images.iter().zip(inputs.chunks_exact_mut(len)) {
            found.push(dataset::faces_found(&pre.frame(rgb_view(img), out)));
        }
        Dataset {
            input_len: len,
            inputs,
            samples: self.samples.clone(),
            found,
            skipped: Vec::new(),
        }
    }
}

fn median(v: &mut [f32]) -> Option<f32> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    Some(v[v.len() / 2])
}
