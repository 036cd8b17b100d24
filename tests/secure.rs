//! A nats-server with TLS (throw-away CA and certificates made by openssl in
//! the test, client certificates verified) and user/password auth: the worker
//! connects with the right settings and fails clearly with wrong ones.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::HeaderMap;
use common::{NatsServer, Worker, fixture_pictures};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, server certificate for 127.0.0.1/localhost, client certificate.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_password_right_and_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let p = |f: &str| d.join(f).to_str().unwrap().to_owned();
    std::fs::write(
        d.join("nats.conf"),
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\nauthorization {{\n  user: alice\n  password: s3cret\n}}\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    )
    .unwrap();
    let conf = p("nats.conf");
    let server = NatsServer::start_with(false, &["-c", &conf]);
    let url = format!("tls://127.0.0.1:{}", server.port);
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let tls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];

    // Right settings: the worker gets ready and answers.
    let mut args: Vec<&str> = tls.to_vec();
    args.extend(["--nats-user", "alice", "--nats-password", "s3cret"]);
    let _worker = Worker::start(&url, &args);
    let client = async_nats::ConnectOptions::new()
        .user_and_password("alice".into(), "s3cret".into())
        .add_root_certificates(d.join("ca.pem"))
        .add_client_certificate(d.join("client.pem"), d.join("client.key"))
        .require_tls(true)
        .connect(url.as_str())
        .await
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("userid", "secure");
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        client.request_with_headers("profiles.images", h, fixture_pictures()[0].1.clone().into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains("\"userid\":\"secure\""));

    // Wrong password, or no client certificate: a clear start-up error naming the server.
    let wrong_password: Vec<&str> = tls
        .iter()
        .copied()
        .chain(["--nats-user", "alice", "--nats-password", "nope"])
        .collect();
    let no_cert = vec![
        "--tls-ca",
        ca.as_str(),
        "--nats-user",
        "alice",
        "--nats-password",
        "s3cret",
    ];
    for (case, extra) in [
        ("wrong password", wrong_password),
        ("no client certificate", no_cert),
    ] {
        let out = tokio::task::spawn_blocking({
            let url = url.clone();
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            move || {
                Command::new(env!("CARGO_BIN_EXE_profile-worker"))
                    .args(["--nats-url", &url, "--metrics-addr", "127.0.0.1:0"])
                    .args(["--weights", common::weights().to_str().unwrap()])
                    .args(&extra)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(!out.status.success(), "{case}: the worker must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&url),
            "{case}: the error names the server: {err}"
        );
    }
}
