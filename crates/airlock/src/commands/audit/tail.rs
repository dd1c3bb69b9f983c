//! `airlock audit tail`: follows the audit trail in the store, printing new
//! records as JSON lines, like `tail -f`.
//!
//! Each chain (one per writing process) is followed from the last seq seen;
//! a chain that appears later (a replica started) is followed from its
//! start. Records are printed in time order within each poll.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Write};
use std::process::ExitCode;
use std::time::Duration;

use airlock_core::audit::AuditRecord;
use airlock_store::{AuditQuery, Store};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

/// How often the store is asked for new records.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Records read per query.
const PAGE: u32 = 1_000;

/// Runs `audit tail`; returns on SIGINT/SIGTERM or when stdout is closed.
pub async fn run(
    config: &Config,
    session: Option<String>,
    lines: usize,
) -> anyhow::Result<ExitCode> {
    let store = super::open_store(config).await?;
    let result = follow(store.as_ref(), session, lines).await;
    store.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// Last seq seen, per chain.
type Cursors = BTreeMap<u32, u64>;

async fn follow(store: &dyn Store, session: Option<String>, lines: usize) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let work = async {
        let mut cursors: Cursors = store
            .audit_heads()
            .await?
            .iter()
            .map(|head| (head.chain, head.seq))
            .collect();
        if lines > 0 {
            let last = last_records(store, session.as_deref(), &cursors, lines).await?;
            if !print(&last)? {
                return Ok(());
            }
        }
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            let new = poll(store, session.as_deref(), &mut cursors).await?;
            if !print(&new)? {
                return Ok(());
            }
        }
    };
    tokio::select! {
        result = work => result,
        _ = interrupt.recv() => Ok(()),
        _ = terminate.recv() => Ok(()),
    }
}

/// Writes records as JSON lines; `false` once stdout is closed (EPIPE).
fn print(records: &[AuditRecord]) -> anyhow::Result<bool> {
    if records.is_empty() {
        return Ok(true);
    }
    let mut out = std::io::stdout().lock();
    let written = records
        .iter()
        .try_for_each(|record| writeln!(out, "{}", record.to_json()))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// The last `n` records (of `session`, if given) up to the cursors, oldest
/// first.
async fn last_records(
    store: &dyn Store,
    session: Option<&str>,
    cursors: &Cursors,
    n: usize,
) -> anyhow::Result<Vec<AuditRecord>> {
    let mut all = Vec::new();
    for (&chain, &head) in cursors {
        let mut kept: VecDeque<AuditRecord> = VecDeque::with_capacity(n.min(PAGE as usize));
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
                kept.push_back(record);
            }
            if !full || past_head {
                break;
            }
        }
        all.extend(kept);
    }
    sort(&mut all);
    let skip = all.len().saturating_sub(n);
    Ok(all.split_off(skip))
}

/// Records written since the cursors, which it advances; a chain not seen
/// before is read from its start.
async fn poll(
    store: &dyn Store,
    session: Option<&str>,
    cursors: &mut Cursors,
) -> anyhow::Result<Vec<AuditRecord>> {
    let mut new = Vec::new();
    for head in store.audit_heads().await? {
        let cursor = cursors.entry(head.chain).or_insert(0);
        if head.seq <= *cursor {
            continue;
        }
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
        // Every record up to the head was committed when the head was read:
        // records of other sessions up to it need not be read again.
        *cursor = (*cursor).max(head.seq);
    }
    sort(&mut new);
    Ok(new)
}

fn sort(records: &mut [AuditRecord]) {
    records.sort_by_key(|r| (r.ts_ms, r.chain, r.seq));
}
