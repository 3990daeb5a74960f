//! The proxy side of an agent's `@control` channel.

use crate::routing::Tunnel;
use std::sync::Arc;

use bytes::BytesMut;
use postern_dial::renew_due::SignerHint;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{debug, warn};
use tunnel_proto::control::{HOST_CA_SIGNER_VERSION, Message};

use super::*;
use crate::trust::Signs;

/// Serves an agent's `@control` channel: hello both ways, the proxy set (once known, and again
/// at every change: see [`crate::peers`]), the host CA's signer to agents that understand it
/// (after their hello, and again at every change), drain on shutdown.
pub(super) async fn control(
    channel: Channel<Msg>,
    shared: Arc<TunnelShared>,
    tunnel: Option<Arc<Tunnel>>,
    cluster: String,
) {
    let (mut rx, tx) = channel.split();
    let mut out = BytesMut::new();
    let hello = Message::Hello {
        version: tunnel_proto::PROTOCOL_VERSION,
        id: shared.proxy_id.clone(),
    };
    let mut peers = shared.peers.subscribe(&cluster);
    let ids = match &mut peers {
        Some(rx) => rx.borrow_and_update().clone(),
        None => vec![shared.proxy_id.clone()],
    };
    if hello.encode(&mut out).is_err() || encode_set(ids, &mut out).is_err() {
        return;
    }
    if tx.data_bytes(out.split().freeze()).await.is_err() {
        return;
    }
    let mut inbuf = BytesMut::new();
    let mut drained = false;
    let mut signer = shared.trust.signer(&cluster, Signs::Agents);
    let mut agent_version = 0u32;
    loop {
        tokio::select! {
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => match Message::feed(&mut inbuf, &data) {
                    Ok(msgs) => {
                        for msg in msgs {
                            match msg {
                                Message::Hello { version, id } => {
                                    debug!(version, agent = %id, "control hello");
                                    if let Some(t) = &tunnel {
                                        t.agent_version.send_replace(version.max(1));
                                    }
                                    agent_version = version;
                                    if let Some(m) = signer_for(&mut signer, agent_version)
                                        && m.encode(&mut out).is_ok()
                                    {
                                        let _ = tx.data_bytes(out.split().freeze()).await;
                                    }
                                }
                                Message::Heartbeat { active_streams } => debug!(active_streams, "heartbeat"),
                                Message::TargetLabels { target, labels } => {
                                    debug!(%target, ?labels, "target labels");
                                    if let Some(t) = &tunnel {
                                        t.set_labels(&target, labels.into_iter().collect());
                                    }
                                }
                                other => debug!(?other, "unexpected control message from agent"),
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "closing control channel");
                        let _ = tx.close().await;
                        return;
                    }
                },
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
            Ok(()) = async { peers.as_mut().expect("guarded").changed().await }, if peers.is_some() && !drained => {
                let ids = peers.as_mut().expect("guarded").borrow_and_update().clone();
                if encode_set(ids, &mut out).is_ok() && !out.is_empty() {
                    let _ = tx.data_bytes(out.split().freeze()).await;
                }
            }
            Ok(()) = async { signer.as_mut().expect("guarded").changed().await }, if signer.is_some() && agent_version >= HOST_CA_SIGNER_VERSION && !drained => {
                if let Some(m) = signer_for(&mut signer, agent_version)
                    && m.encode(&mut out).is_ok()
                {
                    let _ = tx.data_bytes(out.split().freeze()).await;
                }
            }
            _ = shared.draining.cancelled(), if !drained => {
                drained = true;
                let drain = Message::Drain { reason: "proxy shutting down".into(), grace_secs: shared.grace_secs };
                if drain.encode(&mut out).is_ok() {
                    let _ = tx.data_bytes(out.split().freeze()).await;
                }
            }
            _ = shared.hard_stop.cancelled() => return,
        }
    }
}

/// The `HostCaSigner` message for an agent of `agent_version`, if it understands one and the
/// signer is known; marks the signer seen.
pub(crate) fn signer_for(
    signer: &mut Option<tokio::sync::watch::Receiver<Option<SignerHint>>>,
    agent_version: u32,
) -> Option<Message> {
    if agent_version < HOST_CA_SIGNER_VERSION {
        return None;
    }
    signer
        .as_mut()?
        .borrow_and_update()
        .as_ref()
        .map(crate::trust::signer_message)
}

/// Appends a `ProxySet` frame for `ids` to `out`, unless the set is unknown (empty).
fn encode_set(ids: Vec<String>, out: &mut BytesMut) -> Result<(), ()> {
    if ids.is_empty() {
        return Ok(());
    }
    Message::ProxySet { ids }.encode(out).map_err(|_| ())
}
