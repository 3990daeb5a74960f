//! The Markdown output: the comparison table (its columns are the README's), then the agent
//! log-in figure, the isolation and stalled-stream figures, and the knobs in effect.

use super::support::{bytes, median};
use super::{Cli, Phase, QUIC_CLIENT_ROW, QUIC_ROW};

/// The whole output of a run.
pub fn render(phases: &[Phase], cli: &Cli) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "| system | cipher | 1 stream MiB/s (median of {}) | × direct | × OpenSSH | {} streams MiB/s | × OpenSSH | p50 / p99 µs (64 B @ 1k/s) | p99 added over direct | RSS per idle stream | CPU-s per GiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        cli.runs, cli.streams
    ));
    for ph in phases {
        let direct = ph
            .rows
            .iter()
            .find(|r| r.system == "direct loopback")
            .cloned()
            .unwrap_or_default();
        let ossh = ph
            .rows
            .iter()
            .find(|r| r.system.starts_with("OpenSSH"))
            .cloned()
            .unwrap_or_default();
        for r in &ph.rows {
            let single = median(&r.single_mib_s);
            let multi = median(&r.multi_mib_s);
            let ratio = |a: f64, b: f64| {
                if b > 0.0 && a > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "—".into()
                }
            };
            s.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.system,
                r.cipher,
                single,
                ratio(single, median(&direct.single_mib_s)),
                ratio(single, median(&ossh.single_mib_s)),
                if multi > 0.0 {
                    format!("{multi:.0}")
                } else {
                    "—".into()
                },
                ratio(multi, median(&ossh.multi_mib_s)),
                if r.p50_us > 0.0 {
                    format!("{:.0} / {:.0}", r.p50_us, r.p99_us)
                } else {
                    "—".into()
                },
                if r.p99_us > 0.0 && r.system != "direct loopback" {
                    format!("{:+.0} µs", r.p99_us - direct.p99_us)
                } else {
                    "—".into()
                },
                r.rss_per_stream_kib
                    .map(|k| format!("{k:.1} KiB"))
                    .unwrap_or_else(|| "—".into()),
                r.cpu_s_per_gib
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "—".into()),
            ));
        }
    }
    for ph in phases {
        if let Some(r) = ph
            .rows
            .iter()
            .find(|r| r.system.starts_with("Postern (Rust"))
        {
            s.push_str(&format!(
                "\nPostern, {}: {:.0} tunnel set-ups/s (TCP + key exchange + certificate login + tcpip-forward, 64 at a time, {} agents); proxy RSS per idle tunnel {:.1} KiB.",
                r.cipher, ph.setups_per_s, cli.agents, ph.tunnel_rss_kib
            ));
        }
    }
    if phases
        .iter()
        .any(|p| p.rows.iter().any(|r| r.system == QUIC_ROW))
    {
        s.push_str(&format!(
            "\n{QUIC_ROW}: the agent's leg is QUIC (TLS 1.3), which does not depend on the SSH cipher, so this row runs once, in the {} phase, not per cipher; the client's leg to the proxy is SSH with that cipher, and its ratios are against that phase's direct and OpenSSH rows. The agent was forced to QUIC (`transport.mode = \"quic\"`) and the proxy's `postern_tunnels_connected{{transport=\"quic\"}}` gauge was checked before and after.",
            cli.extras_cipher()
        ));
    }
    if phases
        .iter()
        .any(|p| p.rows.iter().any(|r| r.system == QUIC_CLIENT_ROW))
    {
        s.push_str(&format!(
            "\n{QUIC_CLIENT_ROW}: the client logs in over QUIC too (`ProxySession::connect_over(.., Transport::Quic)`, its user certificate bound to the connection's TLS exporter), on the same proxy and agent as the row above, both legs at the default MTU bound (1452); in its \"MTU ≤\" row the client raises its bound too (`DialOptions::quic_mtu_upper_bound`). No SSH cipher is involved, so these rows run once."
        ));
    }
    s.push('\n');
    for ph in phases {
        s.push_str(&isolation(ph));
        s.push_str(&stalls(ph));
        if let Some(k) = &ph.knobs {
            s.push_str(&k.render());
        }
    }
    s
}

/// The isolation figure of one phase (empty when it did not run there).
fn isolation(ph: &Phase) -> String {
    let Some(first) = ph.isolation.first() else {
        return String::new();
    };
    let r = &first.report;
    let mut s = format!(
        "\nIsolation ({}): client B pings a 64-byte echo at 10 Hz through the tunnel, {} s alone, then {} s while client A (another SSH session) downloads through the same tunnel reading {} KiB/s. Target: ratio ≤ 2×.\n\n| agent transport | B p50 / p99 alone | B p50 / p99 while A reads slowly | p99 ratio | A read |\n|---|---|---|---|---|\n",
        ph.cipher, r.secs, r.secs, r.slow_kib_per_s
    );
    for f in &ph.isolation {
        let r = &f.report;
        let ((a50, a99), (d50, d99)) = (r.alone(), r.during());
        s.push_str(&format!(
            "| {} | {a50:.2} / {a99:.2} ms | {d50:.2} / {d99:.2} ms | {:.2}×{} | {} |\n",
            f.transport,
            r.ratio(),
            if r.ratio() <= 2.0 {
                ""
            } else {
                " (over target)"
            },
            bytes(r.slow_read_bytes),
        ));
    }
    s
}

/// The stalled-stream figure of one phase (empty when it did not run there).
fn stalls(ph: &Phase) -> String {
    if ph.stalls.is_empty() {
        return String::new();
    }
    let window = |t| {
        ph.knobs
            .as_ref()
            .map(|k| match t {
                super::postern::AgentTransport::Ssh => k.ssh_stream_window,
                super::postern::AgentTransport::Quic => k.proxy_stream_window,
            })
            .unwrap_or(u64::from(tunnel_proto::credit::STREAM_WINDOW))
    };
    let mut s = format!(
        "\nOne fully stalled stream ({}): client A opens a stream to a service that writes as fast as it is let and never reads; once the service can write no more (every window on the way full), the proxy's RSS is compared with before A opened it. Target: growth ≤ the window.\n\n| agent transport | proxy RSS before | growth once stalled | window (proxy side) | pushed by the service before it stalled | of which the proxy passed on toward A |\n|---|---|---|---|---|---|\n",
        ph.cipher
    );
    for f in &ph.stalls {
        let r = &f.report;
        let w = window(f.transport);
        s.push_str(&format!(
            "| {} | {} | {}{} | {} ({}) | {} in {:.1} s | {} |\n",
            f.transport,
            bytes(r.rss_before_kib * 1024),
            bytes(r.growth_bytes()),
            if r.growth_bytes() <= w {
                ""
            } else {
                " (over the window)"
            },
            bytes(w),
            match f.transport {
                super::postern::AgentTransport::Ssh => "SSH per-stream credit",
                super::postern::AgentTransport::Quic => "QUIC stream_receive_window",
            },
            bytes(r.pushed_bytes),
            r.settle_secs,
            r.passed_on_bytes.map(bytes).unwrap_or_else(|| "—".into()),
        ));
    }
    s
}
