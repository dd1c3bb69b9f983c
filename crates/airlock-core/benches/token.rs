//! Token handling on the request path: the shape check, hashing, the
//! constant-time comparison of hashes, and generation (admin path).

use std::hint::black_box;

use airlock_core::token::{self, TokenHash};
use criterion::{criterion_group, criterion_main, Criterion};

mod support;

fn bench_tokens(c: &mut Criterion) {
    let secret = token::generate_token();
    let good = secret.expose().to_owned();
    let mut bad_last = good.clone();
    bad_last.pop();
    bad_last.push('!');
    let short = &good[..good.len() - 1];

    let mut group = c.benchmark_group("token");
    group.bench_function("generate", |b| b.iter(token::generate_token));
    group.bench_function("hash (SHA-256)", |b| {
        b.iter(|| TokenHash::of(black_box(&good)))
    });
    group.bench_function("well-formed: valid", |b| {
        b.iter(|| token::is_well_formed(black_box(&good)))
    });
    group.bench_function("well-formed: bad last char", |b| {
        b.iter(|| token::is_well_formed(black_box(&bad_last)))
    });
    group.bench_function("well-formed: wrong length", |b| {
        b.iter(|| token::is_well_formed(black_box(short)))
    });

    let hash = TokenHash::of(&good);
    let same = TokenHash::of(&good);
    let other = TokenHash::of(&bad_last);
    // Equal and different hashes must cost the same (constant-time compare).
    group.bench_function("hash eq: equal", |b| {
        b.iter(|| black_box(&hash) == black_box(&same))
    });
    group.bench_function("hash eq: different", |b| {
        b.iter(|| black_box(&hash) == black_box(&other))
    });
    let hex = hash.to_hex();
    group.bench_function("hash to hex", |b| b.iter(|| black_box(&hash).to_hex()));
    group.bench_function("hash from hex", |b| {
        b.iter(|| TokenHash::from_hex(black_box(&hex)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::quick();
    targets = bench_tokens
}
criterion_main!(benches);
