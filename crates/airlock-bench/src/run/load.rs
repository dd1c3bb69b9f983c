//! The wrk workloads: a warm-up per peer, then rounds in which the peers
//! take turns, with CPU time and memory read from `/proc` around each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::{progress, Options, Peer};
use crate::audit_metrics::{self, AuditTotals};
use crate::procs;
use crate::results::{LoadFigures, LoadRow, LoadTable, Workload};
use crate::wrk::{self, WrkRun};

/// Runs `workload` through every peer: a warm-up each, then `rounds`
/// rounds in which the peers take turns, so that a disturbance of the
/// machine hits one round rather than one peer.
pub(super) async fn load(
    opts: &Options,
    tmp: &Path,
    list: &[Peer],
    workload: Workload,
    peak_note: &mut bool,
) -> anyhow::Result<LoadTable> {
    let mut states = Vec::new();
    for (i, peer) in list.iter().enumerate() {
        let script = tmp.join(format!("{}-{i}.lua", workload.slug()));
        std::fs::write(
            &script,
            wrk::script(workload.payload(), &peer.target.authorization),
        )
        .with_context(|| format!("writing {}", script.display()))?;
        states.push(PeerLoad {
            script,
            ..PeerLoad::default()
        });
    }
    for round in 0..=opts.rounds {
        for (peer, state) in list.iter().zip(&mut states) {
            if state.error.is_some() {
                continue;
            }
            let outcome = if round == 0 {
                warm_up(opts, peer, workload, state, peak_note).await
            } else {
                measure_round(opts, peer, workload, state).await
            };
            if let Err(err) = outcome {
                progress(&format!(
                    "{} {}: {err:#}",
                    workload.slug(),
                    peer.target.name
                ));
                state.error = Some(format!("{err:#}"));
            }
        }
    }
    let rows = list
        .iter()
        .zip(states)
        .map(|(peer, state)| {
            let outcome = state.finish(peer);
            if let Ok(f) = &outcome {
                progress(&format!(
                    "{:<13} {:<20} {:>8.0} req/s (±{:.0}%)  p50 {:>6.0} µs  p99 {:>6.0} µs  \
                     p99.9 {:>6.0} µs  errors {}",
                    workload.slug(),
                    peer.target.name,
                    f.rps,
                    f.rps_spread / 2.0,
                    f.p50,
                    f.p99,
                    f.p999,
                    f.socket_errors + f.status_errors,
                ));
            }
            LoadRow {
                peer: peer.target.name.clone(),
                outcome,
            }
        })
        .collect();
    Ok(LoadTable { workload, rows })
}

/// One peer's progress through the rounds of a workload.
#[derive(Default)]
struct PeerLoad {
    script: PathBuf,
    rounds: Vec<wrk::WrkResult>,
    cpu_ticks: u64,
    audit: Option<AuditTotals>,
    rss_before_kib: Option<u64>,
    peak_after_first_round_kib: Option<u64>,
    error: Option<String>,
}

impl PeerLoad {
    fn finish(self, peer: &Peer) -> Result<LoadFigures, String> {
        if let Some(err) = self.error {
            return Err(err);
        }
        let mut figures = LoadFigures::from_rounds(&self.rounds);
        figures.cpu_us_per_req = (figures.requests > 0).then(|| {
            self.cpu_ticks as f64 * 1e6 / procs::ticks_per_second() as f64 / figures.requests as f64
        });
        figures.rss_before_kib = self.rss_before_kib;
        figures.peak_after_first_round_kib = self
            .peak_after_first_round_kib
            .filter(|_| self.rounds.len() > 1);
        figures.peak_rss_kib = procs::status_kib(&procs::tree(peer.pid), "VmHWM");
        figures.audit = self.audit;
        Ok(figures)
    }
}

fn wrk_run<'a>(
    opts: &'a Options,
    url: &'a str,
    script: &'a Path,
    workload: Workload,
    duration: Duration,
) -> WrkRun<'a> {
    let connections = workload.connections();
    WrkRun {
        bin: &opts.wrk_bin,
        script,
        url,
        connections,
        threads: connections.min(std::thread::available_parallelism().map_or(1, usize::from)),
        duration,
    }
}

/// Resets the peak RSS, then runs the warm-up.
async fn warm_up(
    opts: &Options,
    peer: &Peer,
    workload: Workload,
    state: &mut PeerLoad,
    peak_note: &mut bool,
) -> anyhow::Result<()> {
    let pids = procs::tree(peer.pid);
    state.rss_before_kib = procs::status_kib(&pids, "VmRSS");
    if procs::reset_peak(&pids).is_err() {
        *peak_note = true;
    }
    let url = peer.target.url(workload.path());
    wrk::run(&wrk_run(opts, &url, &state.script, workload, opts.warmup))
        .await
        .context("warm-up")?;
    Ok(())
}

/// One measured round, with the CPU time the peer spent in it.
async fn measure_round(
    opts: &Options,
    peer: &Peer,
    workload: Workload,
    state: &mut PeerLoad,
) -> anyhow::Result<()> {
    let url = peer.target.url(workload.path());
    let pids = procs::tree(peer.pid);
    let audit_before = audit_totals(peer).await?;
    let before = procs::cpu_ticks(&pids);
    let result = wrk::run(&wrk_run(opts, &url, &state.script, workload, opts.duration)).await?;
    state.cpu_ticks += procs::cpu_ticks(&pids).saturating_sub(before);
    // Every answer wrk counted waited for its record's commit; calls wrk
    // cut off at the end may land in the next reading, which changes the
    // ratios (records per commit, time per commit) by a few calls at most.
    if let (Some(earlier), Some(later)) = (audit_before, audit_totals(peer).await?) {
        state
            .audit
            .get_or_insert_with(AuditTotals::default)
            .add(earlier.until(later));
    }
    state.rounds.push(result);
    if state.rounds.len() == 1 {
        state.peak_after_first_round_kib = procs::status_kib(&pids, "VmHWM");
    }
    Ok(())
}

/// The audit writer's totals of an airlock peer (`None` for other peers
/// and airlock with audit off).
async fn audit_totals(peer: &Peer) -> anyhow::Result<Option<AuditTotals>> {
    match &peer.metrics {
        Some(source) => audit_metrics::read(source)
            .await
            .context("reading the audit metrics"),
        None => Ok(None),
    }
}
