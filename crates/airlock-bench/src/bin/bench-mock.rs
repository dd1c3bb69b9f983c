//! `bench-mock`: the mock provider of the benchmark (see
//! [`airlock_bench::mock`]). Prints `listening on http://ADDR` once bound,
//! then serves until SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use http::HeaderValue;

use airlock_bench::mock::{self, MockConfig};

/// A fast mock LLM provider for load benchmarks.
#[derive(Parser, Debug)]
#[command(name = "bench-mock")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Delay before every answer, unless the request says `?delay_ms=`.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Answer 401 unless `Authorization` is exactly this value.
    #[arg(long)]
    expect_auth: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let expect_auth = args
        .expect_auth
        .as_deref()
        .map(HeaderValue::from_str)
        .transpose()
        .context("--expect-auth is not a valid header value")?;
    let config = MockConfig {
        delay: Duration::from_millis(args.delay_ms),
        expect_auth,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let (listener, addr) = mock::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on http://{addr}")?;
        stdout.flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            () = mock::serve(listener, config) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })
}
