//! [`FrameStream`]: the QUIC tunnel's control stream, [`Frame`]s in both directions. The agent
//! opens it and the proxy accepts it; both read and write it through this one type.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control::{DecodeError, EncodeError};
use crate::quic::Frame;

/// Bytes asked of the stream per read while a frame is incomplete.
const READ_CHUNK: usize = 64 * 1024;

/// Why a control stream read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameStreamError {
    /// The peer sent bytes that are not a frame (or one over the size limit).
    #[error("bad frame on the control stream: {0}")]
    Decode(DecodeError),
    /// A frame to send could not be encoded (a field over its limit).
    #[error("cannot encode a control frame: {0}")]
    Encode(#[from] EncodeError),
    /// The peer finished the stream.
    #[error("the peer closed the control stream")]
    Closed,
    /// The stream failed underneath (connection lost, reset).
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
}

/// A control stream's two halves and what was read but not yet decoded.
pub struct FrameStream<R, W> {
    recv: R,
    send: W,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> FrameStream<R, W> {
    /// Wraps the halves of a freshly opened stream.
    pub fn new(send: W, recv: R) -> Self {
        FrameStream {
            recv,
            send,
            buf: BytesMut::new(),
        }
    }

    /// Reads until one whole frame is decoded; frames read past it are kept for the next call.
    pub async fn read(&mut self) -> Result<Frame, FrameStreamError> {
        loop {
            match Frame::decode_from(&mut self.buf) {
                Ok(f) => return Ok(f),
                Err(DecodeError::Incomplete) => {}
                Err(e) => return Err(FrameStreamError::Decode(e)),
            }
            self.buf.reserve(READ_CHUNK);
            if self.recv.read_buf(&mut self.buf).await? == 0 {
                return Err(FrameStreamError::Closed);
            }
        }
    }

    /// The sending half, for bytes that are already encoded frames, or to finish the stream.
    pub fn send_half(&mut self) -> &mut W {
        &mut self.send
    }

    /// Writes `frames` in one write.
    pub async fn write(&mut self, frames: &[Frame]) -> Result<(), FrameStreamError> {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out)?;
        }
        self.send.write_all(&out).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Message;

    #[tokio::test]
    async fn frames_cross_a_stream_split_anywhere_and_eof_is_closed() {
        let (a, b) = tokio::io::duplex(7);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let mut left = FrameStream::new(aw, ar);
        let mut right = FrameStream::new(bw, br);
        let sent = vec![
            Frame::Control(Message::Hello {
                version: 3,
                id: "p1".into(),
            }),
            Frame::Control(Message::ProxySet {
                ids: vec!["p1".into(), "p2".into()],
            }),
        ];
        let writer = tokio::spawn(async move {
            left.write(&sent).await.unwrap();
            drop(left);
            sent
        });
        let first = right.read().await.unwrap();
        let second = right.read().await.unwrap();
        assert_eq!(vec![first, second], writer.await.unwrap());
        assert!(matches!(right.read().await, Err(FrameStreamError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error() {
        let (a, b) = tokio::io::duplex(64);
        let (br, bw) = tokio::io::split(b);
        let mut right = FrameStream::new(bw, br);
        let (_ar, mut aw) = tokio::io::split(a);
        aw.write_all(&[0xff; 32]).await.unwrap();
        assert!(matches!(
            right.read().await,
            Err(FrameStreamError::Decode(_))
        ));
    }
}
