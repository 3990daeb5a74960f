//! How pctl prints: `--format text|json|yaml` with one schema per resource across formats, RFC
//! 3339 times (with a relative hint in text), and standard output that may close early (`pctl get
//! roles --format json | head -1` ends quietly instead of panicking on the broken pipe).

use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

/// Output format of `pctl get`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Format {
    /// YAML documents (`---` between resources), readable back by `pctl create -f`.
    Yaml,
    /// JSON: an object for one named resource, an array for a listing.
    Json,
    /// A table for people.
    Text,
}

/// Writes to standard output; a closed pipe ends pctl quietly (status 0), another error ends it
/// with status 1.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("pctl: writing the output: {e}");
        std::process::exit(1);
    }
}

/// `print!` that survives a closed pipe.
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write_out(format_args!($($t)*)) };
}

/// `println!` that survives a closed pipe.
macro_rules! outln {
    () => { $crate::output::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::output::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

pub(crate) use {out, outln};

pub use postern_client::times::{human_time, now, rfc3339, rfc3339_ms};

/// Prints one resource document: a JSON object, or one YAML document.
pub fn one<T: Serialize>(doc: &T, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(doc)?),
        _ => out!("{}", serde_norway::to_string(doc)?),
    }
    Ok(())
}

/// Prints a listing: a JSON array, or YAML documents separated by `---`.
pub fn list<T: Serialize>(docs: &[T], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(docs)?),
        _ => {
            let texts = docs
                .iter()
                .map(serde_norway::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            out!("{}", texts.join("---\n"))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(1_764_532_800), "2025-11-30T20:00:00Z");
        assert_eq!(rfc3339_ms(1_764_532_800_123), "2025-11-30T20:00:00.123Z");
        assert_eq!(rfc3339(0), "");
        assert!(human_time(now() + 3600).ends_with("(in 1h)"));
    }
}
