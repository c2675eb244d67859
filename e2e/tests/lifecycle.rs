//! A GonkaNode's life on a real control plane: kube-apiserver + etcd + kube-controller-manager
//! (DaemonSet controller, garbage collector), with the operator running as a replica would.
//! Pods are bound and readied by `simulate_kubelet`, standing in for scheduler and kubelets.

use std::time::Duration;

use gonka_crds::GonkaNode;
use std::collections::BTreeMap;

use gonka_e2e::{ControlPlane, TEST_DAEMON_IMAGE, eventually, gonka_node_manifest, start_devnet};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(60);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

async fn gonka_node(api: &Api<GonkaNode>) -> anyhow::Result<GonkaNode> {
    Ok(api.get("h100").await?)
}

fn condition(gn: &GonkaNode, type_: &str) -> Option<(String, String, String)> {
    gn.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn has(gn: &GonkaNode, type_: &str, status: &str, reason: &str) -> bool {
    condition(gn, type_).is_some_and(|(s, r, _)| s == status && r == reason)
}

fn image(ds: &DaemonSet) -> String {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].image.clone().unwrap_or_default()
}

async fn event_reasons(client: &Client) -> anyhow::Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("h100"))
        .filter_map(|e| e.reason)
        .collect())
}

/// Binds and readies the fleet's pods until the GonkaNode reports `ready` ready ML nodes with
/// `pred` true.
async fn converge(
    what: &str,
    cp: &ControlPlane,
    api: &Api<GonkaNode>,
    ready: i32,
    pred: impl Fn(&GonkaNode) -> bool,
) -> anyhow::Result<GonkaNode> {
    eventually(what, WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        let gn = gonka_node(api).await?;
        let s = gn.status.clone().unwrap_or_default();
        Ok(s.ready_ml_nodes == ready && s.desired_ml_nodes == ready && pred(&gn))
    })
    .await?;
    gonka_node(api).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gonka_node_lifecycle() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    // A CPU node: no GPU label, so no ML node lands there.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cp.client().await?);
    nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "cpu-a"}}))?).await?;

    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let operator = cp.start_operator("op-a").await?;
    let (devnet, admin_url) = start_devnet(&["Qwen/QwQ-32B"]).await?;
    let registrations = || {
        let mut r: Vec<(String, String, bool)> = devnet
            .lock()
            .unwrap()
            .nodes()
            .into_iter()
            .map(|n| (n.node.config.id, n.node.config.host, n.state.admin_state.enabled))
            .collect();
        r.sort();
        r
    };

    // --- create ---
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(admin_url);
    manifest["spec"]["models"] =
        json!([{"id": "Qwen/QwQ-32B", "args": ["--tensor-parallel-size", "4", "--quantization", "fp8"]}]);
    let gn: GonkaNode = serde_json::from_value(manifest)?;
    let created = api.create(&PostParams::default(), &gn).await?;
    let uid = created.uid().unwrap();

    eventually("DaemonSet created", WAIT, || async { Ok(daemon_sets.get_opt("h100-ml-node").await?.is_some()) })
        .await?;
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), NS).get("h100-ml-node").await?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let svc = Api::<Service>::namespaced(client.clone(), NS).get("h100-ml-nodes").await?;
    let ds = daemon_sets.get("h100-ml-node").await?;
    for owners in [
        &sa.metadata.owner_references,
        &cm.metadata.owner_references,
        &svc.metadata.owner_references,
        &ds.metadata.owner_references,
    ] {
        let owner = &owners.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), (uid.as_str(), Some(true)));
    }
    assert_eq!(image(&ds), TEST_DAEMON_IMAGE);
    assert!(
        cm.data.as_ref().unwrap()["daemon.json"].contains("\"mlCallbackUrl\": \"http://gonka-api.gonka.svc:9100\"")
    );
    assert!(gonka_node(&api).await?.finalizers().contains(&gonka_operator::FINALIZER.to_string()));

    // The DaemonSet controller makes one pod per GPU node; once they run, the fleet is ready.
    let gn = converge("fleet ready", &cp, &api, 2, |gn| has(gn, "Ready", "True", "AllMlNodesReady")).await?;
    assert!(has(&gn, "Progressing", "False", "RolloutComplete"));
    assert!(has(&gn, "Degraded", "False", "AsExpected"));
    assert_eq!(gn.status.as_ref().unwrap().observed_generation, Some(1));
    assert!(event_reasons(&client).await?.contains(&"Created".to_string()));

    // Each ready ML node is registered with the network node, at its pod IP.
    eventually("both ML nodes registered", WAIT, || async {
        let gn = gonka_node(&api).await?;
        Ok(gn.status.as_ref().is_some_and(|s| s.registered_ml_nodes == 2)
            && has(&gn, "Registered", "True", "MlNodesRegistered"))
    })
    .await?;
    let pods = pod_ips(&client).await?;
    let ids: Vec<(String, String, bool)> = registrations();
    assert_eq!(
        ids,
        vec![
            ("h100.gpu@gpu-a".to_string(), pods["gpu-a"].clone(), true),
            ("h100.gpu@gpu-b".to_string(), pods["gpu-b"].clone(), true)
        ]
    );
    assert!(event_reasons(&client).await?.contains(&"Registered".to_string()));

    // kubectl tells the story through the printer columns.
    let table = cp.kubectl(&["get", "gonkanodes", "-n", NS])?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "DESIRED", "NODES", "REGISTERED", "GPUS", "WEIGHT", "AGE"], "{table}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..6], ["h100", "True", "2", "2", "2", "0"], "{table}");
    let wide = cp.kubectl(&["get", "gn", "-n", NS, "-o", "wide"])?;
    assert!(wide.contains("REASON") && wide.contains("AllMlNodesReady"), "{wide}");

    // --- a restarted operator changes nothing that is already right ---
    let versions = |objs: [&Option<String>; 4]| objs.map(|v| v.clone().unwrap());
    let before = versions([
        &ds_now(&daemon_sets).await?.metadata.resource_version,
        &Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?.metadata.resource_version,
        &Api::<Service>::namespaced(client.clone(), NS).get("h100-ml-nodes").await?.metadata.resource_version,
        &gonka_node(&api).await?.metadata.resource_version,
    ]);
    operator.stop().await?;
    let operator = cp.start_operator("op-b").await?;
    eventually("op-b reconciled", WAIT, || async { Ok(operator.reconciles() >= 1) }).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = versions([
        &ds_now(&daemon_sets).await?.metadata.resource_version,
        &Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?.metadata.resource_version,
        &Api::<Service>::namespaced(client.clone(), NS).get("h100-ml-nodes").await?.metadata.resource_version,
        &gonka_node(&api).await?.metadata.resource_version,
    ]);
    assert_eq!(before, after, "a reconcile with nothing to change wrote to the apiserver");

    // --- a spec change rolls out ---
    let merge = |v: serde_json::Value| Patch::Merge(v);
    api.patch(
        "h100",
        &PatchParams::default(),
        &merge(json!({"spec": {"image": "registry.test/daemon:v2", "poc": {"batchSize": 64}}})),
    )
    .await?;
    eventually("DaemonSet image v2", WAIT, || async {
        Ok(image(&ds_now(&daemon_sets).await?) == "registry.test/daemon:v2")
    })
    .await?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    assert!(cm.data.as_ref().unwrap()["daemon.json"].contains("\"batchSize\": 64"));
    let gn = converge("v2 rolled out", &cp, &api, 2, |gn| {
        gn.status.as_ref().unwrap().updated_ml_nodes == 2 && has(gn, "Progressing", "False", "RolloutComplete")
    })
    .await?;
    assert_eq!(gn.status.as_ref().unwrap().observed_generation, Some(2));
    assert!(event_reasons(&client).await?.contains(&"Updated".to_string()));
    // Replaced pods have new IPs: their registrations follow, in place (no duplicates).
    eventually("registrations follow the new pods", WAIT, || async {
        let pods = pod_ips(&client).await?;
        Ok(registrations()
            .iter()
            .map(|(id, host, _)| (id.rsplit('@').next().unwrap().to_string(), host.clone()))
            .collect::<BTreeMap<_, _>>()
            == pods)
    })
    .await?;

    // --- a spec the apiserver accepts but the operator cannot run: nothing changes, Degraded says why ---
    let ds_generation = ds_now(&daemon_sets).await?.metadata.generation;
    api.patch(
        "h100",
        &PatchParams::default(),
        &merge(json!({"spec": {"gpusPerMlNode": 6, "image": "registry.test/daemon:broken"}})),
    )
    .await?;
    eventually("InvalidSpec reported", WAIT, || async {
        Ok(has(&gonka_node(&api).await?, "Degraded", "True", "InvalidSpec"))
    })
    .await?;
    let (_, _, message) = condition(&gonka_node(&api).await?, "Degraded").unwrap();
    assert!(message.contains("spec.models[0].args") && message.contains("gpusPerMlNode=6"), "{message}");
    assert_eq!(ds_now(&daemon_sets).await?.metadata.generation, ds_generation, "invalid spec must not touch the fleet");
    assert!(has(&gonka_node(&api).await?, "Ready", "True", "AllMlNodesReady"), "the running fleet keeps serving");
    assert!(event_reasons(&client).await?.contains(&"InvalidSpec".to_string()));

    // --- paused: a valid change is held ---
    api.patch(
        "h100",
        &PatchParams::default(),
        &merge(json!({"spec": {"gpusPerMlNode": 8, "paused": true, "image": "registry.test/daemon:v3"}})),
    )
    .await?;
    eventually("Paused reported", WAIT, || async {
        Ok(has(&gonka_node(&api).await?, "Progressing", "False", "Paused"))
    })
    .await?;
    assert!(has(&gonka_node(&api).await?, "Degraded", "False", "AsExpected"));
    assert_eq!(image(&ds_now(&daemon_sets).await?), "registry.test/daemon:v2", "paused must hold the rollout");
    eventually("ML nodes disabled on the network node", WAIT, || async {
        Ok(registrations().iter().all(|(_, _, enabled)| !enabled))
    })
    .await?;
    api.patch("h100", &PatchParams::default(), &merge(json!({"spec": {"paused": false}}))).await?;
    // Resuming rolls the held change out; each ML node is enabled again once its pod is ready.
    eventually("ML nodes enabled again", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(registrations().iter().all(|(_, _, enabled)| *enabled))
    })
    .await?;
    eventually("DaemonSet image v3 after resume", WAIT, || async {
        Ok(image(&ds_now(&daemon_sets).await?) == "registry.test/daemon:v3")
    })
    .await?;
    // The pass that applied v3 announces the resume only after registration: wait for it.
    let resumed = eventually("the Resumed event", WAIT, || async {
        Ok(event_reasons(&client).await?.contains(&"Resumed".to_string()))
    })
    .await;
    let reasons = event_reasons(&client).await?;
    assert!(
        resumed.is_ok() && reasons.contains(&"Paused".to_string()) && reasons.contains(&"Resumed".to_string()),
        "{reasons:?}"
    );

    // --- drift: someone edits the DaemonSet by hand; the operator puts it back ---
    daemon_sets
        .patch(
            "h100-ml-node",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "spec": {"template": {"spec": {"containers": [{"name": "node-daemon", "image": "evil:latest"}]}}}
            })),
        )
        .await?;
    eventually("drift repaired", WAIT, || async {
        Ok(image(&ds_now(&daemon_sets).await?) == "registry.test/daemon:v3")
    })
    .await?;

    // --- delete: the finalizer runs, then the garbage collector removes what the GonkaNode owned ---
    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    assert!(registrations().is_empty(), "no registration left behind: {:?}", registrations());
    eventually("owned objects collected", WAIT, || async {
        let gone = daemon_sets.get_opt("h100-ml-node").await?.is_none()
            && Api::<ConfigMap>::namespaced(client.clone(), NS).get_opt("h100-daemon-config").await?.is_none()
            && Api::<Service>::namespaced(client.clone(), NS).get_opt("h100-ml-nodes").await?.is_none()
            && Api::<ServiceAccount>::namespaced(client.clone(), NS).get_opt("h100-ml-node").await?.is_none();
        Ok(gone)
    })
    .await?;
    let reasons = event_reasons(&client).await?;
    assert!(reasons.contains(&"Deleting".to_string()) && reasons.contains(&"Deregistered".to_string()), "{reasons:?}");

    operator.stop().await?;
    Ok(())
}

/// Kubernetes node -> pod IP of the GonkaNode's running pods.
async fn pod_ips(client: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), NS);
    Ok(pods
        .list(&ListParams::default().labels(PODS))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.spec?.node_name?, p.status?.pod_ip?)))
        .collect())
}

async fn ds_now(api: &Api<DaemonSet>) -> anyhow::Result<DaemonSet> {
    Ok(api.get("h100-ml-node").await?)
}
