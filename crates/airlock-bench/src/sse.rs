//! The streaming measurement: time to the first event and the gaps between
//! events of a `text/event-stream` answer, read over a kept-alive connection.
//!
//! The mock sends event `i` at `start + i * interval` on its own clock, so
//! every gap the client sees beyond `interval` is added by the path in
//! between (the client, the kernel and, for proxies, the proxy). The direct
//! peer gives the baseline of everything but the proxy.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::client::Conn;
use crate::peers::Target;
use crate::stats::Samples;

/// What to ask the mock for.
#[derive(Clone, Copy, Debug)]
pub struct SseSpec {
    /// Events per stream.
    pub events: u32,
    /// Milliseconds between events.
    pub interval_ms: u64,
}

impl SseSpec {
    /// The mock path.
    pub fn path(&self) -> String {
        format!(
            "/sse?events={}&interval_ms={}",
            self.events, self.interval_ms
        )
    }
}

/// Times of one stream, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// From sending the request to the end of the first event.
    pub first_event_us: f64,
    /// Between the ends of consecutive events.
    pub gaps_us: Vec<f64>,
}

/// All streams of one peer.
#[derive(Clone, Debug, Default)]
pub struct SseResult {
    /// Time to first event.
    pub first_event: Samples,
    /// Every gap of every stream.
    pub gaps: Samples,
    /// Streams that completed.
    pub streams: usize,
}

impl SseResult {
    /// Gathers the streams.
    pub fn from_streams(streams: &[Stream]) -> Self {
        Self {
            first_event: Samples::new(streams.iter().map(|s| s.first_event_us).collect()),
            gaps: Samples::new(
                streams
                    .iter()
                    .flat_map(|s| s.gaps_us.iter().copied())
                    .collect(),
            ),
            streams: streams.len(),
        }
    }
}

/// Reads one stream from `target` on `conn`.
pub async fn one_stream(conn: &mut Conn, target: &Target, spec: SseSpec) -> anyhow::Result<Stream> {
    let path = target.target(&spec.path());
    let sent = Instant::now();
    let response = conn
        .send(Method::GET, &path, Some(&target.authorization), None)
        .await
        .with_context(|| format!("GET {path} via {}", target.name))?;
    if response.status() != StatusCode::OK {
        bail!(
            "GET {path} via {} answered {}",
            target.name,
            response.status()
        );
    }
    let mut body = response.into_body();
    let mut ends: Vec<Instant> = Vec::with_capacity(spec.events as usize);
    let mut last_newline = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("reading the stream via {}", target.name))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        for &b in data.iter() {
            let newline = b == b'\n';
            if newline && last_newline {
                ends.push(now);
            }
            last_newline = newline && !last_newline;
        }
    }
    if ends.len() != spec.events as usize {
        bail!(
            "stream via {} had {} events, expected {}",
            target.name,
            ends.len(),
            spec.events
        );
    }
    let Some(first) = ends.first() else {
        bail!("stream via {} had no event", target.name);
    };
    Ok(Stream {
        first_event_us: micros(*first - sent),
        gaps_us: ends.windows(2).map(|w| micros(w[1] - w[0])).collect(),
    })
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
