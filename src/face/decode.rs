//! From the detector's raw outputs to faces: anchor decoding, the score
//! threshold, and MediaPipe's weighted non-maximum suppression.
//!
//! Pure arithmetic on slices: no network, no pictures.

use super::blazeface::COORDS;

/// Overlap above which two detections are the same face.
pub const NMS_IOU: f32 = 0.3;

/// One face, relative to the detector's square input (0..1, origin top left).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Detector confidence, 0..1.
    pub score: f32,
    /// Box: left, top, right, bottom.
    pub xmin: f32,
    /// Top edge.
    pub ymin: f32,
    /// Right edge.
    pub xmax: f32,
    /// Bottom edge.
    pub ymax: f32,
    /// Right eye, left eye, nose, mouth, right ear, left ear (the person's
    /// right), each `(x, y)`.
    pub landmarks: [[f32; 2]; 6],
}

impl Detection {
    /// Intersection over union of two boxes.
    pub fn iou(&self, other: &Detection) -> f32 {
        let corners = |d: &Detection| [d.xmin, d.ymin, d.xmax, d.ymax];
        iou(corners(self), corners(other))
    }

    /// The detection of a horizontally mirrored square, in the coordinates
    /// of the square before mirroring: x runs the other way, and the
    /// person's right and left landmarks change places.
    pub fn unmirrored(&self) -> Detection {
        let mut landmarks = self.landmarks.map(|[x, y]| [1.0 - x, y]);
        landmarks.swap(0, 1);
        landmarks.swap(4, 5);
        Detection {
            xmin: 1.0 - self.xmax,
            xmax: 1.0 - self.xmin,
            landmarks,
            ..*self
        }
    }
}

/// Intersection over union of two boxes given as `[xmin, ymin, xmax, ymax]`
/// (0 when apart, 1 when equal).
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// `sigmoid(clamp(logit, -100, 100))`.
pub fn score(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit.clamp(-100.0, 100.0)).exp())
}

/// Decodes every anchor at or above `threshold` and merges overlapping ones.
/// `boxes` holds [`COORDS`] numbers per anchor, `side` is the input side.
pub fn detections(
    boxes: &[f32],
    logits: &[f32],
    anchors: &[[f32; 4]],
    side: f32,
    threshold: f32,
) -> Vec<Detection> {
    let mut found: Vec<Detection> = logits
        .iter()
        .zip(boxes.chunks_exact(COORDS))
        .zip(anchors)
        .filter_map(|((&logit, r), a)| {
            let score = score(logit);
            (score >= threshold).then(|| decode_one(r, a, side, score))
        })
        .collect();
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    weighted_nms(found)
}

fn decode_one(r: &[f32], a: &[f32; 4], side: f32, score: f32) -> Detection {
    let x = r[0] / side * a[2] + a[0];
    let y = r[1] / side * a[3] + a[1];
    let w = r[2] / side * a[2];
    let h = r[3] / side * a[3];
    let mut landmarks = [[0f32; 2]; 6];
    for (k, l) in landmarks.iter_mut().enumerate() {
        *l = [
            r[4 + 2 * k] / side * a[2] + a[0],
            r[5 + 2 * k] / side * a[3] + a[1],
        ];
    }
    Detection {
        score,
        xmin: x - w / 2.0,
        ymin: y - h / 2.0,
        xmax: x + w / 2.0,
        ymax: y + h / 2.0,
        landmarks,
    }
}

/// MediaPipe's weighted NMS over detections sorted by falling score: the
/// best remaining one and every other overlapping it by more than
/// [`NMS_IOU`] become one face, its box and landmarks the score-weighted
/// mean of theirs, its score the best one's.
pub fn weighted_nms(mut sorted: Vec<Detection>) -> Vec<Detection> {
    let mut out = Vec::new();
    while let Some(best) = sorted.first().copied() {
        let (cluster, rest): (Vec<Detection>, Vec<Detection>) = sorted
            .into_iter()
            .partition(|d| best.iou(d) > NMS_IOU || *d == best);
        sorted = rest;
        let total: f32 = cluster.iter().map(|d| d.score).sum();
        let mean = |f: &dyn Fn(&Detection) -> f32| {
            cluster.iter().map(|d| f(d) * d.score).sum::<f32>() / total
        };
        let mut merged = Detection {
            score: best.score,
            xmin: mean(&|d| d.xmin),
            ymin: mean(&|d| d.ymin),
            xmax: mean(&|d| d.xmax),
            ymax: mean(&|d| d.ymax),
            landmarks: [[0.0; 2]; 6],
        };
        for k in 0..6 {
            merged.landmarks[k] = [mean(&|d| d.landmarks[k][0]), mean(&|d| d.landmarks[k][1])];
        }
        out.push(merged);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(score: f32, x: f32, y: f32, s: f32) -> Detection {
        Detection {
            score,
            xmin: x,
            ymin: y,
            xmax: x + s,
            ymax: y + s,
            landmarks: [[x, y]; 6],
        }
    }

    #[test]
    fn overlapping_detections_merge_by_score() {
        let merged = weighted_nms(vec![
            det(0.9, 0.10, 0.10, 0.2),
            det(0.6, 0.12, 0.10, 0.2),
            det(0.8, 0.60, 0.60, 0.2),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].score, 0.9);
        let want = (0.10 * 0.9 + 0.12 * 0.6) / 1.5;
        assert!((merged[0].xmin - want).abs() < 1e-6);
        assert!((merged[1].xmin - 0.60).abs() < 1e-6);
    }

    #[test]
    fn a_mirrored_detection_comes_back_to_its_place() {
        let mut d = det(0.9, 0.10, 0.20, 0.3);
        d.landmarks = [
            [0.2, 0.3],
            [0.3, 0.3],
            [0.25, 0.4],
            [0.25, 0.45],
            [0.1, 0.3],
            [0.4, 0.3],
        ];
        let m = d.unmirrored();
        assert!((m.xmin - 0.60).abs() < 1e-6 && (m.xmax - 0.90).abs() < 1e-6);
        assert_eq!((m.ymin, m.ymax, m.score), (d.ymin, d.ymax, d.score));
        // The person's right eye of the mirror image is their left one here.
        assert!((m.landmarks[0][0] - 0.7).abs() < 1e-6 && (m.landmarks[1][0] - 0.8).abs() < 1e-6);
        assert!((m.landmarks[4][0] - 0.6).abs() < 1e-6 && (m.landmarks[5][0] - 0.9).abs() < 1e-6);
        let back = m.unmirrored();
        let pairs = back
            .landmarks
            .iter()
            .flatten()
            .zip(d.landmarks.iter().flatten());
        assert!(pairs.into_iter().all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn decoding_follows_the_anchor() {
        let mut r = [0f32; COORDS];
        r[0] = 12.8; // +0.1 of the input
        r[2] = 32.0;
        r[3] = 64.0;
        let d = detections(&r, &[5.0], &[[0.5, 0.5, 1.0, 1.0]], 128.0, 0.75);
        assert_eq!(d.len(), 1);
        assert!((d[0].xmin - (0.6 - 0.125)).abs() < 1e-6);
        assert!((d[0].ymax - 0.75).abs() < 1e-6);
        assert!(detections(&r, &[0.0], &[[0.5, 0.5, 1.0, 1.0]], 128.0, 0.75).is_empty());
    }
}
