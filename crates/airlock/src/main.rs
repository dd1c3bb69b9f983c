//! The `airlock` binary: parses the command line and runs a command.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod audit_key;
mod cli;
mod client;
mod commands;
mod config;
mod credentials;
mod key_check;
mod logging;
mod output;
mod paths;

use cli::{Cli, Command, LogFormat};

/// `EX_USAGE`: the config is bad.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    // Log lines are written by a background thread: the request path never
    // blocks on stderr. The guard flushes what is pending at exit.
    let log_guard = logging::init(cli.log_format);
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    // The control plane: admin API, store sync, PostgreSQL audit writes.
    // Proxy traffic runs on `proxy.workers` threads of its own (see
    // airlock_proxy::server), so two threads are plenty here.
    let control_threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(control_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            drop(log_guard);
            output::fatal_line(json_logs, &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let mut fatal = None;
    let code = runtime.block_on(run(cli, &mut fatal));
    // Why serve could not go on comes last, after every log line before it
    // (and whatever RUST_LOG filters out).
    drop(runtime);
    drop(log_guard);
    if let Some(message) = fatal {
        output::fatal_line(json_logs, &message);
    }
    code
}

/// Runs the command; `fatal` receives why `serve` could not start or had
/// to stop, which `main` says once the log is flushed.
async fn run(cli: Cli, fatal: &mut Option<String>) -> ExitCode {
    match cli.command {
        Command::Serve => {
            let loaded = config::Config::load(cli.config.as_deref())
                .and_then(|config| config.check_tls().map(|()| config));
            let config = match loaded {
                Ok(config) => config,
                Err(e) => {
                    *fatal = Some(format!("invalid config: {e}"));
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match commands::serve::run(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    *fatal = Some(format!("{e:#}"));
                    ExitCode::from(if cli::is_usage(&e) {
                        cli::EXIT_USAGE
                    } else {
                        1
                    })
                }
            }
        }
        Command::Session(cmd) => match admin_url(cli.config.as_deref()) {
            Ok(url) => report(commands::session::run(cmd, url).await),
            Err(code) => code,
        },
        Command::Credential(cmd) => match admin_url(cli.config.as_deref()) {
            Ok(url) => report(commands::credential::run(cmd, url).await),
            Err(code) => code,
        },
        Command::Status { json } => match try_admin_url(cli.config.as_deref()) {
            Ok(url) => match commands::status::run(url, json).await {
                Ok(code) => code,
                Err(e) => report(Err(e)),
            },
            Err(message) => config_failed(&message, json.then_some("ready")),
        },
        Command::Audit(cmd) if commands::audit::is_remote(&cmd) => {
            let verifying = matches!(cmd, cli::AuditCommand::Verify { .. });
            let json = matches!(cmd, cli::AuditCommand::Verify { json: true, .. });
            let url = match try_admin_url(cli.config.as_deref()) {
                Ok(url) => url,
                Err(message) => return config_failed(&message, json.then_some("ok")),
            };
            match commands::audit::run_remote(cmd, url).await {
                Ok(code) => code,
                // As below: a trail verify could not ask about is exit 2.
                Err(e) if verifying && !output::is_stdout_closed(&e) => unverified(&e, json),
                Err(e) => report(Err(e)),
            }
        }
        Command::Audit(cmd) => {
            let json = matches!(cmd, cli::AuditCommand::Verify { json: true, .. });
            let config = match config::Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    let message = format!("invalid config: {e}");
                    return config_failed(&message, json.then_some("ok"));
                }
            };
            // `audit verify` answers 0 (intact) or 1 (broken); a trail it
            // could not check at all (no database, no key, no file) is 2,
            // as `diff` and `grep` say trouble, so that a script never
            // takes a misconfiguration for tampering.
            let verifying = matches!(cmd, cli::AuditCommand::Verify { .. });
            match commands::audit::run(cmd, &config).await {
                Ok(code) => code,
                Err(e) if verifying => unverified(&e, json),
                Err(e) => report(Err(e)),
            }
        }
        Command::Exec(args) => {
            let config = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match commands::exec::run(args, &config).await {
                Ok(code) => code,
                Err(e) => {
                    crate::output::error_line(format_args!("{e:#}"));
                    // A usage error exits 2, as for every command; 125 is
                    // for airlock's other failures before CMD ran.
                    ExitCode::from(if cli::is_usage(&e) {
                        cli::EXIT_USAGE
                    } else {
                        commands::exec::EXIT_AIRLOCK_FAILED
                    })
                }
            }
        }
        Command::Config(cli::ConfigCommand::Check) => {
            match load_config_to_serve(cli.config.as_deref()) {
                Ok(config) => commands::config_check::run(&config),
                Err(code) => code,
            }
        }
        Command::Completions { shell } => report(commands::completions::run(shell)),
    }
}

/// `audit verify` that could not check the trail: says why, and with
/// `--json` also prints a verdict a script can read (`ok` false, the
/// `error`) instead of nothing; exit 2.
fn unverified(error: &anyhow::Error, json: bool) -> ExitCode {
    let message = format!("{error:#}");
    if json {
        let verdict = serde_json::json!({ "ok": false, "error": message });
        // The verdict is the exit status; a closed stdout changes nothing.
        let _ = output::print_verdict(&format!("{verdict}\n"));
    }
    crate::output::error_line(&message);
    ExitCode::from(cli::EXIT_USAGE)
}

/// A config that could not be loaded (exit 64), said on stderr; a `--json`
/// command (`verdict`: the field its answer says false in) also prints a
/// JSON object on stdout, as for its other failures.
fn config_failed(message: &str, verdict: Option<&str>) -> ExitCode {
    if let Some(field) = verdict {
        let mut answer = serde_json::json!({ "error": message });
        answer[field] = serde_json::Value::Bool(false);
        let _ = output::print_verdict(&format!("{answer}\n"));
    }
    crate::output::error_line(message);
    ExitCode::from(EXIT_CONFIG)
}

/// Loads the config named by `--config`; on error, says why as `serve`
/// does and gives exit 64.
fn load_config(path: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    config::Config::load(path).map_err(|e| {
        crate::output::error_line(format_args!("invalid config: {e}"));
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The admin API's URL for the commands that talk to it: `admin.listen` of
/// the config (`--config`, else `./airlock.toml` when it exists, else the
/// defaults), which must load as for every command (exit 64 otherwise).
/// `AIRLOCK_ADMIN_URL` overrides it; with it set and no `--config`, no
/// config is read.
fn admin_url(path: Option<&std::path::Path>) -> Result<String, ExitCode> {
    try_admin_url(path).map_err(|message| {
        crate::output::error_line(&message);
        ExitCode::from(EXIT_CONFIG)
    })
}

/// [`admin_url`], or why the config could not be loaded (nothing printed).
fn try_admin_url(path: Option<&std::path::Path>) -> Result<String, String> {
    let from_env = client::admin_url_from_env();
    if let Some(url) = from_env.clone().filter(|_| path.is_none()) {
        return Ok(url);
    }
    let config = config::Config::load(path).map_err(|e| format!("invalid config: {e}"))?;
    match from_env {
        // The client takes the variable's URL over the config's.
        Some(_) => Ok(format!("http://{}", config.admin_listen)),
        None => client::admin_url_of_listen(config.admin_listen),
    }
}

/// Like `load_config`, and also loads the TLS files `serve` would use.
fn load_config_to_serve(path: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    let config = load_config(path)?;
    config.check_tls().map_err(|e| {
        crate::output::error_line(format_args!("invalid config: {e}"));
        ExitCode::from(EXIT_CONFIG)
    })?;
    Ok(config)
}

/// clap's answer to the command line (help, version, or a usage error),
/// as clap gives it, unless it quotes a session token: then in plain text
/// with the token withheld.
fn clap_error(e: &clap::Error) -> ExitCode {
    let plain = e.render().to_string();
    match airlock_core::token::withhold_runs(&plain) {
        Some(withheld) => {
            eprint!("{withheld}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(cli::EXIT_USAGE))
        }
        None => e.exit(),
    }
}

/// Exit 0, or the error on stderr with exit 2 for a usage error and 1 for
/// anything else. A closed stdout (`| head`) ends a command quietly: exit 0.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if output::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            crate::output::error_line(format_args!("{e:#}"));
            if cli::is_usage(&e) {
                ExitCode::from(cli::EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
