//! A nats-server with TLS (throw-away CA and certificates made by openssl in
//! the test, client certificates verified) and user/password auth: the worker
//! connects with the right settings and fails clearly with wrong ones.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::HeaderMap;
use common::{NatsServer, Worker, fixture_pictures};
use futures::StreamExt;
use profile_classifier::connect::{NatsArgs, notify_reload};

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

/// On a server that lets only these credentials in: the worker started with
/// `worker_flags` answers a request sent through `client`, and a reload
/// notice published with `nats` (the flags the trainer shares with the
/// worker) arrives.
async fn serves_and_is_notified(
    nats: NatsArgs,
    worker_flags: &[&str],
    client: async_nats::ConnectOptions,
) {
    let url = nats.nats_url.clone();
    assert!(
        async_nats::connect(url.as_str()).await.is_err(),
        "the server lets no one in without credentials"
    );
    let _worker = Worker::start(&url, worker_flags);
    let client = client.connect(url.as_str()).await.expect("client connects");
    let mut h = HeaderMap::new();
    h.insert("userid", "secured-user");
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        client.request_with_headers("profiles.images", h, fixture_pictures()[0].1.clone().into()),
    )
    .await
    .expect("answered in time")
    .expect("request");
    assert!(String::from_utf8_lossy(&reply.payload).contains("\"userid\":\"secured-user\""));

    let mut sub = client.subscribe("profiles.control.reload").await.unwrap();
    client.flush().await.unwrap();
    notify_reload(&nats, "profiles.control.reload", "{}")
        .await
        .expect("the reload notice is published");
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(got, Ok(Some(_))), "the reload notice arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{\n  users = [ {{ nkey: {} }} ]\n}}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let server = NatsServer::start_with(false, &["-c", conf.to_str().unwrap()]);
    let url = server.url();
    let nats = NatsArgs {
        nats_nkey_seed_file: Some(seed.clone()),
        ..NatsArgs::url(url.clone())
    };
    let client = async_nats::ConnectOptions::with_nkey(user.seed().unwrap());
    let flags = ["--nats-nkey-seed-file", seed.to_str().unwrap()];
    serves_and_is_notified(nats, &flags, client).await;

    // Another key is refused, with an error naming the server.
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_profile-worker"))
        .args(["--nats-url", &url, "--metrics-addr", "127.0.0.1:0"])
        .args(["--nats-nkey-seed-file", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&url));
}

/// A signed NATS JWT (`ed25519-nkey`) of `claims`, issued by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{}{now}", name.to_uppercase()),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let sig = b64.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{sig}")
}

#[tokio::test(flavor = "multi_thread")]
async fn creds_file_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let (operator, account, user) = (
        nkeys::KeyPair::new_operator(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_user(),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1
    });
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "acc",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "usr",
        serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1
        }),
    );
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {op_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {acc_jwt}\n}}\n",
            account.public_key()
        ),
    )
    .unwrap();
    let creds = dir.path().join("user.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let server = NatsServer::start_with(false, &["-c", conf.to_str().unwrap()]);
    let url = server.url();
    let nats = NatsArgs {
        nats_creds: Some(creds.clone()),
        ..NatsArgs::url(url)
    };
    let client = async_nats::ConnectOptions::with_credentials_file(&creds)
        .await
        .unwrap();
    serves_and_is_notified(nats, &["--nats-creds", creds.to_str().unwrap()], client).await;
}
