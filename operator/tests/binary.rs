//! The `gonka-operator` binary as a Deployment runs it: configured by flags and environment,
//! talking to a real kube-apiserver through a kubeconfig, stopped by SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, admin_get, eventually, free_port, gonka_node_manifest};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

const WAIT: Duration = Duration::from_secs(45);

fn operator(cp: &ControlPlane, admin_port: u16) -> std::io::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_gonka-operator"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{admin_port}"), "--identity", "bin-a"])
        .args(["--report-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("POD_NAMESPACE", "default")
        .env("LOG_FORMAT", "json")
        .env("GONKA_DAEMON_IMAGE", "registry.test/daemon:bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "operator did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_crd_it_exits_with_the_fix_in_the_message() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    let mut child = operator(&cp, free_port()?)?;
    let status = wait_exit(&mut child, WAIT)?;
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success());
    assert!(stderr.contains("the GonkaNode CRD is not installed"), "{stderr}");
    assert!(stderr.contains("kubectl apply --server-side -f crds/gonkanode.yaml"), "{stderr}");
    Ok(())
}

/// The admin's policy as the chart passes it (environment): a host path the operator could not
/// check against is refused at start, naming the setting, before anything is reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_admin_policy_stops_it_at_start() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.install_crd().await?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_gonka-operator"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{}", free_port()?), "--report-addr", "off"])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("GONKA_ALLOWED_HOST_PATHS", "/srv/gonka-models,srv/relative")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = wait_exit(&mut child, WAIT)?;
    let stderr = String::from_utf8_lossy(&child.wait_with_output()?.stderr).to_string();
    assert!(!status.success());
    assert!(stderr.contains("--allowed-host-paths") && stderr.contains("\"srv/relative\""), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_reconciles_logs_json_and_stops_cleanly_on_sigterm() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.install_crd().await?;
    cp.namespace("gpu").await?;
    let client = cp.client().await?;
    let port = free_port()?;
    let mut child = operator(&cp, port)?;
    let admin = format!("127.0.0.1:{port}").parse()?;

    eventually("operator ready", WAIT, || async { Ok(admin_get(admin, "/readyz").await.is_ok_and(|(s, _)| s == 200)) })
        .await?;
    let gn: GonkaNode = serde_json::from_value(gonka_node_manifest("l40s", "gpu"))?;
    Api::<GonkaNode>::namespaced(client.clone(), "gpu").create(&PostParams::default(), &gn).await?;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), "gpu");
    eventually("DaemonSet created by the binary", WAIT, || async {
        Ok(daemon_sets.get_opt("l40s-ml-node").await?.is_some())
    })
    .await?;
    let ds = daemon_sets.get("l40s-ml-node").await?;
    let image = ds.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.test/daemon:bin"), "GONKA_DAEMON_IMAGE is the default image");
    let (_, metrics) = admin_get(admin, "/metrics").await?;
    assert!(metrics.contains("gonka_operator_leader 1"), "{metrics}");
    let reconciles = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gonka_operator_reconciles_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(reconciles.is_some_and(|n| n > 0.0), "reconciles {reconciles:?} in:\n{metrics}");
    // Its own requests to the apiserver, by verb and resource (the DaemonSet was written with an
    // apply patch, the GonkaNodes are watched).
    for (verb, resource) in [("patch", "daemonsets"), ("watch", "gonkanodes"), ("patch", "leases")] {
        let series = format!("gonka_operator_apiserver_requests_total{{verb=\"{verb}\",resource=\"{resource}\"}}");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }

    let leases: Api<Lease> = Api::namespaced(client, "default");
    let holder = leases.get("gonka-operator-leader").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("bin-a"));

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?.success());
    let status = wait_exit(&mut child, WAIT)?;
    assert!(status.success(), "SIGTERM must be a clean exit, got {status}");
    let holder = leases.get("gonka-operator-leader").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the lease is released on shutdown");

    let output = child.wait_with_output()?;
    let logs = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no logs");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{line}");
    }
    Ok(())
}

/// `gonka-operator uninstall` (the Helm chart's pre-delete hook): deletes every GonkaNode and
/// exits 0 once they are gone; one held by its finalizer (no operator to deregister it) makes it
/// fail, naming the GonkaNode, instead of letting the uninstall orphan registrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_deletes_gonka_nodes_and_fails_on_those_that_stay() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.install_crd().await?;
    cp.namespace("gpu").await?;
    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, "gpu");
    api.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("a100", "gpu"))?).await?;
    let uninstall = |timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_gonka-operator"))
            .args(["uninstall", "--timeout-seconds", timeout])
            .env("KUBECONFIG", cp.kubeconfig())
            .stdin(Stdio::null())
            .output()
    };
    // No operator holds the leader Lease: nothing is deleted, and it says what to do.
    let refused = uninstall("30")?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("nothing was deleted") && stderr.contains("gonka-operator-leader"), "{stderr}");
    assert_eq!(api.list(&Default::default()).await?.items.len(), 1);

    // An operator leads (its Lease renewed just now).
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "gonka-operator-leader", "namespace": "default"},
        "spec": {"holderIdentity": "op-x", "leaseDurationSeconds": 3600,
                 "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    }))?;
    Api::<Lease>::namespaced(cp.client().await?, "default").create(&PostParams::default(), &lease).await?;
    let done = uninstall("30")?;
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(api.list(&Default::default()).await?.items.is_empty());

    let mut held = gonka_node_manifest("h100", "gpu");
    held["metadata"]["finalizers"] = serde_json::json!([gonka_operator::FINALIZER]);
    api.create(&PostParams::default(), &serde_json::from_value(held)?).await?;
    let stuck = uninstall("1")?;
    let stderr = String::from_utf8_lossy(&stuck.stderr);
    assert!(!stuck.status.success());
    assert!(stderr.contains("gpu/h100") && stderr.contains("is it running"), "{stderr}");
    Ok(())
}
