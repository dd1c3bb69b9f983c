//! The audit MAC: what the writer computes for every record (its HMAC-SHA256
//! over the record and the previous mac) and once per batch (the head
//! seal), and what verifying a trail recomputes.

use std::hint::black_box;

use airlock_core::audit::{head_seal, AuditKey, AuditRecord, ChainVerifier, Flags, GENESIS_MAC};
use criterion::{criterion_group, criterion_main, Criterion};

mod support;

/// A record as the proxy writes one for an allowed call.
fn record() -> AuditRecord {
    AuditRecord {
        chain: 1,
        seq: 0,
        ts_ms: 1_764_000_000_000,
        session: Some("ses_01HZX3Q4V9S8B7N6M5K4J3H2G1".into()),
        provider: Some("openai".into()),
        method: "POST".into(),
        path: "/openai/v1/chat/completions".to_owned(),
        decision: "allow".into(),
        status: 200,
        upstream_status: Some(200),
        duration_us: 123_456,
        bytes_in: 1_024,
        bytes_out: 8_192,
        flags: Flags::empty(),
        prev_mac: GENESIS_MAC,
        mac: GENESIS_MAC,
    }
}

fn bench_audit(c: &mut Criterion) {
    let key = AuditKey::new(&[7; 32]);
    let mut group = c.benchmark_group("audit");
    let mut sealed = record();
    group.bench_function("seal a record (HMAC-SHA256)", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            let prev = sealed.mac;
            sealed.seal(black_box(&key), 1, seq, prev);
        })
    });
    let mut long = record();
    long.path = format!("/openai/v1/{}", "segment/".repeat(120));
    group.bench_function("seal a record with a 1 KiB path", |b| {
        b.iter(|| long.seal(black_box(&key), 1, 1, GENESIS_MAC))
    });
    group.bench_function("head seal", |b| {
        b.iter(|| head_seal(black_box(&key), 1, 42, black_box(&GENESIS_MAC)))
    });
    // Verifying: a chain of 1,000 records, checked in order.
    let mut chain = Vec::with_capacity(1_000);
    let mut prev = GENESIS_MAC;
    for seq in 1..=1_000 {
        let mut r = record();
        r.seal(&key, 1, seq, prev);
        prev = r.mac;
        chain.push(r);
    }
    group.bench_function("verify 1,000 records", |b| {
        b.iter(|| {
            let mut verifier = ChainVerifier::from_start(&key);
            for (i, r) in chain.iter().enumerate() {
                let checked = verifier.check(r, chain.get(i + 1));
                black_box(checked.is_ok());
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::quick();
    targets = bench_audit
}
criterion_main!(benches);
