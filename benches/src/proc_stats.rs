//! RSS and CPU time of processes from `/proc` (Linux).

/// Resident set size of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU time of `pid` in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    stat_fields(pid)
        .map(|f| {
            let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (u + s) / ticks
        })
        .unwrap_or(0.0)
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some(f) = stat_fields(p)
                && let Some(pp) = f.get(1).and_then(|v| v.parse::<u32>().ok())
            {
                parents.push((p, pp));
            }
        }
    }
    let mut i = 0;
    while i < all.len() {
        let cur = all[i];
        for (p, pp) in &parents {
            if *pp == cur && !all.contains(p) {
                all.push(*p);
            }
        }
        i += 1;
    }
    all
}

/// Sum of RSS (KiB) over `pids`.
pub fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).sum()
}
