//! The audit trail's write path on SQLite: `audit_append` of batches of 1,
//! 16 and 256 records onto one chain of a store in a temporary directory,
//! committed directly and through the audit journal. Only the append is
//! timed (building the batches is not).
//!
//! `cargo bench -p airlock-store --bench audit_append` (under a minute).
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use airlock_core::audit::{AuditRecord, Flags, GENESIS_MAC};
use airlock_store::{ChainHead, SqliteStore, Store};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// A record as the proxy writes one for an allowed call; seals are not
/// checked by the store, so fixed bytes do.
fn record(chain: u32, seq: u64) -> AuditRecord {
    AuditRecord {
        chain,
        seq,
        ts_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap_or(0),
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
        prev_mac: [0x5a; 32],
        mac: [0xa5; 32],
    }
}

/// The next `n` records after `head`, and the head after them.
fn batch(head: &ChainHead, n: u64) -> (Vec<AuditRecord>, ChainHead) {
    let records = (1..=n).map(|i| record(head.chain, head.seq + i)).collect();
    let next = ChainHead {
        chain: head.chain,
        seq: head.seq + n,
        mac: [0xa5; 32],
        seal: [0x3c; 32],
    };
    (records, next)
}

/// A runtime and a store in a temporary directory (kept while it lives),
/// its chain claimed; with the audit journal if `journal`.
fn claimed_store(
    journal: bool,
) -> (
    tokio::runtime::Runtime,
    SqliteStore,
    ChainHead,
    tempfile::TempDir,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/bench.db", dir.path().display());
    let (store, head) = rt.block_on(async {
        let store = SqliteStore::open(&url).await.expect("open");
        if journal {
            assert!(store.audit_use_journal().await.expect("journal"));
        }
        let genesis = |_chain: u32| GENESIS_MAC;
        let head = store.audit_claim_chain(&genesis).await.expect("claim");
        (store, head)
    });
    (rt, store, head, dir)
}

fn bench_audit_append(c: &mut Criterion) {
    let (rt, store, mut head, _dir) = claimed_store(false);

    let mut group = c.benchmark_group("sqlite audit_append");
    for n in [1_u64, 16, 256] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let (records, next) = batch(&head, n);
                        let started = Instant::now();
                        store.audit_append(&records, &next).await.expect("append");
                        spent += started.elapsed();
                        head = next;
                    }
                    spent
                })
            });
        });
    }
    group.finish();
    rt.block_on(store.close());
}

/// The same batches through the audit journal, as `serve`'s audit writer
/// appends them (`audit_append_blocking` on its own thread): the cost a
/// call waits for. The journal's thread moves them into the database
/// meanwhile (on the other cores), which this does not time.
fn bench_journal_append(c: &mut Criterion) {
    let (rt, store, mut head, _dir) = claimed_store(true);

    let mut group = c.benchmark_group("sqlite journal append");
    for n in [1_u64, 16, 256] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let (records, next) = batch(&head, n);
                    let started = Instant::now();
                    store
                        .audit_append_blocking(&records, &next)
                        .expect("inline")
                        .expect("append");
                    spent += started.elapsed();
                    head = next;
                }
                spent
            });
        });
    }
    group.finish();
    rt.block_on(store.close());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = bench_audit_append, bench_journal_append
}
criterion_main!(benches);
