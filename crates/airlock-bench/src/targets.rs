//! The targets, checked against a run. They are reported, never
//! asserted: a miss does not fail the benchmark.

use crate::results::{
    LoadFigures, Results, Workload, AIRLOCK_AUDIT_OFF, AIRLOCK_AUDIT_ON, DIRECT, NGINX,
};

/// Outcome of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the target.
    Met,
    /// Outside it.
    NotMet,
    /// A figure it needs is missing.
    NotMeasured,
    /// The proxy looked faster than the direct call: the difference is
    /// noise, not a measurement.
    Inconclusive,
}

impl Verdict {
    /// Table text.
    pub fn label(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::NotMet => "**not met**",
            Self::NotMeasured => "not measured",
            Self::Inconclusive => "inconclusive (negative: noise)",
        }
    }
}

/// One target for one peer.
#[derive(Clone, Debug)]
pub struct TargetRow {
    /// The target as stated.
    pub target: String,
    /// The airlock peer.
    pub peer: String,
    /// The measured figure.
    pub measured: String,
    /// Whether it was met.
    pub verdict: Verdict,
}

const KIB_PER_MIB: f64 = 1024.0;
/// Growth of the peak RSS allowed after the first round of a 1 MiB workload.
const BODY_SLACK_MIB: f64 = 1.0;

/// Checks every target for each airlock peer that ran.
pub fn evaluate(results: &Results) -> Vec<TargetRow> {
    let mut rows = Vec::new();
    for peer in [AIRLOCK_AUDIT_ON, AIRLOCK_AUDIT_OFF] {
        if results.peer(peer).is_none() {
            continue;
        }
        let mut add =
            |target: &str, measured: Option<f64>, limit: f64, unit: &str, at_least: bool| {
                let (measured, verdict) = match measured {
                    Some(v) if v.is_finite() && v < 0.0 && target.contains("added") => {
                        (format!("{v:.2}{unit}"), Verdict::Inconclusive)
                    }
                    Some(v) if v.is_finite() => {
                        let met = if at_least { v >= limit } else { v <= limit };
                        (
                            format!("{v:.2}{unit}"),
                            if met { Verdict::Met } else { Verdict::NotMet },
                        )
                    }
                    _ => ("—".to_owned(), Verdict::NotMeasured),
                };
                rows.push(TargetRow {
                    target: target.to_owned(),
                    peer: peer.to_owned(),
                    measured,
                    verdict,
                });
            };

        let c64 = Workload::Json { c: 64 };
        let ratio = rps(results, c64, peer)
            .zip(rps(results, c64, NGINX))
            .map(|(a, n)| a / n);
        add("throughput at c=64 ≥ 0.9× nginx", ratio, 0.9, "×", true);

        let c1 = Workload::Json { c: 1 };
        let added = |pick: fn(&LoadFigures) -> f64| {
            let table = results.load(c1)?;
            Some(pick(table.figures(peer)?) - pick(table.figures(DIRECT)?))
        };
        add(
            "added latency at c=1, p50 ≤ 50 µs",
            added(|w| w.p50),
            50.0,
            " µs",
            false,
        );
        add(
            "added latency at c=1, p99 ≤ 150 µs",
            added(|w| w.p99),
            150.0,
            " µs",
            false,
        );

        let ttfe = results
            .sse_of(peer)
            .zip(results.sse_of(DIRECT))
            .map(|(p, d)| p.first_event.percentile(50.0) - d.first_event.percentile(50.0));
        add(
            "SSE added time to first event (p50) ≤ 100 µs",
            ttfe,
            100.0,
            " µs",
            false,
        );

        let idle = results
            .peer(peer)
            .and_then(|p| p.idle_rss_kib)
            .map(|k| k as f64 / KIB_PER_MIB);
        add("idle RSS ≤ 20 MB", idle, 20.0, " MiB", false);

        let c256 = results
            .load(Workload::Json { c: 256 })
            .and_then(|t| t.figures(peer))
            .and_then(|f| f.peak_rss_kib)
            .map(|k| k as f64 / KIB_PER_MIB);
        add("peak RSS at c=256 ≤ 60 MB", c256, 60.0, " MiB", false);

        for workload in results.loads.iter().map(|t| t.workload) {
            if workload.body_bytes().is_none() {
                continue;
            }
            let figures = results.load(workload).and_then(|t| t.figures(peer));
            // Gigabytes move during the rounds after the first: memory
            // bounded by concurrency has reached its peak by then.
            let later = figures
                .and_then(|f| {
                    Some(
                        f.peak_rss_kib?
                            .saturating_sub(f.peak_after_first_round_kib?),
                    )
                })
                .map(|k| k as f64 / KIB_PER_MIB);
            add(
                &format!(
                    "{}: memory bounded by concurrency (peak RSS growth after the first round ≤ {BODY_SLACK_MIB} MiB)",
                    workload.title()
                ),
                later,
                BODY_SLACK_MIB,
                " MiB",
                false,
            );
            let c = workload.connections();
            let per_connection = figures
                .and_then(|f| Some(f.peak_rss_kib?.saturating_sub(f.rss_before_kib?)))
                .map(|k| k as f64 / KIB_PER_MIB / c as f64);
            add(
                &format!(
                    "{}: RSS growth per connection < one body (1 MiB)",
                    workload.title()
                ),
                per_connection,
                1.0,
                " MiB",
                false,
            );
        }
    }
    rows
}

fn rps(results: &Results, workload: Workload, peer: &str) -> Option<f64> {
    results
        .load(workload)?
        .figures(peer)
        .map(|f| f.rps)
        .filter(|r| *r > 0.0)
}
