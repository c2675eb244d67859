//! Rollouts that don't cost a PoC window, on a real control plane: with a public URL to read the
//! epoch phase, the DaemonSet updates OnDelete and the operator replaces pods itself — never
//! while the devnet network node reports a PoC phase, one at a time after, each ML node
//! disabled on the network node before its pod goes and enabled again once it is back. The
//! GonkaNode's PodDisruptionBudget follows the windows: no eviction during one, also while paused,
//! and an unreadable phase holds evictions only up to a limit. The nodes hosting ML nodes are
//! kept from autoscalers during a window, and a GonkaNode deleted mid-window leaves no claim.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest, start_devnet};
use gonka_protocol::network::EpochPhase;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

/// One field of each of the fleet's pods that is not being deleted (a terminating pod is one
/// being replaced), sorted.
async fn live_pods<T: Ord>(pods: &Api<Pod>, field: impl Fn(Pod) -> Option<T>) -> anyhow::Result<Vec<T>> {
    let mut fields: Vec<T> = pods
        .list(&ListParams::default().labels(PODS))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(field)
        .collect();
    fields.sort();
    Ok(fields)
}

/// The ML-node pods' UIDs, sorted (a replaced pod has a new one).
async fn pod_uids(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    live_pods(pods, |p| p.metadata.uid).await
}

async fn pod_images(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    live_pods(pods, |p| p.spec?.containers.first()?.image.clone()).await
}

fn condition(gn: &GonkaNode, t: &str) -> (String, String, String) {
    gn.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// A GonkaNode `h100` over `nodes`, its rollouts held out of PoC windows (the devnet is its
/// network node and public API), rolled out and registered.
struct Held {
    cp: ControlPlane,
    client: kube::Client,
    api: Api<GonkaNode>,
    pods: Api<Pod>,
    devnet: gonka_devnet::Shared,
    /// The devnet's URL (admin and public API).
    url: String,
    operator: gonka_e2e::Operator,
}

async fn held_fleet(nodes: &[&str]) -> anyhow::Result<Held> {
    let cp = ControlPlane::start_h100_fleet(NS, nodes).await?;
    let client = cp.client().await?;
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op-a").await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["publicUrl"] = json!(url);
    cp.roll_out(manifest, PODS, nodes.len() as i32, WAIT).await?;
    let (api, pods) = (Api::namespaced(client.clone(), NS), Api::namespaced(client.clone(), NS));
    Ok(Held { cp, client, api, pods, devnet, url, operator })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_wait_for_the_poc_window_to_end() -> anyhow::Result<()> {
    let Held { cp, client, api, pods, devnet, operator, .. } = held_fleet(&["gpu-a", "gpu-b"]).await?;
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NS).get("h100-ml-node").await?;
    assert_eq!(ds.spec.unwrap().update_strategy.unwrap().type_.as_deref(), Some("OnDelete"));
    let node_nums = || {
        devnet.lock().unwrap().nodes().iter().map(|n| (n.node.config.id.clone(), n.node.node_num)).collect::<Vec<_>>()
    };
    let before = node_nums();

    // Outside a PoC window the disruption budget tolerates what rollouts do (one ML node), and
    // the disruption controller lets an eviction through (a dry run: nothing is evicted).
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let min_available = || async {
        let pdb = budgets.get_opt("h100-ml-nodes").await?;
        anyhow::Ok(pdb.and_then(|p| p.spec?.min_available))
    };
    let a_pod = pods.list(&ListParams::default().labels(PODS)).await?.items[0].name_any();
    // A refused eviction answers 429, which kube's default client would retry for minutes.
    let evictions: Api<Pod> = Api::namespaced(cp.client_without_retries().await?, NS);
    let dry_run_eviction = || async {
        // `?dryRun=All`: the apiserver checks the budget and evicts nothing.
        let params = EvictParams {
            post_options: PostParams { dry_run: true, ..PostParams::default() },
            ..EvictParams::default()
        };
        evictions.evict(&a_pod, &params).await
    };
    eventually("an eviction is allowed outside the PoC window", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(min_available().await? == Some(IntOrString::Int(1)) && dry_run_eviction().await.is_ok())
    })
    .await?;

    // A PoC window opens, then a new image is applied: nothing restarts, and nothing may evict
    // an ML node (the cluster autoscaler, a descheduler).
    devnet.lock().unwrap().set_phase(EpochPhase::PocGenerate);
    eventually("the disruption budget closes for the PoC window", WAIT, || async {
        Ok(min_available().await? == Some(IntOrString::Int(2))
            && matches!(dry_run_eviction().await, Err(kube::Error::Api(e)) if e.code == 429))
    })
    .await?;
    // Autoscalers are kept off both nodes for the window.
    let nodes: Api<Node> = Api::all(client.clone());
    let protected = || async {
        let mut out = Vec::new();
        for name in ["gpu-a", "gpu-b"] {
            let annotations = nodes.get(name).await?.metadata.annotations.unwrap_or_default();
            let on = |k: &str| annotations.get(k).is_some_and(|v| v == "true");
            out.push(on("cluster-autoscaler.kubernetes.io/scale-down-disabled") && on("karpenter.sh/do-not-disrupt"));
        }
        anyhow::Ok(out)
    };
    eventually("the nodes are protected from scale-down during the window", WAIT, || async {
        Ok(protected().await? == [true, true])
    })
    .await?;
    // The platform team's own do-not-disrupt on gpu-a (applied under its own manager) must
    // survive the lifting.
    let theirs = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gpu-a", "annotations": {"karpenter.sh/do-not-disrupt": "true"}}});
    nodes.patch("gpu-a", &PatchParams::apply("platform-team"), &Patch::Apply(&theirs)).await?;
    let uids_before = pod_uids(&pods).await?;
    api.patch("h100", &PatchParams::default(), &Patch::Merge(json!({"spec": {"image": "registry.test/daemon:v2"}})))
        .await?;
    eventually("the hold is reported", WAIT, || async {
        let (status, reason, message) = condition(&api.get("h100").await?, "Progressing");
        Ok(status == "True" && reason == "HeldForPoC" && message.contains("PocGenerate"))
    })
    .await?;
    // Several more passes of the held rollout (it rechecks every second), then the same pods.
    let seen = operator.reconciles();
    eventually("three more reconciles while held", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(operator.reconciles() >= seen + 3)
    })
    .await?;
    assert_eq!(pod_uids(&pods).await?, uids_before, "no pod replaced during PoC");
    assert_eq!(pod_images(&pods).await?, ["registry.test/gonka-node-daemon:e2e"; 2], "no pod replaced during PoC");
    assert!(devnet.lock().unwrap().nodes().iter().all(|n| n.state.admin_state.enabled), "nothing disabled yet");

    // The window closes: pods are replaced one at a time and come back registered and enabled.
    devnet.lock().unwrap().set_phase(EpochPhase::Inference);
    eventually("the disruption budget opens again", WAIT, || async {
        Ok(min_available().await? == Some(IntOrString::Int(1)))
    })
    .await?;
    eventually("the protection is lifted after the window", WAIT, || async {
        let a = nodes.get("gpu-a").await?.metadata.annotations.unwrap_or_default();
        let b = nodes.get("gpu-b").await?.metadata.annotations.unwrap_or_default();
        let ca = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
        Ok(!a.contains_key(ca) && !b.contains_key(ca) && !b.contains_key("karpenter.sh/do-not-disrupt"))
    })
    .await?;
    let a = nodes.get("gpu-a").await?.metadata.annotations.unwrap_or_default();
    assert_eq!(a.get("karpenter.sh/do-not-disrupt").map(String::as_str), Some("true"), "the team's annotation stays");
    eventually("rolled out after the window", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let s = api.get("h100").await?.status.unwrap_or_default();
        let images = pod_images(&pods).await?;
        let enabled = devnet.lock().unwrap().nodes().iter().all(|n| n.state.admin_state.enabled);
        Ok(images == ["registry.test/daemon:v2"; 2] && s.ready_ml_nodes == 2 && s.registered_ml_nodes == 2 && enabled)
    })
    .await?;
    assert_eq!(node_nums(), before, "replaced ML nodes keep their registration (and broker number)");
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await?.items.into_iter().filter_map(|e| e.reason).collect();
    for r in ["Replacing", "Enabled"] {
        assert!(reasons.contains(&r.to_string()), "missing event {r}: {reasons:?}");
    }
    eventually("rollout complete", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(condition(&api.get("h100").await?, "Progressing").1 == "RolloutComplete")
    })
    .await?;
    operator.stop().await?;
    Ok(())
}

/// Fail safe: when the operator can't disable an ML node (here its credentials are refused), no
/// pod is replaced, PoC window or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pod_is_replaced_unless_its_ml_node_was_disabled_first() -> anyhow::Result<()> {
    let Held { cp, api, pods, devnet, operator, .. } = held_fleet(&["gpu-a"]).await?;

    // A new image, and credentials the operator won't use (the Secret did not opt in): outside
    // any PoC window, the rollout still waits.
    let spec = json!({"spec": {"image": "registry.test/daemon:v2", "networkNode": {
        "credentialsSecretRef": {"name": "not-opted-in"}, "allowPlaintextCredentials": true}}});
    api.patch("h100", &PatchParams::default(), &Patch::Merge(spec)).await?;
    eventually("the hold says why", WAIT, || async {
        let (status, _, message) = condition(&api.get("h100").await?, "Progressing");
        Ok(status == "True" && message.contains("can't be disabled"))
    })
    .await?;
    cp.simulate_kubelet(NS, PODS).await?;
    assert_eq!(pod_images(&pods).await?, ["registry.test/gonka-node-daemon:e2e"], "no pod replaced");
    assert!(devnet.lock().unwrap().nodes().iter().all(|n| n.state.admin_state.enabled));
    operator.stop().await?;
    Ok(())
}

/// Nothing freezes the disruption budget: paused, it still opens after a PoC window; a phase that
/// stays unreadable holds evictions only up to the limit (5 s in the tests, 30 minutes by
/// default), then the budget opens, `Degraded` says why and the gauge behind the alert counts it,
/// until the phase can be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disruption_budget_is_never_frozen() -> anyhow::Result<()> {
    // `_cp` keeps the control plane up (a `..` would drop it here).
    let Held { cp: _cp, client, api, devnet, url, operator, .. } = held_fleet(&["gpu-a", "gpu-b"]).await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let min_available = || async {
        let pdb = budgets.get_opt("h100-ml-nodes").await?;
        anyhow::Ok(pdb.and_then(|p| p.spec?.min_available))
    };
    let patch = |spec: serde_json::Value| {
        let api = api.clone();
        async move { api.patch("h100", &PatchParams::default(), &Patch::Merge(json!({"spec": spec}))).await }
    };

    devnet.lock().unwrap().set_phase(EpochPhase::PocGenerate);
    eventually("closed for the window", WAIT, || async { Ok(min_available().await? == Some(IntOrString::Int(2))) })
        .await?;
    patch(json!({"paused": true})).await?;
    devnet.lock().unwrap().set_phase(EpochPhase::Inference);
    eventually("open after the window while paused", WAIT, || async {
        Ok(min_available().await? == Some(IntOrString::Int(1)))
    })
    .await?;

    // The public API stops answering (nothing listens there): counted as a window at first...
    patch(json!({"paused": false, "networkNode": {"publicUrl": "http://127.0.0.1:9"}})).await?;
    eventually("an unreadable phase counts as a window", WAIT, || async {
        Ok(min_available().await? == Some(IntOrString::Int(2)))
    })
    .await?;
    // ... for the limit only.
    eventually("past the limit evictions are allowed, and Degraded says why", WAIT, || async {
        let (status, reason, message) = condition(&api.get("h100").await?, "Degraded");
        Ok(min_available().await? == Some(IntOrString::Int(1))
            && (status.as_str(), reason.as_str()) == ("True", "PocWindowUnknown")
            && message.contains("epoch phase has been unreadable")
            && operator.metrics.poc_window_unknown.get() == 1)
    })
    .await?;
    patch(json!({"networkNode": {"publicUrl": url}})).await?;
    eventually("readable again: nothing degraded", WAIT, || async {
        let (status, _, _) = condition(&api.get("h100").await?, "Degraded");
        Ok(status == "False" && operator.metrics.poc_window_unknown.get() == 0)
    })
    .await?;
    operator.stop().await?;
    Ok(())
}

/// A GonkaNode deleted during a window lifts its claims on the nodes (nothing of it stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gonka_node_deleted_mid_window_leaves_no_protection_behind() -> anyhow::Result<()> {
    let Held { cp: _cp, client, api, devnet, operator, .. } = held_fleet(&["gpu-a"]).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let annotated = || async {
        let annotations = nodes.get("gpu-a").await?.metadata.annotations.unwrap_or_default();
        anyhow::Ok(annotations.get("cluster-autoscaler.kubernetes.io/scale-down-disabled").cloned())
    };
    devnet.lock().unwrap().set_phase(EpochPhase::PocGenerate);
    eventually("gpu-a protected for the window", WAIT, || async { Ok(annotated().await?.as_deref() == Some("true")) })
        .await?;
    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    assert_eq!(annotated().await?, None, "the deleted GonkaNode's claim was lifted with it");
    let managers: Vec<String> = nodes
        .get("gpu-a")
        .await?
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .filter(|m| m.starts_with("gonka-operator/poc-window/"))
        .collect();
    assert!(managers.is_empty(), "no claim left: {managers:?}");
    operator.stop().await?;
    Ok(())
}
