//! Driving `wrk`: a Lua script per run sets the method, body and headers,
//! and its `done()` hook prints one `BENCH_RESULT key=value ...` line with
//! the counts and the latency percentiles in microseconds.
//!
//! wrk is a closed-loop load tool: each connection sends its next request
//! when the previous answer is complete, and the latency of every request is
//! recorded (1 µs resolution). The percentiles are therefore service
//! latencies at the given concurrency.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::process::Command;

/// The body of the small JSON workload (a typical short chat request).
pub const SMALL_JSON: &str = r#"{"model":"bench","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say ok."}],"max_tokens":8,"stream":false}"#;

/// Size of the upload workload's body.
pub const UPLOAD_BYTES: usize = 1024 * 1024;

/// What each request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// `POST` with [`SMALL_JSON`].
    SmallJson,
    /// `POST` with [`UPLOAD_BYTES`] bytes.
    Upload,
    /// `GET`, no body.
    Get,
}

/// What one wrk run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Length of the run in microseconds.
    pub duration_us: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Answers with a status of 400 or more.
    pub status_errors: u64,
    /// Latency percentiles and mean, in microseconds.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub mean: f64,
    pub max: f64,
}

impl WrkResult {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        if self.duration_us == 0 {
            return 0.0;
        }
        self.requests as f64 * 1e6 / self.duration_us as f64
    }
}

/// The Lua script of one run.
pub fn script(payload: Payload, authorization: &str) -> String {
    let (method, body, content_type) = match payload {
        Payload::SmallJson => ("POST", format!("[[{SMALL_JSON}]]"), "application/json"),
        Payload::Upload => (
            "POST",
            format!("string.rep(\"a\", {UPLOAD_BYTES})"),
            "application/octet-stream",
        ),
        Payload::Get => ("GET", "nil".to_owned(), ""),
    };
    let mut out = format!(
        "wrk.method = \"{method}\"\n\
         wrk.body = {body}\n\
         wrk.headers[\"Authorization\"] = \"{authorization}\"\n"
    );
    if !content_type.is_empty() {
        out.push_str(&format!(
            "wrk.headers[\"Content-Type\"] = \"{content_type}\"\n"
        ));
    }
    out.push_str(DONE_HOOK);
    out
}

const DONE_HOOK: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d status=%d " ..
    "p50=%.1f p90=%.1f p99=%.1f p999=%.1f mean=%.1f max=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
"#;

/// Finds and parses the `BENCH_RESULT` line.
pub fn parse(output: &str) -> anyhow::Result<WrkResult> {
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_RESULT "))
        .ok_or_else(|| anyhow!("wrk printed no BENCH_RESULT line:\n{output}"))?;
    let mut result = WrkResult::default();
    for pair in line.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("bad field {pair:?}"))?;
        let int = || value.parse::<u64>().with_context(|| format!("field {key}"));
        let float = || value.parse::<f64>().with_context(|| format!("field {key}"));
        match key {
            "requests" => result.requests = int()?,
            "duration_us" => result.duration_us = int()?,
            "connect" | "read" | "write" | "timeout" => result.socket_errors += int()?,
            "status" => result.status_errors = int()?,
            "p50" => result.p50 = float()?,
            "p90" => result.p90 = float()?,
            "p99" => result.p99 = float()?,
            "p999" => result.p999 = float()?,
            "mean" => result.mean = float()?,
            "max" => result.max = float()?,
            _ => {}
        }
    }
    Ok(result)
}

/// How one wrk run is started.
#[derive(Clone, Debug)]
pub struct WrkRun<'a> {
    /// The `wrk` binary.
    pub bin: &'a Path,
    /// The script written by [`script`].
    pub script: &'a Path,
    /// Full URL.
    pub url: &'a str,
    /// Open connections.
    pub connections: usize,
    /// wrk threads (at most `connections`).
    pub threads: usize,
    /// Whole seconds.
    pub duration: Duration,
}

/// Runs wrk and parses its result.
pub async fn run(run: &WrkRun<'_>) -> anyhow::Result<WrkResult> {
    let seconds = run.duration.as_secs().max(1);
    let output = Command::new(run.bin)
        .arg("-t")
        .arg(run.threads.clamp(1, run.connections.max(1)).to_string())
        .arg("-c")
        .arg(run.connections.to_string())
        .arg("-d")
        .arg(format!("{seconds}s"))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(run.script)
        .arg(run.url)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", run.bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_done_line() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  2 threads\n\
                   BENCH_RESULT requests=1000 duration_us=2000000 connect=0 read=1 write=0 timeout=2 \
                   status=3 p50=50.0 p90=70.5 p99=120.0 p999=300.0 mean=55.2 max=900.0\n";
        let r = parse(out).unwrap();
        assert_eq!(r.requests, 1000);
        assert_eq!(r.socket_errors, 3);
        assert_eq!(r.status_errors, 3);
        assert_eq!(r.p999, 300.0);
        assert_eq!(r.rps(), 500.0);
        assert!(parse("nothing").is_err());
    }

    #[test]
    fn scripts_carry_body_and_header() {
        let s = script(Payload::SmallJson, "Bearer sess_x");
        assert!(s.contains("wrk.method = \"POST\""));
        assert!(s.contains("\"Bearer sess_x\""));
        assert!(s.contains(SMALL_JSON));
        assert!(script(Payload::Get, "x").contains("wrk.body = nil"));
    }
}
