//! Prometheus metrics of the request path.
//!
//! Every label combination is created once when a provider is built, so
//! recording a call is an atomic add, with no lookup or allocation.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

type HistogramFamily = Family<ProviderLabels, Histogram, fn() -> Histogram>;

/// The proxy's metric families.
#[derive(Clone)]
pub struct ProxyMetrics {
    calls: Family<CallLabels, Counter>,
    latency: HistogramFamily,
    upstream_latency: HistogramFamily,
    tunnels: Family<ProviderLabels, Gauge>,
}

/// One provider's pre-created series.
#[derive(Clone)]
pub struct ProviderMetrics {
    /// Index 0 is `allow`; index `1 + code.index()` is that refusal; the
    /// last is `client_aborted`.
    decisions: Vec<Counter>,
    latency: Histogram,
    upstream_latency: Histogram,
    /// Open WebSocket tunnels.
    pub(crate) tunnels: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

// === impl ProxyMetrics ===

impl ProxyMetrics {
    /// Creates the families and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let upstream_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let tunnels = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "airlock_proxy_calls",
            "Calls handled by the proxy, by provider and decision (allow or the error code)",
            calls.clone(),
        );
        registry.register(
            "airlock_proxy_response_seconds",
            "Time from request to response headers sent back to the agent",
            latency.clone(),
        );
        registry.register(
            "airlock_upstream_response_seconds",
            "Time the upstream took to answer with response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "airlock_proxy_websocket_tunnels",
            "WebSocket tunnels open now, by provider (each also counted once in airlock_proxy_calls)",
            tunnels.clone(),
        );
        Self {
            calls,
            latency,
            upstream_latency,
            tunnels,
        }
    }

    /// Pre-creates the series of one provider.
    pub fn for_provider(&self, provider: &str) -> ProviderMetrics {
        let decision = |decision: &'static str| {
            self.calls
                .get_or_create(&CallLabels {
                    provider: provider.to_owned(),
                    decision,
                })
                .clone()
        };
        let mut decisions = vec![decision("allow")];
        decisions.extend(ErrorCode::ALL.iter().map(|c| decision(c.as_str())));
        decisions.push(decision(crate::audit::UNDECIDED));
        let labels = ProviderLabels {
            provider: provider.to_owned(),
        };
        ProviderMetrics {
            decisions,
            latency: self.latency.get_or_create(&labels).clone(),
            upstream_latency: self.upstream_latency.get_or_create(&labels).clone(),
            tunnels: self.tunnels.get_or_create(&labels).clone(),
        }
    }
}

// === impl ProviderMetrics ===

impl ProviderMetrics {
    /// Counts one call with its outcome and time to response headers.
    pub fn record(&self, outcome: Option<ErrorCode>, seconds: f64) {
        let index = outcome.map_or(0, |c| 1 + c.index());
        if let Some(counter) = self.decisions.get(index) {
            counter.inc();
        }
        self.latency.observe(seconds);
    }

    /// Counts one refusal answered before any request was read (a
    /// connection over `proxy.max_connections`): no latency to observe.
    pub fn record_refusal(&self, code: ErrorCode) {
        if let Some(counter) = self.decisions.get(1 + code.index()) {
            counter.inc();
        }
    }

    /// Counts one call whose agent went away before airlock answered it.
    pub fn record_aborted(&self) {
        if let Some(counter) = self.decisions.last() {
            counter.inc();
        }
    }

    /// Records how long the upstream took to answer.
    pub fn record_upstream(&self, seconds: f64) {
        self.upstream_latency.observe(seconds);
    }
}
