//! Hostile input: the corpus in `tests/fixtures/hostile/` and property tests
//! (random and mutated payloads and headers) through request parsing and
//! preprocessing. Nothing may panic; every input ends as a valid request or
//! one of the protocol's error codes.
//!
//! More cases: `PROPTEST_CASES=20000 cargo test --release --test hostile_input`.

mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use profile_classifier::face::{FaceCrop, FaceFinder};
use profile_classifier::model::{ModelMeta, Precision};
use profile_classifier::preprocess::{FaceStage, Limits, Preprocessor};
use profile_classifier::protocol::{ErrorCode, Request};
use proptest::prelude::*;

fn preprocessor() -> Preprocessor {
    Preprocessor::new(&ModelMeta::sketch(64, &[16]), Limits::default())
}

/// The same with face detection in front, as the worker runs by default.
fn with_faces() -> &'static Preprocessor {
    static PRE: OnceLock<Preprocessor> = OnceLock::new();
    PRE.get_or_init(|| {
        let finder =
            FaceFinder::load(&common::detector(), Precision::Bf16).expect("shipped detector");
        preprocessor().with_faces(FaceStage {
            finder: Arc::new(finder),
            crop: FaceCrop {
                threshold: 0.75,
                side: 1.1,
                dx: 0.0,
                dy: 0.0,
                first_look: profile_classifier::face::Look::Quick,
                closer_look: Some(0.98),
                min_contrast: Some(profile_classifier::face::align::MIN_CONTRAST),
                min_face: Some(profile_classifier::face::align::MIN_FACE),
                confirm_below: Some(profile_classifier::face::align::CONFIRM_BELOW),
                deblock: Some(profile_classifier::preprocess::DEBLOCK),
            },
            threshold: 0.75,
        })
    })
}

/// Runs one payload the way the worker does: parse, then preprocess, with
/// face detection off and on; both must agree on the error code.
fn handle(payload: &[u8], header: Option<&[u8]>) -> Result<(), ErrorCode> {
    let req = Request::parse(bytes::Bytes::copy_from_slice(payload), header).map_err(|e| e.code)?;
    let pre = preprocessor();
    let mut out = vec![0f32; pre.input_len()];
    let whole = pre.run(&req.image, &mut out).map_err(|e| e.code);
    assert!(out.iter().all(|v| v.is_finite()));
    let faces = with_faces().run(&req.image, &mut out).map_err(|e| e.code);
    assert!(out.iter().all(|v| v.is_finite()));
    assert_eq!(whole.map(|_| ()), faces.map(|_| ()));
    whole.map(|_| ())
}

#[test]
fn every_corpus_file_is_answered_without_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let outcome = handle(&bytes, Some(b"hostile"));
        assert!(outcome.is_err(), "{} was accepted", path.display());
        n += 1;
    }
    assert!(n >= 8, "corpus files missing: {n}");
    // The ones whose code is part of the contract.
    let code = |f: &str| handle(&std::fs::read(dir.join(f)).unwrap(), Some(b"u")).unwrap_err();
    assert_eq!(code("png_bomb_100000x100000.png"), ErrorCode::ImageTooLarge);
    assert_eq!(code("jpeg_sof_65500x65500.jpg"), ErrorCode::ImageTooLarge);
    assert_eq!(code("jpeg_truncated.jpg"), ErrorCode::UndecodableImage);
    assert_eq!(code("empty.jpg"), ErrorCode::EmptyImage);
    assert_eq!(code("gif_huge.gif"), ErrorCode::ImageTooLarge);
    assert_eq!(code("json_lookalike.bin"), ErrorCode::BadJson);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_payloads_and_headers_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        header in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
    ) {
        let _ = handle(&payload, header.as_deref());
    }

    #[test]
    fn mutated_pictures_never_panic(
        which in 0usize..48,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let pics = common::fixture_pictures();
        let mut bytes = pics[which % pics.len()].1.clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()).max(1));
        }
        let _ = handle(&bytes, Some(b"mutant"));
    }

    #[test]
    fn json_requests_never_panic(userid in ".{0,300}", image in "[A-Za-z0-9+/=!]{0,64}", extra in any::<bool>()) {
        let body = if extra {
            serde_json::json!({"userid": userid, "image": image, "x": [1, 2]})
        } else {
            serde_json::json!({"userid": userid, "image": image})
        };
        let _ = handle(&serde_json::to_vec(&body).unwrap(), None);
    }
}
