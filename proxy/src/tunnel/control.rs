//! The proxy side of an agent's `@control` channel.

use crate::routing::Tunnel;
use std::sync::Arc;

use bytes::BytesMut;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{debug, warn};
use tunnel_proto::control::Message;

use super::*;

/// Serves an agent's `@control` channel: hello both ways, the proxy set, drain on shutdown.
pub(super) async fn control(
    channel: Channel<Msg>,
    shared: Arc<TunnelShared>,
    tunnel: Option<Arc<Tunnel>>,
) {
    let (mut rx, tx) = channel.split();
    let mut out = BytesMut::new();
    let hello = Message::Hello {
        version: tunnel_proto::PROTOCOL_VERSION,
        id: shared.proxy_id.clone(),
    };
    let set = Message::ProxySet {
        ids: vec![shared.proxy_id.clone()],
    };
    if hello.encode(&mut out).is_err() || set.encode(&mut out).is_err() {
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
