//! The orchestration: start the peers, check them, run every workload
//! through every peer back to back, and gather the results.
//!
//! - `start`: the line-up of peers in front of the mock.
//! - `load`: the wrk workloads in rounds.

mod load;
mod start;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::audit_metrics::MetricsSource;
use crate::client::{self, Conn};
use crate::first_use;
use crate::machine::Machine;
use crate::peers::{self, Target};
use crate::procs;
use crate::results::{PeerInfo, Results, Settings, Workload};
use crate::sse::{self, SseResult, SseSpec, Stream};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The workspace (for `git rev-parse`).
    pub root: PathBuf,
    /// The release `airlock` binary.
    pub airlock_bin: PathBuf,
    /// The `bench-mock` binary.
    pub mock_bin: PathBuf,
    /// The `wrk` binary.
    pub wrk_bin: PathBuf,
    /// The `nginx` binary, `None` to leave nginx out.
    pub nginx_bin: Option<PathBuf>,
    /// A database for the "airlock (PostgreSQL)" peer, `None` to leave it out.
    pub postgres_url: Option<String>,
    /// Measured part of each wrk run (whole seconds).
    pub duration: Duration,
    /// Warm-up before the first round (whole seconds).
    pub warmup: Duration,
    /// Measured rounds per workload and peer.
    pub rounds: usize,
    /// Concurrencies of the small JSON workload.
    pub json_concurrency: Vec<usize>,
    /// Concurrency of the 1 MiB workloads.
    pub body_concurrency: usize,
    /// The streams.
    pub sse: SseSpec,
    /// Streams per peer.
    pub sse_reps: usize,
    /// Tokens of the first-use measurement.
    pub first_use_tokens: usize,
    /// Mock worker threads (`None`: one per core).
    pub mock_threads: Option<usize>,
}

/// A peer while the run goes on.
struct Peer {
    target: Target,
    /// Root of its process tree (the mock for `direct`).
    pid: u32,
    info: PeerInfo,
    /// An airlock's metrics, read around each measured round.
    metrics: Option<MetricsSource>,
}

/// Background CPU use (% of all cores) above which the report warns.
const BUSY_NOTE_PERCENT: f64 = 5.0;

/// Streams per peer before the measured ones.
const SSE_WARMUP: usize = 3;

/// Runs everything. Progress goes to stderr.
///
/// Phase one (small JSON at each concurrency, SSE, first use) and phase two
/// (1 MiB bodies) run on freshly started peers, so that the memory figures
/// of the 1 MiB workloads start from an idle process.
pub async fn run(opts: &Options) -> anyhow::Result<Results> {
    let load_before = procs::loadavg();
    let machine = Machine::collect(
        &opts.root,
        &opts.wrk_bin,
        opts.nginx_bin.as_deref().unwrap_or(Path::new("nginx")),
    );
    let tmp = tempfile::Builder::new()
        .prefix("airlock-bench-")
        .tempdir()
        .context("creating the temporary directory")?;
    let mut notes = Vec::new();

    progress("starting the mock provider");
    let mock = peers::start_mock(&opts.mock_bin, opts.mock_threads)?;

    let phase_one = tmp.path().join("phase-1");
    let mut lineup = start::start(opts, &phase_one, &mock, &machine.nginx, &mut notes).await?;
    // Let start-up allocations settle, then read the idle size; meanwhile
    // see how busy the machine is without our load.
    let busy_before = procs::machine_busy(Duration::from_secs(2)).await;
    for peer in &mut lineup.list {
        peer.info.idle_rss_kib = procs::status_kib(&procs::tree(peer.pid), "VmRSS");
    }
    let mut peak_note = false;
    let mut loads = Vec::new();
    for &c in &opts.json_concurrency {
        let workload = Workload::Json { c };
        loads.push(load::load(opts, tmp.path(), &lineup.list, workload, &mut peak_note).await?);
    }

    progress("SSE streams");
    let sse = sse_all(&lineup.list, opts.sse, opts.sse_reps).await;

    let mut first = Vec::new();
    for (name, airlock) in &mut lineup.airlocks {
        let Some(peer) = lineup.list.iter().find(|p| p.target.name == *name) else {
            continue;
        };
        progress(&format!(
            "first use of {} tokens via {name}",
            opts.first_use_tokens
        ));
        let outcome = first_use_one(opts, airlock, peer).await;
        first.push(((*name).to_owned(), outcome.map_err(|e| format!("{e:#}"))));
    }
    let peer_infos: Vec<PeerInfo> = lineup.list.iter().map(|p| p.info.clone()).collect();
    drop(lineup);

    progress("restarting the peers for the 1 MiB workloads");
    let phase_two = tmp.path().join("phase-2");
    let lineup = start::start(opts, &phase_two, &mock, &machine.nginx, &mut notes).await?;
    let c = opts.body_concurrency;
    for workload in [Workload::Upload { c }, Workload::Download { c }] {
        loads.push(load::load(opts, tmp.path(), &lineup.list, workload, &mut peak_note).await?);
    }
    if peak_note {
        notes.push(
            "the kernel refused to reset peak RSS (/proc/PID/clear_refs): peak RSS is the \
             process's peak since start, not per workload"
                .to_owned(),
        );
    }

    let busy_after = procs::machine_busy(Duration::from_secs(2)).await;
    let load_after = procs::loadavg();
    drop(lineup);
    drop(mock);
    for (when, busy) in [("before", busy_before), ("after", busy_after)] {
        if let Some(busy) = busy.filter(|b| *b > BUSY_NOTE_PERCENT) {
            notes.push(format!(
                "other processes kept {busy:.0}% of the machine's CPU busy {when} the load \
                 (peers idle): figures are noisier than on a quiet machine"
            ));
        }
    }
    Ok(Results {
        machine,
        settings: Settings {
            duration: opts.duration,
            warmup: opts.warmup,
            rounds: opts.rounds,
            sse: opts.sse,
            sse_reps: opts.sse_reps,
            first_use_tokens: opts.first_use_tokens,
            mock_threads: opts.mock_threads,
        },
        loadavg: (load_before, load_after),
        background_busy: (busy_before, busy_after),
        notes,
        peers: peer_infos,
        loads,
        sse,
        first_use: first,
    })
}

/// Streams through every peer, taking turns, after a short warm-up. The
/// order of the turns is shuffled each repetition: a stream's first event
/// comes sooner when the stream before it ran the same code (the airlock
/// peers share one binary, so the second of two in a row finds its code in
/// the CPU's caches), and a fixed order gave that edge to the same peer
/// every time (measured: whichever airlock peer came second was 50–110 µs
/// faster to its first event).
async fn sse_all(
    list: &[Peer],
    spec: SseSpec,
    reps: usize,
) -> Vec<(String, Result<SseResult, String>)> {
    let mut conns = Vec::new();
    for peer in list {
        conns.push(
            Conn::open(peer.target.addr)
                .await
                .map_err(|e| format!("{e:#}")),
        );
    }
    let mut streams: Vec<Vec<Stream>> = vec![Vec::new(); list.len()];
    for rep in 0..SSE_WARMUP + reps {
        for i in turn_order(rep, list.len()) {
            let peer = &list[i];
            let Some(Ok(conn)) = conns.get_mut(i) else {
                continue;
            };
            match sse::one_stream(conn, &peer.target, spec).await {
                Ok(stream) if rep >= SSE_WARMUP => streams[i].push(stream),
                Ok(_) => {}
                Err(err) => conns[i] = Err(format!("{err:#}")),
            }
        }
    }
    list.iter()
        .zip(conns)
        .zip(streams)
        .map(|((peer, conn), streams)| {
            let outcome = conn.map(|_| SseResult::from_streams(&streams));
            (peer.target.name.clone(), outcome)
        })
        .collect()
}

/// The order in which `peers` peers take their turn in repetition `rep`: a
/// shuffle, the same for the same `rep` in every run.
fn turn_order(rep: usize, peers: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..peers).collect();
    fastrand::Rng::with_seed(rep as u64).shuffle(&mut order);
    order
}

/// Stops the measured peer (a SQLite store takes one server at a time),
/// creates the tokens with a second process on its store, then starts the
/// peer again, warms it up with a token of its own and measures.
async fn first_use_one(
    opts: &Options,
    airlock: &mut peers::Airlock,
    peer: &Peer,
) -> anyhow::Result<first_use::FirstUseResult> {
    airlock.proc.stop();
    let mut tokens = first_use::tokens_from_second_process(
        &opts.airlock_bin,
        &airlock.config_path,
        &airlock.admin_token,
        opts.first_use_tokens + 1,
    )
    .await?;
    let (mut proc, urls) = peers::spawn_airlock(
        &opts.airlock_bin,
        &airlock.config_path,
        &airlock.admin_token,
    )
    .context("starting the measured airlock again")?;
    let target = Target {
        addr: client::addr_of(urls.first().map_or("", String::as_str))?,
        ..peer.target.clone()
    };
    // Its first call opens the upstream connection: not part of the figure.
    let warm_up = tokens.split_off(opts.first_use_tokens);
    first_use::measure(&target, &warm_up).await?;
    let measured = first_use::measure(&target, &tokens).await;
    proc.stop();
    measured
}

fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

#[cfg(test)]
mod tests {
    use super::turn_order;

    #[test]
    fn turns_are_shuffled_permutations_repeatable_by_repetition() {
        let orders: Vec<Vec<usize>> = (0..40).map(|rep| turn_order(rep, 4)).collect();
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3]);
        }
        // Each peer follows another peer, not always the same one.
        for peer in 0..4 {
            let before: std::collections::BTreeSet<usize> = orders
                .iter()
                .filter_map(|o| {
                    let at = o.iter().position(|p| *p == peer)?;
                    at.checked_sub(1).map(|b| o[b])
                })
                .collect();
            assert!(before.len() >= 2, "peer {peer} follows only {before:?}");
        }
        assert_eq!(turn_order(7, 4), turn_order(7, 4));
        assert!(turn_order(3, 0).is_empty());
    }
}
