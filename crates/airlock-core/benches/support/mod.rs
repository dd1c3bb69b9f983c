//! Shared settings of the airlock-core micro-benchmarks: short warm-up and
//! measurement so that `cargo bench -p airlock-core` takes about a minute.

use std::time::Duration;

use criterion::Criterion;

/// Criterion tuned for quick runs of nanosecond-scale functions.
pub fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
}
