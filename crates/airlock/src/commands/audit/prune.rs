//! `airlock audit prune --before T`: removes the oldest records of every
//! chain and seals where each chain now starts (its floor), so that the
//! rest of the trail still verifies and any other removal still shows.

use std::fmt::Write as _;
use std::process::ExitCode;

use airlock_audit::verify_store;
use airlock_core::audit::{floor_seal, format_ts, MacBytes};
use airlock_session::now_ms;
use airlock_store::{Pruned, Store};
use anyhow::Context;
use serde_json::json;

use super::{open_store, report_break};
use crate::config::Config;
use crate::{audit_key, key_check, output};

/// Prunes the store the config names of the records that ended before
/// `before_ms`; exit 1 when the trail does not verify (nothing removed).
pub async fn run(
    config: &Config,
    before_ms: i64,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // The store first, as verify: a config read from another directory
    // than `serve`'s misses both, and the database is what to say is
    // missing.
    let store = open_store(config).await?;
    let key = match audit_key::load_existing(&config.audit, &config.store_url) {
        Ok(key) => key,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let outcome = prune(store.as_ref(), &key, before_ms, dry_run).await;
    store.close().await;
    let pruned = match outcome? {
        Ok(pruned) => pruned,
        Err(refusal) => {
            output::error_line(refusal.trim_end());
            return Ok(ExitCode::from(1));
        }
    };
    let text = if json {
        format!("{}\n", render_json(&pruned, before_ms, dry_run))
    } else {
        render(&pruned, before_ms, dry_run)
    };
    output::print(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks the key and the whole trail, then prunes; `Err` inside when the
/// trail does not verify (what to say), outside when it cannot be read.
async fn prune(
    store: &dyn Store,
    key: &airlock_core::audit::AuditKey,
    before_ms: i64,
    dry_run: bool,
) -> anyhow::Result<Result<Vec<Pruned>, String>> {
    if key_check::audit_key_remembered(store, key)
        .await
        .context("reading the audit key's check value")?
        == Some(false)
    {
        anyhow::bail!(
            "the audit key (AIRLOCK_AUDIT_KEY or [audit] key_file) is not the one this store's \
             audit trail was written with: nothing was pruned"
        );
    }
    // Records that do not verify are evidence: pruning them would remove
    // it, and a floor sealed over a forged record would vouch for it.
    let verified = verify_store(store, key)
        .await
        .context("reading the audit trail")?;
    if let Some(broken) = verified.first_break {
        let mut report = String::new();
        report_break(&mut report, &broken, None);
        let _ = write!(
            report,
            "nothing was pruned: pruning a trail that does not verify would remove the evidence \
             (see `airlock audit verify`)"
        );
        return Ok(Err(report));
    }
    let seal = |chain: u32, seq: u64, mac: &MacBytes| floor_seal(key, chain, seq, mac);
    let pruned = store
        .audit_prune(before_ms, &seal, now_ms(), dry_run)
        .await
        .context(
            "pruning the audit trail (steps done before this error stay done: `airlock audit \
             verify` says where each chain starts now)",
        )?;
    Ok(Ok(pruned))
}

/// The lines for people.
fn render(pruned: &[Pruned], before_ms: i64, dry_run: bool) -> String {
    let before = format_ts(before_ms);
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut text = String::new();
    if pruned.is_empty() {
        let _ = writeln!(
            text,
            "nothing to prune: no chain has records before its last batch that ended before \
             {before}"
        );
        return text;
    }
    for chain in pruned {
        let _ = writeln!(
            text,
            "chain {}: {verb} records {}–{} ({}); it {} at record {}",
            chain.chain,
            chain.first_seq,
            chain.floor.seq,
            plural(chain.records, "record"),
            if dry_run { "would start" } else { "starts" },
            chain.floor.seq.saturating_add(1)
        );
    }
    let total = pruned.iter().map(|chain| chain.records).sum();
    let _ = writeln!(
        text,
        "{verb} {} that ended before {before}{}",
        plural(total, "record"),
        if dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    text
}

/// The outcome as one JSON object.
fn render_json(pruned: &[Pruned], before_ms: i64, dry_run: bool) -> serde_json::Value {
    let total: u64 = pruned.iter().map(|chain| chain.records).sum();
    json!({
        "before": format_ts(before_ms),
        "dry_run": dry_run,
        "records": total,
        "chains": pruned.iter().map(|chain| json!({
            "chain": chain.chain,
            "first_seq": chain.first_seq,
            "last_seq": chain.floor.seq,
            "records": chain.records,
        })).collect::<Vec<_>>(),
    })
}

/// `1 record`, `2 records`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}
