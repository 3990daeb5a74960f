//! Logins under attack: a stranger cannot lock the owner out, refusals look alike (message and
//! timing), attacker-sized and control-character names are refused and never written raw to
//! the log.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use postern_auth::login::DENIED;
use support::logins::Bench;

/// Everything the tests in this binary log, as text.
fn captured() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(b.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_lock_the_owner_out() {
    let b = Bench::new("lockout", |_| {});
    b.add_user("bob", Some("bob's right password"), None);
    // Five wrong passwords from the attacker's address, then even the right one is throttled
    // there...
    for _ in 0..5 {
        let r = b
            .from("203.0.113.9", b.req("bob", Some("guess"), None))
            .await;
        assert_eq!((r.status, r.error.as_str()), (401, DENIED));
    }
    let r = b
        .from(
            "203.0.113.9",
            b.req("bob", Some("bob's right password"), None),
        )
        .await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.error.contains("from your address"), "{}", r.error);
    // ...while bob, from his own address, logs in.
    let r = b
        .from(
            "198.51.100.7",
            b.req("bob", Some("bob's right password"), None),
        )
        .await;
    assert_eq!(
        r.status, 200,
        "the owner was locked out by a stranger: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_wrong_passwords_and_wrong_secrets_answer_alike() {
    let b = Bench::new("alike", |_| {});
    b.add_user("carol", Some("carol's password!"), None);
    b.add_user("dave", None, Some("dave's real secret"));
    let answers = [
        b.from("192.0.2.1", b.req("nosuch", Some("pw"), None)).await,
        b.from("192.0.2.2", b.req("carol", Some("wrong"), None))
            .await,
        b.from("192.0.2.3", b.req("dave", None, Some("wrong secret")))
            .await,
        b.from("192.0.2.4", b.req("nosuch", None, Some("wrong secret")))
            .await,
        b.from("192.0.2.5", b.req("carol", None, Some("a secret")))
            .await,
    ];
    for a in &answers {
        assert_eq!((a.status, a.error.as_str()), (401, DENIED), "{answers:?}");
    }
    // The right secret still works, once.
    let r = b
        .from("192.0.2.6", b.req("dave", None, Some("dave's real secret")))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = b
        .from("192.0.2.7", b.req("dave", None, Some("dave's real secret")))
        .await;
    assert_eq!((r.status, r.error.as_str()), (401, DENIED));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_existing_users_take_the_same_time() {
    let b = Bench::new("timing", |_| {});
    b.add_user("erin", Some("erin's password!!"), None);
    b.add_user("frank", None, Some("frank's secret"));
    let mut unknown = Vec::new();
    let mut wrong_pw = Vec::new();
    let mut wrong_secret = Vec::new();
    // Interleaved, so that machine noise falls on all three alike; each from its own address
    // (the throttle is per address).
    for i in 0..30 {
        let t = Instant::now();
        let r = b
            .from(&format!("10.1.0.{i}"), b.req("nobody", Some("pw"), None))
            .await;
        unknown.push(t.elapsed());
        assert_eq!(r.status, 401);
        let t = Instant::now();
        let r = b
            .from(&format!("10.2.0.{i}"), b.req("erin", Some("pw"), None))
            .await;
        wrong_pw.push(t.elapsed());
        assert_eq!(r.status, 401);
        let t = Instant::now();
        let r = b
            .from(&format!("10.3.0.{i}"), b.req("frank", None, Some("nope")))
            .await;
        wrong_secret.push(t.elapsed());
        assert_eq!(r.status, 401);
    }
    let (u, w, s) = (median(unknown), median(wrong_pw), median(wrong_secret));
    println!("medians of 30: unknown user {u:?}, wrong password {w:?}, wrong secret {s:?}");
    for (name, x) in [("unknown user", u), ("wrong secret", s)] {
        let ratio = x.as_secs_f64() / w.as_secs_f64();
        assert!(
            (0.5..=2.0).contains(&ratio),
            "{name} answers in {x:?}, a wrong password in {w:?} (ratio {ratio:.2}): timing tells them apart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_sized_and_control_character_names_are_refused_and_escaped() {
    let log = captured();
    let b = Bench::new("names", |_| {});
    let huge = "u".repeat(59_000);
    let r = b.from("192.0.2.10", b.req(&huge, Some("pw"), None)).await;
    assert_eq!(r.status, 400, "{}", &r.error[..r.error.len().min(200)]);
    assert!(r.error.len() < 200, "the answer does not echo the name");
    assert!(
        b.logins.failures.is_empty(),
        "a refused name is not tracked"
    );

    let forged = "bob\n2026-11-30T00:00:00.000000Z  INFO postern_auth::login: login user=\"admin\" ok=true\x1b[2K";
    let r = b.from("192.0.2.11", b.req(forged, Some("pw"), None)).await;
    assert_eq!(r.status, 400);
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        text.contains("bob\\n2026"),
        "the name is logged, escaped: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("2026-11-30T00:00:00.000000Z")),
        "a forged log line: {text}"
    );
    assert!(!text.contains('\x1b'), "a raw escape in the log");
    assert!(!text.contains(&huge[..1000]), "a 59 KB name in the log");
}
