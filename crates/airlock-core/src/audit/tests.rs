#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn key() -> AuditKey {
    AuditKey::new(&[7; 32])
}

fn record(n: u64) -> AuditRecord {
    AuditRecord {
        chain: 0,
        seq: 0,
        ts_ms: 1_764_000_000_000 + n as i64,
        session: Some(format!("ses_{n:022}").into()),
        provider: Some("openai".into()),
        method: "POST".into(),
        path: "/v1/chat/completions".to_owned(),
        decision: "allow".into(),
        status: 200,
        upstream_status: Some(200),
        duration_us: 1234 + n,
        bytes_in: 10,
        bytes_out: 20,
        flags: Flags::empty(),
        prev_mac: GENESIS_MAC,
        mac: GENESIS_MAC,
    }
}

/// A chain of `n` sealed records.
fn chain(key: &AuditKey, id: u32, n: u64) -> Vec<AuditRecord> {
    let mut prev = GENESIS_MAC;
    (1..=n)
        .map(|seq| {
            let mut r = record(seq);
            r.seal(key, id, seq, prev);
            prev = r.mac;
            r
        })
        .collect()
}

fn verify(v: &mut ChainVerifier<'_>, records: &[AuditRecord]) -> Result<(), Break> {
    for (i, r) in records.iter().enumerate() {
        v.check(r, records.get(i + 1))?;
    }
    Ok(())
}

#[test]
fn intact_chain_verifies() {
    let key = key();
    let records = chain(&key, 1, 10);
    let mut v = ChainVerifier::from_start(&key);
    verify(&mut v, &records).unwrap();
    assert_eq!(v.records(), 10);
    let last = records.last().unwrap();
    let seal = head_seal(&key, 1, last.seq, &last.mac);
    v.check_head(1, last.seq, &last.mac, &seal).unwrap();
}

#[test]
fn every_field_is_covered_by_the_mac() {
    let key = key();
    let base = chain(&key, 1, 1).remove(0);
    type Edit = Box<dyn Fn(&mut AuditRecord)>;
    let edits: Vec<Edit> = vec![
        Box::new(|r| r.ts_ms += 1),
        Box::new(|r| r.session = None),
        Box::new(|r| r.provider = Some("anthropic".into())),
        Box::new(|r| r.method = "GET".into()),
        Box::new(|r| r.path.push('x')),
        Box::new(|r| r.decision = "out_of_scope".into()),
        Box::new(|r| r.status = 201),
        Box::new(|r| r.upstream_status = None),
        Box::new(|r| r.duration_us += 1),
        Box::new(|r| r.bytes_in += 1),
        Box::new(|r| r.bytes_out += 1),
        Box::new(|r| r.flags = Flags::CLIENT_ABORTED),
        Box::new(|r| r.prev_mac[0] ^= 1),
        Box::new(|r| r.chain = 2),
    ];
    for (i, edit) in edits.iter().enumerate() {
        let mut r = base.clone();
        edit(&mut r);
        assert_ne!(r.compute_mac(&key), r.mac, "edit {i} not detected");
    }
}

#[test]
fn a_different_key_does_not_verify() {
    let records = chain(&key(), 1, 3);
    let other = AuditKey::new(&[8; 32]);
    let err = verify(&mut ChainVerifier::from_start(&other), &records).unwrap_err();
    assert_eq!((err.seq, err.reason), (1, BreakReason::BadMac));
}

#[test]
fn edited_record_is_named() {
    let key = key();
    let mut records = chain(&key, 1, 10);
    records[4].status = 500;
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!(
        (err.chain, err.seq, err.reason),
        (1, 5, BreakReason::BadMac)
    );
}

#[test]
fn deleted_record_is_a_gap() {
    let key = key();
    let mut records = chain(&key, 1, 10);
    records.remove(6); // seq 7
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!((err.seq, err.reason), (8, BreakReason::Gap { expected: 7 }));
}

#[test]
fn deleted_first_record_is_a_gap_for_whole_chains_only() {
    let key = key();
    let records = chain(&key, 1, 5);
    let err = verify(&mut ChainVerifier::from_start(&key), &records[1..]).unwrap_err();
    assert_eq!((err.seq, err.reason), (2, BreakReason::Gap { expected: 1 }));
    verify(&mut ChainVerifier::partial(&key), &records[1..]).unwrap();
}

#[test]
fn swapped_records_are_out_of_order() {
    let key = key();
    let mut records = chain(&key, 1, 10);
    records.swap(3, 4); // seq 4 and 5
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!(
        (err.seq, err.reason),
        (5, BreakReason::OutOfOrder { expected: 4 })
    );
}

#[test]
fn renumbered_swap_breaks_the_link() {
    let key = key();
    let mut records = chain(&key, 1, 10);
    records.swap(3, 4);
    records[3].seq = 4;
    records[4].seq = 5;
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!((err.seq, err.reason), (4, BreakReason::BadMac));
}

#[test]
fn inserted_record_is_detected() {
    let key = key();
    let mut records = chain(&key, 1, 5);
    // A forger without the key: copies record 3 and renumbers the rest.
    let mut forged = records[2].clone();
    forged.seq = 4;
    records.insert(3, forged);
    for (i, r) in records.iter_mut().enumerate().skip(4) {
        r.seq = i as u64 + 1;
    }
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!((err.seq, err.reason), (4, BreakReason::BadMac));

    // A duplicate of an earlier record, unrenumbered.
    let mut records = chain(&key, 1, 5);
    let dup = records[1].clone();
    records.insert(3, dup);
    let err = verify(&mut ChainVerifier::from_start(&key), &records).unwrap_err();
    assert_eq!(
        (err.seq, err.reason),
        (2, BreakReason::OutOfOrder { expected: 4 })
    );
}

#[test]
fn a_record_from_another_chain_does_not_link() {
    let key = key();
    let a = chain(&key, 1, 4);
    let b = chain(&key, 2, 4);
    // Interleaved chains verify together.
    let mixed: Vec<_> = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    verify(&mut ChainVerifier::from_start(&key), &mixed).unwrap();
    // Record 3 of chain 2 relabelled as chain 1 fails its mac.
    let mut spliced = a.clone();
    let mut moved = b[2].clone();
    moved.chain = 1;
    spliced[2] = moved;
    let err = verify(&mut ChainVerifier::from_start(&key), &spliced).unwrap_err();
    assert_eq!((err.seq, err.reason), (3, BreakReason::BadMac));
}

#[test]
fn session_exports_may_skip_but_not_alter() {
    let key = key();
    let records = chain(&key, 1, 10);
    let picked: Vec<_> = [1usize, 4, 5, 9]
        .iter()
        .map(|&i| records[i].clone())
        .collect();
    verify(&mut ChainVerifier::allow_gaps(&key), &picked).unwrap();
    let mut edited = picked.clone();
    edited[2].bytes_out = 0;
    let err = verify(&mut ChainVerifier::allow_gaps(&key), &edited).unwrap_err();
    assert_eq!((err.seq, err.reason), (6, BreakReason::BadMac));
    let err = verify(&mut ChainVerifier::from_start(&key), &picked).unwrap_err();
    assert_eq!(err.reason, BreakReason::Gap { expected: 1 });
}

#[test]
fn truncation_is_caught_by_the_sealed_head() {
    let key = key();
    let records = chain(&key, 1, 10);
    let head = records.last().unwrap();
    let seal = head_seal(&key, 1, head.seq, &head.mac);
    let mut v = ChainVerifier::from_start(&key);
    verify(&mut v, &records[..7]).unwrap();
    let err = v.check_head(1, head.seq, &head.mac, &seal).unwrap_err();
    assert_eq!(
        (err.seq, err.reason),
        (8, BreakReason::Truncated { head_seq: 10 })
    );

    // A head rewritten without the key does not pass either.
    let fake = &records[6];
    let err = v.check_head(1, fake.seq, &fake.mac, &seal).unwrap_err();
    assert_eq!(err.reason, BreakReason::BadHead);
}

#[test]
fn a_pruned_chain_verifies_from_its_sealed_floor_only() {
    let key = key();
    let records = chain(&key, 1, 10);
    let floor = &records[3];
    let seal = floor_seal(&key, 1, floor.seq, &floor.mac);

    // From the floor on, the rest verifies as a whole chain, to its head.
    let mut v = ChainVerifier::from_start(&key);
    v.start_after(1, floor.seq, &floor.mac, &seal).unwrap();
    verify(&mut v, &records[4..]).unwrap();
    assert_eq!(v.records(), 6);
    let head = records.last().unwrap();
    v.check_head(
        1,
        head.seq,
        &head.mac,
        &head_seal(&key, 1, head.seq, &head.mac),
    )
    .unwrap();

    // More removed than the floor says: a gap right after it.
    let mut v = ChainVerifier::from_start(&key);
    v.start_after(1, floor.seq, &floor.mac, &seal).unwrap();
    let err = verify(&mut v, &records[5..]).unwrap_err();
    assert_eq!((err.seq, err.reason), (6, BreakReason::Gap { expected: 5 }));

    // A floor moved without the key (a later seq, the same seal; or a
    // head's seal passed off as a floor's) starts nothing.
    let mut v = ChainVerifier::from_start(&key);
    let later = &records[5];
    let err = v.start_after(1, later.seq, &later.mac, &seal).unwrap_err();
    assert_eq!(
        (err.chain, err.seq, err.reason),
        (1, 7, BreakReason::BadFloor)
    );
    let head_like = head_seal(&key, 1, floor.seq, &floor.mac);
    let err = v
        .start_after(1, floor.seq, &floor.mac, &head_like)
        .unwrap_err();
    assert_eq!(err.reason, BreakReason::BadFloor);
    // ... and a chain that then starts after seq 1 is a gap, as before.
    let err = verify(&mut v, &records[4..]).unwrap_err();
    assert_eq!(err.reason, BreakReason::Gap { expected: 1 });

    // A floor whose mac is not the last pruned record's breaks the link.
    let mut v = ChainVerifier::from_start(&key);
    let other = records[2].mac;
    v.start_after(
        1,
        floor.seq,
        &other,
        &floor_seal(&key, 1, floor.seq, &other),
    )
    .unwrap();
    let err = verify(&mut v, &records[4..]).unwrap_err();
    assert_eq!((err.seq, err.reason), (5, BreakReason::BrokenLink));
}

#[test]
fn json_round_trips_and_is_canonical() {
    let key = key();
    let mut r = chain(&key, 3, 2).remove(1);
    r.flags = Flags::CLIENT_ABORTED;
    r.flags.insert(Flags::CREDENTIAL_REDACTED);
    r.path = "/v1/\"quoted\"\r\n\u{1b}[31m".to_owned();
    r.mac = r.compute_mac(&key);
    let line = r.to_json();
    assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\u{1b}'));
    let back = AuditRecord::from_json(&line).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.compute_mac(&key), back.mac);

    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["duration_ms"], serde_json::json!(1.236));
    assert_eq!(
        value["flags"],
        serde_json::json!(["client_aborted", "credential_redacted"])
    );
    assert!(value["ts"].as_str().unwrap().ends_with('Z'));
    // As the admin API lists it: a value, in whatever key order.
    assert_eq!(AuditRecord::from_json_value(value.clone()).unwrap(), r);
    let mut without_mac = value.clone();
    without_mac.as_object_mut().unwrap().remove("mac");
    assert!(AuditRecord::from_json_value(without_mac).is_err());

    // A spelling that parses to the same value is still refused.
    let respelled = line.replace("\"duration_ms\":1.236", "\"duration_ms\":1.2360001");
    assert!(AuditRecord::from_json(&respelled).is_err());
    let extra = line.replacen('{', "{\"note\":1,", 1);
    assert!(AuditRecord::from_json(&extra).is_err());
    // A key given twice, the last time with the true value: a reader that
    // keeps the first value sees another record.
    let twice = line.replacen("\"status\":", "\"status\":500,\"status\":", 1);
    assert_ne!(twice, line);
    assert!(AuditRecord::from_json(&twice).is_err(), "{twice}");
    // The line's own whitespace (a CRLF file, say) is no change.
    assert_eq!(AuditRecord::from_json(&format!("{line}\r")).unwrap(), r);
    // Nor is the layout another JSON tool gives the same values: spaces
    // after the separators and `\u` escapes (Python's `json.dumps`), keys
    // in another order, a whole number of milliseconds written without
    // its `.0` (jq).
    let python = line
        .replace("\",\"", "\", \"")
        .replace("\":", "\": ")
        .replace("\\r", "\\u000d");
    assert_ne!(python, line);
    assert_eq!(AuditRecord::from_json(&python).unwrap(), r);
    let reordered = serde_json::to_string(&value).unwrap();
    assert_ne!(reordered, line);
    assert_eq!(AuditRecord::from_json(&reordered).unwrap(), r);
    let mut whole = r.clone();
    whole.duration_us = 2000;
    whole.mac = whole.compute_mac(&key);
    let whole_line = whole.to_json();
    assert!(whole_line.contains("\"duration_ms\":2.0,"), "{whole_line}");
    let jq = whole_line.replace("\"duration_ms\":2.0,", "\"duration_ms\":2,");
    assert_eq!(AuditRecord::from_json(&jq).unwrap(), whole);
    // A value one unit in the last place off is another value (read so
    // by any correct parser), though it rounds to the same microseconds.
    for off in ["1.2360000000000002", "1.2359999999999998"] {
        let ulp = line.replace("\"duration_ms\":1.236,", &format!("\"duration_ms\":{off},"));
        assert_ne!(ulp, line);
        assert!(AuditRecord::from_json(&ulp).is_err(), "{ulp}");
    }
    let mut quick = r.clone();
    quick.duration_us = 91;
    quick.mac = quick.compute_mac(&key);
    let quick_line = quick.to_json();
    assert!(
        quick_line.contains("\"duration_ms\":0.091,"),
        "{quick_line}"
    );
    for off in ["0.09100000000000001", "0.09099999999999999"] {
        let ulp = quick_line.replace("\"duration_ms\":0.091,", &format!("\"duration_ms\":{off},"));
        assert!(AuditRecord::from_json(&ulp).is_err(), "{ulp}");
    }
    // The values without their names, or without a `null` field: not
    // what airlock writes.
    // RECORD_FIELDS is every field, in the order the line has them.
    let at: Vec<usize> = RECORD_FIELDS
        .iter()
        .map(|k| line.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
    assert_eq!(value.as_object().unwrap().len(), RECORD_FIELDS.len());
    let array: Vec<&serde_json::Value> = RECORD_FIELDS.iter().map(|k| &value[*k]).collect();
    let array = serde_json::to_string(&array).unwrap();
    assert!(AuditRecord::from_json(&array).is_err(), "{array}");
    let mut unanswered = r.clone();
    unanswered.upstream_status = None;
    unanswered.mac = unanswered.compute_mac(&key);
    let mut no_null = unanswered.to_json_value();
    assert_eq!(
        AuditRecord::from_json_value(no_null.clone()).unwrap(),
        unanswered
    );
    assert!(no_null["upstream_status"].is_null());
    no_null.as_object_mut().unwrap().remove("upstream_status");
    assert!(AuditRecord::from_json(&no_null.to_string()).is_err());
    assert!(AuditRecord::from_json_value(no_null).is_err());
    let ts = line.replace(".002Z\"", ".002000Z\"");
    assert_ne!(ts, line);
    assert!(AuditRecord::from_json(&ts).is_err(), "{ts}");
}

/// Durations `to_json` writes read back as themselves: a spread of
/// microseconds up to ten seconds, then larger ones up to a year (a
/// stream of a long session; `duration_ms` is an `f64`, exact far beyond).
#[test]
fn every_duration_round_trips_through_json() {
    let key = key();
    let mut r = chain(&key, 1, 1).remove(0);
    let year_us = 366 * 24 * 3600 * 1_000_000u64;
    let larger = (0..40u64)
        .map(|shift| (10_000_000u64 << shift) | shift)
        .take_while(|us| *us <= year_us);
    let small = (0..=100_000)
        .step_by(3)
        .chain((100_000..=10_000_000).step_by(997));
    for us in small.chain(larger).chain([year_us, year_us - 1]) {
        r.duration_us = us;
        let back = AuditRecord::from_json(&r.to_json())
            .unwrap_or_else(|e| panic!("{us} µs: {e}: {}", r.to_json()));
        assert_eq!(back.duration_us, us);
    }
}

#[test]
fn record_path_is_bounded() {
    assert_eq!(record_path("/v1/models"), "/v1/models");
    let long = format!("/{}", "é".repeat(MAX_PATH_LEN));
    let cut = record_path(&long);
    assert!(cut.len() <= MAX_PATH_LEN + '…'.len_utf8());
    assert!(cut.ends_with('…'));
}

/// An HTTP/2 `:path` may carry UTF-8 that many log viewers read as a line
/// break (U+2028, U+0085) or that turns text around (U+202E), and spaces
/// that look like none (U+00A0): recorded paths hold visible ASCII only.
#[test]
fn record_path_escapes_everything_outside_visible_ascii() {
    let forged = "/v1/models/x\u{2028}2026-01-01 INFO call\u{a0}decision=allow\u{202e}\u{85}\t";
    let recorded = record_path(forged);
    assert!(recorded.bytes().all(|b| b.is_ascii_graphic()), "{recorded}");
    assert_eq!(
        recorded,
        "/v1/models/x%E2%80%A82026-01-01%20INFO%20call%C2%A0decision=allow%E2%80%AE%C2%85%09"
    );
    let token = format!("sess_{}", "A".repeat(43));
    let withheld = record_path_withholding(&format!("/v1/{token}\u{2028}"), &[&token[5..]]);
    assert_eq!(withheld.as_deref(), Some("/v1/sess_[withheld]%E2%80%A8"));
    // What HTTP/1.1 lets through is kept as it is.
    assert_eq!(record_path("/v1/files/a%20b"), "/v1/files/a%20b");
}

/// Every byte of `text` as a `%XX` escape.
fn escaped(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[test]
fn record_path_withholds_anything_shaped_like_a_token() {
    let token = crate::token::generate_token();
    let token = token.expose();
    let random = &token[TOKEN_PREFIX.len()..];
    let spellings = [
        format!("/v1/models/{token}"),
        format!("/v1/models/{token}/x"),
        format!("/{token}{token}"),
        format!("/v1/{}", escaped(token)),
        format!("/v1/s%65ss_{random}"),
        format!("/v1/sess%5f{}{}", &random[..3], escaped(&random[3..])),
        format!("/v1/{}/{token}", "a".repeat(MAX_PATH_LEN)),
    ];
    for path in spellings {
        let recorded = record_path(&path);
        assert!(!recorded.contains(&random[..TOKEN_RUN_MIN]), "{recorded}");
        assert!(!recorded.contains(&escaped(&random[..4])), "{recorded}");
        if path.len() < MAX_PATH_LEN {
            assert!(recorded.contains("sess_[withheld]"), "{recorded}");
        }
    }
    assert_eq!(
        record_path(&format!("/v1/models/{token}/x")),
        "/v1/models/sess_[withheld]/x"
    );
    assert_eq!(
        record_path(&format!("/v1/{}", escaped(token))),
        "/v1/sess_[withheld]"
    );

    // Decoding for the search never puts a line break (or anything but
    // visible ASCII) into a recorded path: such escapes stay escapes.
    let forged = format!("/v1/{token}%0A2026-01-01T00:00:00Z%20INFO%0d%E2%80%AEx");
    assert_eq!(
        record_path(&forged),
        "/v1/sess_[withheld]%0A2026-01-01T00:00:00Z%20INFO%0d%E2%80%AEx"
    );

    // Not a token's shape: recorded as sent, escapes and all.
    for path in [
        "/v1/files/sess_notes",
        "/v1/files/a%20b",
        "/v1/sess_",
        "/v1/sess_0123456789abcde-f",
    ] {
        assert_eq!(record_path(path), path);
    }
}

#[test]
fn record_path_withholding_removes_a_call_s_own_token() {
    let token = crate::token::generate_token();
    let random = &token.expose()[TOKEN_PREFIX.len()..];
    assert_eq!(
        record_path_withholding(&format!("/v1/x/{random}/y"), &[random]).as_deref(),
        Some("/v1/x/[withheld]/y")
    );
    assert_eq!(
        record_path_withholding(&format!("/v1/x/{}", escaped(random)), &[random]).as_deref(),
        Some("/v1/x/[withheld]")
    );
    assert_eq!(record_path_withholding("/v1/models", &[random]), None);
    assert_eq!(record_path_withholding("/v1/models", &[""]), None);
    // Several at once: every one is withheld.
    let other = "0123456789abcdefghijABCDEFGHIJ0123456789abc";
    assert_eq!(
        record_path_withholding(&format!("/{other}/{random}"), &[random, other]).as_deref(),
        Some("/[withheld]/[withheld]")
    );
}

#[test]
fn flags_refuse_unknown_bits() {
    assert_eq!(Flags::from_bits(0b111), Some(Flags(0b111)));
    assert_eq!(Flags::from_bits(1 << 9), None);
    assert_eq!(Flags::from_bits(0b1000), Some(Flags::SESSION_ENDED));
}

#[test]
fn key_debug_is_redacted() {
    assert_eq!(format!("{:?}", key()), "AuditKey([redacted])");
}

#[test]
fn format_ts_is_rfc3339_millis() {
    assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(format_ts(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
}
