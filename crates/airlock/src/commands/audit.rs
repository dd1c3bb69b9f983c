//! `airlock audit verify`, `export`, `tail` and `prune`: read the store and
//! the audit key named by the config directly, so they work while the
//! server is down (forensics) as well as while it runs.

use std::fmt::Write as _;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use airlock_audit::verify_store;
use airlock_core::audit::{AuditKey, AuditRecord, Break, BreakReason, ChainVerifier};
use airlock_core::duration;
use airlock_session::now_ms;
use airlock_store::{AuditQuery, Store};
use anyhow::Context;

use crate::key_check;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::audit_key;
use crate::cli::AuditCommand;
use crate::client::AdminClient;
use crate::config::Config;
use crate::output;

mod prune;
mod remote;
mod tail;

/// Whether `cmd` goes through the admin API (`--remote`) rather than the
/// store: it needs no config then, as the session commands.
pub fn is_remote(cmd: &AuditCommand) -> bool {
    match cmd {
        AuditCommand::Verify { remote, .. }
        | AuditCommand::Export { remote, .. }
        | AuditCommand::Tail { remote, .. } => *remote,
        AuditCommand::Prune { .. } => false,
    }
}

/// Runs a `--remote` audit command against the admin API at `admin_url`
/// (unless `AIRLOCK_ADMIN_URL` says otherwise).
pub async fn run_remote(cmd: AuditCommand, admin_url: String) -> anyhow::Result<ExitCode> {
    let client = AdminClient::from_env(admin_url);
    match cmd {
        AuditCommand::Verify { json, .. } => remote::verify(&client, json).await,
        AuditCommand::Export {
            session,
            since,
            page_size,
            ..
        } => {
            let since_ms = export_filters(session.as_deref(), since.as_deref())?;
            remote::export(&client, session.as_deref(), since_ms, page_size).await?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Tail { session, lines, .. } => {
            check_session(session.as_deref())?;
            remote::tail(&client, session.as_deref(), lines).await
        }
        // Never remote (see `is_remote`).
        AuditCommand::Prune { .. } => Err(crate::cli::usage(
            "audit prune has no --remote: it runs on the store".to_owned(),
        )),
    }
}

/// Runs an audit command on the store the config names; exit 1 means "the
/// trail does not verify".
pub async fn run(cmd: AuditCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            from: None, json, ..
        } => verify_stored(config, json).await,
        AuditCommand::Verify {
            from: Some(file),
            session,
            json,
            ..
        } => {
            check_session(session.as_deref())?;
            // The file first: a file that is not there is the first thing
            // to fix, whatever the key.
            let reader = open_export(&file)?;
            let key = audit_key::load_existing(&config.audit, &config.store_url)?;
            verify_file(reader, session.as_deref(), &key, json)
        }
        AuditCommand::Export {
            session,
            since,
            page_size,
            ..
        } => {
            let since_ms = export_filters(session.as_deref(), since.as_deref())?;
            export(config, session, since_ms, page_size).await?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Tail { session, lines, .. } => {
            check_session(session.as_deref())?;
            tail::run(config, session, lines).await
        }
        AuditCommand::Prune {
            before,
            dry_run,
            json,
        } => {
            let before_ms = parse_time("--before", &before)?;
            refuse_future_cut(&before, before_ms, now_ms())?;
            prune::run(config, before_ms, dry_run, json).await
        }
    }
}

/// `export`'s `--session` checked and `--since` read (as Unix ms).
fn export_filters(session: Option<&str>, since: Option<&str>) -> anyhow::Result<Option<i64>> {
    check_session(session)?;
    since.map(|since| parse_time("--since", since)).transpose()
}

/// Refuses a `--session` that is not a session id (it would match nothing:
/// `tail` would wait forever, `export` print nothing).
fn check_session(session: Option<&str>) -> anyhow::Result<()> {
    session.map_or(Ok(()), |id| {
        crate::commands::session::check_id("--session", id)
    })
}

async fn open_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    airlock_store::open_existing(&config.store_url)
        .await
        .with_context(|| {
            format!(
                "opening store {}",
                airlock_store::url_for_display(&config.store_url)
            )
        })
}

async fn verify_stored(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    // The store first: a config read from another directory than `serve`'s
    // misses both, and the database is what to say is missing.
    let store = open_store(config).await?;
    let key = match audit_key::load_existing(&config.audit, &config.store_url) {
        Ok(key) => key,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    // Another key than the trail's would find every record forged: a
    // misconfiguration (exit 2), which the store's check value tells. The
    // value sits in the store verify distrusts, so the chains' sealed heads
    // decide: one sealed with this key makes it the trail's key, and the
    // check value was altered.
    let altered_check = match key_check::audit_key_remembered(store.as_ref(), &key).await {
        Ok(Some(true) | None) => false,
        Ok(Some(false)) => match key_check::seals_a_head(store.as_ref(), &key).await {
            Ok(true) => true,
            Ok(false) => {
                store.close().await;
                anyhow::bail!(
                    "the audit key (AIRLOCK_AUDIT_KEY or [audit] key_file) is not the one this \
                     store's audit trail was written with, so nothing was verified: use the \
                     servers' audit key (if it is that key, the store's key check value and \
                     every chain's head were altered)"
                );
            }
            Err(e) => {
                store.close().await;
                return Err(e.context("reading the audit chains' heads"));
            }
        },
        Err(e) => {
            store.close().await;
            return Err(e.context("reading the audit key's check value"));
        }
    };
    let verified = verify_store(store.as_ref(), &key).await;
    store.close().await;
    let verified = verified.context("reading the audit trail")?;
    if json {
        let mut verdict = airlock_admin::verified_json(&verified);
        if altered_check {
            verdict["ok"] = serde_json::Value::Bool(false);
            verdict["key_check_altered"] = serde_json::Value::Bool(true);
        }
        let code = if verdict["ok"] == true {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
        output::print_verdict(&format!("{verdict}\n"))?;
        return Ok(code);
    }
    let mut report = String::new();
    if altered_check {
        let _ = writeln!(
            report,
            "audit trail broken: the store's audit key check value was altered (the chains' \
             heads are sealed with this key)"
        );
    }
    let code = match verified.first_break {
        None if altered_check => {
            let _ = writeln!(
                report,
                "({} verified)",
                counted(verified.records, verified.chains)
            );
            ExitCode::from(1)
        }
        None => {
            let _ = writeln!(
                report,
                "audit trail intact: {}{}",
                counted(verified.records, verified.chains),
                pruned_note(&verified.pruned)
            );
            ExitCode::SUCCESS
        }
        Some(broken) => {
            let code = report_break(&mut report, &broken, None);
            for other in verified.broken_chains.iter().skip(1) {
                let _ = writeln!(
                    report,
                    "  chain {} is broken too: first bad record is seq {}: {}",
                    other.chain, other.seq, other.reason
                );
            }
            // Batches are read a page at a time and a page is checked whole:
            // records read beside one that does not decode are not counted
            // (round 28: "0 records verified" with seq 1 to 4 intact).
            let counted_how = if verified
                .broken_chains
                .iter()
                .any(|b| matches!(b.reason, BreakReason::Malformed(_)))
            {
                "in a broken chain, those before its first bad record, less any read in one \
                 page with a record that does not decode"
            } else {
                "in a broken chain, those before its first bad record"
            };
            let _ = writeln!(
                report,
                "({} verified: {counted_how})",
                counted(verified.records, verified.chains)
            );
            code
        }
    };
    output::print_verdict(&report)?;
    Ok(code)
}

/// Where pruned chains start (`audit prune`), for the verdict's line.
fn pruned_note(pruned: &[(u32, u64)]) -> String {
    if pruned.is_empty() {
        return String::new();
    }
    let starts: Vec<String> = pruned
        .iter()
        .map(|(chain, first_seq)| format!("chain {chain} from record {first_seq}"))
        .collect();
    format!(" (older records pruned: {})", starts.join(", "))
}

/// `N records in M chains`, singular where it is one.
fn counted(records: u64, chains: usize) -> String {
    let records_s = if records == 1 { "" } else { "s" };
    let chains_s = if chains == 1 { "" } else { "s" };
    format!("{records} record{records_s} in {chains} chain{chains_s}")
}

/// Adds the line naming `broken` to `report`; exit 1.
fn report_break(report: &mut String, broken: &Break, line: Option<usize>) -> ExitCode {
    let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
    // Nothing verified before the break: a key other than the server's
    // fails every record the same way tampering fails one.
    let first_checked = match line {
        Some(line) => line == 1,
        None => broken.seq <= 1,
    };
    let hint = match broken.reason {
        BreakReason::BadMac | BreakReason::BadHead if first_checked => {
            " (nothing before it verified: if this is the whole trail, check that the audit key \
             — AIRLOCK_AUDIT_KEY or [audit] key_file — is the one the server writes with)"
        }
        _ => "",
    };
    // As the summaries say: "audit trail" is the store's, "audit file" a
    // file's.
    let what = if line.is_some() { "file" } else { "trail" };
    // Seqs start at 1: 0 is a line that does not say which record it is.
    // A bad head is no bad record: the records up to it verified (round
    // 28: "first bad record is seq 35", with 35 records verified).
    let which = match broken.reason {
        BreakReason::BadHead => format!(
            "the sealed head of chain {} (at seq {}) does not match its records",
            broken.chain, broken.seq
        ),
        _ if line.is_some() && broken.seq == 0 => {
            "first bad record is an unreadable line".to_owned()
        }
        _ => format!(
            "first bad record is seq {} of chain {}",
            broken.seq, broken.chain
        ),
    };
    let _ = writeln!(
        report,
        "audit {what} broken: {which}{at}: {}{hint}",
        broken.reason
    );
    ExitCode::from(1)
}

/// The exported file `--from` names (`-`: stdin), opened.
fn open_export(path: &Path) -> anyhow::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("--from {}: cannot open the file", path.display()))?;
    Ok(Box::new(std::io::BufReader::new(file)))
}

/// Verifies an exported file and prints what it found: lines for people,
/// or with `json` one object (`ok`, `records`, `chains` with each one's
/// first and last seq; or `ok` false with `first_bad`, `chain`, `line`,
/// `reason`).
fn verify_file(
    reader: Box<dyn BufRead>,
    session: Option<&str>,
    key: &AuditKey,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let verdict = check_file(reader, session, key)?;
    let mut report = String::new();
    let code = match &verdict {
        FileVerdict::Intact { .. } => ExitCode::SUCCESS,
        FileVerdict::Broken { .. } => ExitCode::from(1),
    };
    if json {
        let _ = writeln!(report, "{}", file_verdict_json(&verdict));
    } else {
        write_file_verdict(&mut report, &verdict, session);
    }
    output::print_verdict(&report)?;
    Ok(code)
}

/// What [`check_file`] found.
enum FileVerdict {
    /// Every record verified.
    Intact {
        records: u64,
        chains: usize,
        /// First and last seq of each chain in the file.
        ranges: std::collections::BTreeMap<u32, (u64, u64)>,
    },
    /// The first bad record, on `line`; `records` verified before it.
    Broken {
        broken: Break,
        line: usize,
        records: u64,
        /// A gap in a file whose records so far all name this session:
        /// likely its export, verified without `--session`.
        one_session: Option<String>,
    },
}

/// The lines `verify --from` prints for people.
fn write_file_verdict(report: &mut String, verdict: &FileVerdict, session: Option<&str>) {
    match verdict {
        FileVerdict::Broken {
            broken,
            line,
            one_session,
            ..
        } => {
            report_break(report, broken, Some(*line));
            if let Some(id) = one_session {
                let _ = writeln!(
                    report,
                    "(every record up to it names session {id}: if the file is that session's \
                     export, whose seqs jump, verify it with --session {id})"
                );
            }
        }
        FileVerdict::Intact {
            records,
            chains,
            ranges,
        } => {
            let _ = writeln!(report, "audit file intact: {}", counted(*records, *chains));
            for (chain, (first, last)) in ranges {
                let _ = writeln!(report, "  chain {chain}: seq {first} to {last}");
            }
            let _ = writeln!(
                report,
                "(a file shows its records unaltered{}; whether records before its first or \
                 after its last were cut off, only the store can tell: airlock audit verify)",
                if session.is_some() {
                    ""
                } else {
                    " and none missing between them"
                }
            );
        }
    }
}

/// The JSON verdict of `verify --from --json`: the fields of the stored
/// trail's (`ok`, `records`, `chains` as a count, `first_bad`, `chain`,
/// `reason`), with a file's own: each chain's `ranges`, the bad `line`.
fn file_verdict_json(verdict: &FileVerdict) -> serde_json::Value {
    match verdict {
        FileVerdict::Intact {
            records,
            chains,
            ranges,
        } => serde_json::json!({
            "ok": true,
            "records": records,
            "chains": chains,
            "ranges": ranges
                .iter()
                .map(|(chain, (first, last))| {
                    serde_json::json!({"chain": chain, "first_seq": first, "last_seq": last})
                })
                .collect::<Vec<_>>(),
        }),
        FileVerdict::Broken {
            broken,
            line,
            records,
            ..
        } => {
            // Seq 0: a line that does not say which record it is.
            let named = broken.seq != 0;
            serde_json::json!({
                "ok": false,
                "first_bad": named.then_some(broken.seq),
                "chain": named.then_some(broken.chain),
                "line": line,
                "reason": broken.reason.to_string(),
                "records": records,
            })
        }
    }
}

/// Verifies an exported file line by line, with one record of look-ahead;
/// the first bad line is named (a line that is no record is bad where it
/// is: the record before it is checked first).
fn check_file(
    reader: Box<dyn BufRead>,
    session: Option<&str>,
    key: &AuditKey,
) -> anyhow::Result<FileVerdict> {
    let mut verifier = match session {
        Some(_) => ChainVerifier::allow_gaps(key),
        None => ChainVerifier::partial(key),
    };
    let mut pending: Option<(usize, AuditRecord)> = None;
    // First and last seq of each chain in the file, for the summary.
    let mut ranges: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
    // The one session every record so far names, while there is one: a
    // gap in such a file is likely a session's export verified without
    // `--session`.
    let mut one_session = OneSession::Unknown;
    let mut check = |verifier: &mut ChainVerifier<'_>,
                     (line, record): (usize, AuditRecord),
                     next: Option<&AuditRecord>|
     -> Option<FileVerdict> {
        one_session.see(record.session.as_deref());
        if let Some(wanted) = session {
            if record.session.as_deref() != Some(wanted) {
                let broken = Break {
                    chain: record.chain,
                    seq: record.seq,
                    reason: BreakReason::Malformed(format!(
                        "belongs to another session, not {wanted}"
                    )),
                };
                return Some(FileVerdict::Broken {
                    broken,
                    line,
                    records: verifier.records(),
                    one_session: None,
                });
            }
        }
        let range = ranges
            .entry(record.chain)
            .or_insert((record.seq, record.seq));
        range.1 = record.seq;
        verifier.check(&record, next).err().map(|broken| {
            let one_session = match (&broken.reason, session, &one_session) {
                (BreakReason::Gap { .. }, None, OneSession::Only(id)) => Some(id.clone()),
                _ => None,
            };
            FileVerdict::Broken {
                broken,
                line,
                records: verifier.records(),
                one_session,
            }
        })
    };
    let mut lines = reader.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let number = index + 1;
        let line = line.with_context(|| format!("reading line {number}"))?;
        // A byte order mark some editors put at a file's start.
        let line = match (number, line.strip_prefix('\u{feff}')) {
            (1, Some(rest)) => rest.to_owned(),
            _ => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let record = match AuditRecord::from_json(&line) {
            Ok(record) => record,
            Err(why) => {
                // The record before this line comes first; with nothing
                // readable after it, a gap there is a gap, not a swap.
                if let Some(previous) = pending.take() {
                    if let Some(broken) = check(&mut verifier, previous, None) {
                        return Ok(broken);
                    }
                }
                // Name the record by what the line claims, when it can be read.
                let claimed = claimed_record(&line);
                // Not one line in the whole file that is, or says it is, a
                // record: it is no audit export (the wrong file), which says
                // nothing about tampering. (Records whose every line was
                // altered still name their chain and seq: broken.)
                if verifier.records() == 0 && ranges.is_empty() && claimed.is_none() {
                    let any_record = lines.any(|(_, line)| {
                        line.is_ok_and(|l| {
                            AuditRecord::from_json(&l).is_ok() || claimed_record(&l).is_some()
                        })
                    });
                    if !any_record {
                        anyhow::bail!(
                            "--from: not an audit export: no line of it is an audit record \
                             (line {number}: {why})"
                        );
                    }
                }
                let (chain, seq) = claimed.unwrap_or((0, 0));
                return Ok(FileVerdict::Broken {
                    broken: Break {
                        chain,
                        seq,
                        reason: BreakReason::Malformed(why),
                    },
                    line: number,
                    records: verifier.records(),
                    one_session: None,
                });
            }
        };
        if let Some(previous) = pending.take() {
            if let Some(broken) = check(&mut verifier, previous, Some(&record)) {
                return Ok(broken);
            }
        }
        pending = Some((number, record));
    }
    if let Some(last) = pending {
        if let Some(broken) = check(&mut verifier, last, None) {
            return Ok(broken);
        }
    }
    if verifier.records() == 0 {
        // Not "intact": an export that failed, or a pipe whose first
        // command did, is empty too (round 28: exit 0 for either).
        anyhow::bail!(
            "--from: the input holds no audit records, so nothing was verified (an export \
             that failed prints none, nor does one of a session without calls)"
        );
    }
    Ok(FileVerdict::Intact {
        records: verifier.records(),
        chains: verifier.chains(),
        ranges,
    })
}

/// The chain and seq a line that is no valid record says it has, when it
/// is JSON that says so.
fn claimed_record(line: &str) -> Option<(u32, u64)> {
    let value = serde_json::from_str::<serde_json::Value>(line).ok()?;
    Some((
        u32::try_from(value["chain"].as_u64()?).ok()?,
        value["seq"].as_u64()?,
    ))
}

/// Which sessions the records of a file name, as far as read.
enum OneSession {
    /// No record read yet.
    Unknown,
    /// Every record read names this session.
    Only(String),
    /// Records of several sessions, or of none.
    Several,
}

impl OneSession {
    fn see(&mut self, session: Option<&str>) {
        *self = match (std::mem::replace(self, Self::Several), session) {
            (Self::Unknown, Some(id)) => Self::Only(id.to_owned()),
            (Self::Only(only), Some(id)) if only == id => Self::Only(only),
            _ => Self::Several,
        };
    }
}

/// Prints matching records chain by chain, each in seq order, so that the
/// output verifies on its own: with `since_ms`, each chain from its first
/// record at or after that time on (`AuditQuery::since_ms`), a contiguous
/// run of seqs.
async fn export(
    config: &Config,
    session: Option<String>,
    since_ms: Option<i64>,
    page_size: u32,
) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let written = match write_records(store.as_ref(), session.as_deref(), since_ms, page_size).await
    {
        // Nothing for a session the store never had: a mistyped id, whose
        // empty export would verify as intact.
        Ok(0) => check_session_known(store.as_ref(), session.as_deref()).await,
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    store.close().await;
    written
}

/// Refuses a `--session` the store has never had (a usage error, exit 2):
/// a mistyped id would export nothing, which verifies as intact, or leave
/// `tail` waiting forever. (Sessions are never deleted.)
async fn check_session_known(store: &dyn Store, session: Option<&str>) -> anyhow::Result<()> {
    let Some(id) = session.and_then(airlock_core::SessionId::parse) else {
        return Ok(());
    };
    match store.session_by_id(&id).await? {
        Some(_) => Ok(()),
        None => Err(crate::cli::usage(format!(
            "--session: no session {id} in the store"
        ))),
    }
}

/// [`export`]'s records, written to stdout; how many.
async fn write_records(
    store: &dyn Store,
    session: Option<&str>,
    since_ms: Option<i64>,
    page_size: u32,
) -> anyhow::Result<usize> {
    let mut out = BufWriter::new(output::stdout());
    let mut written = 0;
    for head in store.audit_heads().await? {
        let mut after_seq = 0;
        loop {
            let page = store
                .audit_records(&AuditQuery {
                    session: session.map(str::to_owned),
                    since_ms,
                    chain: Some(head.chain),
                    after_seq,
                    limit: page_size,
                })
                .await?;
            for record in &page {
                writeln!(out, "{}", record.to_json())?;
            }
            written += page.len();
            match page.last() {
                Some(last) if page.len() == page_size as usize => after_seq = last.seq,
                _ => break,
            }
        }
    }
    out.flush()?;
    Ok(written)
}

/// Refuses a `prune --before` later than `now_ms`: it would remove every
/// record but each chain's last batch, and is far likelier a mistyped
/// year than meant (round 43). Everything up to now stays possible.
fn refuse_future_cut(value: &str, before_ms: i64, now_ms: i64) -> anyhow::Result<()> {
    if before_ms > now_ms {
        return Err(crate::cli::usage(format!(
            "--before {value:?} is in the future: prune removes records that ended before it, \
             which would be every record but each chain's last batch; give a time in the past \
             (2026-01-02T03:04:05Z) or an age (90d)"
        )));
    }
    Ok(())
}

/// `--since` or `--before` (`flag`): an RFC 3339 time, or a duration
/// meaning "that long ago".
fn parse_time(flag: &str, value: &str) -> anyhow::Result<i64> {
    match duration::parse(value) {
        Ok(ago) => {
            let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
            return Ok(now_ms().saturating_sub(ago));
        }
        Err(e @ duration::DurationError::TooLarge(_)) => {
            return Err(crate::cli::usage(format!("{flag}: {e}")));
        }
        Err(duration::DurationError::Invalid(_)) => {}
    }
    let t = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
        crate::cli::usage(format!(
            "{flag} {value:?}: use an RFC 3339 time (2026-01-02T03:04:05Z) or a duration (15m, \
             2h, 90d)"
        ))
    })?;
    Ok(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
}
