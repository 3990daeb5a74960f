//! The proxy side of an agent's `@control` channel.

use crate::routing::Tunnel;
use std::sync::Arc;

use bytes::BytesMut;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{debug, warn};
use tunnel_proto::control::Message;

use super::*;

/// Serves an agent's `@control` channel: hello both ways, the proxy set (once known, and again
/// at every change: see [`crate::peers`]), drain on shutdown.
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

/// Appends a `ProxySet` frame for `ids` to `out`, unless the set is unknown (empty).
fn encode_set(ids: Vec<String>, out: &mut BytesMut) -> Result<(), ()> {
    if ids.is_empty() {
        return Ok(());
    }
    Message::ProxySet { ids }.encode(out).map_err(|_| ())
}
