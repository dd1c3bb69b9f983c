//! The Markdown report of a run.

use std::fmt::Write as _;

use crate::results::{LoadFigures, LoadTable, Results, DIRECT};
use crate::stats::Samples;
use crate::targets;

/// Renders the whole report.
pub fn render(results: &Results) -> String {
    let mut out = String::new();
    header(&mut out, results);
    idle(&mut out, results);
    for table in &results.loads {
        load_table(&mut out, results, table);
    }
    audit_commits(&mut out, results);
    sse(&mut out, results);
    first_use(&mut out, results);
    target_table(&mut out, results);
    out
}

fn header(out: &mut String, r: &Results) {
    let m = &r.machine;
    let s = &r.settings;
    let _ = writeln!(out, "# airlock load benchmark: results\n");
    let _ = writeln!(out, "Run {} on git `{}`.\n", m.date, m.git_rev);
    let _ = writeln!(out, "| machine | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} |", m.cpu);
    let _ = writeln!(out, "| cores | {} |", m.cores);
    let _ = writeln!(out, "| memory | {} MiB |", m.memory_mib);
    let _ = writeln!(out, "| OS, kernel | {}, {} |", m.os, m.kernel);
    let _ = writeln!(out, "| rustc | {} |", m.rustc);
    let _ = writeln!(out, "| load tool | {} |", m.wrk);
    let _ = writeln!(out, "| nginx | {} |", m.nginx);
    let _ = writeln!(out, "| niceness of the benchmark processes | {} |", m.nice);
    let _ = writeln!(
        out,
        "| load average before / after | {} / {} |",
        r.loadavg.0, r.loadavg.1
    );
    let _ = writeln!(
        out,
        "| CPU busy with peers idle, before / after | {} / {} |\n",
        percent(r.background_busy.0),
        percent(r.background_busy.1)
    );
    let _ = writeln!(
        out,
        "Every workload: a {}s warm-up per peer, then {} rounds of {}s in which the \
         peers take turns; req/s and each percentile are the median round, ± is half \
         the range of the rounds' req/s. All on loopback on this one machine (load \
         tool, mock and proxy share the cores). Streams: {} per peer, {} events {} ms \
         apart, the peers' turns shuffled each time round. First use: {} tokens. Mock threads: {}. The peers (not the mock) are \
         restarted before the 1 MiB workloads, so that their memory figures start \
         from an idle process.\n",
        s.warmup.as_secs(),
        s.rounds,
        s.duration.as_secs(),
        s.sse_reps,
        s.sse.events,
        s.sse.interval_ms,
        s.first_use_tokens,
        s.mock_threads
            .map_or_else(|| "one per core".to_owned(), |t| t.to_string()),
    );
    let _ = writeln!(out, "Peers:\n");
    for peer in &r.peers {
        let _ = writeln!(out, "- **{}**: {}", peer.name, peer.description);
    }
    out.push('\n');
    if !r.notes.is_empty() {
        let _ = writeln!(out, "Notes:\n");
        for note in &r.notes {
            let _ = writeln!(out, "- ⚠ {note}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Latencies are in µs. *Added* is the peer's percentile minus the direct \
         percentile of the same workload (a difference of percentiles). CPU is user + \
         system time of the peer's processes over the measured run divided by the \
         requests; for `direct` it is the mock's own (in parentheses). RSS is in MiB.\n"
    );
}

fn idle(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Memory at idle\n\n| peer | RSS after start-up |\n|---|---:|"
    );
    for peer in &r.peers {
        let value = mib(peer.idle_rss_kib);
        let value = if peer.own_process {
            value
        } else {
            format!("({value})")
        };
        let _ = writeln!(out, "| {} | {value} |", peer.name);
    }
    out.push('\n');
}

fn load_table(out: &mut String, r: &Results, table: &LoadTable) {
    let w = table.workload;
    let _ = writeln!(out, "## {}\n", w.title());
    let mib_s = w.body_bytes().is_some();
    out.push_str("| peer | req/s | ± |");
    if mib_s {
        out.push_str(" MiB/s |");
    }
    out.push_str(
        " p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | CPU µs/req | RSS before | peak RSS | errors |\n|---|---:|---:|",
    );
    if mib_s {
        out.push_str("---:|");
    }
    out.push_str("---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let direct = table.figures(DIRECT);
    for row in &table.rows {
        let own = r.peer(&row.peer).is_none_or(|p| p.own_process);
        match &row.outcome {
            Err(err) => {
                let _ = writeln!(out, "| {} | not measured: {} |", row.peer, one_line(err));
            }
            Ok(f) => load_row(out, &row.peer, f, direct, own, w.body_bytes()),
        }
    }
    out.push('\n');
}

fn load_row(
    out: &mut String,
    peer: &str,
    f: &LoadFigures,
    direct: Option<&LoadFigures>,
    own: bool,
    body_bytes: Option<u64>,
) {
    let _ = write!(
        out,
        "| {peer} | {:.0} | {:.0}% |",
        f.rps,
        f.rps_spread / 2.0
    );
    if let Some(bytes) = body_bytes {
        let _ = write!(out, " {:.0} |", f.rps * bytes as f64 / 1048576.0);
    }
    let added = |pick: fn(&LoadFigures) -> f64| match direct {
        Some(d) if peer != DIRECT => signed(pick(f) - pick(d)),
        _ => "—".to_owned(),
    };
    let paren = |s: String| if own { s } else { format!("({s})") };
    let errors = if f.socket_errors + f.status_errors == 0 {
        "0".to_owned()
    } else {
        format!("⚠ {} socket, {} status", f.socket_errors, f.status_errors)
    };
    let _ = writeln!(
        out,
        " {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {errors} |",
        f.p50,
        f.p99,
        f.p999,
        added(|x| x.p50),
        added(|x| x.p99),
        added(|x| x.p999),
        paren(
            f.cpu_us_per_req
                .map_or_else(|| "—".to_owned(), |c| format!("{c:.1}"))
        ),
        paren(mib(f.rss_before_kib)),
        paren(mib(f.peak_rss_kib)),
    );
}

/// The audit writer's commits during each workload, for the peers that
/// have one: where a call's wait for its record goes.
fn audit_commits(out: &mut String, r: &Results) {
    let rows: Vec<_> = r
        .loads
        .iter()
        .flat_map(|table| {
            table.rows.iter().filter_map(move |row| {
                let audit = row.outcome.as_ref().ok()?.audit?;
                Some((table.workload, &row.peer, audit))
            })
        })
        .filter(|(_, _, audit)| audit.commits > 0.0)
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Audit commits\n\n\
         From each airlock's own metrics over the measured rounds \
         (`airlock_audit_records_written_total`, `airlock_audit_commit_seconds`): \
         records per commit (the group commit's size) and the store's mean time \
         per commit, which every call waits for before its answer completes.\n\n\
         | workload | peer | commits | records per commit | commit µs (mean) |\n\
         |---|---|---:|---:|---:|"
    );
    for (workload, peer, audit) in rows {
        let _ = writeln!(
            out,
            "| {} | {peer} | {:.0} | {:.1} | {:.0} |",
            workload.title(),
            audit.commits,
            audit.records / audit.commits,
            audit.seconds * 1e6 / audit.commits,
        );
    }
    out.push('\n');
}

fn sse(out: &mut String, r: &Results) {
    if r.sse.is_empty() {
        return;
    }
    let s = &r.settings.sse;
    let _ = writeln!(
        out,
        "## SSE stream of {} events, {} ms apart\n\n\
         Time to first event: from sending the request to the end of the first event. \
         Gaps: between the ends of consecutive events (the mock's schedule is {} ms).\n\n\
         | peer | streams | first event p50 | p99 | added p50 | added p99 | gap mean | gap p99 | added gap mean | added gap p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        s.events, s.interval_ms, s.interval_ms
    );
    let direct = r.sse_of(DIRECT);
    for (peer, outcome) in &r.sse {
        let res = match outcome {
            Ok(res) => res,
            Err(err) => {
                let _ = writeln!(out, "| {peer} | not measured: {} |", one_line(err));
                continue;
            }
        };
        let added = |pick: fn(&crate::sse::SseResult) -> f64| match direct {
            Some(d) if peer != DIRECT => signed(pick(res) - pick(d)),
            _ => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {peer} | {} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} |",
            res.streams,
            res.first_event.percentile(50.0),
            res.first_event.percentile(99.0),
            added(|x| x.first_event.percentile(50.0)),
            added(|x| x.first_event.percentile(99.0)),
            res.gaps.mean(),
            res.gaps.percentile(99.0),
            added(|x| x.gaps.mean()),
            added(|x| x.gaps.percentile(99.0)),
        );
    }
    out.push('\n');
}

fn first_use(out: &mut String, r: &Results) {
    if r.first_use.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## First use of a token (cache miss) vs a known token\n\n\
         Sequential calls (small JSON POST, one kept-alive connection): each token's \
         first call, then its second. The sessions were created by a second airlock \
         process on the same database while the peer was stopped; started again (and \
         warmed up with a token of its own), it looks each token up in the store on \
         its first call.\n\n\
         | peer | tokens | first call p50 | p99 | known token p50 | p99 | first-use cost p50 | p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (peer, outcome) in &r.first_use {
        match outcome {
            Err(err) => {
                let _ = writeln!(out, "| {peer} | not measured: {} |", one_line(err));
            }
            Ok(res) => {
                let p = |s: &Samples, q: f64| s.percentile(q);
                let _ = writeln!(
                    out,
                    "| {peer} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    res.miss.len(),
                    p(&res.miss, 50.0),
                    p(&res.miss, 99.0),
                    p(&res.hit, 50.0),
                    p(&res.hit, 99.0),
                    signed(p(&res.miss, 50.0) - p(&res.hit, 50.0)),
                    signed(p(&res.miss, 99.0) - p(&res.hit, 99.0)),
                );
            }
        }
    }
    out.push('\n');
}

fn target_table(out: &mut String, r: &Results) {
    let rows = targets::evaluate(r);
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Targets\n\nReported, not asserted. MB are read as MiB.\n\n\
         | target | peer | measured | result |\n|---|---|---:|---|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.target,
            row.peer,
            row.measured,
            row.verdict.label()
        );
    }
    out.push('\n');
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.1}%"))
}

fn signed(v: f64) -> String {
    if v.is_nan() {
        "—".to_owned()
    } else if v >= 0.0 {
        format!("+{v:.0}")
    } else {
        format!("−{:.0}", -v)
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .replace('|', "\\|")
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::audit_metrics::AuditTotals;
    use crate::results::{LoadFigures, LoadRow, PeerInfo, Settings, Workload};
    use crate::results::{AIRLOCK_AUDIT_ON, NGINX};
    use crate::sse::SseSpec;
    use std::time::Duration;

    fn figures(rps: f64, p50: f64) -> LoadFigures {
        LoadFigures {
            rounds: 1,
            rps,
            p50,
            p99: p50 * 2.0,
            p999: p50 * 3.0,
            rss_before_kib: Some(10 * 1024),
            peak_rss_kib: Some(12 * 1024),
            ..LoadFigures::default()
        }
    }

    #[test]
    fn renders_tables_and_targets() {
        let peer = |name: &str| PeerInfo {
            name: name.to_owned(),
            description: "x".to_owned(),
            own_process: name != DIRECT,
            idle_rss_kib: Some(8 * 1024),
        };
        let row = |name: &str, f: LoadFigures| LoadRow {
            peer: name.to_owned(),
            outcome: Ok(f),
        };
        let results = Results {
            machine: crate::machine::Machine::default(),
            settings: Settings {
                duration: Duration::from_secs(3),
                warmup: Duration::from_secs(1),
                rounds: 1,
                sse: SseSpec {
                    events: 4,
                    interval_ms: 2,
                },
                sse_reps: 1,
                first_use_tokens: 1,
                mock_threads: None,
            },
            loadavg: ("0 0 0".to_owned(), "0 0 0".to_owned()),
            background_busy: (Some(1.0), None),
            notes: vec!["a note".to_owned()],
            peers: vec![peer(DIRECT), peer(NGINX), peer(AIRLOCK_AUDIT_ON)],
            loads: vec![
                LoadTable {
                    workload: Workload::Json { c: 1 },
                    rows: vec![
                        row(DIRECT, figures(1000.0, 10.0)),
                        row(NGINX, figures(900.0, 30.0)),
                        row(
                            AIRLOCK_AUDIT_ON,
                            LoadFigures {
                                audit: Some(AuditTotals {
                                    records: 3000.0,
                                    commits: 1000.0,
                                    seconds: 0.035,
                                }),
                                ..figures(800.0, 40.0)
                            },
                        ),
                    ],
                },
                LoadTable {
                    workload: Workload::Json { c: 64 },
                    rows: vec![
                        row(NGINX, figures(1000.0, 10.0)),
                        LoadRow {
                            peer: AIRLOCK_AUDIT_ON.to_owned(),
                            outcome: Err("wrk failed | badly".to_owned()),
                        },
                    ],
                },
            ],
            sse: Vec::new(),
            first_use: Vec::new(),
        };
        let text = render(&results);
        assert!(text.contains("## Small JSON POST, c=1"), "{text}");
        assert!(
            text.contains("| airlock (audit on) | 800 | 0% | 40 | 80 | 120 | +30 |"),
            "{text}"
        );
        assert!(
            text.contains("not measured: wrk failed \\| badly"),
            "{text}"
        );
        assert!(
            text.contains(
                "| added latency at c=1, p50 ≤ 50 µs | airlock (audit on) | 30.00 µs | met |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| throughput at c=64 ≥ 0.9× nginx | airlock (audit on) | — | not measured |"
            ),
            "{text}"
        );
        assert!(text.contains("- ⚠ a note"), "{text}");
        assert!(
            text.contains(
                "| workload | peer | commits | records per commit | commit µs (mean) |\n\
                 |---|---|---:|---:|---:|\n\
                 | Small JSON POST, c=1 | airlock (audit on) | 1000 | 3.0 | 35 |\n"
            ),
            "{text}"
        );
        // Peers without an audit writer have no row there.
        assert!(!text.contains("| Small JSON POST, c=1 | nginx |"), "{text}");
    }

    #[test]
    fn signs() {
        assert_eq!(signed(12.4), "+12");
        assert_eq!(signed(-3.6), "−4");
        assert_eq!(signed(f64::NAN), "—");
        assert_eq!(mib(Some(2048)), "2.0");
        assert_eq!(one_line("a|b\nc"), "a\\|b");
    }
}
