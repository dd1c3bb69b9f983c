//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// airlock: a credential-injection proxy for AI agents.
///
/// Agents get a short-lived session token and a base URL instead of the real
/// API key; airlock checks every call against the session's scope and limits
/// and swaps the token for the real credential.
#[derive(Debug, Parser)]
#[command(name = "airlock", version, propagate_version = true)]
pub struct Cli {
    /// Config file (default: ./airlock.toml if it exists, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the admin API until SIGINT/SIGTERM.
    ///
    /// Example: airlock serve --config airlock.toml
    Serve,
    /// Create, list, show and revoke sessions through the admin API.
    #[command(subcommand)]
    Session(SessionCommand),
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Open a session and print it.
    ///
    /// Example: airlock session create --allow openai:POST:/v1/chat/completions --ttl 15m --format env
    Create(CreateArgs),
    /// List active sessions (--all adds ended ones).
    List {
        /// Include expired and revoked sessions.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one session as JSON.
    Show {
        /// Session id (ses_...).
        id: String,
    },
    /// Revoke a session by id (ses_...) or token (sess_...).
    Revoke {
        /// Session id or token.
        id_or_token: String,
    },
}

/// Options of `session create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A scope rule PROVIDER:METHODS:PATH, e.g. openai:POST:/v1/chat/completions
    /// or github:GET,HEAD:/repos/acme/** (repeatable).
    #[arg(long = "allow", value_name = "RULE", required = true)]
    pub allow: Vec<String>,
    /// Time to live: 90s, 15m, 2h.
    #[arg(long, default_value = "15m")]
    pub ttl: String,
    /// A label key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Total requests over the session's life.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Denied calls after which the session is revoked.
    #[arg(long)]
    pub max_denied: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    pub format: OutputFormat,
}

/// How `session create` prints the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The admin API's JSON answer.
    Json,
    /// KEY=value lines.
    Env,
    /// export KEY='value' lines for eval in a shell.
    Shell,
}
