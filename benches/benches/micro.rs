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

/// What authorization adds to a stream open: `ClusterPolicy::decide` for a user with 3 roles
/// (one denying by label) on a labelled target, in a cache of 100 roles, 1,000 users and 10 locks.
fn authorize(c: &mut Criterion) {
    use postern_api::proto::{Lock, PolicyEvent, PolicyUser};
    use postern_proxy::config::PolicySource;
    use postern_proxy::policy::{ClusterPolicy, PolicyCache, Who};
    let policy = ClusterPolicy {
        cluster: "bench".into(),
        source: PolicySource::Auth,
        stale_after: std::time::Duration::from_secs(3600),
        cache: PolicyCache::default(),
    };
    let snap = |mut e: PolicyEvent| {
        e.snapshot = true;
        policy.cache.apply(e);
    };
    for i in 0..100 {
        let yaml = format!(
            "kind: role\nmetadata: {{name: r{i}}}\nspec:\n  allow:\n    node_labels: {{env: [prod, e{i}]}}\n  deny:\n    node_labels: {{team: t{i}}}\nversion: v7\n"
        );
        let role = postern_api::resource::parse_roles(&yaml).unwrap().remove(0);
        snap(PolicyEvent {
            kind: "role".into(),
            name: format!("r{i}"),
            role: Some(role),
            ..Default::default()
        });
    }
    for i in 0..1000 {
        snap(PolicyEvent {
            kind: "user".into(),
            name: format!("u{i}"),
            user: Some(PolicyUser {
                name: format!("u{i}"),
                roles: vec![format!("r{}", i % 100), "r1".into(), "r2".into()],
            }),
            ..Default::default()
        });
    }
    for i in 0..10 {
        snap(PolicyEvent {
            kind: "lock".into(),
            name: format!("l{i}"),
            lock: Some(Lock {
                user: format!("locked{i}"),
                message: "x".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    policy.cache.apply(PolicyEvent {
        revision: 1,
        snapshot: true,
        snapshot_end: true,
        ..Default::default()
    });
    let who = Who {
        user: "u7".into(),
        cert_roles: Some(vec!["r7".into(), "r1".into(), "r2".into()]),
        request: None,
    };
    let labels: std::collections::BTreeMap<String, String> = [
        ("env".to_string(), "prod".to_string()),
        ("team".into(), "web".into()),
    ]
    .into();
    assert!(policy.decide(&who, "web", Some(&labels)).is_ok());
    c.bench_function("policy/decide one stream open", |b| {
        b.iter(|| black_box(policy.decide(black_box(&who), "web", Some(&labels)).is_ok()))
    });
}

criterion_group!(benches, codec, certs, routing, authorize);
criterion_main!(benches);
