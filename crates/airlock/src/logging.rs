//! Log output: stderr through a background writer, filtered by `RUST_LOG`.
//!
//! `RUST_LOG` is read as `tracing`'s filter, with two guards for an
//! operator's slip: a value that does not parse is named and the default
//! used, and a value without a level of its own (`RUST_LOG=hyper=debug`, or
//! the typo `RUST_LOG=infoo`, which names a target, not a level) keeps
//! warnings and errors of everything else, where it would have silenced
//! them: airlock's warnings are security events (revocations, a store out
//! of reach, lost audit records).

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The filter when `RUST_LOG` is unset or empty. PostgreSQL's notices (a
/// migration's "already exists, skipping") are not news.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// The level of everything `RUST_LOG` does not name when it sets none.
const FLOOR: &str = "warn";

/// The filter to log with and what to say about `RUST_LOG` once logging
/// runs.
#[derive(Debug)]
struct Chosen {
    directives: String,
    warnings: Vec<String>,
}

/// Reads `rust_log` (the value of `RUST_LOG`, if set).
fn choose(rust_log: Option<&str>) -> Chosen {
    let Some(value) = rust_log.map(str::trim).filter(|v| !v.is_empty()) else {
        return Chosen {
            directives: DEFAULT_FILTER.to_owned(),
            warnings: Vec::new(),
        };
    };
    if let Err(e) = EnvFilter::builder().parse(value) {
        return Chosen {
            directives: DEFAULT_FILTER.to_owned(),
            warnings: vec![format!(
                "RUST_LOG={value:?} is not a log filter ({e}); logging with the default, \
                 {DEFAULT_FILTER:?}"
            )],
        };
    }
    let directives: Vec<&str> = split_directives(value);
    let sets_a_level = directives.iter().any(|d| d.parse::<LevelFilter>().is_ok());
    if sets_a_level {
        return Chosen {
            directives: value.to_owned(),
            warnings: Vec::new(),
        };
    }
    let mut warnings = Vec::new();
    for bare in directives.iter().filter(|d| is_bare_target(d)) {
        warnings.push(format!(
            "RUST_LOG names {bare:?}, which is not a level (trace, debug, info, warn, error, \
             off): it is read as a target, every level of targets starting with {bare:?}"
        ));
    }
    warnings.push(format!(
        "RUST_LOG={value:?} sets no level for everything else: logging its warnings and \
         errors (as RUST_LOG={FLOOR},{value}); add a level to choose (e.g. RUST_LOG=info,{value})"
    ));
    Chosen {
        directives: format!("{FLOOR},{value}"),
        warnings,
    }
}

/// The comma-separated directives of a filter, commas inside a span's
/// `[...]` or field set `{...}` left alone.
fn split_directives(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0_usize;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// A directive that is only a name: no level, span or field of its own.
fn is_bare_target(directive: &str) -> bool {
    !directive.contains(['=', '[', '{']) && directive.parse::<LevelFilter>().is_err()
}

/// Starts logging to stderr; the guard flushes what is pending at exit.
/// What `RUST_LOG` needed said is logged first, as warnings.
pub fn init(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let chosen = choose(rust_log.as_deref());
    // Parsed above (or the default): the lossy parse drops nothing here.
    let filter = EnvFilter::builder().parse_lossy(&chosen.directives);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let ansi = colours(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    for warning in chosen.warnings {
        tracing::warn!("{warning}");
    }
    guard
}

/// Whether log lines are coloured: only on a terminal (escape codes in a
/// log file or pipe are noise), and not when `NO_COLOR` is set to anything
/// but the empty string (no-color.org).
fn colours(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colours(true, None));
        assert!(colours(true, Some(OsStr::new(""))));
        assert!(!colours(true, Some(OsStr::new("1"))));
        assert!(!colours(false, None));
    }

    #[test]
    fn unset_or_empty_is_the_default() {
        for value in [None, Some(""), Some("  ")] {
            let chosen = choose(value);
            assert_eq!(chosen.directives, DEFAULT_FILTER);
            assert!(chosen.warnings.is_empty());
        }
    }

    #[test]
    fn a_value_with_a_level_is_taken_as_it_is() {
        for value in [
            "warn",
            "INFO",
            "off",
            "info,airlock::call=warn",
            "hyper=debug,error",
        ] {
            let chosen = choose(Some(value));
            assert_eq!(chosen.directives, value);
            assert!(chosen.warnings.is_empty(), "{value}: {:?}", chosen.warnings);
        }
    }

    #[test]
    fn a_typo_for_a_level_keeps_warnings_and_is_named() {
        let chosen = choose(Some("infoo"));
        assert_eq!(chosen.directives, "warn,infoo");
        assert_eq!(chosen.warnings.len(), 2, "{:?}", chosen.warnings);
        assert!(chosen.warnings[0].contains("\"infoo\", which is not a level"));
        assert!(chosen.warnings[1].contains("RUST_LOG=info,infoo"));
    }

    #[test]
    fn targets_alone_keep_everything_else_at_warn() {
        let chosen = choose(Some("hyper=debug,airlock::call=info"));
        assert_eq!(chosen.directives, "warn,hyper=debug,airlock::call=info");
        // No bare name: only the note on the level.
        assert_eq!(chosen.warnings.len(), 1, "{:?}", chosen.warnings);
    }

    #[test]
    fn a_value_that_does_not_parse_is_named_and_the_default_used() {
        let chosen = choose(Some("info,hyper=loud"));
        assert_eq!(chosen.directives, DEFAULT_FILTER);
        assert_eq!(chosen.warnings.len(), 1);
        assert!(chosen.warnings[0].contains("is not a log filter"));
    }

    #[test]
    fn commas_inside_spans_do_not_split() {
        assert_eq!(
            split_directives("info, [req{a=1,b=2}]=debug ,"),
            vec!["info", "[req{a=1,b=2}]=debug"]
        );
    }
}
