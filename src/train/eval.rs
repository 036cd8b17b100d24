//! Evaluation of a classifier on a labelled dataset: accuracy, per-class
//! precision/recall/F1, confusion matrix, ROC AUC, and accuracy per group
//! (the `race` column and age bands) when the CSV has those columns.
//!
//! Computes and formats numbers only; it writes no file.

use std::fmt;

use candle_core::Tensor;
use serde::Serialize;

use super::dataset::Dataset;
use crate::model::{Classifier, argmax};

/// Age bands of the per-group report, as (name, lowest age, highest age).
pub const AGE_BANDS: [(&str, u32, u32); 5] = [
    ("0-12", 0, 12),
    ("13-19", 13, 19),
    ("20-39", 20, 39),
    ("40-59", 40, 59),
    ("60+", 60, u32::MAX),
];

/// Precision, recall and F1 of one label.
#[derive(Debug, Clone, Serialize)]
pub struct ClassStats {
    /// The label.
    pub label: String,
    /// Of the pictures predicted as this label, the share that are.
    pub precision: f64,
    /// Of the pictures with this label, the share predicted so.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Pictures with this label.
    pub support: usize,
}

/// Accuracy within one group of pictures.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStats {
    /// The group's name.
    pub group: String,
    /// Pictures in the group.
    pub n: usize,
    /// Share predicted correctly.
    pub accuracy: f64,
}

/// The full evaluation report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Pictures evaluated.
    pub n: usize,
    /// Share predicted correctly.
    pub accuracy: f64,
    /// Share of the largest class (what always guessing it scores).
    pub majority_baseline: f64,
    /// Per-label statistics, in label order.
    pub per_class: Vec<ClassStats>,
    /// Label names, the order of the confusion matrix.
    pub labels: Vec<String>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Area under the ROC curve (one-vs-rest, averaged over labels).
    pub roc_auc: f64,
    /// Accuracy per `race` value, when the CSV has that column.
    pub by_race: Vec<GroupStats>,
    /// Accuracy per age band, when the CSV has an `age` column.
    pub by_age: Vec<GroupStats>,
    /// Face detection outcomes (all zero when detection is off).
    pub faces: FaceStats,
}

/// How face detection went on a labelled set. A face missed and a face
/// "found" in a picture without one both count as wrong answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaceStats {
    /// Pictures answered "no face".
    pub answered_no_face: usize,
    /// Pictures labelled `none` (no face in them).
    pub without_face: usize,
    /// Pictures with a face answered "no face".
    pub missed: usize,
    /// Pictures without a face that got a label.
    pub false_faces: usize,
}

/// Runs the classifier over every picture of `data`, `batch` at a time.
pub fn predict_all(
    cls: &Classifier,
    data: &Dataset,
    batch: usize,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let size = cls.meta().input_size;
    let mut out = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(batch.max(1)) {
        let n = batch.min(data.len() - start);
        let slice = &data.inputs[start * data.input_len..(start + n) * data.input_len];
        let x = Tensor::from_slice(slice, (n, size, size, 3), cls.device())?;
        out.extend(cls.probabilities(&x)?);
    }
    Ok(out)
}

/// Area under the ROC curve for `scores` of positives vs negatives (ties count half).
pub fn roc_auc(scores: &[(f32, bool)]) -> f64 {
    let mut sorted: Vec<_> = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let avg_rank = (i + j + 1) as f64 / 2.0; // ranks are 1-based
        rank_sum += avg_rank * sorted[i..j].iter().filter(|s| s.1).count() as f64;
        i = j;
    }
    let pos = sorted.iter().filter(|s| s.1).count() as f64;
    let neg = sorted.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Builds the report from the true labels in `data` and the predicted
/// probabilities. A picture where no face was found is answered "no face":
/// right for a picture labelled `none`, wrong for any other.
pub fn evaluate(labels: &[String], data: &Dataset, probs: &[Vec<f32>]) -> Report {
    let k = labels.len();
    // Rows and columns past the labels: "no face".
    let mut confusion = vec![vec![0usize; k + 1]; k + 1];
    let mut correct = Vec::with_capacity(probs.len());
    let mut faces = FaceStats::default();
    let mut scored = Vec::new();
    for ((s, p), found) in data.samples.iter().zip(probs).zip(&data.found) {
        let pred = if *found == Some(0) { k } else { argmax(p) };
        let truth = s.label.unwrap_or(k);
        confusion[truth][pred] += 1;
        correct.push(pred == truth);
        faces.answered_no_face += usize::from(pred == k);
        faces.without_face += usize::from(truth == k);
        faces.missed += usize::from(pred == k && truth != k);
        faces.false_faces += usize::from(pred != k && truth == k);
        if pred != k && truth != k {
            scored.push((s, p));
        }
    }
    let n = correct.len();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class = (0..k)
        .map(|c| {
            let tp = confusion[c][c];
            let predicted: usize = (0..=k).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassStats {
                label: labels[c].clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect::<Vec<_>>();
    let aucs: Vec<f64> = (0..k)
        .map(|c| {
            let scores: Vec<_> = scored
                .iter()
                .map(|(s, p)| (p[c], s.label == Some(c)))
                .collect();
            roc_auc(&scores)
        })
        .filter(|a| !a.is_nan())
        .collect();
    let group = |key: &dyn Fn(&super::dataset::Sample) -> Option<String>, order: Vec<String>| {
        order
            .into_iter()
            .filter_map(|g| {
                let hits: Vec<bool> = data
                    .samples
                    .iter()
                    .zip(&correct)
                    .filter(|(s, _)| key(s).as_deref() == Some(g.as_str()))
                    .map(|(_, &c)| c)
                    .collect();
                (!hits.is_empty()).then(|| GroupStats {
                    group: g,
                    n: hits.len(),
                    accuracy: ratio(hits.iter().filter(|&&c| c).count(), hits.len()),
                })
            })
            .collect::<Vec<_>>()
    };
    let mut races: Vec<String> = data.samples.iter().filter_map(|s| s.race.clone()).collect();
    races.sort();
    races.dedup();
    let band = |s: &super::dataset::Sample| {
        s.age.and_then(|a| {
            AGE_BANDS
                .iter()
                .find(|b| a >= b.1 && a <= b.2)
                .map(|b| b.0.to_string())
        })
    };
    Report {
        n,
        accuracy: ratio(correct.iter().filter(|&&c| c).count(), n),
        majority_baseline: ratio(per_class.iter().map(|c| c.support).max().unwrap_or(0), n),
        per_class,
        labels: labels.to_vec(),
        confusion,
        roc_auc: if aucs.is_empty() {
            f64::NAN
        } else {
            aucs.iter().sum::<f64>() / aucs.len() as f64
        },
        by_race: group(&|s| s.race.clone(), races),
        by_age: group(&band, AGE_BANDS.iter().map(|b| b.0.to_string()).collect()),
        faces,
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pictures: {}", self.n)?;
        writeln!(
            f,
            "accuracy: {:.4}  (majority baseline {:.4})",
            self.accuracy, self.majority_baseline
        )?;
        writeln!(f, "ROC AUC:  {:.4}", self.roc_auc)?;
        let faces = &self.faces;
        writeln!(
            f,
            "no face:  {} answered (pictures without a face: {}; faces missed: {}; \
             faces found where there is none: {})",
            faces.answered_no_face, faces.without_face, faces.missed, faces.false_faces
        )?;
        writeln!(f)?;
        writeln!(f, "| label | precision | recall | F1 | support |")?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: |")?;
        for c in &self.per_class {
            writeln!(
                f,
                "| {} | {:.4} | {:.4} | {:.4} | {} |",
                c.label, c.precision, c.recall, c.f1, c.support
            )?;
        }
        writeln!(f)?;
        writeln!(f, "confusion (rows: true, columns: predicted)")?;
        let names: Vec<&str> = self
            .labels
            .iter()
            .map(String::as_str)
            .chain(["(no face)"])
            .collect();
        writeln!(f, "| | {} |", names.join(" | "))?;
        writeln!(f, "| --- |{}", " ---: |".repeat(names.len()))?;
        for (label, row) in names.iter().zip(&self.confusion) {
            let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
            writeln!(f, "| {label} | {} |", cells.join(" | "))?;
        }
        for (title, groups) in [("race", &self.by_race), ("age band", &self.by_age)] {
            if groups.is_empty() {
                continue;
            }
            writeln!(f)?;
            writeln!(f, "| {title} | pictures | accuracy |")?;
            writeln!(f, "| --- | ---: | ---: |")?;
            for g in groups {
                writeln!(f, "| {} | {} | {:.4} |", g.group, g.n, g.accuracy)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_scores() {
        let perfect = [(0.1, false), (0.2, false), (0.8, true), (0.9, true)];
        assert_eq!(roc_auc(&perfect), 1.0);
        let inverted = [(0.9, false), (0.8, false), (0.2, true), (0.1, true)];
        assert_eq!(roc_auc(&inverted), 0.0);
        let ties = [(0.5, false), (0.5, true)];
        assert_eq!(roc_auc(&ties), 0.5);
    }
}
