//! The fleet under Kubernetes' own scheduling: the real kube-scheduler places the ML-node pods
//! and kwok runs the nodes and pods (no simulated binding). ML nodes land on exactly the GPU
//! nodes where their GPUs fit, are registered on the pod IPs Kubernetes gave them, and an ML node
//! the scheduler cannot place is named in status with the scheduler's reason, until capacity
//! appears and it starts by itself. A rollout replaces pods for real (terminated by kwok,
//! re-created by the DaemonSet controller, placed again) and every ML node stays registered. An
//! in-house pod of a higher PriorityClass preempts a lent ML node (`opportunistic`), which is
//! disabled on the network node while its pod stops.

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, KWOK_POD_PREFIX, Operator, eventually, gonka_node_manifest, start_devnet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(120);
const PODS: &str = "app.kubernetes.io/instance=fleet,app.kubernetes.io/name=gonka-ml-node";

fn ready_condition(gn: &GonkaNode) -> (String, String, String) {
    let c = gn.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
    c.map(|c| (c.status, c.reason, c.message)).unwrap_or_default()
}

/// Pods by the node the scheduler bound them to (`""` while unbound), with their IP.
async fn placement(pods: &Api<Pod>) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let list = pods.list(&ListParams::default().labels(PODS)).await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            (node, p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        })
        .collect())
}

struct Fleet {
    cp: ControlPlane,
    devnet: gonka_devnet::Shared,
    operator: Operator,
    api: Api<GonkaNode>,
    pods: Api<Pod>,
}

/// A control plane with the real scheduler and kwok `nodes` (name, GPUs), a devnet, an operator,
/// and the GonkaNode `fleet` (its network node the devnet; `edit` adjusts it, given the devnet's
/// URL).
async fn kwok_fleet(nodes: &[(&str, u32)], edit: impl FnOnce(&mut serde_json::Value, &str)) -> anyhow::Result<Fleet> {
    let cp = ControlPlane::start(Components::Scheduled).await?;
    cp.install_crd().await?;
    cp.namespace(NS).await?;
    for (node, gpus) in nodes {
        cp.kwok_node(node, *gpus, "NVIDIA-H100-80GB-HBM3").await?;
    }
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op").await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let mut manifest = gonka_node_manifest("fleet", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    edit(&mut manifest, &url);
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    Ok(Fleet { cp, devnet, operator, api, pods })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_places_ml_nodes_where_their_gpus_fit() -> anyhow::Result<()> {
    // Two full H100 boxes, a 4-GPU box too small for an 8-GPU ML node, and a CPU node.
    let nodes = [("gpu-a", 8), ("gpu-b", 8), ("gpu-small", 4), ("cpu-a", 0)];
    let Fleet { cp, devnet, operator, api, pods } =
        kwok_fleet(&nodes, |m, _| m["spec"]["gpusPerMlNode"] = json!(8)).await?;
    let client = cp.client().await?;

    // Both H100 boxes run an ML node (tolerating the GPU taint), registered on kwok's pod IPs.
    eventually("two ML nodes registered", WAIT, || async {
        Ok(api.get("fleet").await?.status.is_some_and(|s| s.registered_ml_nodes == 2))
    })
    .await
    .map_err(|e| {
        let logs = ["kube-scheduler", "kwok"].map(|c| format!("{c}:\n{}", cp.log_tail(c, 15))).join("\n");
        let objects = cp.kubectl(&["get", "nodes,daemonsets,pods,gonkanodes", "-A", "-o", "wide"]).unwrap_or_default();
        e.context(format!("{objects}\n{logs}"))
    })?;
    let placed = placement(&pods).await?;
    for node in ["gpu-a", "gpu-b"] {
        let ip = placed.get(node).cloned().flatten().unwrap_or_default();
        assert!(ip.starts_with(KWOK_POD_PREFIX), "{node}'s ML node runs with a kwok pod IP: {placed:?}");
    }
    assert!(!placed.contains_key("cpu-a"), "no ML node on a node without GPUs: {placed:?}");
    let mut hosts: Vec<String> = devnet.lock().unwrap().nodes().iter().map(|n| n.node.config.host.clone()).collect();
    hosts.sort();
    let mut ips: Vec<String> = ["gpu-a", "gpu-b"].iter().filter_map(|n| placed[*n].clone()).collect();
    ips.sort();
    assert_eq!(hosts, ips, "the network node reaches each ML node on its pod IP");

    // The small box's ML node exists but no node can take it; status says which and why.
    let unplaced = pods.list(&ListParams::default().labels(PODS)).await?;
    let pending: Vec<&Pod> =
        unplaced.items.iter().filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none())).collect();
    assert_eq!(pending.len(), 1, "one ML node waits for the scheduler: {placed:?}");
    eventually("status names the unschedulable ML node", WAIT, || async {
        let (status, reason, message) = ready_condition(&api.get("fleet").await?);
        Ok(status == "False"
            && reason == "MlNodesUnschedulable"
            && message.contains("gpu-small")
            && message.contains("Insufficient nvidia.com/gpu"))
    })
    .await?;

    let events = cp.kubectl(&["get", "events", "-n", NS, "--field-selector", "reason=MlNodesUnschedulable"])?;
    assert!(events.contains("gpu-small"), "a warning event names the unschedulable ML node: {events}");

    // Capacity appears (the device plugin now advertises 8 GPUs): the scheduler places the
    // waiting ML node, kwok runs it, the operator registers it.
    let nodes: Api<Node> = Api::all(client.clone());
    let gpus = json!({"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"});
    nodes
        .patch_status(
            "gpu-small",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": gpus, "allocatable": gpus}})),
        )
        .await?;
    eventually("three ML nodes registered and ready", WAIT, || async {
        let gn = api.get("fleet").await?;
        let (status, reason, _) = ready_condition(&gn);
        Ok(gn.status.is_some_and(|s| s.registered_ml_nodes == 3)
            && (status.as_str(), reason.as_str()) == ("True", "AllMlNodesReady"))
    })
    .await?;
    let placed = placement(&pods).await?;
    assert_eq!(placed.keys().map(String::as_str).collect::<Vec<_>>(), ["gpu-a", "gpu-b", "gpu-small"]);
    operator.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_real_pod_lifecycles_keeps_every_ml_node_registered() -> anyhow::Result<()> {
    // The operator deletes outdated pods itself (OnDelete, outside PoC windows); here kwok really
    // terminates them, the DaemonSet controller re-creates them, the scheduler places them and
    // kwok runs them (it hands the freed address out again): each ML node ends up registered,
    // enabled, at its new pod's address, under the same id and broker number.
    let Fleet { cp: _cp, devnet, operator, api, pods } =
        kwok_fleet(&[("gpu-a", 8), ("gpu-b", 8)], |m, url| m["spec"]["networkNode"]["publicUrl"] = json!(url)).await?;
    eventually("two ML nodes registered", WAIT, || async {
        Ok(api.get("fleet").await?.status.is_some_and(|s| s.registered_ml_nodes == 2))
    })
    .await?;
    let registrations = || {
        let mut r: Vec<(String, u64, String)> = devnet
            .lock()
            .unwrap()
            .nodes()
            .iter()
            .map(|n| (n.node.config.id.clone(), n.node.node_num, n.node.config.host.clone()))
            .collect();
        r.sort();
        r
    };
    let before = registrations();
    let old_pods: Vec<String> = pods
        .list(&ListParams::default().labels(PODS))
        .await?
        .items
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();

    api.patch("fleet", &PatchParams::default(), &Patch::Merge(json!({"spec": {"image": "registry.test/daemon:v2"}})))
        .await?;
    eventually("rolled out, registered at the new pods", WAIT, || async {
        let list = pods.list(&ListParams::default().labels(PODS)).await?.items;
        let fresh = list.len() == 2
            && list.iter().all(|p| {
                p.metadata.uid.as_ref().is_some_and(|u| !old_pods.contains(u))
                    && p.spec.as_ref().and_then(|s| s.containers.first()?.image.clone()).as_deref()
                        == Some("registry.test/daemon:v2")
            });
        let mut ips: Vec<String> = list.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
        ips.sort();
        let mut hosts: Vec<String> = registrations().into_iter().map(|(_, _, host)| host).collect();
        hosts.sort();
        let s = api.get("fleet").await?.status.unwrap_or_default();
        let enabled = devnet.lock().unwrap().nodes().iter().all(|n| n.state.admin_state.enabled);
        Ok(fresh && ips.len() == 2 && hosts == ips && s.registered_ml_nodes == 2 && enabled)
    })
    .await?;
    let after = registrations();
    let ids = |r: &[(String, u64, String)]| r.iter().map(|(id, num, _)| (id.clone(), *num)).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before), "each ML node keeps its registration and broker number");
    operator.stop().await?;
    Ok(())
}

/// Lent GPUs taken back by the real scheduler: the fleet runs at a low PriorityClass
/// (`opportunistic`), an in-house pod of a higher class needs gpu-b's GPUs, and kube-scheduler
/// preempts the ML node's pod there. While that pod terminates (a finalizer of the test's holds
/// it, as a long grace period would) its ML node is disabled on the network node; gpu-a's is
/// not touched. Once it is gone the in-house pod runs, the DaemonSet's new pod waits (it never
/// preempts back) and status says why; when the in-house pod ends the ML node returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_house_pod_preempts_a_lent_ml_node_which_is_disabled_before_its_pod_goes() -> anyhow::Result<()> {
    use k8s_openapi::api::scheduling::v1::PriorityClass;

    let cp = ControlPlane::start(Components::Scheduled).await?;
    cp.install_crd().await?;
    cp.namespace(NS).await?;
    for node in ["gpu-a", "gpu-b"] {
        cp.kwok_node(node, 8, "NVIDIA-H100-80GB-HBM3").await?;
    }
    let client = cp.client().await?;
    let classes: Api<PriorityClass> = Api::all(client.clone());
    for (name, value, policy) in [("gonka-lent", -100, "Never"), ("in-house", 1000, "PreemptLowerPriority")] {
        let class = json!({"metadata": {"name": name}, "value": value, "preemptionPolicy": policy});
        classes.create(&PostParams::default(), &serde_json::from_value(class)?).await?;
    }
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op").await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut manifest = gonka_node_manifest("fleet", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["gpusPerMlNode"] = json!(8);
    manifest["spec"]["priorityClassName"] = json!("gonka-lent");
    manifest["spec"]["opportunistic"] = json!({});
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
    let registered = |a: Option<bool>, b: Option<bool>| {
        [("fleet.gpu@gpu-a", a), ("fleet.gpu@gpu-b", b)]
            .into_iter()
            .filter_map(|(id, e)| Some((id.to_string(), e?)))
            .collect::<Vec<_>>()
    };
    eventually("two ML nodes registered and enabled", WAIT, || async {
        Ok(api.get("fleet").await?.status.is_some_and(|s| s.registered_ml_nodes == 2)
            && enabled() == registered(Some(true), Some(true)))
    })
    .await?;
    let on_b = |list: &[Pod]| {
        list.iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-b")).cloned()
    };
    let victim = on_b(&pods.list(&ListParams::default().labels(PODS)).await?.items).unwrap();
    let victim_name = victim.metadata.name.clone().unwrap();
    pods.patch(
        &victim_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["e2e.gonka.ai/hold"]}})),
    )
    .await?;

    // The team's training job wants all of gpu-b (in a namespace's default ServiceAccount, which
    // no controller makes here).
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), NS);
    accounts.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}}))?).await?;
    let training: Pod = serde_json::from_value(json!({
        "metadata": {"name": "training", "namespace": NS},
        "spec": {
            "priorityClassName": "in-house",
            "nodeSelector": {"kubernetes.io/hostname": "gpu-b"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [{"name": "train", "image": "registry.test/train:1",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}]
        }
    }))?;
    pods.create(&PostParams::default(), &training).await?;
    eventually("the scheduler preempts gpu-b's ML node, which is disabled while its pod stops", WAIT, || async {
        let nominated = pods.get("training").await?.status.and_then(|s| s.nominated_node_name);
        let terminating = pods.get_opt(&victim_name).await?.is_some_and(|p| p.metadata.deletion_timestamp.is_some());
        Ok(nominated.as_deref() == Some("gpu-b") && terminating && enabled() == registered(Some(true), Some(false)))
    })
    .await
    .map_err(|e| {
        let objects = cp.kubectl(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_default();
        e.context(format!("{objects}\n{:?}\nkube-scheduler:\n{}", enabled(), cp.log_tail("kube-scheduler", 20)))
    })?;

    // The pod stops: the in-house pod runs on gpu-b; the ML node's new pod waits without
    // preempting back, and status names it.
    pods.patch(&victim_name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await?;
    eventually("training runs on gpu-b, the ML node waits for its GPUs", WAIT, || async {
        let bound = pods.get("training").await?.spec.and_then(|s| s.node_name);
        let (status, reason, message) = ready_condition(&api.get("fleet").await?);
        Ok(bound.as_deref() == Some("gpu-b")
            && pods.get_opt(&victim_name).await?.is_none()
            && (status.as_str(), reason.as_str()) == ("False", "MlNodesUnschedulable")
            && message.contains("gpu-b"))
    })
    .await?;
    assert!(
        enabled().iter().all(|(id, on)| id != "fleet.gpu@gpu-b" || !on),
        "gpu-b's ML node takes no work: {:?}",
        enabled()
    );

    // The job ends: the ML node is placed again and serves.
    pods.delete("training", &DeleteParams::default().grace_period(0)).await?;
    eventually("both ML nodes registered and enabled again", WAIT, || async {
        let (status, reason, _) = ready_condition(&api.get("fleet").await?);
        Ok((status.as_str(), reason.as_str()) == ("True", "AllMlNodesReady")
            && enabled() == registered(Some(true), Some(true)))
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
