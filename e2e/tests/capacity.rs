//! Caps on a fleet (`spec.capacity`) on the real control plane: the best eligible nodes join
//! up to the cap, the cap holds while nodes come and go, a node that stops being eligible
//! leaves and the next one takes its place, a shrunk cap takes the lowest-ranked node out only
//! after the PoC window and with its ML node disabled on the network node before its pod goes,
//! and a lifted cap gives every matching node an ML node again with no label left behind. The
//! scale subresource is the cap in ML nodes (`kubectl scale`, an HPA, KEDA).

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest, start_devnet};
use gonka_protocol::network::EpochPhase;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

/// The Kubernetes nodes of the pods that are not being deleted.
async fn pod_nodes(pods: &Api<Pod>) -> anyhow::Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default().labels(PODS))
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec?.node_name)
        .collect())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_while_nodes_come_and_go_and_nodes_leave_in_order() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b", "gpu-c"]).await?;
    let client = cp.client().await?;
    let (api, pods): (Api<GonkaNode>, Api<Pod>) =
        (Api::namespaced(client.clone(), NS), Api::namespaced(client.clone(), NS));
    let nodes: Api<Node> = Api::all(client.clone());
    // gpu-c is the team's own pool: preferred.
    cp.kubectl(&["label", "node", "gpu-c", "pool=owned"])?;
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op-a").await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["publicUrl"] = json!(url);
    manifest["spec"]["capacity"] =
        json!({"maxMlNodes": 3, "maxGpus": 16, "preferences": [{"weight": 10, "matchLabels": {"pool": "owned"}}]});
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    let uid = api.get("h100").await?.uid().unwrap();
    let label = format!("joined.gonka.ai/{uid}");
    let registered = || {
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
    let ids =
        |names: &[&str]| -> Vec<(String, bool)> { names.iter().map(|n| (format!("h100.gpu@{n}"), true)).collect() };
    let capacity = || async {
        let s = api.get("h100").await?.status.unwrap_or_default().capacity.unwrap_or_default();
        anyhow::Ok((s.eligible, s.joined, s.held_back, s.leaving))
    };

    // 16 GPUs hold two ML nodes of 8 (fewer than maxMlNodes): the preferred gpu-c, then gpu-a
    // by name.
    eventually("gpu-a and gpu-c joined and registered, gpu-b held back", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let on = pod_nodes(&pods).await?;
        anyhow::ensure!(on.len() <= 2, "the cap of two was exceeded: {on:?}");
        Ok(on == set(&["gpu-a", "gpu-c"])
            && registered() == ids(&["gpu-a", "gpu-c"])
            && capacity().await? == (3, 2, 1, 0))
    })
    .await?;
    let message = api.get("h100").await?.status.unwrap().capacity.unwrap().message;
    assert_eq!(message.as_deref(), Some("1 eligible nodes held back by the cap of 2 ML nodes"));
    // What a platform team scales on, from the operator's /metrics: 3 eligible nodes of 8 GPUs,
    // one held back.
    let (_, metrics) = gonka_e2e::admin_get(operator.admin_addr, "/metrics").await?;
    for line in [
        r#"gonka_operator_fleet_eligible_gpus{gonka_node_namespace="gpu",gonka_node="h100"} 24"#,
        r#"gonka_operator_fleet_idle_eligible_gpus{gonka_node_namespace="gpu",gonka_node="h100"} 8"#,
        r#"gonka_operator_fleet_poc_window{gonka_node_namespace="gpu",gonka_node="h100"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    let labelled = nodes.list(&ListParams::default().labels(&label)).await?;
    assert_eq!(labelled.iter().map(|n| n.name_any()).collect::<BTreeSet<_>>(), set(&["gpu-a", "gpu-c"]));

    // A node joins the cluster: eligible, held back; the cap holds.
    cp.gpu_node("gpu-d", 8, "NVIDIA-H100-80GB-HBM3").await?;
    eventually("gpu-d counted eligible and held back", WAIT, || async { Ok(capacity().await? == (4, 2, 2, 0)) })
        .await?;
    assert_eq!(pod_nodes(&pods).await?, set(&["gpu-a", "gpu-c"]), "no ML node on gpu-d");

    // gpu-a is cordoned: it goes (its ML node disabled first, as for any cordon), and the best
    // eligible node left, gpu-b by name, takes its place; never more than two.
    cp.kubectl(&["cordon", "gpu-a"])?;
    eventually("gpu-a left, gpu-b joined in its place", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let on = pod_nodes(&pods).await?;
        anyhow::ensure!(on.len() <= 2, "the cap of two was exceeded: {on:?}");
        Ok(on == set(&["gpu-b", "gpu-c"]) && registered() == ids(&["gpu-b", "gpu-c"]))
    })
    .await?;
    assert_eq!(capacity().await?, (3, 2, 1, 0), "gpu-a is no longer eligible; gpu-d waits");

    // The scale subresource is the cap in ML nodes, as an HPA or KEDA reads it: three (the GPU
    // cap is the smaller), two ML nodes desired, the pods' selector.
    let scale: serde_json::Value = serde_json::from_str(&cp.kubectl(&[
        "get",
        "gonkanode",
        "h100",
        "-n",
        NS,
        "--subresource=scale",
        "-o",
        "json",
    ])?)?;
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node");

    // The cap shrinks to one ML node (`kubectl scale`, as an autoscaler would) during a PoC
    // window: nobody leaves until it ends.
    devnet.lock().unwrap().set_phase(EpochPhase::PocGenerate);
    cp.kubectl(&["scale", "gonkanode", "h100", "-n", NS, "--replicas=1"])?;
    let cap = api.get("h100").await?.spec.capacity.unwrap();
    assert_eq!((cap.max_ml_nodes, cap.max_gpus), (Some(1), Some(16)), "scale sets maxMlNodes; the smaller cap holds");
    eventually("status says gpu-b leaves after the window", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default().capacity.unwrap_or_default();
        Ok(s.leaving == 1 && s.message.as_deref().is_some_and(|m| m.contains("1 nodes leave after the PoC window")))
    })
    .await?;
    // Several passes later (the operator re-reads the phase every few seconds) both still prove.
    let reconciles = operator.reconciles();
    eventually("more passes", WAIT, || async { Ok(operator.reconciles() >= reconciles + 3) }).await?;
    assert_eq!(pod_nodes(&pods).await?, set(&["gpu-b", "gpu-c"]), "no ML node leaves during a PoC window");
    assert_eq!(registered(), ids(&["gpu-b", "gpu-c"]));

    // The window ends: gpu-b (lower-ranked than the preferred gpu-c) leaves, its ML node
    // disabled on the network node before its pod is deleted. A watch sees the pod's deletion
    // as it happens and reads the network node's state right then: disabling only after the
    // deletion (as a pass that reacted to it would) shows as still enabled here.
    let at_deletion: std::sync::Arc<std::sync::Mutex<Option<Option<bool>>>> = Default::default();
    let recorder = {
        let (at_deletion, devnet, pods) = (at_deletion.clone(), devnet.clone(), pods.clone());
        tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default().labels(PODS)).applied_objects().boxed();
            while let Some(Ok(pod)) = events.next().await {
                let on_b = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-b");
                if on_b && pod.metadata.deletion_timestamp.is_some() {
                    let enabled = devnet
                        .lock()
                        .unwrap()
                        .nodes()
                        .iter()
                        .find(|n| n.node.config.id == "h100.gpu@gpu-b")
                        .map(|n| n.state.admin_state.enabled);
                    *at_deletion.lock().unwrap() = Some(enabled);
                    return;
                }
            }
        })
    };
    devnet.lock().unwrap().set_phase(EpochPhase::Inference);
    eventually("gpu-b left", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(pod_nodes(&pods).await? == set(&["gpu-c"]) && registered() == ids(&["gpu-c"]))
    })
    .await?;
    recorder.await?;
    assert_eq!(
        *at_deletion.lock().unwrap(),
        Some(Some(false)),
        "gpu-b's ML node was disabled on the network node (and still listed) when its pod was deleted"
    );
    assert!(nodes.get("gpu-b").await?.labels().get(&label).is_none(), "gpu-b's label is off");

    // The cap is lifted: every matching node runs an ML node again (gpu-a cordoned, but a
    // DaemonSet's pods tolerate that), and no node keeps the label.
    api.patch("h100", &PatchParams::default(), &Patch::Merge(json!({"spec": {"capacity": null}}))).await?;
    eventually("an ML node on every node, no label left", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let left = nodes.list(&ListParams::default().labels(&label)).await?.items.len();
        let status = api.get("h100").await?.status.unwrap_or_default();
        Ok(pod_nodes(&pods).await? == set(&["gpu-a", "gpu-b", "gpu-c", "gpu-d"])
            && left == 0
            && status.capacity.is_none())
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
