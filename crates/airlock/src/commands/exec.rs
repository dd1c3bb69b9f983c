//! `airlock exec`: runs a command inside a session of its own.
//!
//! Opens a session through the admin API, starts the command with the
//! session's environment (and without any real credential), forwards
//! SIGTERM/SIGHUP to it (and SIGINT unless a terminal delivered it to the
//! command already), revokes the session once it has exited and exits with
//! its status.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::Method;
use serde_json::Value;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::audit_key::AUDIT_KEY_ENV;
use crate::cli::ExecArgs;
use crate::client::{path_segment, AdminClient};
use crate::commands::session::open;
use crate::config::{Config, CredentialSource};

/// airlock itself failed (before the command ran, or could not revoke the
/// session of a command that succeeded), as `env(1)` and `timeout(1)` say it.
pub const EXIT_AIRLOCK_FAILED: u8 = 125;
/// The command was found but could not be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// The variable that tells the command its session id (not a secret).
pub const SESSION_ID_ENV: &str = "AIRLOCK_SESSION_ID";

/// Attempts to revoke the session after the command exits.
const REVOKE_ATTEMPTS: u32 = 3;
/// Pause between revocation attempts (doubled each time).
const REVOKE_RETRY: Duration = Duration::from_millis(250);

/// Runs `airlock exec`. Errors are airlock's own failures before the command
/// started; everything after that is reported and folded into the exit code.
pub async fn run(args: ExecArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let Some((program, program_args)) = args.command.split_first() else {
        bail!("no command given (put it after --)");
    };
    let default_url = match crate::client::admin_url_from_env() {
        Some(url) => url,
        None => {
            crate::client::admin_url_of_listen(config.admin_listen).map_err(anyhow::Error::msg)?
        }
    };
    let client = AdminClient::from_env(default_url);
    // Installed before the session exists, so that no signal between now and
    // the command's start is lost: a pending one is forwarded at once.
    let mut signals = Signals::install()?;

    let session = tokio::select! {
        session = open(&client, &args.session) => session?,
        number = signals.recv() => {
            // The session may have been created, but its token was never
            // handed to anyone; it ends with its TTL.
            crate::output::error_line("interrupted while opening the session");
            return Ok(ExitCode::from(signal_exit_code(number)));
        }
    };
    let id = session
        .get("id")
        .and_then(Value::as_str)
        .context("the admin API's answer has no session id")?
        .to_owned();

    let mut hidden = hidden_variables(config);
    // The server's providers may not be the local config's (another host,
    // no config here): their variables go too.
    match client.call(Method::GET, "/v1/providers", None).await {
        Ok(listed) => {
            hidden.extend(provider_variables(&listed));
            hidden.extend(credential_variables(&client, &listed).await);
        }
        Err(e) => crate::output::error_line(format_args!(
            "could not list the server's providers ({e:#}); removing the variables the local \
             config names"
        )),
    }
    let mut command = tokio::process::Command::new(program);
    command.args(program_args);
    if args.clean_env {
        command.env_clear();
        for (name, value) in std::env::vars_os() {
            if kept_in_a_clean_env(&name, &args.pass_env) {
                command.env(name, value);
            }
        }
    }
    // Also after --clean-env: --pass-env names no credential. Said once
    // per name it named (round 43: the operator was not told).
    for name in &args.pass_env {
        if hidden.contains(name.as_str()) {
            crate::output::error_line(format_args!(
                "--pass-env {name}: not passed on, it names a provider's credential or base URL \
                 (the session's value is set instead, where it has one)"
            ));
        }
    }
    for var in hidden {
        command.env_remove(var);
    }
    let env = session_env(&session);
    // The legacy names get the session's base URL too, so that the tools
    // that read them go through airlock rather than to the provider with a
    // token worth nothing there.
    for (legacy, current) in LEGACY_BASE_URL_ALIASES {
        if let Some((_, url)) = env.iter().find(|(key, _)| key == current) {
            command.env(legacy, url);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command.env(SESSION_ID_ENV, &id);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            };
            crate::output::error_line(format_args!(
                "cannot run {}: {e}",
                program.to_string_lossy()
            ));
            if let Err(e) = revoke(&client, &id).await {
                crate::output::error_line(format_args!("{e:#}"));
            }
            return Ok(ExitCode::from(code));
        }
    };

    let status = loop {
        tokio::select! {
            biased;
            status = child.wait() => break status,
            number = signals.recv() => {
                let forwarded = forwards(number, in_terminal_foreground());
                tracing::debug!(signal = number, forwarded, "signal received");
                if let Some(pid) = child.id().filter(|_| forwarded) {
                    forward_signal(pid, number);
                }
            }
        }
    };

    let revoked = revoke(&client, &id).await;
    let code = match status {
        Ok(status) => exit_code_of(status),
        Err(e) => {
            crate::output::error_line(format_args!(
                "waiting for {}: {e}",
                program.to_string_lossy()
            ));
            EXIT_AIRLOCK_FAILED
        }
    };
    match revoked {
        Ok(()) => Ok(ExitCode::from(code)),
        Err(e) => {
            crate::output::error_line(format_args!("{e:#}"));
            Ok(ExitCode::from(if code == 0 {
                EXIT_AIRLOCK_FAILED
            } else {
                code
            }))
        }
    }
}

/// Where the common AI SDKs and CLIs look for their API keys.
const WELL_KNOWN_KEY_VARIABLES: [&str; 28] = [
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "AZURE_OPENAI_API_KEY",
    // A Microsoft Entra ID bearer token: the openai SDK's AzureOpenAI
    // client reads it (before AZURE_OPENAI_API_KEY).
    "AZURE_OPENAI_AD_TOKEN",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "MISTRAL_API_KEY",
    "COHERE_API_KEY",
    "CO_API_KEY",
    "GROQ_API_KEY",
    "TOGETHER_API_KEY",
    "DEEPSEEK_API_KEY",
    "XAI_API_KEY",
    "OPENROUTER_API_KEY",
    // Hugging Face (huggingface_hub, transformers; LangChain's name).
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACEHUB_API_TOKEN",
    "REPLICATE_API_TOKEN",
    "FIREWORKS_API_KEY",
    "PERPLEXITY_API_KEY",
    "PPLX_API_KEY",
    "VOYAGE_API_KEY",
    "CEREBRAS_API_KEY",
    "DEEPINFRA_API_TOKEN",
    "AI21_API_KEY",
    "NVIDIA_API_KEY",
    "AZURE_API_KEY",
];

/// The variables `--clean-env` keeps, besides the session's: what a
/// program needs to run at all, nothing that holds a secret.
const CLEAN_ENV: [&str; 9] = [
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "TZ", "TMPDIR",
];

/// Whether `--clean-env` passes `name` on: a basic variable, a locale
/// (`LC_*`), or one `--pass-env` names.
fn kept_in_a_clean_env(name: &std::ffi::OsStr, pass: &[String]) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    CLEAN_ENV.contains(&name) || name.starts_with("LC_") || pass.iter().any(|p| p == name)
}

/// Legacy base-URL variables that SDKs read before (or instead of) the one
/// a session sets: inherited, they would send the session's token, and
/// the agent, somewhere other than airlock.
const WELL_KNOWN_BASE_URL_VARIABLES: [&str; 3] = [
    // openai-python before 1.0 (its only name), LangChain's ChatOpenAI and
    // OpenAIEmbeddings, LiteLLM: all before OPENAI_BASE_URL or instead of it.
    "OPENAI_API_BASE",
    // LangChain's ChatAnthropic (langchain-anthropic), before the
    // Anthropic SDK's ANTHROPIC_BASE_URL.
    "ANTHROPIC_API_URL",
    // LiteLLM's Anthropic calls, before ANTHROPIC_BASE_URL.
    "ANTHROPIC_API_BASE",
];

/// The legacy base-URL variables ([`WELL_KNOWN_BASE_URL_VARIABLES`]) and
/// the current one each stands for: set to the session's value of it.
const LEGACY_BASE_URL_ALIASES: [(&str, &str); 3] = [
    ("OPENAI_API_BASE", "OPENAI_BASE_URL"),
    ("ANTHROPIC_API_URL", "ANTHROPIC_BASE_URL"),
    ("ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL"),
];

/// Variables the command must not inherit: the real credentials of every
/// configured provider whose source is `env:VAR`; the variables the common
/// AI SDKs read keys from ([`WELL_KNOWN_KEY_VARIABLES`]) and the legacy
/// base-URL variables they read ([`WELL_KNOWN_BASE_URL_VARIABLES`]); every provider's
/// `env_key` and `env_base_url` (the names its SDK reads: a real key the
/// operator's shell holds there must not reach the command for a provider
/// outside the session, and one inside gets the session's values); the
/// admin token, the audit key and the master key (which unseals stored
/// credentials).
pub fn hidden_variables(config: &Config) -> BTreeSet<String> {
    let mut vars: BTreeSet<String> = BTreeSet::new();
    for provider in config.providers.values() {
        if let CredentialSource::Env(var) = &provider.credential {
            vars.insert(var.clone());
        }
        vars.insert(provider.env_key.clone());
        vars.insert(provider.env_base_url.clone());
    }
    // The variables the common AI SDKs read their key from, whether or not
    // a provider here uses them: a real key in the shell under one of
    // them must not reach an agent's command either.
    vars.extend(WELL_KNOWN_KEY_VARIABLES.iter().map(|v| (*v).to_owned()));
    vars.extend(
        WELL_KNOWN_BASE_URL_VARIABLES
            .iter()
            .map(|v| (*v).to_owned()),
    );
    // The agent has no business with the admin API: neither where it is
    // (the URL may hold a user:password) nor its token.
    vars.insert(crate::client::ADMIN_URL_ENV.to_owned());
    vars.insert("AIRLOCK_ADMIN_TOKEN".to_owned());
    vars.insert(AUDIT_KEY_ENV.to_owned());
    vars.insert(airlock_core::seal::MASTER_KEY_ENV.to_owned());
    vars
}

/// The variable names `GET /v1/providers` lists for every provider.
fn provider_variables(listed: &Value) -> Vec<String> {
    listed
        .get("providers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|p| [p.get("env_key"), p.get("env_base_url")])
        .filter_map(|v| v.and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// The variables the server's providers read their real credential from
/// (`credential = "env:VAR"`, as `GET /v1/providers/{name}/credential`
/// says): the server's sources, whatever the local config names (round 32:
/// run without the server's config, exec passed the real key on).
async fn credential_variables(client: &AdminClient, listed: &Value) -> Vec<String> {
    let names = listed
        .get("providers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("name").and_then(Value::as_str));
    let mut vars = Vec::new();
    for name in names {
        let path = format!("/v1/providers/{}/credential", path_segment(name));
        match client.call(Method::GET, &path, None).await {
            Ok(status) => vars.extend(
                status
                    .get("source")
                    .and_then(Value::as_str)
                    .and_then(|source| source.strip_prefix("env:"))
                    .map(str::to_owned),
            ),
            Err(e) => crate::output::error_line(format_args!(
                "could not read where provider {name} takes its credential from ({e:#}); if \
                 from a variable the local config does not name, it is not removed"
            )),
        }
    }
    vars
}

/// The `env` object of a created session.
fn session_env(session: &Value) -> Vec<(String, String)> {
    session
        .get("env")
        .and_then(Value::as_object)
        .map(|env| {
            env.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Revokes the session, retrying briefly: the command has ended and its
/// token must stop working.
async fn revoke(client: &AdminClient, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/sessions/{id}");
    let mut pause = REVOKE_RETRY;
    let mut attempt = 1;
    loop {
        match client.call(Method::DELETE, &path, None).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= REVOKE_ATTEMPTS => {
                return Err(e.context(format!(
                    "could not revoke session {id}; it stays usable until it expires \
                     (revoke it with `airlock session revoke {id}`)"
                )))
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
        }
    }
}

/// The exit code of a finished command: its own, or 128+N when signal N
/// killed it (as shells report it).
fn exit_code_of(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        // Exit codes are 0..=255 on Unix; `code()` is the low 8 bits.
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    status.signal().map_or(1, signal_exit_code)
}

/// 128+N for signal N.
fn signal_exit_code(number: i32) -> u8 {
    u8::try_from(128 + number).unwrap_or(255)
}

/// Whether airlock passes signal `number` on to the command. The command
/// shares airlock's process group, so a Ctrl-C typed at the terminal
/// (`terminal`: airlock's group is its terminal's foreground group) has
/// reached it already: a second SIGINT would make many programs skip their
/// graceful exit.
fn forwards(number: i32, terminal: bool) -> bool {
    !(terminal && number == SignalKind::interrupt().as_raw_value())
}

/// Whether airlock's process group is the foreground group of its
/// controlling terminal (`/dev/tty`, whatever stdin is: `… | airlock exec`
/// typed at a shell still gets Ctrl-C), i.e. whether a Ctrl-C typed there
/// reaches the command directly. Not without a controlling terminal, nor
/// when airlock runs in the background (`airlock exec … &`): a SIGINT then
/// came from `kill` and only airlock got it.
fn in_terminal_foreground() -> bool {
    std::fs::File::open("/dev/tty").is_ok_and(|terminal| {
        rustix::termios::tcgetpgrp(&terminal).is_ok_and(|group| group == rustix::process::getpgrp())
    })
}

/// Sends signal `number` to `pid`; a command that is already gone is fine.
fn forward_signal(pid: u32, number: i32) {
    let signal = match number {
        n if n == SignalKind::interrupt().as_raw_value() => rustix::process::Signal::INT,
        n if n == SignalKind::terminate().as_raw_value() => rustix::process::Signal::TERM,
        n if n == SignalKind::hangup().as_raw_value() => rustix::process::Signal::HUP,
        _ => return,
    };
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, signal) {
        if e != rustix::io::Errno::SRCH {
            crate::output::error_line(format_args!(
                "cannot forward signal {number} to the command: {e}"
            ));
        }
    }
}

/// The signals airlock catches while the command runs (so that airlock
/// outlives the command and can revoke its session).
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Self {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => SignalKind::interrupt().as_raw_value(),
            _ = self.terminate.recv() => SignalKind::terminate().as_raw_value(),
            _ = self.hangup.recv() => SignalKind::hangup().as_raw_value(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ctrl_c_at_the_terminal_is_not_sent_twice() {
        let (int, term, hup) = (
            SignalKind::interrupt().as_raw_value(),
            SignalKind::terminate().as_raw_value(),
            SignalKind::hangup().as_raw_value(),
        );
        assert!(!forwards(int, true));
        assert!(forwards(int, false));
        for number in [term, hup] {
            assert!(forwards(number, true) && forwards(number, false));
        }
    }
}
