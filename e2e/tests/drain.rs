//! Draining a GPU node: `kubectl cordon` (what `kubectl drain` starts with; DaemonSet pods stay
//! on a drained node) disables the node's ML node on the network node, so it serves out the
//! epoch and gets no new work before the maintenance; `kubectl uncordon` enables it again.
//! The other ML nodes are not touched. So do the autoscalers' taints on a node they are removing
//! (cluster-autoscaler's `ToBeDeletedByClusterAutoscaler`, Karpenter's `karpenter.sh/disrupted`),
//! lifted when they change their mind; a soft candidate taint does nothing. A pod being deleted, whatever deletes it (eviction,
//! preemption, a person), has its ML node disabled while it stops; its replacement serves again.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest, start_devnet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordoning_a_node_disables_its_ml_node_and_uncordoning_enables_it() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, NS);
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op-a").await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    let enabled = || {
        let mut nodes: Vec<(String, bool)> = devnet
            .lock()
            .unwrap()
            .nodes()
            .iter()
            .map(|n| (n.node.config.id.clone(), n.state.admin_state.enabled))
            .collect();
        nodes.sort();
        nodes
    };
    let both = |a: bool, b: bool| vec![("h100.gpu@gpu-a".to_string(), a), ("h100.gpu@gpu-b".to_string(), b)];
    eventually("both ML nodes registered and enabled", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(enabled() == both(true, true))
    })
    .await?;

    cp.kubectl(&["cordon", "gpu-a"])?;
    eventually("gpu-a's ML node disabled, gpu-b's untouched", WAIT, || async { Ok(enabled() == both(false, true)) })
        .await?;
    eventually("the Registered condition says why", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        let c = s.conditions.iter().find(|c| c.type_ == "Registered");
        Ok(c.is_some_and(|c| c.status == "True" && c.message.contains("1 disabled on cordoned nodes")))
    })
    .await?;

    cp.kubectl(&["uncordon", "gpu-a"])?;
    eventually("gpu-a's ML node enabled again", WAIT, || async { Ok(enabled() == both(true, true)) }).await?;

    // The autoscalers' taints on a node they are removing: cluster-autoscaler's, then
    // Karpenter's. The ML node is disabled before anything drains the node; when the
    // autoscaler changes its mind (the taint goes), it is enabled again.
    for (taint, key) in [
        ("ToBeDeletedByClusterAutoscaler=1796300000:NoSchedule", "ToBeDeletedByClusterAutoscaler"),
        ("karpenter.sh/disrupted:NoSchedule", "karpenter.sh/disrupted"),
    ] {
        cp.kubectl(&["taint", "nodes", "gpu-b", taint])?;
        eventually(&format!("{key}: gpu-b's ML node disabled"), WAIT, || async { Ok(enabled() == both(true, false)) })
            .await?;
        eventually("the Registered condition names the autoscaler", WAIT, || async {
            let s = api.get("h100").await?.status.unwrap_or_default();
            let c = s.conditions.iter().find(|c| c.type_ == "Registered");
            Ok(c.is_some_and(|c| c.message.contains("1 disabled on nodes an autoscaler is removing")))
        })
        .await?;
        cp.kubectl(&["taint", "nodes", "gpu-b", &format!("{key}-")])?;
        eventually(&format!("{key} lifted: enabled again"), WAIT, || async { Ok(enabled() == both(true, true)) })
            .await?;
    }
    // A soft candidate taint is not a departure: with one on gpu-b first and then
    // cluster-autoscaler's on gpu-a, the pass that disables gpu-a's ML node (the node watch
    // delivers in order) has seen gpu-b's candidate taint and left it enabled.
    cp.kubectl(&["taint", "nodes", "gpu-b", "DeletionCandidateOfClusterAutoscaler=1796300000:PreferNoSchedule"])?;
    cp.kubectl(&["taint", "nodes", "gpu-a", "ToBeDeletedByClusterAutoscaler=1796300000:NoSchedule"])?;
    eventually("gpu-a disabled, gpu-b (a mere candidate) not", WAIT, || async {
        let now = enabled();
        anyhow::ensure!(now[1].1, "gpu-b's ML node was disabled by a PreferNoSchedule candidate taint");
        Ok(now == both(false, true))
    })
    .await?;
    cp.kubectl(&["taint", "nodes", "gpu-a", "ToBeDeletedByClusterAutoscaler-"])?;
    eventually("gpu-a enabled again", WAIT, || async { Ok(enabled() == both(true, true)) }).await?;
    cp.kubectl(&["taint", "nodes", "gpu-b", "DeletionCandidateOfClusterAutoscaler-"])?;

    // gpu-b's pod is deleted; no kubelet confirms yet, so it stays terminating.
    let pods: Api<Pod> = Api::namespaced(cp.client().await?, NS);
    let on_b = pods
        .list(&ListParams::default().labels(PODS))
        .await?
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-b"))
        .expect("gpu-b's pod");
    pods.delete(&on_b.name_any(), &DeleteParams::default()).await?;
    eventually("gpu-b's ML node disabled while its pod stops", WAIT, || async { Ok(enabled() == both(true, false)) })
        .await?;
    eventually("its replacement enabled again", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(enabled() == both(true, true))
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
