//! 500 concurrent password logins: the hashing gate keeps memory bounded and the logins it
//! cannot take soon are told "busy, retry" (503 with a retry delay). In its own test binary, so
//! that the peak resident set measured (`VmHWM` of this process, which runs the Auth server's
//! login service in-process) is the server's alone.

mod support;

use std::time::Instant;

use support::logins::Bench;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The bound asserted: 128 MiB of peak RSS for the whole test process (it starts near 27 MiB;
/// two hashing slots hold 2 × 19 MiB). Unbounded, 500 Argon2id
/// hashes at 19 MiB each could reach 9.5 GiB (the issue measured 4.96 GiB for 200).
const PEAK_BOUND_KIB: u64 = 128 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_logins_stay_under_a_memory_bound() {
    let b = Bench::new("memory", |c| {
        c.limits.max_queued_logins = 64;
        c.limits.login_queue_timeout_ms = 2000;
    });
    b.add_user("victim", Some("the victim's password"), None);
    let before = status_kib("VmHWM:");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let logins = b.logins.clone();
        let mut req = b.req("victim", Some("wrong password"), None);
        req.source = Some(format!("10.9.{}.{}:1", i / 250, i % 250));
        tasks.push(tokio::spawn(async move {
            postern_auth::login::answer(&logins, req, "127.0.0.1:1".parse().unwrap()).await
        }));
    }
    let (mut refused, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            401 => refused += 1,
            503 if r.retry_after_secs > 0 && r.error.contains("busy") => busy += 1,
            _ => panic!("unexpected answer: {r:?}"),
        }
    }
    let peak = status_kib("VmHWM:");
    println!(
        "500 concurrent logins in {:?}: {refused} checked (401), {busy} told busy (503, retry); peak RSS {} -> {} MiB (bound {} MiB)",
        start.elapsed(),
        before / 1024,
        peak / 1024,
        PEAK_BOUND_KIB / 1024
    );
    assert!(refused >= 2, "some logins were checked");
    assert!(busy > 0, "the queue bound answered busy");
    assert!(
        peak < PEAK_BOUND_KIB,
        "peak RSS {} MiB over the {} MiB bound",
        peak / 1024,
        PEAK_BOUND_KIB / 1024
    );
}
