//! Durations as people write them: `90s`, `15m`, `2h`, `1d`, or combined (`1h30m`).

use std::time::Duration;

/// Why a duration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not written as a duration.
    #[error(
        "invalid duration {0:?}: use a number followed by ms, s, m, h or d, e.g. 500ms, 90s, 15m, 2h, 1h30m"
    )]
    Invalid(String),
    /// Written as one, but too large to count (round 43: said to be no
    /// duration at all).
    #[error("duration {0:?} is too large: at most about 584 million years")]
    TooLarge(String),
}

/// Parses `500ms`, `90s`, `15m`, `2h`, `1d` and combinations such as `1h30m`
/// (each unit once, largest first).
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let fail = || DurationError::Invalid(input.to_owned());
    let too_large = || DurationError::TooLarge(input.to_owned());
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    let mut last_unit: Option<u64> = None;
    let mut chars = input.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(too_large)?,
            );
            continue;
        }
        // Units in milliseconds.
        let unit = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(fail()),
        };
        // Each unit once, largest first (`1h30m`): `30m1h` or `1m1m` is a
        // typo more likely than a sum.
        if last_unit.is_some_and(|last| unit >= last) {
            return Err(fail());
        }
        last_unit = Some(unit);
        let n = number.take().ok_or_else(fail)?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(too_large)?;
    }
    if number.is_some() || total == 0 && input.trim().is_empty() {
        return Err(fail());
    }
    Ok(Duration::from_millis(total))
}

/// Formats a whole number of seconds the short way (`1h30m`, `45s`, `0s`).
pub fn format(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&(secs / unit).to_string());
            out.push(name);
            secs %= unit;
        }
    }
    out
}

#[cfg(test)]
mod tests;
