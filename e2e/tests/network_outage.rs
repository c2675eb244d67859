//! The network node is down when the fleet comes up, then appears; later the operator restarts
//! mid-way. Registration catches up by itself, never registers a node twice, and a restarted
//! operator changes nothing that is already right.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, free_port, gonka_node_manifest, start_devnet_on};
use kube::api::{Api, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

fn registered(gn: &GonkaNode) -> (i32, String) {
    let s = gn.status.clone().unwrap_or_default();
    let reason = s.conditions.iter().find(|c| c.type_ == "Registered").map(|c| c.reason.clone()).unwrap_or_default();
    (s.registered_ml_nodes, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_a_network_node_outage_and_an_operator_restart() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, NS);
    let operator = cp.start_operator("op-a").await?;

    // The GonkaNode names a network node that is not up yet.
    let port = free_port()?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(format!("http://127.0.0.1:{port}"));
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    eventually("outage reported while the fleet is ready", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let gn = api.get("h100").await?;
        let ready = gn.status.as_ref().is_some_and(|s| s.ready_ml_nodes == 2);
        Ok(ready && registered(&gn).1 == "NetworkNodeUnreachable")
    })
    .await?;

    // It comes up: the operator's retries register both ML nodes, once each.
    let (devnet, _) =
        start_devnet_on(gonka_devnet::Generation::Mainline2026, &["Qwen/Qwen2.5-7B-Instruct"], port).await?;
    eventually("registered after the outage", WAIT, || async {
        Ok(registered(&api.get("h100").await?) == (2, "MlNodesRegistered".to_string()))
    })
    .await?;
    let snapshot = || {
        devnet.lock().unwrap().nodes().iter().map(|n| (n.node.config.id.clone(), n.node.node_num)).collect::<Vec<_>>()
    };
    let before = snapshot();
    assert_eq!(before.len(), 2);

    // A new operator replica takes over: it reconciles, and nothing on the network node changes.
    operator.stop().await?;
    let operator = cp.start_operator("op-b").await?;
    eventually("op-b reconciled", WAIT, || async { Ok(operator.reconciles() >= 1) }).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshot(), before, "no duplicate or re-created registration");
    assert_eq!(registered(&api.get("h100").await?), (2, "MlNodesRegistered".to_string()));
    operator.stop().await?;
    Ok(())
}
