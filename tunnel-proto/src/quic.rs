//! The QUIC transport's wire contract: frames on the agent's first stream, the header of each
//! proxy-opened stream, and the signatures that bind an SSH identity to one QUIC connection.
//!
//! ## The conversation
//! After the QUIC/TLS handshake (ALPN [`ALPN`]) the agent opens one bidirectional stream, the
//! *control stream*, and both sides read exporter values from the TLS session
//! ([`EXPORTER_LABEL`], context [`AGENT_CONTEXT`] or [`PROXY_CONTEXT`], [`EXPORTER_LEN`] bytes):
//! equal on both ends, different for every connection.
//!
//! 1. agent → proxy: [`Frame::AgentAuth`]: its login (`@agent/<host-id>.<cluster>`), its host
//!    certificate, and an SSHSIG signature ([`SIG_NAMESPACE`]) with the certificate's key over the
//!    agent exporter value.
//! 2. proxy → agent: [`Frame::ProxyAuth`] (its host certificate or key, and its signature over the
//!    proxy exporter value), or [`Frame::Refused`] and the connection closes.
//! 3. agent → proxy: [`Frame::Register`] per target; proxy → agent: [`Frame::Registered`] each.
//! 4. Then both sides speak the `@control` messages ([`Frame::Control`]) on the same stream.
//!
//! For each client stream the proxy opens a bidirectional stream and writes [`Frame::Open`]; the
//! agent answers [`Frame::Accept`] or [`Frame::Refuse`], and raw payload follows both ways.
//!
//! ## Clients
//! A client may dial the same listener with its SSH **user** certificate: the same
//! [`Frame::AgentAuth`] with its user name as the login (signed over the same exporter value,
//! [`AGENT_CONTEXT`]: the certificate's type tells the two apart, as on SSH), answered with
//! [`Frame::ProxyAuth`] alone. It then opens one bidirectional stream per stream it wants, writes
//! [`Frame::Open`] with `<target>.<cluster>` as the target (what `direct-tcpip` names on SSH), and
//! the proxy answers [`Frame::Accept`] or [`Frame::Refuse`] with the reason.
//!
//! ## Frames
//! Same layout as [`crate::control`] (`u32` big-endian length, `u8` type, fields; strings are a
//! `u16` length and UTF-8), and types 1–15 *are* the control messages (1–5 today; the rest kept
//! for later ones), so one decoder serves the
//! whole stream. At most [`MAX_FRAME`] bytes.
//!
//! | type | frame | sent by |
//! |---|---|---|
//! | 1–15 | [`Frame::Control`] | both (see [`crate::control`]) |
//! | 16 | [`Frame::AgentAuth`] | agent or client, first |
//! | 17 | [`Frame::ProxyAuth`] | proxy |
//! | 18 | [`Frame::Refused`] | proxy |
//! | 19 | [`Frame::Register`] | agent |
//! | 20 | [`Frame::Registered`] | proxy |
//! | 32 | [`Frame::Open`] | proxy (to an agent) or client, first on a stream |
//! | 33 | [`Frame::Accept`] | agent, or proxy (to a client) |
//! | 34 | [`Frame::Refuse`] | agent, or proxy (to a client) |

use bytes::{Buf, BufMut, BytesMut};
use russh::keys::ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::control::{DecodeError, EncodeError, MAX_FRAME, Message, get_str, get_u32, put_str};

/// ALPN protocol of the tunnel over QUIC.
pub const ALPN: &[u8] = b"postern-tunnel/1";
/// The default upper bound of QUIC path MTU discovery (UDP payload bytes): quinn's own, what an
/// internet path of 1,500-byte Ethernet frames carries.
pub const MTU_UPPER_BOUND_DEFAULT: u16 = 1452;
/// The highest upper bound accepted: quinn sends up to 10 datagrams per UDP GSO batch and Linux
/// refuses batches over 64 KiB, so a larger MTU makes every batch fail and quinn's black-hole
/// detection falls back to 1,200.
pub const MTU_UPPER_BOUND_MAX: u16 = 6500;
/// QUIC's minimum MTU (RFC 9000): the lowest bound accepted.
pub const MTU_UPPER_BOUND_MIN: u16 = 1200;
/// Whether `bound` is an accepted MTU discovery upper bound.
pub fn mtu_bound_ok(bound: u16) -> bool {
    (MTU_UPPER_BOUND_MIN..=MTU_UPPER_BOUND_MAX).contains(&bound)
}
/// TLS exporter label (RFC 8446 7.5) of the login binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-postern-agent-auth";
/// Exporter context of the value the dialler (an agent or a client) signs.
pub const AGENT_CONTEXT: &[u8] = b"agent";
/// Exporter context of the value the proxy signs (distinct, so neither signature can be
/// reflected back as the other's).
pub const PROXY_CONTEXT: &[u8] = b"proxy";
/// Bytes of exporter value signed.
pub const EXPORTER_LEN: usize = 32;
/// The last frame type that belongs to [`crate::control`]'s messages (1–5 today).
pub const CONTROL_TYPES_END: u8 = 15;
/// SSHSIG namespace of the exporter signatures.
pub const SIG_NAMESPACE: &str = "postern-quic-login@postern";

/// One frame of the QUIC transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A `@control` message (types 1–15).
    Control(Message),
    /// The dialler's login: first frame on the control stream (an agent's, or a client's).
    AgentAuth {
        /// `@agent/<host-id>.<cluster>` for an agent, the user name for a client, as on SSH.
        login: String,
        /// The host (agent) or user (client) certificate, OpenSSH one-line form.
        cert: String,
        /// SSHSIG (PEM) by the certificate's key over the agent exporter value.
        signature: String,
    },
    /// The proxy's proof: its host certificate (or plain host key) and its signature.
    ProxyAuth {
        /// The proxy's host certificate or public key, OpenSSH one-line form.
        key: String,
        /// SSHSIG (PEM) by that key over the proxy exporter value.
        signature: String,
    },
    /// The login was refused; the proxy closes the connection after this.
    Refused {
        /// Why.
        reason: String,
    },
    /// Register a target (as `tcpip-forward` does on SSH).
    Register {
        /// Target name.
        target: String,
    },
    /// The answer to [`Frame::Register`].
    Registered {
        /// Target name.
        target: String,
        /// Whether it was registered.
        ok: bool,
        /// Why not, when refused.
        reason: String,
    },
    /// First frame of a stream: which target (from the proxy to an agent), or
    /// `<target>.<cluster>` (from a client to the proxy), and for whom.
    Open {
        /// Target name.
        target: String,
        /// Port the client asked for (passed on, as on SSH).
        port: u32,
        /// The client's address, for the agent's logs.
        originator: String,
        /// The client's port.
        originator_port: u32,
    },
    /// The agent dialled the target: payload follows.
    Accept,
    /// The agent refused the stream.
    Refuse {
        /// Why.
        reason: String,
    },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Control(_) => 0,
            Frame::AgentAuth { .. } => 16,
            Frame::ProxyAuth { .. } => 17,
            Frame::Refused { .. } => 18,
            Frame::Register { .. } => 19,
            Frame::Registered { .. } => 20,
            Frame::Open { .. } => 32,
            Frame::Accept => 33,
            Frame::Refuse { .. } => 34,
        }
    }

    /// Appends this frame to `out`.
    pub fn encode(&self, out: &mut impl BufMut) -> Result<(), EncodeError> {
        if let Frame::Control(m) = self {
            return m.encode(out);
        }
        let mut body = BytesMut::with_capacity(128);
        body.put_u8(self.kind());
        match self {
            Frame::Control(_) | Frame::Accept => {}
            Frame::AgentAuth {
                login,
                cert,
                signature,
            } => {
                put_str(&mut body, login)?;
                put_str(&mut body, cert)?;
                put_str(&mut body, signature)?;
            }
            Frame::ProxyAuth { key, signature } => {
                put_str(&mut body, key)?;
                put_str(&mut body, signature)?;
            }
            Frame::Refused { reason } | Frame::Refuse { reason } => put_str(&mut body, reason)?,
            Frame::Register { target } => put_str(&mut body, target)?,
            Frame::Registered { target, ok, reason } => {
                put_str(&mut body, target)?;
                body.put_u8(u8::from(*ok));
                put_str(&mut body, reason)?;
            }
            Frame::Open {
                target,
                port,
                originator,
                originator_port,
            } => {
                put_str(&mut body, target)?;
                body.put_u32(*port);
                put_str(&mut body, originator)?;
                body.put_u32(*originator_port);
            }
        }
        if body.len() + 4 > MAX_FRAME {
            return Err(EncodeError::TooLarge);
        }
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        Ok(())
    }

    /// Decodes one frame from the front of `buf`: the frame and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        if buf.len() < 5 {
            // A type byte is needed to tell control messages from the rest; a shorter prefix of
            // a valid frame is incomplete, and a zero length is malformed either way.
            if buf.len() >= 4 && buf[..4] == [0, 0, 0, 0] {
                return Err(DecodeError::Malformed("empty frame"));
            }
            return Message::decode(buf).map(|(m, n)| (Frame::Control(m), n));
        }
        if (1..=CONTROL_TYPES_END).contains(&buf[4]) {
            return Message::decode(buf).map(|(m, n)| (Frame::Control(m), n));
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
        let frame = match body.get_u8() {
            16 => Frame::AgentAuth {
                login: get_str(&mut body)?,
                cert: get_str(&mut body)?,
                signature: get_str(&mut body)?,
            },
            17 => Frame::ProxyAuth {
                key: get_str(&mut body)?,
                signature: get_str(&mut body)?,
            },
            18 => Frame::Refused {
                reason: get_str(&mut body)?,
            },
            19 => Frame::Register {
                target: get_str(&mut body)?,
            },
            20 => {
                let target = get_str(&mut body)?;
                if !body.has_remaining() {
                    return Err(DecodeError::Malformed("truncated flag"));
                }
                let ok = match body.get_u8() {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed("flag is not 0 or 1")),
                };
                Frame::Registered {
                    target,
                    ok,
                    reason: get_str(&mut body)?,
                }
            }
            32 => Frame::Open {
                target: get_str(&mut body)?,
                port: get_u32(&mut body)?,
                originator: get_str(&mut body)?,
                originator_port: get_u32(&mut body)?,
            },
            33 => Frame::Accept,
            34 => Frame::Refuse {
                reason: get_str(&mut body)?,
            },
            _ => return Err(DecodeError::Malformed("unknown frame type")),
        };
        if body.has_remaining() {
            return Err(DecodeError::Malformed("trailing bytes in frame"));
        }
        Ok((frame, 4 + len))
    }

    /// Decodes one frame from `buf` and advances past it; `Incomplete` consumes nothing.
    pub fn decode_from(buf: &mut BytesMut) -> Result<Frame, DecodeError> {
        let (frame, used) = Frame::decode(buf)?;
        buf.advance(used);
        Ok(frame)
    }

    /// Appends `data` to `buf` and decodes every whole frame in it, as
    /// [`Message::feed`] does: the frames before a malformed one come first, the error on the
    /// next call.
    pub fn feed(buf: &mut BytesMut, data: &[u8]) -> Result<Vec<Frame>, DecodeError> {
        crate::control::feed_frames(buf, data, Frame::decode)
    }
}

/// Why an exporter signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The signature is not an SSHSIG in PEM form.
    #[error("the login signature is not an SSH signature: {0}")]
    Malformed(String),
    /// The signature does not verify with that key over this connection's exporter value
    /// (wrong key, wrong namespace, or made for another connection: a replay).
    #[error("the login signature does not match this connection (replayed or forged)")]
    Mismatch,
    /// Signing failed (a key type ssh-key cannot sign with).
    #[error("cannot sign the login binding: {0}")]
    Sign(String),
}

impl BindingError {
    /// Label for the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            BindingError::Malformed(_) => "bad_binding",
            BindingError::Mismatch => "binding_mismatch",
            BindingError::Sign(_) => "bad_binding",
        }
    }
}

/// Signs an exporter value with `key`: an SSHSIG in PEM form for [`Frame::AgentAuth`] or
/// [`Frame::ProxyAuth`].
pub fn sign_binding(key: &PrivateKey, exporter: &[u8]) -> Result<String, BindingError> {
    key.sign(SIG_NAMESPACE, HashAlg::Sha512, exporter)
        .and_then(|sig| sig.to_pem(LineEnding::LF))
        .map_err(|e| BindingError::Sign(e.to_string()))
}

/// Checks that `signature` is `key`'s SSHSIG over `exporter` (this connection's value).
pub fn verify_binding(
    key: &PublicKey,
    exporter: &[u8],
    signature: &str,
) -> Result<(), BindingError> {
    let sig = SshSig::from_pem(signature).map_err(|e| BindingError::Malformed(e.to_string()))?;
    key.verify(SIG_NAMESPACE, exporter, &sig)
        .map_err(|_| BindingError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn all() -> Vec<Frame> {
        vec![
            Frame::AgentAuth {
                login: "@agent/h1.example".into(),
                cert: "ssh-ed25519-cert-v01@openssh.com AAAA".into(),
                signature: "-----BEGIN SSH SIGNATURE-----\nx\n-----END SSH SIGNATURE-----".into(),
            },
            Frame::ProxyAuth {
                key: "ssh-ed25519 AAAA".into(),
                signature: "sig".into(),
            },
            Frame::Refused {
                reason: "untrusted CA".into(),
            },
            Frame::Register {
                target: "auth".into(),
            },
            Frame::Registered {
                target: "auth".into(),
                ok: true,
                reason: String::new(),
            },
            Frame::Control(Message::Hello {
                version: 2,
                id: "p1".into(),
            }),
            Frame::Control(Message::Heartbeat { active_streams: 3 }),
            Frame::Open {
                target: "auth".into(),
                port: 3025,
                originator: "10.0.0.1".into(),
                originator_port: 5555,
            },
            Frame::Accept,
            Frame::Refuse {
                reason: "no such target".into(),
            },
        ]
    }

    #[test]
    fn round_trip_in_any_split() {
        let mut wire = BytesMut::new();
        for f in all() {
            f.encode(&mut wire).unwrap();
        }
        for cut in 0..wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Frame::feed(&mut buf, &wire[..cut]).unwrap();
            got.extend(Frame::feed(&mut buf, &wire[cut..]).unwrap());
            assert_eq!(got, all(), "split at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn control_messages_encode_as_on_ssh() {
        let m = Message::Drain {
            reason: "bye".into(),
            grace_secs: 9,
        };
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        m.encode(&mut a).unwrap();
        Frame::Control(m.clone()).encode(&mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(Frame::decode(&a).unwrap().0, Frame::Control(m));
    }

    #[test]
    fn malformed_frames() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0, 0],
            &[0, 0, 0, 0, 16],
            &[0xff, 0xff, 0xff, 0xff, 16],
            &[0, 0, 0, 1, 99],
            &[0, 0, 0, 1, 16],
            &[0, 0, 0, 4, 20, 0, 0, 7],
            &[0, 0, 0, 6, 20, 0, 0, 2, 0, 0],
            &[0, 0, 0, 2, 33, 0],
        ];
        for c in cases {
            assert!(
                matches!(Frame::decode(c), Err(DecodeError::Malformed(_))),
                "{c:?}: {:?}",
                Frame::decode(c)
            );
        }
        assert_eq!(Frame::decode(&[0, 0, 0]), Err(DecodeError::Incomplete));
        assert_eq!(
            Frame::decode(&[0, 0, 0, 9, 16, 0]),
            Err(DecodeError::Incomplete)
        );
    }

    #[test]
    fn binding_verifies_only_for_its_key_and_value() {
        let mut rng = rand::rng();
        let key = PrivateKey::random(&mut rng, russh::keys::Algorithm::Ed25519).unwrap();
        let other = PrivateKey::random(&mut rng, russh::keys::Algorithm::Ed25519).unwrap();
        let value = [7u8; EXPORTER_LEN];
        let sig = sign_binding(&key, &value).unwrap();
        verify_binding(key.public_key(), &value, &sig).unwrap();
        // Another connection's value: a replayed signature.
        assert_eq!(
            verify_binding(key.public_key(), &[8u8; EXPORTER_LEN], &sig),
            Err(BindingError::Mismatch)
        );
        assert_eq!(
            verify_binding(other.public_key(), &value, &sig),
            Err(BindingError::Mismatch)
        );
        assert!(matches!(
            verify_binding(key.public_key(), &value, "not a signature"),
            Err(BindingError::Malformed(_))
        ));
    }
}
