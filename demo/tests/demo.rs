//! The README's demo runs end to end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_call_goes_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, report) = postern_demo::run(dir.path()).await.unwrap();
    assert_eq!(report.echoed, "hello from alice through the Postern tunnel");
    assert!(report.ssh_command.contains("-W auth.demo:3025"));
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_runs_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, report) = postern_demo::auth_flow::run(dir.path()).await.unwrap();
    assert!(
        report.role_yaml.contains("name: api-role"),
        "{}",
        report.role_yaml
    );
    assert!(report.role_yaml.contains("- read"), "{}", report.role_yaml);
    assert!(
        report.denied.starts_with("permission denied"),
        "{}",
        report.denied
    );
    assert!(
        report.denied.contains("verb 'create' on resource 'role'"),
        "{}",
        report.denied
    );
    // The client reached the Auth server as api-user, through the tunnel.
    assert_eq!(demo.client.user, "api-user");
    demo.stop().await.unwrap();
}
