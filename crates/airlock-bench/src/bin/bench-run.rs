//! `bench-run`: runs the side-by-side load benchmark (direct, nginx,
//! airlock with audit on and off), prints the Markdown report and writes it
//! to `bench/results.md`. Usually started by `bench/run.sh`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;

use airlock_bench::report;
use airlock_bench::run::{self, Options};
use airlock_bench::sse::SseSpec;

/// Side-by-side load benchmark of airlock on loopback.
#[derive(Parser, Debug)]
// bench/run.sh passes its defaults (`--out`, the binaries) before the
// caller's arguments: the last occurrence of an option wins.
#[command(name = "bench-run", args_override_self = true)]
struct Args {
    /// Measured time of every load round (whole seconds: 5s, 1m).
    #[arg(long, default_value = "3s", value_parser = parse_seconds)]
    duration: Duration,
    /// Warm-up of every peer before a workload's first round (whole seconds).
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    warmup: Duration,
    /// Measured rounds per workload; the peers take turns in each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Concurrencies of the small JSON workload.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    json_concurrency: Vec<usize>,
    /// Concurrency of the 1 MiB upload and download.
    #[arg(long, default_value_t = 16)]
    body_concurrency: usize,
    /// Events per SSE stream.
    #[arg(long, default_value_t = 64)]
    sse_events: u32,
    /// Milliseconds between SSE events.
    #[arg(long, default_value_t = 2)]
    sse_interval_ms: u64,
    /// Measured SSE streams per peer.
    #[arg(long, default_value_t = 30)]
    sse_reps: usize,
    /// Tokens of the first-use measurement.
    #[arg(long, default_value_t = 200)]
    first_use: usize,
    /// Worker threads of the mock (default: one per core).
    #[arg(long)]
    mock_threads: Option<usize>,
    /// The airlock binary (default: `airlock` next to this program).
    #[arg(long)]
    airlock_bin: Option<PathBuf>,
    /// The mock binary (default: `bench-mock` next to this program).
    #[arg(long)]
    mock_bin: Option<PathBuf>,
    /// The wrk binary.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// The nginx binary (default: `nginx` on PATH or in /usr/sbin).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Leave nginx out.
    #[arg(long)]
    no_nginx: bool,
    /// A PostgreSQL database (emptied by the caller) for an extra peer,
    /// "airlock (PostgreSQL)": audit on, sessions and audit in PostgreSQL.
    #[arg(long, value_name = "URL")]
    postgres_url: Option<String>,
    /// The workspace root (default: where this crate was built from).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Where to write the report (default: ROOT/bench/results.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sse_events == 0 {
        bail!("--sse-events must be at least 1");
    }
    let here = std::env::current_exe()
        .context("locating this program")?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("this program has no directory"))?;
    let root = args.root.clone().unwrap_or_else(default_root);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench").join("results.md"));
    let nginx_bin = if args.no_nginx {
        None
    } else {
        args.nginx.clone().or_else(|| find_on_path("nginx"))
    };
    let opts = Options {
        root,
        airlock_bin: args.airlock_bin.unwrap_or_else(|| here.join("airlock")),
        mock_bin: args.mock_bin.unwrap_or_else(|| here.join("bench-mock")),
        wrk_bin: args.wrk,
        nginx_bin,
        postgres_url: args.postgres_url.clone(),
        duration: args.duration,
        warmup: args.warmup,
        rounds: usize::try_from(args.rounds).unwrap_or(1),
        json_concurrency: args.json_concurrency,
        body_concurrency: args.body_concurrency,
        sse: SseSpec {
            events: args.sse_events,
            interval_ms: args.sse_interval_ms,
        },
        sse_reps: args.sse_reps,
        first_use_tokens: args.first_use,
        mock_threads: args.mock_threads,
    };
    for (what, bin) in [
        ("airlock", &opts.airlock_bin),
        ("bench-mock", &opts.mock_bin),
    ] {
        if !bin.is_file() {
            bail!("{what} binary {} not found: build with `cargo build --release -p airlock -p airlock-bench`", bin.display());
        }
    }

    // The clients (SSE, first use) run on one thread so that they take as
    // little of the shared cores as possible; wrk is its own process.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let results = runtime.block_on(run::run(&opts))?;
    let text = report::render(&results);
    let mut stdout = std::io::stdout();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("[bench] wrote {}", out.display());
    Ok(())
}

/// `5s`, `2m`, `1m30s` or a plain number of seconds; at least one second.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let fail = || format!("{text:?} is not a whole number of seconds (e.g. 5s, 2m, 1m30s)");
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(fail()),
        };
        let n: u64 = number.parse().map_err(|_| fail())?;
        total += n * unit;
        number.clear();
    }
    if !number.is_empty() {
        total += number.parse::<u64>().map_err(|_| fail())?;
    }
    if total == 0 {
        return Err(fail());
    }
    Ok(Duration::from_secs(total))
}

fn default_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_seconds("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_seconds("7"), Ok(Duration::from_secs(7)));
        assert!(parse_seconds("500ms").is_err());
        assert!(parse_seconds("0s").is_err());
    }

    #[test]
    fn a_later_option_overrides_the_scripts_default() {
        let args = Args::try_parse_from([
            "bench-run",
            "--out",
            "a.md",
            "--rounds",
            "2",
            "--out",
            "b.md",
        ])
        .expect("parses");
        assert_eq!(args.out, Some(PathBuf::from("b.md")));
        assert_eq!(args.rounds, 2);
    }
}
