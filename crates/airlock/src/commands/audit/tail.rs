//! `airlock audit tail`: follows the audit trail in the store, printing new
//! records as JSON lines, like `tail -f`.
//!
//! Each chain (one per writing process) is followed from the last seq seen;
//! a chain that appears later (a replica started) is followed from its
//! start. Within each poll the chains are interleaved by time, each in seq
//! order, so that what is printed verifies as a file.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use airlock_core::audit::AuditRecord;
use airlock_store::{take_oldest_first, take_oldest_first_by, AuditQuery, Store};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

/// How often the store (or the admin API) is asked for new records.
pub(super) const POLL_EVERY: Duration = Duration::from_millis(200);
/// Records read per query (or admin API call).
pub(super) const PAGE: u32 = 1_000;

/// Runs `audit tail` until SIGINT/SIGTERM, or until stdout is closed
/// ([`crate::output::StdoutClosed`], a quiet end).
pub async fn run(
    config: &Config,
    session: Option<String>,
    lines: usize,
) -> anyhow::Result<ExitCode> {
    let store = super::open_store(config).await?;
    let result = match super::check_session_known(store.as_ref(), session.as_deref()).await {
        Ok(()) => follow(store.as_ref(), session, lines).await,
        Err(e) => Err(e),
    };
    store.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// Last seq seen, per chain.
type Cursors = BTreeMap<u32, u64>;

/// Runs `work` until it ends or SIGINT/SIGTERM arrives (a quiet end).
pub(super) async fn until_interrupted(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = interrupt.recv() => Ok(()),
        _ = terminate.recv() => Ok(()),
    }
}

async fn follow(store: &dyn Store, session: Option<String>, lines: usize) -> anyhow::Result<()> {
    until_interrupted(async {
        let mut cursors: Cursors = store
            .audit_heads()
            .await?
            .iter()
            .map(|head| (head.chain, head.seq))
            .collect();
        if lines > 0 {
            let last = last_records(store, session.as_deref(), &cursors, lines).await?;
            print_lines(last.iter().map(|(_, line)| line.as_str()))?;
        }
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            if crate::output::stdout_gone() {
                return Ok(());
            }
            let new = poll(store, session.as_deref(), &mut cursors).await?;
            print(&new)?;
        }
    })
    .await
}

/// Writes records as JSON lines.
fn print(records: &[AuditRecord]) -> std::io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = records.iter().map(AuditRecord::to_json).collect();
    print_lines(lines.iter().map(String::as_str))
}

/// Writes JSON lines. Once stdout is closed this fails with
/// [`crate::output::StdoutClosed`], which ends `tail` quietly.
pub(super) fn print_lines<'a>(lines: impl Iterator<Item = &'a str>) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(crate::output::stdout());
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// A record's time, chain and seq (the output interleaves chains by the
/// first two; within a chain the order is the seq's).
type Key = (i64, u32, u64);

/// The last `n` records (of `session`, if given) up to the cursors, as
/// JSON lines: the chains interleaved oldest first, each in seq order (so
/// that the output verifies as a file); at most `n` lines a chain are held
/// (a line is a fraction of a decoded record's size). Without a session,
/// each chain is read from `n` records before its head only.
async fn last_records(
    store: &dyn Store,
    session: Option<&str>,
    cursors: &Cursors,
    n: usize,
) -> anyhow::Result<Vec<(Key, String)>> {
    let mut chains = Vec::with_capacity(cursors.len());
    for (&chain, &head) in cursors {
        let mut kept: VecDeque<(Key, String)> = VecDeque::with_capacity(n.min(PAGE as usize));
        // Without a session filter seqs have no gaps: start n before the head.
        // With one, read the chain and keep the last n.
        let mut after_seq = match session {
            None => head.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX)),
            Some(_) => 0,
        };
        loop {
            let page = store
                .audit_records(&AuditQuery {
                    session: session.map(str::to_owned),
                    chain: Some(chain),
                    after_seq,
                    limit: PAGE,
                    ..AuditQuery::default()
                })
                .await?;
            let full = page.len() == PAGE as usize;
            let mut past_head = false;
            for record in page {
                after_seq = record.seq;
                if record.seq > head {
                    // Written after tail started: the follow loop prints it.
                    past_head = true;
                    break;
                }
                if kept.len() == n {
                    kept.pop_front();
                }
                kept.push_back(((record.ts_ms, record.chain, record.seq), record.to_json()));
            }
            if !full || past_head {
                break;
            }
        }
        chains.push(kept);
    }
    let mut all = oldest_first(chains);
    let skip = all.len().saturating_sub(n);
    all.drain(..skip);
    Ok(all)
}

/// The lines of `chains` (each in seq order), the chains interleaved by
/// time, each still in seq order: a record whose call ended before that of
/// the record before it on its chain (its `ts` is earlier) still comes
/// after it.
fn oldest_first(mut chains: Vec<VecDeque<(Key, String)>>) -> Vec<(Key, String)> {
    take_oldest_first_by(&mut chains, usize::MAX, |((ts, chain, _), _)| (*ts, *chain))
}

/// Records written since the cursors, which it advances; a chain not seen
/// before is read from its start. The chains interleaved oldest first, each
/// in seq order (`take_oldest_first`).
async fn poll(
    store: &dyn Store,
    session: Option<&str>,
    cursors: &mut Cursors,
) -> anyhow::Result<Vec<AuditRecord>> {
    let mut chains = Vec::new();
    for head in store.audit_heads().await? {
        let cursor = cursors.entry(head.chain).or_insert(0);
        if head.seq <= *cursor {
            continue;
        }
        let read_up_to = *cursor;
        let mut new = VecDeque::new();
        loop {
            let page = store
                .audit_records(&AuditQuery {
                    session: session.map(str::to_owned),
                    chain: Some(head.chain),
                    after_seq: *cursor,
                    limit: PAGE,
                    ..AuditQuery::default()
                })
                .await?;
            let full = page.len() == PAGE as usize;
            if let Some(last) = page.last() {
                *cursor = last.seq;
            }
            new.extend(page);
            if !full {
                break;
            }
        }
        // Seqs jump only where records were pruned before they were read
        // (or, with a session, at other sessions' records).
        let jumped = new
            .front()
            .is_some_and(|first| read_up_to > 0 && first.seq > read_up_to + 1);
        if jumped && session.is_none() {
            report_pruned(store, head.chain, read_up_to).await?;
        }
        // Every record up to the head was committed when the head was read:
        // records of other sessions up to it need not be read again.
        *cursor = (*cursor).max(head.seq);
        chains.push(new);
    }
    Ok(take_oldest_first(&mut chains, usize::MAX))
}

/// Says on stderr that `chain`'s records after `read_up_to` up to its
/// floor were pruned (`audit prune`) before this follower read them.
async fn report_pruned(store: &dyn Store, chain: u32, read_up_to: u64) -> anyhow::Result<()> {
    let floors = store.audit_floors().await?;
    if let Some(floor) = floors
        .iter()
        .find(|f| f.chain == chain && f.seq > read_up_to)
    {
        crate::output::error_line(format_args!(
            "chain {chain}: records {}–{} were pruned (`airlock audit prune`) before they were \
             read; following on from record {}",
            read_up_to + 1,
            floor.seq,
            floor.seq + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_interleaved_by_time_each_in_seq_order() {
        let line = |ts: i64, chain: u32, seq: u64| ((ts, chain, seq), format!("{chain}.{seq}"));
        // Chain 1's seq 2 ended before its seq 1 (seqs are given at commit).
        let chains = vec![
            VecDeque::from([line(5, 1, 1), line(3, 1, 2), line(9, 1, 3)]),
            VecDeque::from([line(4, 2, 1), line(6, 2, 2)]),
        ];
        let merged: Vec<String> = oldest_first(chains).into_iter().map(|(_, l)| l).collect();
        assert_eq!(merged, ["2.1", "1.1", "1.2", "2.2", "1.3"]);
    }
}
