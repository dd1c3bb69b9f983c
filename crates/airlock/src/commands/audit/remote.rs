//! `airlock audit verify --remote`, `export --remote` and `tail --remote`:
//! the audit
//! trail through the running server's admin API, for an operator who has
//! neither the database nor the audit key at hand (a replica set on
//! PostgreSQL, a server in a container).

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_core::audit::AuditRecord;
use anyhow::{anyhow, Context};
use hyper::{Method, StatusCode};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::client::{path_segment, AdminClient, ApiRefusal, NotAirlock};
use crate::output;

/// `GET /v1/audit/verify`: the server's verdict, as text or (`json`) as the
/// server's JSON; exit 0 when intact, 1 when not.
pub async fn verify(client: &AdminClient, json: bool) -> anyhow::Result<ExitCode> {
    let verdict = client.call(Method::GET, "/v1/audit/verify", None).await?;
    let verdict = client.expect_fields(verdict, &["ok"])?;
    let ok = match verdict.get("ok").and_then(Value::as_bool) {
        Some(ok) => ok,
        None => anyhow::bail!("the admin API's verdict holds no \"ok\": {verdict}"),
    };
    // An intact trail is counted, a broken one explained.
    let verdict = client.expect_fields(verdict, if ok { &["records"] } else { &["reason"] })?;
    let code = if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    let text = if json {
        format!("{verdict}\n")
    } else {
        verdict_text(&verdict, client.shown_url())
    };
    output::print_verdict(&text)?;
    Ok(code)
}

/// The lines `audit verify` prints for the server's verdict.
fn verdict_text(verdict: &Value, server: &str) -> String {
    let number = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64).unwrap_or(0);
    let text = |value: &Value, key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_owned()
    };
    let counted = super::counted(
        number(verdict, "records"),
        usize::try_from(number(verdict, "chains")).unwrap_or(usize::MAX),
    );
    let mut report = String::new();
    if verdict.get("ok").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(
            report,
            "audit trail intact: {counted} (verified by the server at {server})"
        );
        return report;
    }
    let (seq, chain, reason) = (
        number(verdict, "first_bad"),
        number(verdict, "chain"),
        text(verdict, "reason"),
    );
    // As the local verify says it: a bad head is no bad record.
    let which = if reason.starts_with("bad head") {
        format!("the sealed head of chain {chain} (at seq {seq}) does not match its records")
    } else {
        format!("first bad record is seq {seq} of chain {chain}")
    };
    let _ = writeln!(
        report,
        "audit trail broken: {which}: {reason} (verified by the server at {server})"
    );
    let others = verdict.get("broken_chains").and_then(Value::as_array);
    for other in others.into_iter().flatten().skip(1) {
        let _ = writeln!(
            report,
            "  chain {} is broken too: first bad record is seq {}: {}",
            number(other, "chain"),
            number(other, "first_bad"),
            text(other, "reason"),
        );
    }
    let _ = writeln!(
        report,
        "({counted} verified: in a broken chain, those before its first bad record)"
    );
    report
}

/// `GET /v1/audit`, page after page (following `next`), each record
/// written as the JSON line `audit export` writes for it. A `session` the
/// server has never had is a usage error, as for the local export.
pub async fn export(
    client: &AdminClient,
    session: Option<&str>,
    since_ms: Option<i64>,
    page_size: u32,
) -> anyhow::Result<()> {
    // Before any time RFC 3339 can write: every record, as the local
    // export has it.
    let since = match since_ms.map(|ms| (ms, rfc3339(ms))) {
        None => None,
        Some((_, Ok(since))) => Some(since),
        Some((ms, Err(_))) if ms < 0 => None,
        Some((_, Err(e))) => return Err(e),
    };
    let mut out = BufWriter::new(output::stdout());
    let mut written: u64 = 0;
    let mut after: Option<String> = None;
    loop {
        let path = list_path(session, since.as_deref(), page_size, after.as_deref());
        let answer = client.call(Method::GET, &path, None).await?;
        let answer = client.expect_fields(answer, &["records"])?;
        for line in record_lines(&answer)? {
            writeln!(out, "{line}")?;
            written += 1;
        }
        match answer.get("next").and_then(Value::as_str) {
            Some(next) if after.as_deref() == Some(next) => {
                anyhow::bail!("the admin API answered the same page twice (next = {next:?})")
            }
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    out.flush()?;
    if written == 0 {
        if let Some(id) = session {
            check_session_known(client, id).await?;
        }
    }
    Ok(())
}

/// `audit tail --remote`: the records committed from now on, through
/// `GET /v1/audit` polled with the `resume` of its last answer, until
/// SIGINT/SIGTERM or until stdout is closed.
pub async fn tail(
    client: &AdminClient,
    session: Option<&str>,
    lines: usize,
) -> anyhow::Result<ExitCode> {
    if lines > 0 {
        return Err(crate::cli::usage(
            "--lines: not with --remote (the admin API reads forward only); `airlock audit \
             export --remote --since 15m` prints what came before",
        ));
    }
    if let Some(id) = session {
        check_session_known(client, id).await?;
    }
    // Where the trail ends now, as the server sees it (each chain's head):
    // no clock decides what is new.
    let mut start = String::from("/v1/audit?from=end");
    if let Some(id) = session {
        start.push_str(&format!("&session={}", path_segment(id)));
    }
    let started = client.call(Method::GET, &start, None).await?;
    let mut after = resume_of(&client.expect_fields(started, &["records"])?)?;
    super::tail::until_interrupted(async {
        // When the server stopped answering, if it has.
        let mut outage: Option<Instant> = None;
        loop {
            // The cursor holds the session filter.
            let path = list_path(None, None, super::tail::PAGE, Some(&after));
            let answer = match client
                .call(Method::GET, &path, None)
                .await
                .and_then(|answer| client.expect_fields(answer, &["records"]))
            {
                Ok(answer) => answer,
                Err(e) if passing(&e) => {
                    let since = *outage.get_or_insert_with(|| {
                        output::error_line(format_args!(
                            "{e:#}; asking again every {}s for up to {}s",
                            RETRY_EVERY.as_secs(),
                            OUTAGE_LIMIT.as_secs()
                        ));
                        Instant::now()
                    });
                    if since.elapsed() >= OUTAGE_LIMIT {
                        return Err(e.context(format!(
                            "the admin API did not answer for {}s",
                            OUTAGE_LIMIT.as_secs()
                        )));
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if outage.take().is_some() {
                output::error_line(format_args!("the admin API answers again"));
            }
            report_pruned(&answer);
            let lines = record_lines(&answer)?;
            super::tail::print_lines(lines.iter().map(String::as_str))?;
            after = resume_of(&answer)?;
            // A full page: more are waiting, ask again at once.
            if answer.get("next").is_none() {
                tokio::time::sleep(super::tail::POLL_EVERY).await;
                if output::stdout_gone() {
                    return Ok(());
                }
            }
        }
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// How long `tail --remote` keeps asking a server that does not answer
/// (restarting, briefly overloaded) before it gives up.
const OUTAGE_LIMIT: Duration = Duration::from_secs(60);
/// How often it asks meanwhile.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Whether an admin API call failed in a way that may pass: no answer (the
/// server is restarting or out of reach) or a 5xx (overloaded, its store
/// briefly out of reach). A refused token or request will not pass.
fn passing(error: &anyhow::Error) -> bool {
    if error.downcast_ref::<NotAirlock>().is_some() {
        return false;
    }
    match error.downcast_ref::<ApiRefusal>() {
        Some(refusal) => refusal.status.is_server_error(),
        None => true,
    }
}

/// The `resume` cursor of an answer of `GET /v1/audit`.
/// Says on stderr which records were pruned before this follower read them
/// (the answer's `pruned`, when the cursor was behind a chain's floor).
fn report_pruned(answer: &Value) {
    for chain in answer["pruned"].as_array().into_iter().flatten() {
        let (Some(id), Some(from), Some(first)) = (
            chain["chain"].as_u64(),
            chain["missed_from"].as_u64(),
            chain["first_seq"].as_u64(),
        ) else {
            continue;
        };
        output::error_line(format_args!(
            "chain {id}: records {from}–{} were pruned (`airlock audit prune`) before they were \
             read; following on from record {first}",
            first.saturating_sub(1)
        ));
    }
}

fn resume_of(answer: &Value) -> anyhow::Result<String> {
    match answer.get("resume").and_then(Value::as_str) {
        Some(resume) => Ok(resume.to_owned()),
        None => anyhow::bail!(
            "the admin API's answer holds no \"resume\" (a server older than this command): \
             `audit tail --remote` cannot follow it"
        ),
    }
}

/// The records of an answer of `GET /v1/audit`, each as the JSON line
/// `audit export` writes for it.
fn record_lines(answer: &Value) -> anyhow::Result<Vec<String>> {
    let records = answer
        .get("records")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the admin API's answer holds no \"records\" list"))?;
    records
        .iter()
        .map(|value| {
            AuditRecord::from_json_value(value.clone())
                .map(|record| record.to_json())
                .map_err(|why| anyhow!("the admin API listed a record airlock cannot read: {why}"))
        })
        .collect()
}

/// The path of one page of records.
fn list_path(
    session: Option<&str>,
    since: Option<&str>,
    limit: u32,
    after: Option<&str>,
) -> String {
    let mut params = vec![format!("limit={limit}")];
    if let Some(session) = session {
        params.push(format!("session={}", path_segment(session)));
    }
    if let Some(since) = since {
        params.push(format!("since={}", path_segment(since)));
    }
    if let Some(after) = after {
        params.push(format!("after={}", path_segment(after)));
    }
    format!("/v1/audit?{}", params.join("&"))
}

/// `ms` as the RFC 3339 time the admin API reads (to the millisecond).
fn rfc3339(ms: i64) -> anyhow::Result<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| crate::cli::usage("--since: the time is out of range"))
}

/// Refuses a `--session` the server has never had (exit 2): its empty
/// export would verify as intact.
async fn check_session_known(client: &AdminClient, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/sessions/{}", path_segment(id));
    match client.call(Method::GET, &path, None).await {
        Ok(_) => Ok(()),
        Err(e) => match e.downcast_ref::<ApiRefusal>() {
            Some(refusal) if refusal.status == StatusCode::NOT_FOUND => Err(crate::cli::usage(
                format!("--session: the server has no session {id}"),
            )),
            _ => Err(e).context("looking the session up"),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    /// `tail --remote` keeps asking through an outage or a 5xx, not when
    /// the URL names another server or a request is refused.
    #[test]
    fn only_outages_and_server_errors_may_pass() {
        let refusal = |status| {
            anyhow::Error::new(ApiRefusal {
                status,
                message: "m".into(),
            })
        };
        assert!(passing(&anyhow::anyhow!("connection refused")));
        assert!(passing(&refusal(StatusCode::BAD_GATEWAY)));
        assert!(!passing(&refusal(StatusCode::FORBIDDEN)));
        assert!(!passing(&anyhow::Error::new(NotAirlock(
            "not airlock".into()
        ))));
    }

    #[test]
    fn verdicts_read_as_the_local_ones() {
        let intact = json!({"ok": true, "records": 3, "chains": 1});
        assert_eq!(
            verdict_text(&intact, "http://a:1"),
            "audit trail intact: 3 records in 1 chain (verified by the server at http://a:1)\n"
        );
        let broken = json!({
            "ok": false, "first_bad": 4, "chain": 2, "reason": "bad mac",
            "records": 5, "chains": 2,
            "broken_chains": [
                {"chain": 2, "first_bad": 4, "reason": "bad mac"},
                {"chain": 3, "first_bad": 9, "reason": "gap: record 8 is missing"},
            ],
        });
        let bad_head = json!({
            "ok": false, "first_bad": 35, "chain": 1, "records": 35, "chains": 1,
            "reason": "bad head: the chain head's seal is not valid",
        });
        assert!(verdict_text(&bad_head, "u").starts_with(
            "audit trail broken: the sealed head of chain 1 (at seq 35) does not match its \
             records: bad head"
        ));
        assert_eq!(
            verdict_text(&broken, "http://a:1"),
            "audit trail broken: first bad record is seq 4 of chain 2: bad mac (verified by the \
             server at http://a:1)\n  chain 3 is broken too: first bad record is seq 9: gap: \
             record 8 is missing\n(5 records in 2 chains verified: in a broken chain, those \
             before its first bad record)\n"
        );
    }

    #[test]
    fn pages_carry_the_filters_encoded() {
        assert_eq!(
            list_path(
                Some("ses_A1"),
                Some("2026-01-02T03:04:05.006Z"),
                50,
                Some("x-y_z")
            ),
            "/v1/audit?limit=50&session=ses_A1&since=2026-01-02T03%3A04%3A05.006Z&after=x-y_z"
        );
        assert_eq!(list_path(None, None, 7, None), "/v1/audit?limit=7");
        assert_eq!(
            rfc3339(1_767_323_045_006).unwrap(),
            "2026-01-02T03:04:05.006Z"
        );
    }
}
