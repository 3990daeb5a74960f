//! The README's demo runs end to end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_call_goes_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, report) = postern_demo::run(dir.path()).await.unwrap();
    assert_eq!(report.echoed, "hello from alice through the Postern tunnel");
    assert!(report.ssh_command.contains("-W auth.demo:3025"));
    demo.stop().await.unwrap();
}
