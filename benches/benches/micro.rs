//! Criterion micro-benches of the hot pieces: the `@control` codec, the routing table under
//! contention, and the certificate checks a login runs.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use postern_dial::mint::{self, CertSpec};
use tunnel_proto::control::Message;

fn codec(c: &mut Criterion) {
    let msgs = vec![
        Message::Heartbeat { active_streams: 42 },
        Message::Drain {
            reason: "proxy shutting down".into(),
            grace_secs: 30,
        },
        Message::ProxySet {
            ids: (0..8).map(|i| format!("proxy-{i}")).collect(),
        },
    ];
    let mut wire = BytesMut::new();
    for m in &msgs {
        m.encode(&mut wire).unwrap();
    }
    c.bench_function("control/encode 3 messages", |b| {
        let mut out = BytesMut::with_capacity(1024);
        b.iter(|| {
            out.clear();
            for m in &msgs {
                m.encode(&mut out).unwrap();
            }
            black_box(out.len());
        })
    });
    c.bench_function("control/feed+decode 3 messages", |b| {
        b.iter(|| {
            let mut buf = BytesMut::new();
            black_box(Message::feed(&mut buf, black_box(&wire)).unwrap());
        })
    });
}

fn certs(c: &mut Criterion) {
    let ca = mint::generate_key();
    let key = mint::generate_key();
    let now = mint::now_unix();
    let cert = mint::issue(
        &ca,
        key.public_key(),
        &CertSpec::Agent {
            host_id: "a1".into(),
            cluster: "bench".into(),
        },
        now - 60,
        now + 3600,
    )
    .unwrap();
    let trusted = vec![tunnel_proto::certs::ca_fingerprint(ca.public_key())];
    c.bench_function("certs/check agent certificate", |b| {
        b.iter(|| {
            black_box(tunnel_proto::certs::check_agent_cert(
                &cert, "a1", "bench", now, &trusted,
            ))
            .unwrap()
        })
    });
}

/// Lookups from 2 threads at once (the machine's cores), on a table of 1,000 clusters. A live
/// `Tunnel` needs a russh session handle, so the table holds none: this measures the lock-free
/// lookup every stream open starts with, not the round-robin step.
fn routing(c: &mut Criterion) {
    use postern_proxy::routing::RoutingTable;
    let table = Arc::new(RoutingTable::default());
    let names: Vec<String> = (0..1000).map(|i| format!("cluster-{i}")).collect();
    c.bench_function("routing/pick from 2 threads (per lookup)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (table, names) = (table.clone(), &names);
                    s.spawn(move || {
                        for i in 0..iters {
                            let n = &names[((i as usize) * 7 + t) % names.len()];
                            black_box(table.pick(n, "auth").is_err());
                        }
                    });
                }
            });
            start.elapsed() / 2
        })
    });
}

criterion_group!(benches, codec, certs, routing);
criterion_main!(benches);
