//! Times for people: RFC 3339 UTC, with a relative hint, as pctl, psh and the doctor print them.

/// Unix seconds as RFC 3339 UTC (`2026-11-30T20:00:00Z`); empty for 0 (never / unset).
pub fn rfc3339(secs: u64) -> String {
    if secs == 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Now, Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 with a relative hint: `2026-11-30T20:00:00Z (in 7h59m)`, `… (3m ago)`; `never`
/// for 0.
pub fn human_time(secs: u64) -> String {
    if secs == 0 {
        return "never".into();
    }
    let now = now();
    let hint = if secs >= now {
        format!("in {}", postern_api::duration::format_secs(secs - now))
    } else {
        format!("{} ago", postern_api::duration::format_secs(now - secs))
    };
    format!("{} ({hint})", rfc3339(secs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_with_hints() {
        assert_eq!(super::rfc3339(0), "");
        assert_eq!(super::rfc3339(1_796_068_800), "2026-11-30T20:00:00Z");
        assert_eq!(super::human_time(0), "never");
        assert!(super::human_time(1).starts_with("1970-01-01T00:00:01Z ("));
        assert!(super::human_time(1).ends_with(" ago)"));
    }
}
