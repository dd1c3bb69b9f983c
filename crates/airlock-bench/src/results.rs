//! Everything one run measured, ready to render.

use std::time::Duration;

use crate::audit_metrics::AuditTotals;
use crate::first_use::FirstUseResult;
use crate::machine::Machine;
use crate::sse::{SseResult, SseSpec};
use crate::stats::Samples;
use crate::wrk::{Payload, WrkResult};

/// Name of the baseline peer.
pub const DIRECT: &str = "direct";
/// Name of the nginx peer.
pub const NGINX: &str = "nginx";
/// Name of the airlock peer with the audit trail on.
pub const AIRLOCK_AUDIT_ON: &str = "airlock (audit on)";
/// Name of the airlock peer with the audit trail off.
pub const AIRLOCK_AUDIT_OFF: &str = "airlock (audit off)";
/// airlock with audit on, on a PostgreSQL store.
pub const AIRLOCK_POSTGRES: &str = "airlock (PostgreSQL)";

/// A wrk workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Small JSON POST to `/v1/chat/completions`.
    Json {
        /// Connections.
        c: usize,
    },
    /// 1 MiB POST to `/upload`.
    Upload {
        /// Connections.
        c: usize,
    },
    /// 1 MiB GET of `/bytes`.
    Download {
        /// Connections.
        c: usize,
    },
}

impl Workload {
    /// Title of its table.
    pub fn title(self) -> String {
        match self {
            Self::Json { c } => format!("Small JSON POST, c={c}"),
            Self::Upload { c } => format!("1 MiB upload, c={c}"),
            Self::Download { c } => format!("1 MiB download, c={c}"),
        }
    }

    /// Short name for file names and progress lines.
    pub fn slug(self) -> String {
        match self {
            Self::Json { c } => format!("json-c{c}"),
            Self::Upload { c } => format!("upload-c{c}"),
            Self::Download { c } => format!("download-c{c}"),
        }
    }

    /// Connections.
    pub fn connections(self) -> usize {
        match self {
            Self::Json { c } | Self::Upload { c } | Self::Download { c } => c,
        }
    }

    /// Method and body.
    pub fn payload(self) -> Payload {
        match self {
            Self::Json { .. } => Payload::SmallJson,
            Self::Upload { .. } => Payload::Upload,
            Self::Download { .. } => Payload::Get,
        }
    }

    /// Path on the mock.
    pub fn path(self) -> &'static str {
        match self {
            Self::Json { .. } => "/v1/chat/completions",
            Self::Upload { .. } => "/upload",
            Self::Download { .. } => "/bytes?n=1048576",
        }
    }

    /// Bytes moved per request in the measured direction (for MiB/s).
    pub fn body_bytes(self) -> Option<u64> {
        match self {
            Self::Json { .. } => None,
            Self::Upload { .. } | Self::Download { .. } => Some(1024 * 1024),
        }
    }
}

/// A peer: one server the workloads run through.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Name in the tables.
    pub name: String,
    /// One line on what it is.
    pub description: String,
    /// `false` for `direct`, whose process figures are the mock's.
    pub own_process: bool,
    /// Resident memory after start-up, before any load.
    pub idle_rss_kib: Option<u64>,
}

/// What the rounds of one workload through one peer gave.
#[derive(Clone, Debug, Default)]
pub struct LoadFigures {
    /// Measured rounds.
    pub rounds: usize,
    /// Requests per second: the median round.
    pub rps: f64,
    /// Spread of the rounds' requests per second, (max − min) / median, in %.
    pub rps_spread: f64,
    /// Requests completed in all rounds.
    pub requests: u64,
    /// Connect, read, write and timeout errors in all rounds.
    pub socket_errors: u64,
    /// Answers with status ≥ 400 in all rounds.
    pub status_errors: u64,
    /// Latency percentiles in µs, each the median over the rounds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// CPU time of the peer's processes per completed request (all rounds).
    pub cpu_us_per_req: Option<f64>,
    /// Resident memory just before the workload.
    pub rss_before_kib: Option<u64>,
    /// Peak resident memory after the warm-up and the first round (only
    /// with two rounds or more).
    pub peak_after_first_round_kib: Option<u64>,
    /// Peak resident memory during the whole workload.
    pub peak_rss_kib: Option<u64>,
    /// The audit writer's commits in the measured rounds (airlock with
    /// audit on only).
    pub audit: Option<AuditTotals>,
}

impl LoadFigures {
    /// Counts summed, rates and percentiles the median of `rounds`.
    pub fn from_rounds(rounds: &[WrkResult]) -> Self {
        let median = |pick: fn(&WrkResult) -> f64| {
            Samples::new(rounds.iter().map(pick).collect()).percentile(50.0)
        };
        let rps = Samples::new(rounds.iter().map(WrkResult::rps).collect());
        let (min, max, mid) = (
            rps.percentile(0.0),
            rps.percentile(100.0),
            rps.percentile(50.0),
        );
        Self {
            rounds: rounds.len(),
            rps: mid,
            rps_spread: if mid > 0.0 {
                (max - min) * 100.0 / mid
            } else {
                f64::NAN
            },
            requests: rounds.iter().map(|r| r.requests).sum(),
            socket_errors: rounds.iter().map(|r| r.socket_errors).sum(),
            status_errors: rounds.iter().map(|r| r.status_errors).sum(),
            p50: median(|r| r.p50),
            p99: median(|r| r.p99),
            p999: median(|r| r.p999),
            ..Self::default()
        }
    }
}

/// One peer's row of a workload.
#[derive(Clone, Debug)]
pub struct LoadRow {
    /// Peer name.
    pub peer: String,
    /// Figures, or why there are none.
    pub outcome: Result<LoadFigures, String>,
}

/// One workload across the peers.
#[derive(Clone, Debug)]
pub struct LoadTable {
    /// The workload.
    pub workload: Workload,
    /// One row per peer.
    pub rows: Vec<LoadRow>,
}

impl LoadTable {
    /// The figures of `peer`, if it ran.
    pub fn figures(&self, peer: &str) -> Option<&LoadFigures> {
        self.rows
            .iter()
            .find(|r| r.peer == peer)
            .and_then(|r| r.outcome.as_ref().ok())
    }
}

/// How the run was set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Measured part of every wrk round.
    pub duration: Duration,
    /// Discarded warm-up before the first round.
    pub warmup: Duration,
    /// Rounds per workload and peer (peers take turns).
    pub rounds: usize,
    /// The streaming requests.
    pub sse: SseSpec,
    /// Streams per peer.
    pub sse_reps: usize,
    /// Tokens in the first-use measurement.
    pub first_use_tokens: usize,
    /// Mock worker threads (`None`: one per core).
    pub mock_threads: Option<usize>,
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// The set-up.
    pub settings: Settings,
    /// Load averages before and after the run.
    pub loadavg: (String, String),
    /// Share of all cores busy (%) while the peers sat idle before the load
    /// and after it: what other processes on the machine were using.
    pub background_busy: (Option<f64>, Option<f64>),
    /// Things the reader must know (a peer that did not run, a setting this
    /// build ignored, ...).
    pub notes: Vec<String>,
    /// The peers, in table order.
    pub peers: Vec<PeerInfo>,
    /// wrk workloads, in run order.
    pub loads: Vec<LoadTable>,
    /// Streaming results per peer.
    pub sse: Vec<(String, Result<SseResult, String>)>,
    /// First-use results per airlock peer.
    pub first_use: Vec<(String, Result<FirstUseResult, String>)>,
}

impl Results {
    /// The table of `workload`, if it ran.
    pub fn load(&self, workload: Workload) -> Option<&LoadTable> {
        self.loads.iter().find(|t| t.workload == workload)
    }

    /// The streaming result of `peer`, if it ran.
    pub fn sse_of(&self, peer: &str) -> Option<&SseResult> {
        self.sse
            .iter()
            .find(|(p, _)| p == peer)
            .and_then(|(_, r)| r.as_ref().ok())
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerInfo> {
        self.peers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(requests: u64, p50: f64) -> WrkResult {
        WrkResult {
            requests,
            duration_us: 1_000_000,
            status_errors: 1,
            p50,
            ..WrkResult::default()
        }
    }

    #[test]
    fn rounds_take_the_median() {
        let f = LoadFigures::from_rounds(&[round(100, 9.0), round(300, 30.0), round(200, 10.0)]);
        assert_eq!(f.rounds, 3);
        assert_eq!(f.rps, 200.0);
        assert_eq!(f.rps_spread, 100.0);
        assert_eq!(f.p50, 10.0);
        assert_eq!(f.requests, 600);
        assert_eq!(f.status_errors, 3);
    }
}
