//! The `@control` channel: length-prefixed messages between an agent and a proxy.
//!
//! Frame: `u32` big-endian length of what follows, then a `u8` type, then the fields. Strings are
//! a `u16` big-endian length and UTF-8 bytes. A frame is at most [`MAX_FRAME`] bytes.
//!
//! | type | message | sent by |
//! |---|---|---|
//! | 1 | [`Message::Hello`] | both, first |
//! | 2 | [`Message::ProxySet`] | proxy |
//! | 3 | [`Message::Drain`] | proxy, when shutting down |
//! | 4 | [`Message::Heartbeat`] | agent |
//! | 5 | [`Message::TargetLabels`] | agent, once per target before it registers the target |
//! | 6 | [`Message::HostCaSigner`] | proxy, to agents of [`HOST_CA_SIGNER_VERSION`] or later |

use bytes::{Buf, BufMut, BytesMut};

/// The protocol version from which an agent understands [`Message::HostCaSigner`]; the proxy
/// sends it to no older agent (an unknown message type closes `@control`).
pub const HOST_CA_SIGNER_VERSION: u32 = 3;

/// Largest frame accepted (length field included).
pub const MAX_FRAME: usize = 64 * 1024;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message each way: protocol version and the sender's id (host id or proxy id).
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// Host id (agent) or proxy id (proxy).
        id: String,
    },
    /// The ids of every proxy of the cluster's edge, so the agent can hold a tunnel to each.
    ProxySet {
        /// Proxy ids.
        ids: Vec<String>,
    },
    /// The proxy is shutting down: move to another proxy before `grace_secs` run out.
    Drain {
        /// Why, for the agent's log.
        reason: String,
        /// Seconds until the proxy closes its remaining streams.
        grace_secs: u32,
    },
    /// The agent's load, sent periodically.
    Heartbeat {
        /// Streams the agent is serving now.
        active_streams: u32,
    },
    /// The labels of one target the agent serves (what roles' `node_labels` match). Sent before
    /// the target's `tcpip-forward`; the proxy refuses streams to a target whose labels it has
    /// not received.
    TargetLabels {
        /// The target name.
        target: String,
        /// `key = value` pairs, sorted by key, keys unique.
        labels: Vec<(String, String)>,
    },
    /// The key that signs the cluster's host certificates now (it changes at a host CA
    /// rotation's `update_clients`, and back on a rollback). An agent whose certificate has
    /// another signer renews it at a random moment within `spread_secs`, so a fleet picks up a
    /// rotated CA in that time without all renewing at once.
    HostCaSigner {
        /// SHA-256 fingerprint of the signing key (`SHA256:…`, as `ssh-keygen -l` prints).
        fingerprint: String,
        /// Seconds over which the agents of a proxy spread their renewals.
        spread_secs: u32,
    },
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a whole frame yet: read more and try again. Nothing was consumed.
    #[error("incomplete frame")]
    Incomplete,
    /// The bytes are not a valid frame; the channel should be closed.
    #[error("malformed control frame: {0}")]
    Malformed(&'static str),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message would exceed [`MAX_FRAME`] or a string its `u16` length.
    #[error("control message too large")]
    TooLarge,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::ProxySet { .. } => 2,
            Message::Drain { .. } => 3,
            Message::Heartbeat { .. } => 4,
            Message::TargetLabels { .. } => 5,
            Message::HostCaSigner { .. } => 6,
        }
    }

    /// Appends this message's frame to `out`.
    pub fn encode(&self, out: &mut impl BufMut) -> Result<(), EncodeError> {
        let mut body = BytesMut::with_capacity(64);
        body.put_u8(self.kind());
        match self {
            Message::Hello { version, id } => {
                body.put_u32(*version);
                put_str(&mut body, id)?;
            }
            Message::ProxySet { ids } => {
                let n = u16::try_from(ids.len()).map_err(|_| EncodeError::TooLarge)?;
                body.put_u16(n);
                for id in ids {
                    put_str(&mut body, id)?;
                }
            }
            Message::Drain { reason, grace_secs } => {
                put_str(&mut body, reason)?;
                body.put_u32(*grace_secs);
            }
            Message::Heartbeat { active_streams } => body.put_u32(*active_streams),
            Message::TargetLabels { target, labels } => {
                put_str(&mut body, target)?;
                let n = u16::try_from(labels.len()).map_err(|_| EncodeError::TooLarge)?;
                body.put_u16(n);
                for (k, v) in labels {
                    put_str(&mut body, k)?;
                    put_str(&mut body, v)?;
                }
            }
            Message::HostCaSigner {
                fingerprint,
                spread_secs,
            } => {
                put_str(&mut body, fingerprint)?;
                body.put_u32(*spread_secs);
            }
        }
        if body.len() + 4 > MAX_FRAME {
            return Err(EncodeError::TooLarge);
        }
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        Ok(())
    }

    /// Decodes one frame from the front of `buf`, returning the message and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Message, usize), DecodeError> {
        if buf.len() < 4 {
            return Err(DecodeError::Incomplete);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(DecodeError::Malformed("empty frame"));
        }
        if len + 4 > MAX_FRAME {
            return Err(DecodeError::Malformed("frame too large"));
        }
        if buf.len() < 4 + len {
            return Err(DecodeError::Incomplete);
        }
        let mut body = &buf[4..4 + len];
        let msg = match body.get_u8() {
            1 => Message::Hello {
                version: get_u32(&mut body)?,
                id: get_str(&mut body)?,
            },
            2 => {
                let n = get_u16(&mut body)?;
                let mut ids = Vec::with_capacity(usize::from(n).min(256));
                for _ in 0..n {
                    ids.push(get_str(&mut body)?);
                }
                Message::ProxySet { ids }
            }
            3 => Message::Drain {
                reason: get_str(&mut body)?,
                grace_secs: get_u32(&mut body)?,
            },
            4 => Message::Heartbeat {
                active_streams: get_u32(&mut body)?,
            },
            5 => {
                let target = get_str(&mut body)?;
                let n = get_u16(&mut body)?;
                let mut labels = Vec::with_capacity(usize::from(n).min(256));
                for _ in 0..n {
                    labels.push((get_str(&mut body)?, get_str(&mut body)?));
                }
                Message::TargetLabels { target, labels }
            }
            6 => Message::HostCaSigner {
                fingerprint: get_str(&mut body)?,
                spread_secs: get_u32(&mut body)?,
            },
            _ => return Err(DecodeError::Malformed("unknown message type")),
        };
        if body.has_remaining() {
            return Err(DecodeError::Malformed("trailing bytes in frame"));
        }
        Ok((msg, 4 + len))
    }

    /// Decodes one frame from `buf` and advances past it; `Incomplete` consumes nothing.
    pub fn decode_from(buf: &mut BytesMut) -> Result<Message, DecodeError> {
        let (msg, used) = Message::decode(buf)?;
        buf.advance(used);
        Ok(msg)
    }

    /// Appends `data` to `buf` and decodes every whole frame now in it, leaving a partial frame
    /// in `buf` for the next call. A malformed frame is an error: close the channel.
    ///
    /// The frames before a malformed one are returned first (`Ok`), with the malformed frame
    /// left at the front of `buf`; the next call, even with no data, returns the error. So what
    /// a peer sent before a bad frame is acted on however the bytes were split into reads.
    pub fn feed(buf: &mut BytesMut, data: &[u8]) -> Result<Vec<Message>, DecodeError> {
        feed_frames(buf, data, Message::decode)
    }
}

pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    let n = u16::try_from(s.len()).map_err(|_| EncodeError::TooLarge)?;
    out.put_u16(n);
    out.put_slice(s.as_bytes());
    Ok(())
}

pub(crate) fn get_u16(b: &mut &[u8]) -> Result<u16, DecodeError> {
    if b.remaining() < 2 {
        return Err(DecodeError::Malformed("truncated u16"));
    }
    Ok(b.get_u16())
}

pub(crate) fn get_u32(b: &mut &[u8]) -> Result<u32, DecodeError> {
    if b.remaining() < 4 {
        return Err(DecodeError::Malformed("truncated u32"));
    }
    Ok(b.get_u32())
}

pub(crate) fn get_str(b: &mut &[u8]) -> Result<String, DecodeError> {
    let n = usize::from(get_u16(b)?);
    if b.remaining() < n {
        return Err(DecodeError::Malformed("truncated string"));
    }
    let s =
        std::str::from_utf8(&b[..n]).map_err(|_| DecodeError::Malformed("string is not UTF-8"))?;
    let s = s.to_owned();
    b.advance(n);
    Ok(s)
}

/// A frame decoder: the frame at the front of a buffer, and the bytes it used.
pub(crate) type Decoder<T> = fn(&[u8]) -> Result<(T, usize), DecodeError>;

/// Appends `data` to `buf` and decodes every whole frame in it with `decode` (which returns a
/// frame and the bytes it used), leaving a partial frame for the next call. The frames before a
/// malformed one come first; the malformed one stays at the front of `buf`, so the next call
/// returns its error. Shared by [`Message::feed`] and the QUIC transport's `Frame::feed`.
pub(crate) fn feed_frames<T>(
    buf: &mut BytesMut,
    data: &[u8],
    decode: Decoder<T>,
) -> Result<Vec<T>, DecodeError> {
    buf.extend_from_slice(data);
    let mut out = Vec::new();
    loop {
        match decode(buf) {
            Ok((frame, used)) => {
                buf.advance(used);
                out.push(frame);
            }
            Err(DecodeError::Incomplete) => return Ok(out),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                id: "h1".into(),
            },
            Message::ProxySet {
                ids: vec!["a".into(), "b".into()],
            },
            Message::Drain {
                reason: "shutdown".into(),
                grace_secs: 30,
            },
            Message::Heartbeat { active_streams: 7 },
            Message::TargetLabels {
                target: "web".into(),
                labels: vec![("env".into(), "prod".into()), ("team".into(), "a".into())],
            },
            Message::TargetLabels {
                target: "db".into(),
                labels: vec![],
            },
        ]
    }

    #[test]
    fn round_trip_and_incomplete() {
        let mut buf = BytesMut::new();
        for m in all() {
            m.encode(&mut buf).unwrap();
        }
        let whole = buf.clone();
        for cut in 0..whole.len() {
            // Every strict prefix either decodes whole frames or says Incomplete, never panics.
            let mut part = BytesMut::from(&whole[..cut]);
            while let Ok(_m) = Message::decode_from(&mut part) {}
            assert_eq!(Message::decode(&part).unwrap_err(), DecodeError::Incomplete);
        }
        for m in all() {
            assert_eq!(Message::decode_from(&mut buf).unwrap(), m);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn feed_yields_whole_frames_and_keeps_the_rest() {
        let mut wire = BytesMut::new();
        for m in all() {
            m.encode(&mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let (a, b) = wire.split_at(7);
        assert!(Message::feed(&mut buf, a).unwrap().is_empty());
        let mut got = Message::feed(&mut buf, &b[..b.len() - 1]).unwrap();
        got.extend(Message::feed(&mut buf, &b[b.len() - 1..]).unwrap());
        assert_eq!(got, all());
        assert!(buf.is_empty());
        assert!(Message::feed(&mut buf, &[0, 0, 0, 1, 9]).is_err());
    }

    /// Found by the `control_frames` fuzz target: a whole frame followed by a malformed one in
    /// the same read was dropped with the error, while the same bytes read in two pieces
    /// delivered it (reduced: the fuzzer's frame was a `ProxySet` with no ids). Now the good frame comes first and the error on the next call.
    #[test]
    fn feed_returns_the_frames_before_a_malformed_one() {
        let mut wire = BytesMut::new();
        Message::ProxySet { ids: vec![] }.encode(&mut wire).unwrap();
        wire.extend_from_slice(&[0, 0, 0, 1, 9]);
        let mut buf = BytesMut::new();
        assert_eq!(
            Message::feed(&mut buf, &wire).unwrap(),
            [Message::ProxySet { ids: vec![] }]
        );
        assert_eq!(
            Message::feed(&mut buf, &[]),
            Err(DecodeError::Malformed("unknown message type"))
        );
    }

    #[test]
    fn malformed_frames() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0, 0],
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 1, 9],
            &[0, 0, 0, 2, 4, 0],
            &[0, 0, 0, 6, 4, 0, 0, 0, 1, 0],
            &[0, 0, 0, 7, 1, 0, 0, 0, 1, 0, 5],
            &[0, 0, 0, 8, 1, 0, 0, 0, 1, 0, 1, 0xff],
            // TargetLabels: one label announced, none there.
            &[0, 0, 0, 6, 5, 0, 1, b'w', 0, 1],
            // TargetLabels: a key with no value.
            &[0, 0, 0, 9, 5, 0, 1, b'w', 0, 1, 0, 1, b'k'],
        ];
        for c in cases {
            assert!(
                matches!(Message::decode(c), Err(DecodeError::Malformed(_))),
                "{c:?}"
            );
        }
    }
}
