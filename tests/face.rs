//! The face detector against the reference outputs of
//! `shared/models/blazeface/reference`, and the face finder on real pictures.

use std::path::PathBuf;

use profile_classifier::face::{BlazeFace, FaceFinder, Kernels, Rgb};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let path = root().join("../shared/models/blazeface/reference/1face.front.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the detector's reference outputs live in ../shared beside the repository)",
            path.display()
        )
    });
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference file");
    let get = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .expect(name)
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    (get("input_rgb_u8"), get("raw_boxes"), get("raw_scores"))
}

fn shipped(kernels: Kernels) -> BlazeFace {
    let bytes = std::fs::read(root().join("weights/blazeface-front.safetensors")).expect("weights");
    BlazeFace::from_bytes(&bytes, kernels).expect("front model")
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= 1e-4,
        "{what}: worst relative error {:.2e} at {} ({} vs {})",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

#[test]
fn detector_reproduces_the_reference_outputs() {
    let (input, boxes, scores) = reference();
    for kernels in [Kernels::best(), Kernels::Portable] {
        let net = shipped(kernels);
        // Twice in one batch: the second picture reuses the scratch.
        let two: Vec<f32> = input.iter().chain(&input).copied().collect();
        let (b, s) = net.raw(&two);
        for i in 0..2 {
            assert_close(
                &format!("{kernels:?} boxes #{i}"),
                &b[i * boxes.len()..][..boxes.len()],
                &boxes,
            );
            assert_close(
                &format!("{kernels:?} scores #{i}"),
                &s[i * scores.len()..][..scores.len()],
                &scores,
            );
        }
    }
}

#[test]
fn the_reference_face_is_found_where_the_reference_says() {
    let (input, _, _) = reference();
    let pixels: Vec<u8> = input.iter().map(|&v| v.round() as u8).collect();
    let finder = FaceFinder::new(shipped(Kernels::best()));
    let faces = finder.find(
        Rgb {
            pixels: &pixels,
            w: 128,
            h: 128,
        },
        0.75,
    );
    assert_eq!(faces.len(), 1, "{faces:?}");
    let f = faces[0];
    // (ymin, xmin, ymax, xmax) ~ (0.273, 0.318, 0.440, 0.484) of 128 pixels.
    // In pixels of the 128-pixel input.
    let (ymin, xmin, ymax, xmax) = (34.94_f32, 40.70, 56.32, 61.95);
    let want = [xmin, ymin, xmax, ymax];
    let got = [f.x, f.y, f.x + f.w, f.y + f.h];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 0.5, "box {got:?} vs {want:?}");
    }
    assert!(f.score > 0.999, "score {}", f.score);
}
