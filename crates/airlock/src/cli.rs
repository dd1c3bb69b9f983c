//! The command line.

use std::path::PathBuf;

use airlock_core::limits::{MAX_COUNT, MAX_RPM};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit status of a usage error: a bad option, or a bad option value the CLI
/// finds after parsing (clap exits with it for its own).
pub const EXIT_USAGE: u8 = 2;

/// A command-line value refused after parsing (a rule, TTL, label, session id
/// or provider name): reported as `airlock: MESSAGE`, naming the option or
/// argument, with exit [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Whether `error` (or an error it wraps) is a [`UsageError`].
pub fn is_usage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<UsageError>())
}

/// airlock: a credential-injection proxy for AI agents.
///
/// Agents get a short-lived session token and a base URL instead of the real
/// API key; airlock checks every call against the session's scope and limits
/// and swaps the token for the real credential.
#[derive(Debug, Parser)]
#[command(
    name = "airlock",
    version,
    propagate_version = true,
    after_help = TOP_EXAMPLES
)]
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

/// Examples shown under `airlock --help`.
const TOP_EXAMPLES: &str = "\
Examples:
  airlock serve --config airlock.toml
  airlock config check
  airlock session create --allow openai:POST:/v1/chat/completions --ttl 15m --format shell
  airlock exec --allow openai:POST:/v1/chat/completions -- python agent.py
  airlock audit tail -n 20

The CLI reaches a running server through AIRLOCK_ADMIN_URL (default: http://
plus admin.listen of the config, 127.0.0.1:8081; https:// through a TLS proxy,
trusting AIRLOCK_ADMIN_CA_FILE's certificates too) and AIRLOCK_ADMIN_TOKEN;
each call gives up after AIRLOCK_ADMIN_TIMEOUT (default: 60s).";

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the admin API until SIGINT/SIGTERM.
    #[command(after_help = "\
Example:
  airlock serve --config airlock.toml")]
    Serve,
    /// Create, list, show and revoke sessions through the admin API.
    #[command(after_help = "\
Examples:
  airlock session create --allow openai:POST:/v1/chat/completions --format env
  airlock session list --all
  airlock session revoke ses_...")]
    #[command(subcommand)]
    Session(SessionCommand),
    /// Run a command inside a new session, then revoke the session.
    ///
    /// Opens a session through the admin API, runs CMD with the session's
    /// environment variables (for every provider in scope: the key variable
    /// holding the session token and the base-URL variable pointing at
    /// airlock) plus AIRLOCK_SESSION_ID, forwards SIGTERM and SIGHUP to it,
    /// and SIGINT sent to airlock alone (a Ctrl-C typed at the terminal
    /// reaches CMD directly and is not sent a second time), revokes the
    /// session when it exits (for any reason, also when airlock itself is
    /// interrupted) and exits with its status (128+N when it was killed by
    /// signal N).
    ///
    /// The real credentials never reach CMD: every provider's
    /// `credential = "env:VAR"` variable, key and base-URL variables (the
    /// server's, as its admin API reports them, and the local config's), the key variables
    /// of the common AI SDKs (OPENAI_API_KEY, ANTHROPIC_API_KEY, HF_TOKEN,
    /// ...), AIRLOCK_ADMIN_URL, AIRLOCK_ADMIN_TOKEN, AIRLOCK_AUDIT_KEY and AIRLOCK_MASTER_KEY
    /// are removed from its environment. The legacy base-URL variables some
    /// SDKs read instead of the one set here (OPENAI_API_BASE,
    /// ANTHROPIC_API_URL, ANTHROPIC_API_BASE) are never inherited: set to
    /// the session's base URL when it has one, removed otherwise. Other
    /// variables (a GITHUB_TOKEN, cloud keys) are inherited as usual, unless
    /// --clean-env starts CMD with only the basic ones (and --pass-env's).
    ///
    /// Exit status: CMD's; 2 for a usage error (a bad option or option value,
    /// as for every command); 125 when airlock fails otherwise before CMD
    /// runs (or CMD succeeded but the session could not be revoked), 126 when
    /// CMD cannot be executed, 127 when it is not found.
    #[command(after_help = "\
Examples:
  airlock exec --allow openai:POST:/v1/chat/completions -- python agent.py
  airlock exec --allow anthropic:POST:/v1/messages --ttl 2h --label agent=a1 \\
               --max-denied 3 -- ./run-agent --verbose")]
    Exec(ExecArgs),
    /// Show whether the running server is ready, its providers' credentials
    /// and its active sessions, through the admin API.
    ///
    /// Exit 0 when the server is ready; 1 when it is not (starting or
    /// shutting down, its audit trail or shared store out of reach: every
    /// call is refused then) or cannot be asked.
    #[command(after_help = "\
Examples:
  airlock status
  airlock status --json | jq .ready")]
    Status {
        /// One JSON object: url, ready, status (as GET /readyz says it),
        /// server (as GET /v1/server says it), providers (name, source,
        /// set), active_sessions; url, ready, error when the server cannot
        /// be asked.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the configuration.
    #[command(
        subcommand,
        after_help = "\
Example:
  airlock config check --config airlock.toml"
    )]
    Config(ConfigCommand),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  airlock completions bash > /etc/bash_completion.d/airlock
  airlock completions zsh > \"${fpath[1]}/_airlock\"
  airlock completions fish > ~/.config/fish/completions/airlock.fish")]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Verify, export, follow and prune the audit trail (reads the store and the audit
    /// key named by the config directly, so the server need not be running; with
    /// --remote, through the running server's admin API).
    #[command(
        subcommand,
        after_help = "\
Examples:
  airlock audit verify
  airlock audit export --session ses_... > session.jsonl
  airlock audit tail -n 20
  airlock audit prune --before 90d"
    )]
    Audit(AuditCommand),
    /// Manage providers' real credentials (write-only) through the admin API.
    #[command(
        subcommand,
        after_help = "\
Examples:
  airlock credential set openai < key.txt
  airlock credential show openai
  airlock credential remove openai"
    )]
    Credential(CredentialCommand),
}

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Store a provider's real credential, sealed, read from stdin.
    ///
    /// The provider's config must say `credential = "store"`. The value is
    /// read without echo (or piped in), sealed with the master key, and can
    /// never be read back; the next call uses it, on every replica.
    #[command(after_help = "\
Examples:
  airlock credential set openai              # prompts, input hidden
  airlock credential set openai < key.txt")]
    Set {
        /// Provider name, as configured.
        provider: String,
    },
    /// Show whether a provider has a credential, its source and when it
    /// was set, as JSON.
    #[command(after_help = "\
Example:
  airlock credential show openai")]
    Show {
        /// Provider name, as configured.
        provider: String,
        /// Print JSON (what it always prints; accepted as by the other
        /// commands that print JSON).
        #[arg(long)]
        json: bool,
    },
    /// Remove a provider's stored credential: its calls get 503
    /// `credential_unavailable` until one is set again, on every replica.
    ///
    /// For a key that leaked before its successor is at hand (`set`
    /// replaces a key in one step). Removing none is no error.
    #[command(
        visible_alias = "rm",
        after_help = "\
Example:
  airlock credential remove openai"
    )]
    Remove {
        /// Provider name, as configured.
        provider: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the HMAC chain of the whole trail, or of an exported file.
    ///
    /// Exit 0 with a one-line summary when intact; exit 1 naming the first
    /// bad record (chain and seq) and why otherwise; exit 2 when the trail
    /// cannot be checked at all (no database, no audit key, no file, no
    /// answer from the server).
    ///
    /// Reads the store and the audit key named by the config, so it works
    /// while the server is down; --remote asks the running server instead.
    #[command(after_help = "\
Examples:
  airlock audit verify
  airlock audit verify --from audit.jsonl
  airlock audit verify --from session.jsonl --session ses_...
  AIRLOCK_ADMIN_URL=https://airlock-admin.internal airlock audit verify --remote")]
    Verify {
        /// An exported JSON Lines file instead of the store ("-" for
        /// stdin); its records' MACs are checked with the audit key all the
        /// same (AIRLOCK_AUDIT_KEY or [audit] key_file).
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// With --from: the file is an export of this session only (its
        /// records' seqs may jump; each record is still checked).
        #[arg(long, value_name = "ID", requires = "from", conflicts_with = "remote")]
        session: Option<String>,
        /// The verdict as one JSON object (same exit status): the stored
        /// trail's as GET /v1/audit/verify answers it; a file's with the
        /// same fields, plus "ranges" (each chain's first and last seq) or
        /// the bad "line".
        #[arg(long)]
        json: bool,
        /// Have the running server verify its trail (GET /v1/audit/verify
        /// at AIRLOCK_ADMIN_URL, with AIRLOCK_ADMIN_TOKEN): no access to the
        /// store or the audit key needed here. The verdict is the server's.
        #[arg(long, conflicts_with = "from")]
        remote: bool,
    },
    /// Print audit records as JSON lines, chain by chain, each in seq order.
    ///
    /// The output verifies on its own (`airlock audit verify --from FILE`,
    /// adding `--session ID` for one session's export). Reads the store
    /// named by the config; --remote reads through the running server.
    #[command(after_help = "\
Examples:
  airlock audit export > audit.jsonl
  airlock audit export --session ses_... --since 2026-01-02T00:00:00Z
  airlock audit export --remote --since 1h > last-hour.jsonl")]
    Export {
        /// Only this session's records.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// From this time (RFC 3339), or this long ago (15m, 2h): in each
        /// chain, from its first record at or after T to its end, so that no
        /// seq is missing. A record's time is when its call ended and its
        /// seq is given at commit, so a few records may be a millisecond or
        /// two older than T.
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// Read the records through the running server (GET /v1/audit at
        /// AIRLOCK_ADMIN_URL, with AIRLOCK_ADMIN_TOKEN) instead of the
        /// store: no database access needed here. Chains come interleaved,
        /// oldest record first; the output verifies the same.
        #[arg(long)]
        remote: bool,
        /// Records asked for per store query or admin API call (1-10000;
        /// tests use small pages).
        #[arg(
            long,
            hide = true,
            value_name = "N",
            default_value_t = 5_000,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(airlock_admin::AUDIT_PAGE_MAX))
        )]
        page_size: u32,
    },
    /// Follow the audit trail: print new records as JSON lines as they are
    /// written, until interrupted.
    ///
    /// Reads the store named by the config directly (every 200 ms), so it
    /// sees the records of every replica sharing the store; --remote reads
    /// them through the running server.
    #[command(after_help = "\
Examples:
  airlock audit tail
  airlock audit tail -n 20 --session ses_...
  airlock audit tail | jq -c 'select(.decision != \"allow\")'
  airlock audit tail --remote --session ses_...")]
    Tail {
        /// Only this session's records.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// First print the last N records already written.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 0)]
        lines: usize,
        /// Follow through the running server (GET /v1/audit at
        /// AIRLOCK_ADMIN_URL, with AIRLOCK_ADMIN_TOKEN, every 200 ms)
        /// instead of the store: the records committed from now on (no
        /// --lines).
        #[arg(long)]
        remote: bool,
    },
    /// Remove the oldest records from the trail, keeping it verifiable.
    ///
    /// In each chain, removes the records from its start up to the last
    /// batch whose records all ended before T (a chain's last batch always
    /// stays), and stores where the chain now starts, sealed with the audit
    /// key: `audit verify` then checks each chain from there, and still
    /// finds any other record removed. Export first what must be kept.
    /// Refuses (exit 1) when the trail does not verify: pruning would
    /// remove the evidence. Reads the store and the audit key named by the
    /// config, like verify; it may run while the server runs. SQLite
    /// reuses the space freed for new records (the file does not shrink).
    #[command(after_help = "\
Examples:
  airlock audit export > audit-until-now.jsonl && airlock audit prune --before 90d
  airlock audit prune --before 2026-01-01T00:00:00Z --dry-run")]
    Prune {
        /// Remove records that ended before this time (RFC 3339), or more
        /// than this long ago (90d, 12h).
        #[arg(long, value_name = "T")]
        before: String,
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// The outcome as one JSON object: before, dry_run, records, and
        /// per chain first_seq, last_seq and records.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config file and print what `airlock serve` would run.
    ///
    /// Prints listen addresses, store, audit settings and every provider
    /// with its upstream, auth style and credential source (never the
    /// credential itself), saying whether the credential is available now.
    /// Exit 64 naming FILE: KEY: reason when the config is invalid, exactly
    /// as `airlock serve` would refuse it; exit 1 when a credential file
    /// cannot be read (serve would refuse to start).
    #[command(after_help = "\
Examples:
  airlock config check
  airlock config check --config /etc/airlock/airlock.toml")]
    Check,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Open a session and print it.
    ///
    /// --format json prints the admin API's answer (id, token, expiry, scope,
    /// limits, labels, env); env prints the session's variables (and
    /// AIRLOCK_SESSION_ID, as exec sets it) as KEY=value lines; shell prints
    /// them as export KEY='value' lines to eval.
    #[command(after_help = "\
Examples:
  airlock session create --allow openai:POST:/v1/chat/completions --ttl 15m
  airlock session create --allow 'openai:GET:/v1/models/*' --format env > agent.env
  eval \"$(airlock session create --allow anthropic:POST:/v1/messages --format shell)\"")]
    Create(CreateArgs),
    /// List active sessions (--all adds ended ones), newest first.
    ///
    /// A table of id, state, time left, allowed/denied calls and labels;
    /// --format json (or --json) prints {"sessions":[...]} for scripts. The
    /// admin API answers a page at a time; every page is fetched, up to
    /// --limit sessions.
    #[command(after_help = "\
Examples:
  airlock session list
  airlock session list --all --format json
  airlock session list --all --limit 20")]
    List {
        /// Include expired and revoked sessions.
        #[arg(long)]
        all: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
        /// Print JSON instead of a table (the same as --format json).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Stop after this many sessions (the newest ones).
        #[arg(long, value_name = "N", value_parser = at_least_one)]
        limit: Option<u64>,
        /// Sessions asked for per admin API call (1-10000; tests use small
        /// pages).
        #[arg(
            long,
            hide = true,
            value_name = "N",
            default_value_t = airlock_admin::SESSION_PAGE_DEFAULT,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(airlock_admin::SESSION_PAGE_MAX))
        )]
        page_size: u32,
    },
    /// Show one session (never its token): as the admin API's JSON, or
    /// with --format text as lines for people.
    #[command(after_help = "\
Examples:
  airlock session show ses_...
  airlock session show ses_... --format text")]
    Show {
        /// Session id (ses_...).
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ShowFormat::Json)]
        format: ShowFormat,
        /// Print JSON (the default; the same as --format json, as for the
        /// other commands that print JSON).
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Revoke sessions by id (ses_...) or token (sess_...), or every active
    /// session with given labels.
    ///
    /// The next call with a revoked session's token gets 401. With several,
    /// each is revoked in turn; one the server does not know (exit 2) or
    /// fails to revoke (exit 1) is named on stderr and the others are still
    /// revoked.
    #[command(after_help = "\
Examples:
  airlock session revoke ses_...
  airlock session revoke ses_A... ses_B...
  airlock session revoke \"$OPENAI_API_KEY\"
  airlock session revoke --label agent=a1")]
    Revoke {
        /// Session ids or tokens.
        #[arg(
            value_name = "ID_OR_TOKEN",
            required_unless_present = "labels",
            conflicts_with = "labels"
        )]
        ids_or_tokens: Vec<String>,
        /// Revoke every active session with this label key=value
        /// (repeatable: sessions with all of them).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
}

/// Options of `session create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the session may do.
    #[command(flatten)]
    pub session: SessionArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    pub format: OutputFormat,
    /// Print JSON (the default; the same as --format json, as for the
    /// other commands that print JSON).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
}

/// Options of `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// What the session may do.
    #[command(flatten)]
    pub session: SessionArgs,
    /// Start CMD with only the session's variables and the basic ones
    /// (PATH, HOME, USER, LOGNAME, SHELL, TERM, LANG, LC_*, TZ, TMPDIR):
    /// nothing else of this shell's (a GITHUB_TOKEN, cloud keys) reaches it.
    #[arg(long)]
    pub clean_env: bool,
    /// With --clean-env, also pass this variable of this shell's on
    /// (repeatable).
    #[arg(long = "pass-env", value_name = "NAME", requires = "clean_env")]
    pub pass_env: Vec<String>,
    /// The command to run and its arguments (put them after `--`).
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    pub command: Vec<std::ffi::OsString>,
}

/// The session a command opens: scope, time to live, labels and limits
/// (shared by `session create` and `exec`).
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// A scope rule PROVIDER:METHODS:PATH, e.g. openai:POST:/v1/chat/completions
    /// or github:GET,HEAD:/repos/acme/** (repeatable).
    #[arg(long = "allow", value_name = "RULE", required = true)]
    pub allow: Vec<String>,
    /// Time to live: 90s, 15m, 2h, 1h30m (no fractions of a second)
    /// [default: 15m, or the server's sessions.max_ttl when that is
    /// shorter].
    // Hyphen values reach the duration parser, which says what is wrong
    // with `-5m` (clap would take it for an unknown flag).
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub ttl: Option<String>,
    /// A label key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Requests per minute.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_parser = rpm
    )]
    pub rpm: Option<u32>,
    /// Total requests over the session's life.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_parser = count
    )]
    pub max_requests: Option<u64>,
    /// Denied calls after which the session is revoked.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_parser = count
    )]
    pub max_denied: Option<u64>,
}

/// A whole number from 1 to `max`, or what is wrong with `text`.
fn whole_number(text: &str, max: u64) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {max}")),
    }
}

/// `session list --limit`: a whole number, at least 1.
fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number, at least 1".to_owned()),
    }
}

/// `--max-requests`, `--max-denied`: 1 to [`MAX_COUNT`].
fn count(text: &str) -> Result<u64, String> {
    whole_number(text, MAX_COUNT)
}

/// `--rpm`: 1 to [`MAX_RPM`].
fn rpm(text: &str) -> Result<u32, String> {
    let n = whole_number(text, u64::from(MAX_RPM))?;
    u32::try_from(n).map_err(|_| format!("must be a whole number from 1 to {MAX_RPM}"))
}

/// How `session list` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// An aligned table.
    Table,
    /// One {"sessions":[...]} document.
    Json,
}

/// How `session show` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    /// The admin API's JSON (the default).
    Json,
    /// One `key: value` line a field, for people.
    Text,
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
