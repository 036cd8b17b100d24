//! Operations: the Prometheus config and alert rules pass `promtool`, a real
//! Prometheus scraping a real worker under load answers every expression of
//! the Grafana dashboard with data, and the Kubernetes manifests carry the
//! fields operators rely on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NatsServer, Worker, free_port, http_get};
use profile_classifier::loadgen;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is missing: install Debian's `prometheus` package (.ci/run does)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_config_and_rules() {
    promtool(&[
        "check",
        "config",
        repo("deploy/prometheus.yml").to_str().unwrap(),
    ]);
    promtool(&[
        "check",
        "rules",
        repo("deploy/alerts.yml").to_str().unwrap(),
    ]);
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo("deploy/grafana/dashboards/profile-worker.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 12);
    exprs
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(port: u16, expr: &str) -> Value {
    let mut url = String::from("/api/v1/query?query=");
    for b in expr.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    let (code, body) = http_get(port, &url).expect("prometheus answers");
    assert_eq!(code, 200, "{expr}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn live_prometheus_answers_every_dashboard_query() {
    let server = NatsServer::start();
    let worker = Worker::start(&server.url(), &[]);
    let dir = tempfile::tempdir().unwrap();
    // The shipped config, with the DNS discovery swapped for this worker's port.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: profile-worker\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        repo("deploy/alerts.yml").display(),
        worker.metrics_port
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is missing: install Debian's `prometheus` package (.ci/run does)");
    let _prom = Prometheus(child);

    // Load with results and a few errors, spread over several scrapes.
    let cfg = common::fixture_load(&server.url(), 600, 16, Some(100.0));
    let load = tokio::spawn(async move { loadgen::run(&cfg).await.unwrap() });
    let c = async_nats::connect(server.url()).await.unwrap();
    for _ in 0..5 {
        c.publish("profiles.images", "not a picture".into())
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    let report = load.await.unwrap();
    assert_eq!(report.missing, 0);

    // Wait until Prometheus has several samples of the worker, then ask.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = query(port, "count_over_time(profile_worker_requests_total[5m])");
        let n = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if n >= 4.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the worker"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for expr in dashboard_exprs() {
        let v = query(port, &expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        let result = v["data"]["result"].as_array().unwrap();
        assert!(
            !result.is_empty(),
            "dashboard query returned no data: {expr}"
        );
    }
    drop(worker);
}

#[test]
fn kubernetes_manifests_have_what_operators_need() {
    let text = std::fs::read_to_string(repo("deploy/k8s/worker.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let deployment = kind("Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Shutdown has three steps (drain, answer what was taken, flush), each
    // bounded by the shutdown timeout: the grace period must cover them.
    let timeout: f64 = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "PROFILE_SHUTDOWN_TIMEOUT")
        .and_then(|e| e["value"].as_str())
        .expect("PROFILE_SHUTDOWN_TIMEOUT set")
        .parse()
        .unwrap();
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_f64()
        .unwrap();
    assert!(grace >= 3.0 * timeout, "grace {grace} s < 3 x {timeout} s");
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(
        container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "--jetstream")
    );
    assert_eq!(kind("Service")["spec"]["ports"][0]["port"], 9464);
    assert_eq!(
        kind("PodMonitor")["spec"]["podMetricsEndpoints"][0]["path"],
        "/metrics"
    );
    let keda = kind("ScaledObject");
    let trigger = &keda["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "nats-jetstream");
    assert_eq!(trigger["metadata"]["stream"], "PROFILES");
    assert_eq!(trigger["metadata"]["consumer"], "profile-workers");
    assert_eq!(
        keda["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
}
