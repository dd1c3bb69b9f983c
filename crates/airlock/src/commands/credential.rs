//! `airlock credential set PROVIDER`, `show PROVIDER` and `remove PROVIDER`.
//!
//! The secret is read from stdin — with echo off when stdin is a terminal —
//! so it never lands in shell history, `ps` or the environment, and is sent
//! to the admin API, which seals it. Nothing can read it back.

use std::io::{IsTerminal, Read};

use airlock_core::{rule, Secret};
use anyhow::{bail, Context};
use http::{Method, StatusCode};
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::{usage, CredentialCommand};
use crate::client::{path_segment, AdminClient, ApiRefusal};

/// Runs a credential command against the admin API at `admin_url` (unless
/// `AIRLOCK_ADMIN_URL` says otherwise).
pub async fn run(cmd: CredentialCommand, admin_url: String) -> anyhow::Result<()> {
    let client = AdminClient::from_env(admin_url);
    match cmd {
        CredentialCommand::Set { provider } => {
            check_provider(&provider)?;
            // The server must take a credential for it before one is asked
            // for: no secret typed in vain.
            let status = match client.call(Method::GET, &path(&provider), None).await {
                Ok(status) => client.expect_fields(status, CREDENTIAL_FIELDS)?,
                Err(e) => return Err(unknown_provider(&client, &provider, e).await),
            };
            if let Some(source) = status["source"].as_str().filter(|s| *s != "store") {
                bail!(
                    "provider {provider} takes its credential from {source}; set `credential = \
                     \"store\"` in its config on the server to manage it here"
                );
            }
            let secret = read_secret(&provider)?;
            let body = json!({ "value": secret.expose() });
            let answer = match client
                .call(Method::PUT, &path(&provider), Some(&body))
                .await
            {
                Ok(answer) => client.expect_fields(answer, CREDENTIAL_FIELDS)?,
                Err(e) => return Err(unknown_provider(&client, &provider, e).await),
            };
            crate::output::print(&format!(
                "credential for {provider} stored sealed (updated {})\n",
                answer["updated_at"].as_str().unwrap_or("now")
            ))?;
        }
        CredentialCommand::Remove { provider } => {
            check_provider(&provider)?;
            let answer = match client.call(Method::DELETE, &path(&provider), None).await {
                Ok(answer) => client.expect_fields(answer, CREDENTIAL_FIELDS)?,
                Err(e) => return Err(unknown_provider(&client, &provider, e).await),
            };
            let said = if answer["removed"].as_bool() == Some(true) {
                format!(
                    "credential for {provider} removed: its calls get 503 credential_unavailable \
                     until one is set (airlock credential set {provider})\n"
                )
            } else {
                format!("provider {provider} had no stored credential: nothing removed\n")
            };
            crate::output::print(&said)?;
        }
        CredentialCommand::Show { provider, .. } => {
            check_provider(&provider)?;
            let answer = match client.call(Method::GET, &path(&provider), None).await {
                Ok(answer) => client.expect_fields(answer, CREDENTIAL_FIELDS)?,
                Err(e) => return Err(unknown_provider(&client, &provider, e).await),
            };
            crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&answer)?))?;
        }
    }
    Ok(())
}

/// Fields of every answer about a provider's credential.
const CREDENTIAL_FIELDS: &[&str] = &["provider", "source", "set"];

/// Refuses a PROVIDER argument no config could name (the rules of
/// `[providers.NAME]`), before anything is read or sent.
fn check_provider(provider: &str) -> anyhow::Result<()> {
    rule::validate_provider(provider).map_err(|e| usage(format!("PROVIDER: {e}")))
}

/// The admin API's 404 for `provider` as a usage error naming PROVIDER and
/// the providers the server has; other errors unchanged.
async fn unknown_provider(
    client: &AdminClient,
    provider: &str,
    error: anyhow::Error,
) -> anyhow::Error {
    match error.downcast_ref::<ApiRefusal>() {
        // Not the route missing (a server older than this command).
        Some(refusal) if refusal.status == StatusCode::NOT_FOUND && !refusal.no_route() => {}
        _ => return error,
    }
    let configured = match client.provider_names().await {
        Ok(names) if names.is_empty() => " (configured: none)".to_owned(),
        Ok(names) => format!(" (configured: {})", names.join(", ")),
        Err(_) => String::new(),
    };
    usage(format!(
        "PROVIDER: no provider {provider:?} is configured on the server{configured}"
    ))
}

fn path(provider: &str) -> String {
    format!("/v1/providers/{}/credential", path_segment(provider))
}

/// The secret from stdin: prompted without echo on a terminal, else all of
/// stdin with one trailing newline removed.
fn read_secret(provider: &str) -> anyhow::Result<Secret> {
    let terminal = std::io::stdin().is_terminal();
    let text = if terminal {
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
    if trimmed.is_empty() && terminal {
        bail!("no credential entered: nothing was stored");
    }
    if trimmed.is_empty() {
        bail!("no credential on stdin (pipe it in, e.g. `airlock credential set {provider} < key.txt`)");
    }
    Ok(Secret::new(trimmed))
}
