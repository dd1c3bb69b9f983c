//! The airlock load benchmark.
//!
//! `bench/run.sh` builds this crate and airlock in release mode and runs
//! `bench-run`, which starts the mock provider (`bench-mock`), nginx doing
//! only the header swap, and airlock with the audit trail on and off, then
//! runs every workload through every peer on loopback and writes a Markdown
//! report (see `BENCHMARKS.md` at the repository root).
//!
//! - [`mock`]: the mock provider (JSON, SSE, bulk bytes, upload).
//! - [`peers`]: starting the mock, nginx and airlock, and creating sessions.
//! - [`wrk`]: the load tool's script and output.
//! - [`sse`], [`first_use`]: the measurements that need their own client
//!   ([`client`]).
//! - [`procs`]: child processes, CPU time and resident memory from `/proc`.
//! - [`audit_metrics`]: the audit writer's commits, from airlock's metrics.
//! - [`run`]: the orchestration; [`results`], [`report`], [`targets`]: what
//!   it produced and how it is shown.
#![forbid(unsafe_code)]

pub mod audit_metrics;
pub mod client;
pub mod first_use;
pub mod machine;
pub mod mock;
pub mod peers;
pub mod procs;
pub mod report;
pub mod results;
pub mod run;
pub mod sse;
pub mod stats;
pub mod targets;
pub mod wrk;
