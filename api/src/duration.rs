//! Durations as Teleport roles write them (`30h`, `8h`, `1h30m`, `90s`, `30h0m0s`), plus days
//! (`30d`, `1d12h`): the one duration syntax of every Postern command and config, and the one
//! parser of it (`pctl`, `psh`, role files, `postern-proxy certs issue --ttl`).
//!
//! Kept by hand rather than `humantime::parse_duration`, checked against humantime 2.4 (2026-11):
//! humantime does accept every form above, but it also accepts what Teleport's syntax (Go's
//! `time.ParseDuration` plus days) refuses, in ways that matter for a certificate lifetime: `M`
//! is *months* and `m` minutes, so a role's `max_session_ttl: 10M` would mean ten months where
//! Teleport refuses it; `y` and `w`, words (`1 hour`), spaces, fractions (`1.5h`) and sub-second
//! units (`500ms`, which would have to be rounded to whole seconds) all parse too. Refusing them
//! around humantime would take a grammar check as long as this parser, so this parser stays:
//! units `d`, `h`, `m`, `s`, whole numbers, overflow refused, errors that say what to write.

use std::fmt::Write;

/// Parses a duration such as `30d`, `8h`, `1h30m` or `45s` into seconds. Units: `d`, `h`, `m`,
/// `s`.
pub fn parse_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (write e.g. 8h, 1h30m, 90s)".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => {
                return Err(format!(
                    "bad duration '{text}': unknown unit '{c}' (use d, h, m, s)"
                ));
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("bad duration '{text}': a number must come before '{c}'"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration '{text}' is too large"))?;
    }
    if !digits.is_empty() {
        return Err(format!(
            "bad duration '{text}': '{digits}' has no unit (write e.g. {digits}h or {digits}s)"
        ));
    }
    Ok(total)
}

/// Formats seconds the short way: `8h`, `1h30m`, `45s`, `0s`.
pub fn format_secs(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
        if n > 0 {
            let _ = write!(out, "{n}{unit}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_secs("8h").unwrap(), 8 * 3600);
        assert_eq!(parse_secs("30h0m0s").unwrap(), 30 * 3600);
        assert_eq!(parse_secs("1h30m").unwrap(), 5400);
        assert_eq!(format_secs(5400), "1h30m");
        assert_eq!(format_secs(45), "45s");
        assert!(parse_secs("8").unwrap_err().contains("no unit"));
        assert_eq!(parse_secs("30d").unwrap(), 30 * 86400);
        assert_eq!(parse_secs("1d12h").unwrap(), 36 * 3600);
        assert!(parse_secs("8w").unwrap_err().contains("unknown unit 'w'"));
        assert!(parse_secs("h").is_err());
        assert!(parse_secs("99999999999999999999h").is_err());
    }

    #[test]
    fn refuses_what_teleport_refuses_and_humantime_would_accept() {
        for text in [
            "10M", "1y", "2w", "500ms", "1 hour", "1h 30m", "1.5h", "-1h",
        ] {
            assert!(parse_secs(text).is_err(), "{text} must be refused");
        }
    }
}
