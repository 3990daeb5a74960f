//! Target labels on the wire: one `@control` `TargetLabels` frame per target, sent before the
//! targets are registered.

use bytes::BytesMut;
use tunnel_proto::control::Message;

use crate::AgentConfig;

/// The `TargetLabels` frames of every target in `config`, concatenated.
pub fn encode_target_labels(config: &AgentConfig) -> BytesMut {
    let mut out = BytesMut::new();
    for (name, target) in &config.targets {
        let msg = Message::TargetLabels {
            target: name.clone(),
            labels: target
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        // Names and labels are validated short (63 bytes each); a target with so many labels
        // that its frame exceeds 64 KiB is left without labels, and streams to it are refused.
        if msg.encode(&mut out).is_err() {
            tracing::warn!(target = %name, "too many labels to send: streams to this target will be refused");
        }
    }
    out
}
