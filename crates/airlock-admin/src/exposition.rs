//! The two text formats `/metrics` speaks: OpenMetrics, which
//! `prometheus-client` encodes and Prometheus asks for, and Prometheus'
//! classic text format (`text/plain; version=0.0.4`), for every other
//! client (curl, scripts, older scrapers).

use axum::http::{header, HeaderMap};

/// Content type of an OpenMetrics answer.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of a classic text format answer.
pub(crate) const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the client's `Accept` prefers OpenMetrics (Prometheus' does)
/// to the classic format: OpenMetrics at a quality above 0 and at least
/// that of `text/plain` (or a range holding it: `text/*`, `*/*`).
/// Anything else gets the classic format.
pub(crate) fn wants_openmetrics(headers: &HeaderMap) -> bool {
    let mut openmetrics: f32 = 0.0;
    let mut plain: f32 = 0.0;
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for range in ranges {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        let quality = params
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok())
            .filter(|q| (0.0..=1.0).contains(q))
            .unwrap_or(0.0);
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            openmetrics = openmetrics.max(quality);
        } else if ["text/plain", "text/*", "*/*"]
            .iter()
            .any(|m| media.eq_ignore_ascii_case(m))
        {
            plain = plain.max(quality);
        }
    }
    openmetrics > 0.0 && openmetrics >= plain
}

/// The classic text format of an OpenMetrics exposition: without the
/// `# EOF` and `# UNIT` lines, and with each counter's `# HELP` and
/// `# TYPE` naming its samples (`name_total`, where OpenMetrics names the
/// family `name`). Sample lines are the same in both formats.
pub(crate) fn to_classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut classic = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match described {
            Some(renamed) => classic.push_str(&renamed),
            None => classic.push_str(line),
        }
        classic.push('\n');
    }
    classic
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const OPENMETRICS_TEXT: &str = "\
# HELP airlock_calls Calls.
# TYPE airlock_calls counter
airlock_calls_total{provider=\"openai\"} 3
# HELP airlock_open Open connections.
# TYPE airlock_open gauge
airlock_open 2
# HELP airlock_seconds Latency.
# TYPE airlock_seconds histogram
# UNIT airlock_seconds seconds
airlock_seconds_sum 0.5
airlock_seconds_count 1
airlock_seconds_bucket{le=\"+Inf\"} 1
# EOF
";

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        assert_eq!(
            to_classic(OPENMETRICS_TEXT),
            "\
# HELP airlock_calls_total Calls.
# TYPE airlock_calls_total counter
airlock_calls_total{provider=\"openai\"} 3
# HELP airlock_open Open connections.
# TYPE airlock_open gauge
airlock_open 2
# HELP airlock_seconds Latency.
# TYPE airlock_seconds histogram
airlock_seconds_sum 0.5
airlock_seconds_count 1
airlock_seconds_bucket{le=\"+Inf\"} 1
"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let accept = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
            }
            wants_openmetrics(&headers)
        };
        // What Prometheus sends.
        assert!(accept(&[
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ]));
        assert!(accept(&["text/plain", "Application/OpenMetrics-Text"]));
        assert!(!accept(&[]));
        assert!(!accept(&["*/*"]));
        assert!(!accept(&["text/plain;version=0.0.4"]));
        assert!(!accept(&["application/openmetrics-text; q=0, text/plain"]));
        assert!(!accept(&["application/openmetrics-text;q=0"]));
        // Preferences by quality, not by presence.
        assert!(!accept(&[
            "text/plain;q=1, application/openmetrics-text;q=0.5"
        ]));
        assert!(accept(&[
            "text/plain;q=0.4, application/openmetrics-text;q=0.5"
        ]));
        assert!(!accept(&["application/openmetrics-text;q=nonsense"]));
        assert!(!accept(&["text/*;q=1, application/openmetrics-text;q=0.5"]));
        assert!(!accept(&["*/*, application/openmetrics-text;q=0.9"]));
    }
}
