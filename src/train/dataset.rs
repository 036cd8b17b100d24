//! Reads the seed layout (a folder of `<userid>.jpg` plus `profile.csv` with
//! at least `userid,gender`), decodes, frames and resizes every picture once
//! through [`crate::preprocess`], and keeps the model inputs in memory. A row
//! whose gender is `none` names a picture without a face (evaluation sets).
//!
//! Bad rows never abort a load: a missing picture, a picture without a row,
//! an undecodable file or an unknown label is recorded in [`Dataset::skipped`]
//! with its user id. Only an unreadable folder or CSV is an error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::preprocess::{Framing, Preprocessor};

/// Errors that make a folder unusable as a whole.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The folder or the CSV could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The CSV is malformed or lacks a required column.
    #[error("{path}: {detail}")]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The `gender` value of a picture without a face.
pub const NO_FACE: &str = "none";

/// One usable picture's labels and the optional group columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The user id (file stem).
    pub userid: String,
    /// Index into the label list; `None` for a picture without a face.
    pub label: Option<usize>,
    /// Age in years, when the CSV has an `age` column.
    pub age: Option<u32>,
    /// Group name, when the CSV has a `race` column.
    pub race: Option<String>,
}

/// A row or file left out of the data, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The user id concerned.
    pub userid: String,
    /// Why it was left out.
    pub reason: String,
}

/// Decoded, normalised pictures and their labels.
pub struct Dataset {
    /// Number of f32 values per picture.
    pub input_len: usize,
    /// All inputs back to back, `samples.len() * input_len` values.
    pub inputs: Vec<f32>,
    /// The usable samples, in user-id order.
    pub samples: Vec<Sample>,
    /// Faces found in each picture (`None`: detection off). A picture with
    /// none has zeros as input and must not count as classified.
    pub found: Vec<Option<usize>>,
    /// What was left out.
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    /// Number of usable pictures.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when no picture is usable.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The model input of picture `i`.
    pub fn input(&self, i: usize) -> &[f32] {
        &self.inputs[i * self.input_len..(i + 1) * self.input_len]
    }

    /// Count of pictures per label index.
    pub fn label_counts(&self, n_labels: usize) -> Vec<usize> {
        let mut counts = vec![0; n_labels];
        for l in self.samples.iter().filter_map(|s| s.label) {
            counts[l] += 1;
        }
        counts
    }

    /// Splits off a validation set: a `fraction` of every label, chosen by a
    /// hash of the user id (stable whatever the seed).
    pub fn split(self, fraction: f64) -> (Dataset, Dataset) {
        let mut train = Dataset {
            input_len: self.input_len,
            inputs: Vec::new(),
            samples: Vec::new(),
            found: Vec::new(),
            skipped: self.skipped,
        };
        let mut val = Dataset {
            input_len: self.input_len,
            inputs: Vec::new(),
            samples: Vec::new(),
            found: Vec::new(),
            skipped: Vec::new(),
        };
        for (i, (s, found)) in self.samples.into_iter().zip(self.found).enumerate() {
            let to = if held_out(&s.userid, fraction) {
                &mut val
            } else {
                &mut train
            };
            to.inputs
                .extend_from_slice(&self.inputs[i * self.input_len..(i + 1) * self.input_len]);
            to.samples.push(s);
            to.found.push(found);
        }
        (train, val)
    }
}

/// Whether a user id falls in the validation `fraction`: chosen by a hash
/// of the id, so the same pictures are held out whatever the seed.
pub fn held_out(userid: &str, fraction: f64) -> bool {
    (fnv1a(userid.as_bytes()) % 10_000) as f64 / 10_000.0 < fraction
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The extensions looked for, in order, next to a CSV row.
const EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// The pictures of a folder with their CSV rows: what can be loaded, and
/// what is left out already (no picture, no row, unknown label).
pub type Listing = (Vec<(Sample, PathBuf)>, Vec<Skipped>);

/// Reads `dir/profile.csv` and lists the pictures beside it. `labels` are
/// the known label names; rows with another label (other than `none`) are
/// skipped.
pub fn list(dir: &Path, labels: &[String]) -> Result<Listing, DatasetError> {
    let csv_path = dir.join("profile.csv");
    let rows = read_csv(&csv_path)?;
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(|cause| DatasetError::Io {
        path: dir.to_owned(),
        cause,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            files.entry(stem.to_owned()).or_insert(path);
        }
    }
    let mut skipped = Vec::new();
    let mut todo = Vec::new();
    for (userid, row) in &rows {
        let label = if row.gender == NO_FACE {
            None
        } else {
            let Some(label) = labels.iter().position(|l| l == &row.gender) else {
                skipped.push(Skipped {
                    userid: userid.clone(),
                    reason: format!(
                        "unknown label `{}` (known: {}, or `{NO_FACE}` for no face)",
                        row.gender,
                        labels.join(", ")
                    ),
                });
                continue;
            };
            Some(label)
        };
        let Some(path) = files.get(userid) else {
            skipped.push(Skipped {
                userid: userid.clone(),
                reason: "no picture for this CSV row".into(),
            });
            continue;
        };
        todo.push((
            Sample {
                userid: userid.clone(),
                label,
                age: row.age,
                race: row.race.clone(),
            },
            path.clone(),
        ));
    }
    for userid in files.keys().filter(|u| !rows.contains_key(*u)) {
        skipped.push(Skipped {
            userid: userid.clone(),
            reason: "picture without a CSV row".into(),
        });
    }
    Ok((todo, skipped))
}

/// Reads `dir/profile.csv` and the pictures beside it, each through `pre`
/// (decoded, framed, normalised). `labels` as for [`list`].
pub fn load(dir: &Path, labels: &[String], pre: &Preprocessor) -> Result<Dataset, DatasetError> {
    let (todo, mut skipped) = list(dir, labels)?;
    let input_len = pre.input_len();
    let decoded = par_map(&todo, |path| {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = vec![0f32; input_len];
        let framing = pre.run(&bytes, &mut out).map_err(|e| e.to_string())?;
        Ok((out, faces_found(&framing)))
    });
    let mut inputs = Vec::with_capacity(todo.len() * input_len);
    let mut samples = Vec::with_capacity(todo.len());
    let mut found = Vec::with_capacity(todo.len());
    for ((sample, _), result) in todo.into_iter().zip(decoded) {
        match result {
            Ok((v, f)) => {
                inputs.extend_from_slice(&v);
                samples.push(sample);
                found.push(f);
            }
            Err(reason) => skipped.push(Skipped {
                userid: sample.userid,
                reason,
            }),
        }
    }
    skipped.sort_by(|a, b| a.userid.cmp(&b.userid));
    Ok(Dataset {
        input_len,
        inputs,
        samples,
        found,
        skipped,
    })
}

/// Faces found, as [`Dataset::found`] records it.
pub fn faces_found(framing: &Framing) -> Option<usize> {
    match framing {
        Framing::Whole => None,
        Framing::Face { faces, .. } => Some(*faces),
        Framing::NoFace => Some(0),
    }
}

/// Runs `f` over every file on every core, keeping the input order.
pub fn par_map<T: Send>(
    todo: &[(Sample, PathBuf)],
    f: impl Fn(&Path) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len().max(1));
    let chunk = todo.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| {
                let handle =
                    scope.spawn(move || part.iter().map(|(_, path)| f(path)).collect::<Vec<_>>());
                (part.len(), handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| {
                h.join().unwrap_or_else(|_| {
                    (0..n)
                        .map(|_| Err("decoder thread panicked".into()))
                        .collect()
                })
            })
            .collect()
    })
}

struct Row {
    gender: String,
    age: Option<u32>,
    race: Option<String>,
}

fn read_csv(path: &Path) -> Result<BTreeMap<String, Row>, DatasetError> {
    let csv_err = |detail: String| DatasetError::Csv {
        path: path.to_owned(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|cause| DatasetError::Io {
        path: path.to_owned(),
        cause,
    })?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| csv_err(e.to_string()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let userid_col = col("userid").ok_or_else(|| csv_err("no `userid` column".into()))?;
    let gender_col = col("gender").ok_or_else(|| csv_err("no `gender` column".into()))?;
    let (age_col, race_col) = (col("age"), col("race"));
    let mut rows = BTreeMap::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_err(e.to_string()))?;
        let field = |i: usize| record.get(i).map(str::trim).unwrap_or("");
        let userid = field(userid_col);
        if userid.is_empty() {
            continue;
        }
        rows.insert(
            userid.to_owned(),
            Row {
                gender: field(gender_col).to_owned(),
                age: age_col.and_then(|i| field(i).parse().ok()),
                race: race_col
                    .map(|i| field(i).to_owned())
                    .filter(|r| !r.is_empty()),
            },
        );
    }
    Ok(rows)
}
