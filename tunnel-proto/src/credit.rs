//! Per-stream credit between two Postern ends (proxy and agent).
//!
//! russh 0.65 re-opens an SSH channel's receive window as soon as its session loop *receives*
//! data, not when the consumer has drained it, so the SSH window cannot slow one stream without
//! blocking the whole connection. Between proxy and agent both ends are Postern, so each stream
//! carries its own credit on top of SSH: a sender may have at most [`STREAM_WINDOW`] bytes of a
//! stream that its peer has not yet passed on, and the receiver grants credit back as its
//! consumer drains. A grant is an SSH `CHANNEL_EXTENDED_DATA` message of type [`CREDIT_EXT`] on
//! the stream's own channel, carrying a 4-byte big-endian byte count; the receiving session loop
//! never has to block, so a stalled stream stalls only itself.
//!
//! Between proxy and agent, credit is used on a stream when both ends announced
//! [`CREDIT_VERSION`] or later in their `@control` hello. Between a client and the proxy, when
//! both identification strings carry [`CREDIT_ID_TAG`] (Postern's client SDK and proxy). Otherwise
//! the stream runs as before (back-pressure by blocking the loop).

/// The `data_type_code` of a credit grant (an SSH extended-data type; `1` is stderr). The bytes
/// spell `pCrd`.
pub const CREDIT_EXT: u32 = 0x7043_7264;

/// Bytes a sender may have outstanding on one stream, in each direction.
pub const STREAM_WINDOW: u32 = 2 << 20;

/// A receiver grants credit back once it has passed on this many bytes since its last grant.
pub const GRANT_EVERY: u32 = STREAM_WINDOW / 4;

/// The first protocol version whose ends use per-stream credit.
pub const CREDIT_VERSION: u32 = 2;

/// The word a Postern end puts in the comment of its SSH identification string to say it speaks
/// credit on client channels too (`SSH-2.0-Postern_0.1.0 postern-credit`). Clients and proxies
/// have no `@control` channel between them, and each must know before its first byte whether the
/// other will grant: the identification strings are the first thing both ends send.
pub const CREDIT_ID_TAG: &str = "postern-credit";

/// Whether an SSH identification string (`SSH-2.0-softwareversion SP comments`, with or without
/// its line end) carries [`CREDIT_ID_TAG`] among its comments.
pub fn id_speaks_credit(id: &[u8]) -> bool {
    let id = String::from_utf8_lossy(id);
    id.trim_end()
        .split_once(' ')
        .is_some_and(|(_, comments)| comments.split_whitespace().any(|w| w == CREDIT_ID_TAG))
}

/// The payload of a grant of `bytes`.
pub fn encode_grant(bytes: u32) -> [u8; 4] {
    bytes.to_be_bytes()
}

/// A grant's byte count, or `None` for a payload that is not exactly 4 bytes or grants nothing.
pub fn decode_grant(payload: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = payload.try_into().ok()?;
    match u32::from_be_bytes(bytes) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_round_trip_and_odd_payloads_are_refused() {
        for n in [1, GRANT_EVERY, STREAM_WINDOW, u32::MAX] {
            assert_eq!(decode_grant(&encode_grant(n)), Some(n));
        }
        assert_eq!(decode_grant(&[]), None);
        assert_eq!(decode_grant(&[0, 0, 1]), None);
        assert_eq!(decode_grant(&[0, 0, 0, 1, 0]), None);
        assert_eq!(decode_grant(&encode_grant(0)), None);
    }

    #[test]
    fn only_a_tagged_comment_speaks_credit() {
        assert!(id_speaks_credit(
            b"SSH-2.0-Postern_0.1.0 postern-credit\r\n"
        ));
        assert!(id_speaks_credit(
            b"SSH-2.0-PosternClient_1 other postern-credit"
        ));
        assert!(!id_speaks_credit(b"SSH-2.0-Postern_0.1.0"));
        assert!(!id_speaks_credit(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"));
        assert!(!id_speaks_credit(b"SSH-2.0-postern-credit"));
        assert!(!id_speaks_credit(b"SSH-2.0-x postern-credit-not"));
        assert!(!id_speaks_credit(&[0xff, 0xfe, b' ']));
    }
}
