//! Two tunnels may not claim the same host id: the newer login of a host id replaces the older
//! tunnel on this proxy, which is closed and counted (`reason="replaced"`).

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tunnel_for_the_same_host_id_replaces_the_first() {
    init_tracing();
    let pki = Pki::new("dup1");
    let proxy = start_proxy(&[&pki], |_| {}).await;
    let a = start_agent(agent_config(
        &pki,
        "same",
        &proxy,
        &[("name", name_server("a").await)],
    ));
    let tunnels = |m: &str| metric(m, "postern_tunnels_connected", &[("cluster", "dup1")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tunnels(&scrape(proxy.ops).await) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "first tunnel up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = start_agent(agent_config(
        &pki,
        "same",
        &proxy,
        &[("name", name_server("b").await)],
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(proxy.ops).await;
        let replaced = metric(
            &m,
            "postern_tunnel_disconnects_total",
            &[("cluster", "dup1"), ("reason", "replaced")],
        );
        assert!(
            tunnels(&m) <= 1.0,
            "two tunnels hold host id 'same' at once"
        );
        if replaced >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the older tunnel was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
    proxy.stop().await;
}
