//! The trainer end to end on small data: the dataset reader on crafted bad
//! folders, a smoke training run through the binary whose weights the
//! loader accepts and `predict` uses, determinism for a seed, and the
//! shipped weights' accuracy on the shared test set.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use profile_classifier::model::{Classifier, ModelMeta, Precision, weights};
use profile_classifier::preprocess::{Limits, Preprocessor};
use profile_classifier::train::{dataset, eval};

fn meta() -> ModelMeta {
    ModelMeta::sketch(32, &[8])
}

#[test]
fn dataset_reader_skips_and_reports_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pics = common::fixture_pictures();
    let d = dir.path();
    std::fs::write(d.join("good.jpg"), &pics[0].1).unwrap();
    std::fs::write(d.join("good2.jpg"), &pics[1].1).unwrap();
    std::fs::write(d.join("broken.jpg"), &pics[2].1[..200]).unwrap();
    std::fs::write(d.join("stray.jpg"), &pics[3].1).unwrap();
    std::fs::write(d.join("alien.jpg"), &pics[4].1).unwrap();
    std::fs::write(
        d.join("profile.csv"),
        "age,userid,gender,extra\n30,good,female,x\n40,good2,male,y\n1,broken,male,z\n2,nofile,female,w\n3,alien,robot,v\n",
    )
    .unwrap();
    let labels = meta().labels;
    let pre = Preprocessor::new(&meta(), Limits::default());
    let set = dataset::load(d, &labels, &pre).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.samples[0].userid, "good");
    assert_eq!(set.samples[0].age, Some(30));
    assert_eq!(set.inputs.len(), 2 * 32 * 32 * 3);
    let reasons: Vec<(String, String)> = set
        .skipped
        .iter()
        .map(|s| (s.userid.clone(), s.reason.clone()))
        .collect();
    let find = |u: &str| {
        reasons
            .iter()
            .find(|r| r.0 == u)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    };
    assert!(find("broken").contains("undecodable_image"), "{reasons:?}");
    assert!(find("nofile").contains("no picture"), "{reasons:?}");
    assert!(find("alien").contains("unknown label"), "{reasons:?}");
    assert!(find("stray").contains("without a CSV row"), "{reasons:?}");
    assert_eq!(reasons.len(), 4);

    // A folder without profile.csv, or a CSV without the gender column, is an error.
    let empty = tempfile::tempdir().unwrap();
    assert!(dataset::load(empty.path(), &labels, &pre).is_err());
    std::fs::write(empty.path().join("profile.csv"), "userid,sex\na,male\n").unwrap();
    let err = dataset::load(empty.path(), &labels, &pre)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gender"), "{err}");
}

fn trainer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_profile-trainer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run profile-trainer")
}

fn smoke_train(out: &Path, seed: &str) {
    smoke_train_with(out, seed, &[]);
}

fn smoke_train_with(out: &Path, seed: &str, extra: &[&str]) {
    let fixtures = common::fixtures();
    let mut args = vec![
        "train",
        "--data",
        fixtures.to_str().unwrap(),
        "--val-fraction",
        "0.25",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--input-size",
        "32",
        "--channels",
        "8,16",
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = trainer(&args);
    assert!(
        o.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("epoch 2/2"), "{log}");
}

#[test]
fn smoke_training_writes_weights_that_load_and_predict() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    smoke_train(&out, "7");
    // The probe was stored at f32; the serving default (bf16 where the CPU
    // has it) must accept it, and f32 too.
    Classifier::load(&out, &Device::Cpu, Precision::F32).expect("f32 accepts the trained file");
    let cls = Classifier::load(&out, &Device::Cpu, Precision::Bf16)
        .expect("the loader accepts the trained file");
    let m = cls.meta();
    assert_eq!(m.labels, vec!["female", "male"]);
    assert_eq!((m.input_size, m.channels.clone()), (32, vec![8, 16]));
    assert!(m.version.starts_with("gender-cnn/"));
    assert_eq!(m.training["epochs"], 2);
    assert!(m.training["val_accuracy"].as_f64().is_some());
    // The crop geometry was measured on the (aligned) training faces: the
    // picture is about one detector box wide, centred on it.
    let face = m.face.expect("face crop geometry in the metadata");
    assert!((0.8..1.5).contains(&face.side), "{face:?}");
    assert!(face.dx.abs() < 0.2 && face.dy.abs() < 0.2, "{face:?}");
    assert_eq!(face.threshold, 0.75);
    // No temporary file is left beside the weights.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let pics = common::fixtures();
    let a = pics.join(format!("{}.jpg", common::fixture_pictures()[0].0));
    let o = trainer(&[
        "predict",
        "--weights",
        out.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    let fields: Vec<&str> = line.trim().split('\t').collect();
    assert_eq!(fields.len(), 4, "{line}");
    assert!(fields[3].starts_with("1 face(s)"), "{line}");
    assert!(["female", "male"].contains(&fields[1]));
    let p: f32 = fields[2].parse().unwrap();
    assert!((0.5..=1.0).contains(&p));

    // Same seed, same weights.
    let again = dir.path().join("w2.safetensors");
    smoke_train(&again, "7");
    let (_, t1) = weights::load(&out, &Device::Cpu).unwrap();
    let (_, t2) = weights::load(&again, &Device::Cpu).unwrap();
    for (name, a) in &t1 {
        let b = &t2[name];
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn eval_reports_on_a_folder() {
    let o = trainer(&[
        "eval",
        "--weights",
        common::weights().to_str().unwrap(),
        "--data",
        common::fixtures().to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 48);
    // female, male, and "no face".
    assert_eq!(v["confusion"].as_array().unwrap().len(), 3);
    assert_eq!(v["faces"]["missed"], 0, "{v}");
    assert!(v["roc_auc"].as_f64().unwrap() > 0.5);
    assert!(!v["by_race"].as_array().unwrap().is_empty());
    assert_eq!(v["by_age"].as_array().unwrap().len(), 5);
}

#[test]
fn eval_counts_no_face_answers_right_and_wrong() {
    // Three faces, one flat picture labelled `none`, one flat picture
    // labelled as a face (a face "missed": wrong), in several formats.
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("userid,gender\n");
    for (i, (userid, bytes)) in common::fixture_pictures().into_iter().take(3).enumerate() {
        std::fs::write(dir.path().join(format!("{userid}.jpg")), bytes).unwrap();
        let label = ["female", "male"][i % 2];
        csv.push_str(&format!("{userid},{label}\n"));
    }
    let flat = image::RgbImage::from_pixel(120, 90, image::Rgb([40, 160, 90]));
    flat.save(dir.path().join("blank.png")).unwrap();
    flat.save(dir.path().join("notaface.bmp")).unwrap();
    csv.push_str("blank,none\nnotaface,female\n");
    std::fs::write(dir.path().join("profile.csv"), csv).unwrap();
    let o = trainer(&[
        "eval",
        "--weights",
        common::weights().to_str().unwrap(),
        "--data",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 5, "{v}");
    let f = &v["faces"];
    assert_eq!(
        (
            &f["answered_no_face"],
            &f["without_face"],
            &f["missed"],
            &f["false_faces"]
        ),
        (&2.into(), &1.into(), &1.into(), &0.into()),
        "{v}"
    );
    // The "no face" row: the blank picture answered "no face".
    assert_eq!(v["confusion"][2][2], 1, "{v}");
    // At most the 3 faces and the blank one right; the missed face wrong.
    assert!(v["accuracy"].as_f64().unwrap() <= 0.8);
}

/// The model issue's bar on the shipped weights, on every CI run: accuracy
/// of at least 0.90 on the shared test set (they measured 0.911). Fails
/// loudly when the shared data is missing.
#[test]
fn shipped_weights_keep_their_accuracy_on_shared_test() {
    let test_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/faces/test");
    assert!(
        test_dir.join("profile.csv").exists(),
        "the shared test set is missing at {}: this test needs ../shared/data/faces",
        test_dir.display()
    );
    let cls = Classifier::load(&common::weights(), &Device::Cpu, Precision::Bf16).unwrap();
    let pre = Preprocessor::new(cls.meta(), Limits::default());
    let set = dataset::load(&test_dir, &cls.meta().labels, &pre).unwrap();
    assert_eq!(set.len(), 1000);
    let probs = eval::predict_all(&cls, &set, 128).unwrap();
    let report = eval::evaluate(&cls.meta().labels, &set, &probs);
    assert!(
        report.accuracy >= 0.90,
        "accuracy {:.4} fell under the 0.90 bar",
        report.accuracy
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trainer_notifies_the_fleet_after_writing() {
    let server = common::NatsServer::start();
    let c = async_nats::connect(server.url()).await.unwrap();
    let mut sub = c.subscribe("profiles.control.reload").await.unwrap();
    c.flush().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    let url = server.url();
    let out2 = out.clone();
    tokio::task::spawn_blocking(move || smoke_train_with(&out2, "3", &["--notify-nats", &url]))
        .await
        .unwrap();
    use futures::StreamExt;
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert!(v["version"].as_str().unwrap().starts_with("gender-cnn/"));
    assert!(out.exists(), "the file is written before the message");
}
