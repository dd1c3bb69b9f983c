//! The audit writer's own figures, read from an airlock's `/metrics`
//! around each measured round: how many records a commit took (the group
//! commit's size) and how long the store took per commit.

use std::net::SocketAddr;

use http::{Method, StatusCode};

use crate::client;

/// The writer's running totals at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuditTotals {
    /// Records committed.
    pub records: f64,
    /// Commits timed (`airlock_audit_commit_seconds_count`).
    pub commits: f64,
    /// Seconds the store spent on them.
    pub seconds: f64,
}

impl AuditTotals {
    /// The totals in Prometheus text, `None` when the writer exports none
    /// (audit off, or a build without the commit histogram).
    pub fn parse(text: &str) -> Option<Self> {
        let value = |name: &str| {
            text.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        Some(Self {
            records: value("airlock_audit_records_written_total")?,
            commits: value("airlock_audit_commit_seconds_count")?,
            seconds: value("airlock_audit_commit_seconds_sum")?,
        })
    }

    /// What happened between `self` (earlier) and `later`.
    pub fn until(self, later: Self) -> Self {
        Self {
            records: later.records - self.records,
            commits: later.commits - self.commits,
            seconds: later.seconds - self.seconds,
        }
    }

    /// Adds `other` to these totals.
    pub fn add(&mut self, other: Self) {
        self.records += other.records;
        self.commits += other.commits;
        self.seconds += other.seconds;
    }
}

/// Where an airlock's metrics are: admin address and token.
#[derive(Clone, Debug)]
pub struct MetricsSource {
    pub admin: SocketAddr,
    pub token: String,
}

/// Reads the audit writer's totals from `source`.
pub async fn read(source: &MetricsSource) -> anyhow::Result<Option<AuditTotals>> {
    let body = client::expect(
        source.admin,
        Method::GET,
        "/metrics",
        Some(&format!("Bearer {}", source.token)),
        None,
        StatusCode::OK,
    )
    .await?;
    Ok(AuditTotals::parse(&String::from_utf8_lossy(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_prometheus_text() {
        let text = "# HELP airlock_audit_records_written Audit records\n\
                    airlock_audit_records_written_total 120\n\
                    airlock_audit_commit_seconds_sum 0.25\n\
                    airlock_audit_commit_seconds_count 4\n\
                    airlock_audit_commit_seconds_bucket{le=\"0.00001\"} 0\n";
        let totals = AuditTotals::parse(text).unwrap();
        assert_eq!(
            totals,
            AuditTotals {
                records: 120.0,
                commits: 4.0,
                seconds: 0.25
            }
        );
        let earlier = AuditTotals {
            records: 20.0,
            commits: 1.0,
            seconds: 0.05,
        };
        let delta = earlier.until(totals);
        assert_eq!(delta.records, 100.0);
        assert_eq!(delta.commits, 3.0);
        assert!((delta.seconds - 0.2).abs() < 1e-9);
        // Audit off: no writer, no totals.
        assert_eq!(AuditTotals::parse("airlock_proxy_calls_total 3\n"), None);
    }
}
