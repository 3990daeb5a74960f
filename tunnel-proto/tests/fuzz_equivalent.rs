//! The stable-Rust counterpart of `tunnel-proto/fuzz` (which needs nightly and cargo-fuzz):
//! property tests over arbitrary bytes and over structure-aware inputs (valid frames with a
//! length or byte mutated, names from a character pool, generated discovery and login JSON),
//! checking the same invariants as the fuzz targets.

use bytes::BytesMut;
use proptest::prelude::*;
use russh::keys::ssh_key::PrivateKey;
use russh::keys::ssh_key::certificate::Builder;
use russh::keys::ssh_key::private::Ed25519Keypair;
use tunnel_proto::certs::{
    CertType, Certificate, ca_fingerprint, check_agent_cert, check_proxy_cert, check_user_cert,
};
use tunnel_proto::control::{DecodeError, MAX_FRAME, Message};
use tunnel_proto::discovery::{
    FindResponse, PingResponse, ProxySettings, join_host_port, split_host_port,
};
use tunnel_proto::login::{LoginRequest, LoginResponse};
use tunnel_proto::names::{
    AGENT_LOGIN_PREFIX, EXT_CLUSTER, EXT_ROLE, MAX_LABEL_LEN, StreamTarget, agent_login,
    validate_cluster, validate_label,
};
use tunnel_proto::quic::Frame;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings of characters drawn from `pool`, up to `max` long.
fn text_from(pool: &'static [char], max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(pool), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

/// Any Unicode text, short.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

const NAME_CHARS: &[char] = &[
    'a', 'b', 'z', '0', '9', '-', '.', ':', '[', ']', '@', '/', 'A', ' ', 'é', '\0',
];

// ---------------------------------------------------------------- control frames

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), any_text(12)).prop_map(|(version, id)| Message::Hello { version, id }),
        proptest::collection::vec(any_text(8), 0..5).prop_map(|ids| Message::ProxySet { ids }),
        (any_text(12), any::<u32>())
            .prop_map(|(reason, grace_secs)| Message::Drain { reason, grace_secs }),
        any::<u32>().prop_map(|active_streams| Message::Heartbeat { active_streams }),
        (
            any_text(8),
            proptest::collection::vec((any_text(6), any_text(6)), 0..4)
        )
            .prop_map(|(target, labels)| Message::TargetLabels { target, labels }),
        (any_text(12), any::<u32>()).prop_map(|(fingerprint, spread_secs)| {
            Message::HostCaSigner {
                fingerprint,
                spread_secs,
            }
        }),
    ]
}

/// Decodes every whole frame of `wire` at once: the messages, the error if any, the leftover.
fn decode_all(wire: &[u8]) -> (Vec<Message>, Option<DecodeError>, BytesMut) {
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    loop {
        let before = buf.clone();
        match Message::decode_from(&mut buf) {
            Ok(m) => out.push(m),
            Err(DecodeError::Incomplete) => {
                assert_eq!(buf, before, "Incomplete consumed bytes");
                return (out, None, buf);
            }
            Err(e) => return (out, Some(e), buf),
        }
    }
}

/// The control-frame invariants (the same as the `control_frames` fuzz target).
fn check_wire(wire: &[u8], step: usize) {
    match Message::decode(wire) {
        Ok((msg, used)) => {
            assert!(
                used > 4 && used <= wire.len() && used <= MAX_FRAME,
                "{used}"
            );
            let mut again = BytesMut::new();
            msg.encode(&mut again)
                .expect("a decoded message re-encodes");
            assert_eq!(&again[..], &wire[..used], "re-encoding differs: {msg:?}");
        }
        Err(DecodeError::Incomplete) => {
            if wire.len() >= 4 {
                let len = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
                assert!(
                    wire.len() < 4 + len,
                    "Incomplete with the whole frame present"
                );
            }
        }
        Err(DecodeError::Malformed(_)) => {}
    }
    let (whole, whole_err, whole_rest) = decode_all(wire);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut err = None;
    for piece in wire.chunks(step.max(1)) {
        match Message::feed(&mut buf, piece) {
            Ok(ms) => got.extend(ms),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    if err.is_none() {
        // A malformed frame after good ones in the same call is reported by the next call.
        match Message::feed(&mut buf, &[]) {
            Ok(ms) => got.extend(ms),
            Err(e) => err = Some(e),
        }
    }
    assert_eq!(got, whole, "chunked feed gave other messages");
    assert_eq!(err, whole_err, "chunked feed gave another error");
    if err.is_none() {
        assert_eq!(buf, whole_rest, "chunked feed left other bytes");
    }
}

fn encode_all(msgs: &[Message]) -> (BytesMut, Vec<usize>) {
    let mut wire = BytesMut::new();
    let mut starts = Vec::new();
    for m in msgs {
        starts.push(wire.len());
        m.encode(&mut wire).unwrap();
    }
    (wire, starts)
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn control_arbitrary_bytes(
        wire in proptest::collection::vec(any::<u8>(), 0..64),
        step in 1usize..9,
    ) {
        check_wire(&wire, step);
    }

    #[test]
    fn control_frame_with_small_lengths(
        len in 0u32..24,
        body in proptest::collection::vec(any::<u8>(), 0..28),
        step in 1usize..9,
    ) {
        // A length prefix that mostly fits: reaches the field decoders.
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend(body);
        check_wire(&wire, step);
    }

    #[test]
    fn control_round_trip_in_any_chunking(
        msgs in proptest::collection::vec(message(), 0..5),
        step in 1usize..17,
    ) {
        let (wire, _) = encode_all(&msgs);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(step) {
            got.extend(Message::feed(&mut buf, piece).unwrap());
        }
        prop_assert_eq!(got, msgs);
        prop_assert!(buf.is_empty());
        check_wire(&wire, step);
    }

    #[test]
    fn control_valid_frames_with_a_mutated_length(
        msgs in proptest::collection::vec(message(), 1..4),
        which in any::<prop::sample::Index>(),
        new_len in prop_oneof![any::<u32>(), 0u32..64],
        step in 1usize..9,
    ) {
        let (mut wire, starts) = encode_all(&msgs);
        let at = starts[which.index(starts.len())];
        wire[at..at + 4].copy_from_slice(&new_len.to_be_bytes());
        check_wire(&wire, step);
    }

    #[test]
    fn control_valid_frames_with_a_mutated_byte(
        msgs in proptest::collection::vec(message(), 1..4),
        at in any::<prop::sample::Index>(),
        delta in 1u8..=255,
        step in 1usize..9,
    ) {
        let (mut wire, _) = encode_all(&msgs);
        let i = at.index(wire.len());
        wire[i] = wire[i].wrapping_add(delta);
        check_wire(&wire, step);
    }
}

#[test]
fn oversized_messages_are_refused_by_the_encoder_not_emitted() {
    let big = Message::Hello {
        version: 1,
        id: "x".repeat(usize::from(u16::MAX) + 1),
    };
    assert!(big.encode(&mut BytesMut::new()).is_err());
    let many = Message::ProxySet {
        ids: vec!["a".repeat(1000); 70],
    };
    let mut out = BytesMut::new();
    assert!(many.encode(&mut out).is_err());
    assert!(out.is_empty(), "a refused message wrote bytes");
}

// ---------------------------------------------------------------- QUIC frames

fn quic_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        message().prop_map(Frame::Control),
        (any_text(12), any_text(24), any_text(24)).prop_map(|(login, cert, signature)| {
            Frame::AgentAuth {
                login,
                cert,
                signature,
            }
        }),
        (any_text(24), any_text(24))
            .prop_map(|(key, signature)| Frame::ProxyAuth { key, signature }),
        any_text(12).prop_map(|reason| Frame::Refused { reason }),
        any_text(12).prop_map(|target| Frame::Register { target }),
        (any_text(12), any::<bool>(), any_text(12))
            .prop_map(|(target, ok, reason)| Frame::Registered { target, ok, reason }),
        (any_text(12), any::<u32>(), any_text(12), any::<u32>()).prop_map(
            |(target, port, originator, originator_port)| Frame::Open {
                target,
                port,
                originator,
                originator_port,
            }
        ),
        Just(Frame::Accept),
        any_text(12).prop_map(|reason| Frame::Refuse { reason }),
    ]
}

/// The QUIC frame invariants (as for control frames): a decoded frame re-encodes to the same
/// bytes, `Incomplete` only while the frame is short, and feeding in any chunking gives what
/// decoding the whole gives.
fn check_quic_wire(wire: &[u8], step: usize) {
    match Frame::decode(wire) {
        Ok((frame, used)) => {
            assert!(
                used > 4 && used <= wire.len() && used <= MAX_FRAME,
                "{used}"
            );
            let mut again = BytesMut::new();
            frame
                .encode(&mut again)
                .expect("a decoded frame re-encodes");
            assert_eq!(&again[..], &wire[..used], "re-encoding differs: {frame:?}");
        }
        Err(DecodeError::Incomplete) => {
            if wire.len() >= 4 {
                let len = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
                assert!(
                    wire.len() < 4 + len,
                    "Incomplete with the whole frame present"
                );
            }
        }
        Err(DecodeError::Malformed(_)) => {}
    }
    let (whole, whole_err, whole_rest) = decode_all_frames(wire);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut err = None;
    for piece in wire.chunks(step.max(1)) {
        match Frame::feed(&mut buf, piece) {
            Ok(fs) => got.extend(fs),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    if err.is_none() {
        match Frame::feed(&mut buf, &[]) {
            Ok(fs) => got.extend(fs),
            Err(e) => err = Some(e),
        }
    }
    assert_eq!(got, whole, "chunked feed gave other frames");
    assert_eq!(err, whole_err, "chunked feed gave another error");
    if err.is_none() {
        assert_eq!(buf, whole_rest, "chunked feed left other bytes");
    }
}

/// Decodes every whole frame of `wire` at once: the frames, the error if any, the leftover.
fn decode_all_frames(wire: &[u8]) -> (Vec<Frame>, Option<DecodeError>, BytesMut) {
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    loop {
        let before = buf.clone();
        match Frame::decode_from(&mut buf) {
            Ok(f) => out.push(f),
            Err(DecodeError::Incomplete) => {
                assert_eq!(buf, before, "Incomplete consumed bytes");
                return (out, None, buf);
            }
            Err(e) => return (out, Some(e), buf),
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn quic_arbitrary_bytes(
        wire in proptest::collection::vec(any::<u8>(), 0..64),
        step in 1usize..9,
    ) {
        check_quic_wire(&wire, step);
    }

    #[test]
    fn quic_frame_with_small_lengths(
        len in 0u32..24,
        kind in prop_oneof![16u8..=20, 32u8..=34, any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..28),
        step in 1usize..9,
    ) {
        let mut wire = len.to_be_bytes().to_vec();
        wire.push(kind);
        wire.extend(body);
        check_quic_wire(&wire, step);
    }

    #[test]
    fn quic_round_trip_in_any_chunking(
        frames in proptest::collection::vec(quic_frame(), 0..5),
        step in 1usize..17,
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(step) {
            got.extend(Frame::feed(&mut buf, piece).unwrap());
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
        check_quic_wire(&wire, step);
    }

    #[test]
    fn quic_valid_frames_with_a_mutated_byte(
        frames in proptest::collection::vec(quic_frame(), 1..4),
        at in any::<prop::sample::Index>(),
        delta in 1u8..=255,
        step in 1usize..9,
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let i = at.index(wire.len());
        wire[i] = wire[i].wrapping_add(delta);
        check_quic_wire(&wire, step);
    }
}

// ---------------------------------------------------------------- names

fn check_name(s: &str) {
    if validate_label("label", s).is_ok() {
        assert!(!s.is_empty() && s.len() <= MAX_LABEL_LEN && !s.starts_with('-'));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
    if validate_cluster(s).is_ok() {
        assert!(s.len() <= 253);
        assert!(s.split('.').all(|p| validate_label("part", p).is_ok()));
    }
    match StreamTarget::parse(s) {
        Ok(t) => {
            assert_eq!(t.host(), s);
            assert!(validate_label("target", &t.target).is_ok());
            assert!(validate_cluster(&t.cluster).is_ok());
            assert!(!s.contains(':') && s.parse::<std::net::IpAddr>().is_err());
        }
        Err(e) => assert!(e.to_string().len() < 600),
    }
    if let Some(principal) = s.strip_prefix(AGENT_LOGIN_PREFIX)
        && let Some((host_id, cluster)) = principal.split_once('.')
        && validate_label("host id", host_id).is_ok()
        && validate_cluster(cluster).is_ok()
    {
        assert_eq!(agent_login(host_id, cluster), s);
    }
    if let Some((host, port)) = split_host_port(s) {
        assert!(!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(join_host_port(host, port), s);
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn names_from_a_character_pool(s in text_from(NAME_CHARS, 24)) {
        check_name(&s);
        check_name(&format!("{AGENT_LOGIN_PREFIX}{s}"));
    }

    #[test]
    fn names_any_text(s in any_text(24)) {
        check_name(&s);
    }

    #[test]
    fn valid_targets_parse_back(
        target in text_from(&['a', 'q', '0', '-'], 8),
        parts in proptest::collection::vec(text_from(&['b', '7', '-'], 6), 1..4),
    ) {
        let host = format!("{target}.{}", parts.join("."));
        let valid = validate_label("t", &target).is_ok()
            && parts.iter().all(|p| validate_label("c", p).is_ok());
        prop_assert_eq!(StreamTarget::parse(&host).is_ok(), valid, "{}", host);
    }
}

// ---------------------------------------------------------------- discovery and login JSON

fn settings() -> impl Strategy<Value = ProxySettings> {
    (
        proptest::option::of(text_from(NAME_CHARS, 16)),
        proptest::option::of(text_from(NAME_CHARS, 16)),
        text_from(NAME_CHARS, 16),
        any::<bool>(),
        proptest::collection::vec(any_text(6), 0..3),
        any_text(8),
        proptest::collection::vec(any_text(6), 0..3),
    )
        .prop_map(
            |(web, public, listen, tls, transports, id, ids)| ProxySettings {
                web_public_addr: web,
                tunnel_public_addr: public,
                tunnel_listen_addr: listen,
                tls_routing_enabled: tls,
                transports,
                quic_port: None,
                proxy_id: id,
                proxy_ids: ids,
            },
        )
}

fn round_trip<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(v).unwrap();
    assert!(!json.contains('\n'));
    assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v);
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn discovery_json_round_trips_and_resolves(
        p in settings(),
        names in proptest::collection::vec(any_text(6), 0..3),
        version in any::<u32>(),
        web_host in text_from(NAME_CHARS, 12),
    ) {
        let ping = PingResponse {
            cluster_names: names,
            server_version: "0.1.0".into(),
            min_client_version: "0.1.0".into(),
            protocol_version: version,
            proxy: p.clone(),
        };
        round_trip(&ping);
        round_trip(&FindResponse { server_version: "x".into(), proxy: p.clone() });
        let addr = p.tunnel_addr(None, &web_host);
        if let Some(public) = p.tunnel_public_addr.as_deref().filter(|a| !a.is_empty()) {
            prop_assert_eq!(addr, public);
        } else if split_host_port(&p.tunnel_listen_addr).is_none() {
            prop_assert_eq!(addr, join_host_port(&web_host, "3024"));
        }
    }

    #[test]
    fn login_json_round_trips(
        cluster in any_text(8),
        user in any_text(8),
        secrets in (proptest::option::of(any_text(8)), proptest::option::of(any_text(8))),
        ttl_secs in any::<u64>(),
        status in any::<u16>(),
        roles in proptest::collection::vec(any_text(6), 0..3),
    ) {
        round_trip(&LoginRequest {
            cluster: cluster.clone(),
            user,
            secret: secrets.0.clone(),
            new_password: secrets.1,
            password: secrets.0,
            public_key: "ssh-ed25519 AAAA".into(),
            ttl_secs,
            source: None,
        });
        round_trip(&LoginResponse { status, cluster, roles, ..Default::default() });
    }

    #[test]
    fn json_decoders_take_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        let _ = serde_json::from_slice::<PingResponse>(&bytes);
        let _ = serde_json::from_slice::<FindResponse>(&bytes);
        let _ = serde_json::from_slice::<LoginRequest>(&bytes);
        if let Ok(r) = serde_json::from_slice::<LoginResponse>(&bytes) {
            round_trip(&r);
        }
    }
}

// ---------------------------------------------------------------- certificates

const NOW: u64 = 1_800_000_000;
const PRINCIPALS: &[&str] = &["h1.example", "h2.example", "h1.other", "alice", "localhost"];
const EXT_KEYS: &[&str] = &[EXT_CLUSTER, EXT_ROLE, "permit-pty"];
const EXT_VALUES: &[&str] = &["example", "other", "auth", "service", "proxy", ""];

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

proptest! {
    #![proptest_config(config(96))]

    /// Each check's verdict on a signed certificate matches the rules written out here.
    #[test]
    fn cert_checks_follow_the_rules(
        host in any::<bool>(),
        other_ca in any::<bool>(),
        principals in proptest::collection::btree_set(proptest::sample::select(PRINCIPALS), 1..3),
        exts in proptest::collection::btree_map(
            proptest::sample::select(EXT_KEYS), proptest::sample::select(EXT_VALUES), 0..3),
        critical in any::<bool>(),
        window in (-3i64..3, -3i64..3),
        login in (proptest::sample::select(&["h1", "h2", "alice"][..]),
                  proptest::sample::select(&["example", "other"][..])),
    ) {
        let (after, before) = (NOW.wrapping_add_signed(window.0), NOW.wrapping_add_signed(window.1));
        // The builder (debug) refuses an empty window.
        prop_assume!(after < before);
        let mut b = Builder::new([1u8; 16], key(9).public_key().key_data().clone(), after, before)
            .unwrap();
        b.cert_type(if host { CertType::Host } else { CertType::User }).unwrap();
        for p in &principals {
            b.valid_principal(*p).unwrap();
        }
        for (k, v) in &exts {
            b.extension(*k, *v).unwrap();
        }
        if critical {
            b.critical_option("force-command", "/bin/true").unwrap();
        }
        let cert: Certificate = b.sign(&key(if other_ca { 8 } else { 7 })).unwrap();
        let trusted = [ca_fingerprint(key(7).public_key())];
        let common = |kind: CertType, principal: &str| {
            !other_ca && after <= NOW && NOW < before && cert.cert_type() == kind
                && principals.contains(principal) && !critical
        };
        let (host_id, cluster) = login;
        let agent_ok = common(CertType::Host, &format!("{host_id}.{cluster}"))
            && exts.get(EXT_CLUSTER) == Some(&cluster)
            && matches!(exts.get(EXT_ROLE), Some(&"auth" | &"service"));
        let r = check_agent_cert(&cert, host_id, cluster, NOW, &trusted);
        prop_assert_eq!(r.is_ok(), agent_ok, "{:?}", r);
        let r = check_user_cert(&cert, host_id, NOW, &trusted);
        prop_assert_eq!(r.is_ok(), common(CertType::User, host_id), "{:?}", r);
        let r = check_proxy_cert(&cert, &format!("[{host_id}]"), NOW, &trusted);
        prop_assert_eq!(r.is_ok(), common(CertType::Host, host_id), "{:?}", r);
    }

    #[test]
    fn cert_parsers_take_arbitrary_input(
        text in any_text(80),
        bytes in proptest::collection::vec(any::<u8>(), 0..160),
    ) {
        let _ = Certificate::from_openssh(&format!("ssh-ed25519-cert-v01@openssh.com {text}"));
        let _ = Certificate::from_bytes(&bytes);
    }
}
