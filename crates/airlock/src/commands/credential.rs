//! `airlock credential set PROVIDER` and `airlock credential show PROVIDER`.
//!
//! The secret is read from stdin — with echo off when stdin is a terminal —
//! so it never lands in shell history, `ps` or the environment, and is sent
//! to the admin API, which seals it. Nothing can read it back.

use std::io::{IsTerminal, Read};
use std::path::Path;

use airlock_core::Secret;
use anyhow::{bail, Context};
use http::Method;
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::CredentialCommand;
use crate::client::AdminClient;
use crate::commands::session::default_admin_url;

/// Runs a credential command.
pub async fn run(cmd: CredentialCommand, config: Option<&Path>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(default_admin_url(config));
    match cmd {
        CredentialCommand::Set { provider } => {
            let secret = read_secret(&provider)?;
            let body = json!({ "value": secret.expose() });
            let answer = client
                .call(Method::PUT, &path(&provider), Some(&body))
                .await?;
            println!(
                "credential for {provider} stored sealed (updated {})",
                answer["updated_at"].as_str().unwrap_or("now")
            );
        }
        CredentialCommand::Show { provider } => {
            let answer = client.call(Method::GET, &path(&provider), None).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
    }
    Ok(())
}

fn path(provider: &str) -> String {
    format!("/v1/providers/{provider}/credential")
}

/// The secret from stdin: prompted without echo on a terminal, else all of
/// stdin with one trailing newline removed.
fn read_secret(provider: &str) -> anyhow::Result<Secret> {
    let text = if std::io::stdin().is_terminal() {
        Zeroizing::new(
            rpassword::prompt_password(format!("credential for {provider} (input hidden): "))
                .context("reading the credential from the terminal")?,
        )
    } else {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the credential from stdin")?;
        text
    };
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        bail!("no credential on stdin (pipe it in, e.g. `airlock credential set {provider} < key.txt`)");
    }
    Ok(Secret::new(trimmed))
}
