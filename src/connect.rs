//! NATS connection settings a production cluster needs, as flags and
//! environment variables shared by the binaries: several server URLs,
//! user/password, token, NKey seed file, `.creds` file, TLS (CA, client
//! certificate and key), connection name.
//!
//! Builds `async_nats::ConnectOptions` and confirms that the server has what
//! a client published ([`round_trip`]); it does not connect by itself.

use std::path::PathBuf;

use anyhow::Context;

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated (`tls://` for TLS).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// User name (with --nats-password).
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// Password (with --nats-user).
    #[arg(
        long,
        env = "NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// Authentication token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// File holding an NKey seed (`SU...`).
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// `.creds` file (JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate(s) to trust (PEM).
    #[arg(long, env = "NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key.
    #[arg(long, env = "NATS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM), with --tls-cert.
    #[arg(long, env = "NATS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    pub tls_required: bool,
}

impl NatsArgs {
    /// Plain settings for a URL, no authentication.
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            ..Self::default()
        }
    }

    /// Connection options with every configured credential and TLS setting.
    pub async fn options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut o = match &self.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("reading the credentials file {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(u), Some(p)) = (&self.nats_user, &self.nats_password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.nats_token {
            o = o.token(t.clone());
        }
        if let Some(path) = &self.nats_nkey_seed_file {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("reading the NKey seed file {}", path.display()))?;
            o = o.nkey(seed.trim().to_string());
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required
            || self
                .nats_url
                .split(',')
                .any(|u| u.trim().starts_with("tls://"))
        {
            o = o.require_tls(true);
        }
        Ok(o)
    }

    /// Connects with these settings; a failure names the server(s).
    pub async fn connect(
        &self,
        options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::Client> {
        let urls: Vec<async_nats::ServerAddr> = self
            .nats_url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad NATS URL in `{}`", self.nats_url))?;
        let wants_tls = self.tls_required || self.nats_url.contains("tls://");
        options.connect(urls).await.map_err(|e| {
            let text = e.to_string();
            let hint =
                if wants_tls && (text.contains("corrupt") || text.contains("InvalidContentType")) {
                    " (TLS was asked for but the server did not answer with TLS: is it a plain \
                 nats:// server? Use a nats:// URL, or enable TLS on the server)"
                } else {
                    ""
                };
            anyhow::Error::new(e).context(format!("connecting to NATS at {}{hint}", self.nats_url))
        })
    }
}

/// Publishes one reload message (PROTOCOL §5) so every worker sharing the
/// weights file loads it now; used by the trainer after writing weights.
pub async fn notify_reload(nats: &NatsArgs, subject: &str, body: &str) -> anyhow::Result<()> {
    let client = nats.connect(nats.options().await?).await?;
    client
        .publish(subject.to_string(), body.to_string().into())
        .await
        .with_context(|| format!("publishing to {subject}"))?;
    round_trip(&client)
        .await
        .context("confirming the reload message")
}

/// Returns once the server has processed everything `client` published
/// before the call. A flush only hands the bytes to the operating system,
/// which may still drop them when the process exits; this sends a message to
/// the client's own inbox and waits for it to come back, and the server
/// handles a connection's messages in order.
pub async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .context("subscribing to the client's inbox")?;
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .context("publishing to the client's inbox")?;
    client.flush().await.context("flushing")?;
    echo.next()
        .await
        .map(|_| ())
        .context("the connection closed before the server answered")
}
