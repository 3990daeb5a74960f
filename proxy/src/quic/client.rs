//! A client logged in over QUIC: each stream it opens starts with `Frame::Open` naming
//! `<target>.<cluster>`, is decided exactly as an SSH `direct-tcpip` channel is
//! ([`crate::tunnel::streams`]: the certificate's restrictions, limits, route, policy, audit) and
//! answered `Frame::Accept` or `Frame::Refuse` with the reason; then bytes move both ways.
//!
//! Before the login the connection may hold one stream (the login's); after it, up to
//! `limits.max_streams_per_client` more. A lock, a deleted user or a policy change that takes
//! the login away closes the connection with the reason, as on SSH.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tracing::{Instrument, info, info_span};

use crate::link::QUIC;
use crate::policy::registry::Registration;
use crate::tunnel::TunnelShared;
use crate::tunnel::checks::Role;
use crate::tunnel::splice::{ClientEnd, open_stream};
use crate::tunnel::streams::ClientView;

/// How long a client has to send its `Frame::Open` on a stream it opened.
const OPEN_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves a logged-in client's streams until the connection ends: `Err` says why it ended on the
/// proxy's side (`shutdown`, `policy`).
pub(super) async fn serve_client(
    shared: &Arc<TunnelShared>,
    conn: &quinn::Connection,
    peer: SocketAddr,
    role: Role,
    registration: Registration,
) -> Result<(), String> {
    let max = shared.limits.max_streams_per_client as u64;
    // The login's stream, the limit, and one more: a stream over the limit is refused with the
    // reason, not held unanswered.
    conn.set_max_concurrent_bi_streams(super::varint(max + 2));
    let client = Arc::new(Client {
        role,
        registration,
        open_streams: Arc::new(AtomicUsize::new(0)),
        peer,
    });
    let kicked = client.registration.entry.kicked.clone();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let span = info_span!("stream", transport = QUIC);
                    shared.streams.spawn(
                        serve_stream(shared.clone(), client.clone(), send, recv).instrument(span),
                    );
                }
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            },
            _ = kicked.cancelled() => {
                let why = client.registration.entry.reason().unwrap_or_default();
                info!(reason = %why, transport = QUIC, "connection closed by policy");
                crate::link::close_quic(conn, &why);
                return Err("policy".into());
            }
            _ = shared.hard_stop.cancelled() => {
                conn.close(0u32.into(), b"proxy shutting down");
                return Err("shutdown".into());
            }
        }
    }
}

/// A logged-in QUIC client: what its streams are decided on.
struct Client {
    role: Role,
    registration: Registration,
    open_streams: Arc<AtomicUsize>,
    peer: SocketAddr,
}

/// One stream the client opened: its `Frame::Open`, the decision, then the splice.
async fn serve_stream(
    shared: Arc<TunnelShared>,
    client: Arc<Client>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some((ask, early)) = postern_dial::quic::read_open(&mut recv, OPEN_FRAME_TIMEOUT).await
    else {
        postern_dial::quic::refuse(
            &mut send,
            "a stream must start with an Open frame naming <target>.<cluster>".into(),
        )
        .await;
        return;
    };
    let view = ClientView {
        shared: &shared,
        peer: client.peer,
        role: Some(&client.role),
        registration: Some(&client.registration),
        open_streams: &client.open_streams,
    };
    // QUIC's own per-stream flow control is the client's credit: no SSH credit on this leg.
    let open = view.request(
        &ask.target,
        ask.port,
        (ask.originator, ask.originator_port),
        false,
    );
    match view.decide(&open) {
        Ok(decided) => {
            let span = info_span!("stream", user = ?open.user, cluster = %decided.target.cluster, target = %decided.target.target, host_id = %decided.tunnel.host_id);
            open_stream(
                shared.clone(),
                decided,
                open,
                ClientEnd::Quic { send, recv, early },
            )
            .instrument(span)
            .await
        }
        Err(refusal) => {
            view.refused(&open, &refusal);
            postern_dial::quic::refuse(&mut send, refusal.1).await;
        }
    }
}
