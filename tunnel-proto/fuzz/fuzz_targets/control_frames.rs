//! `@control` frames: `Message::decode`, `decode_from` and `feed`, on raw bytes and on valid
//! frames with one byte mutated (often a length field).
//!
//! Invariants: a decoded message re-encodes to exactly the bytes it came from; `Incomplete` only
//! when the frame is really not all there and consumes nothing; feeding the bytes in chunks
//! yields the same messages, the same error and the same leftover as decoding them at once.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tunnel_proto::control::{DecodeError, MAX_FRAME, Message};

#[derive(Arbitrary, Debug)]
enum Msg {
    Hello(u32, String),
    ProxySet(Vec<String>),
    Drain(String, u32),
    Heartbeat(u32),
    TargetLabels(String, Vec<(String, String)>),
    HostCaSigner(String, u32),
}

impl From<Msg> for Message {
    fn from(m: Msg) -> Message {
        match m {
            Msg::Hello(version, id) => Message::Hello { version, id },
            Msg::ProxySet(ids) => Message::ProxySet { ids },
            Msg::Drain(reason, grace_secs) => Message::Drain { reason, grace_secs },
            Msg::Heartbeat(active_streams) => Message::Heartbeat { active_streams },
            Msg::TargetLabels(target, labels) => Message::TargetLabels { target, labels },
            Msg::HostCaSigner(fingerprint, spread_secs) => Message::HostCaSigner {
                fingerprint,
                spread_secs,
            },
        }
    }
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

fn check(wire: &[u8], step: usize) {
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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(mode >> 1) + 1;
    if mode & 1 == 0 {
        check(rest, step);
        return;
    }
    // Structure-aware: valid frames, then one byte overwritten.
    let mut u = Unstructured::new(rest);
    let mut wire = BytesMut::new();
    while let Ok(true) = u.arbitrary::<bool>() {
        let Ok(m) = u.arbitrary::<Msg>() else { break };
        let m = Message::from(m);
        let mut one = BytesMut::new();
        if m.encode(&mut one).is_ok() {
            let back = Message::decode(&one).expect("an encoded message decodes");
            assert_eq!(back, (m, one.len()));
            wire.extend_from_slice(&one);
        }
    }
    if !wire.is_empty()
        && let (Ok(at), Ok(byte)) = (u.arbitrary::<usize>(), u.arbitrary::<u8>())
    {
        let at = at % wire.len();
        wire[at] = byte;
    }
    check(&wire, step);
});
