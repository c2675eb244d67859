//! `spec.networkNode.mlNodeApiFrom` on a real apiserver, with the operator holding exactly the
//! manifests' RBAC: the operator's NetworkPolicy admits only those callers to the ML-node API
//! and inference ports (and anyone to the monitoring port), follows edits, denies every caller
//! when the field goes, and admits all for `[]`.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, eventually, gonka_node_manifest};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = "gonka-system";
const WAIT: Duration = Duration::from_secs(45);

/// The policy's ingress rules as `[from, [ports]]` (`from` null: every source).
fn rules(policy: &NetworkPolicy) -> serde_json::Value {
    let ingress = policy.spec.as_ref().and_then(|s| s.ingress.clone()).unwrap_or_default();
    json!(
        ingress
            .iter()
            .map(|r| {
                let ports: Vec<_> = r.ports.iter().flatten().map(|p| p.port.clone()).collect();
                json!([r.from, ports])
            })
            .collect::<Vec<_>>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ml_node_api_admits_only_the_callers_the_spec_names() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.apply_manifests().await?;
    cp.namespace("gpu").await?;
    let operator = cp.start_operator_as(cp.client_as(SYSTEM, "gonka-operator").await?, "op-a", SYSTEM).await?;
    let admin = cp.client().await?;
    let gonka_nodes: Api<GonkaNode> = Api::namespaced(admin.clone(), "gpu");
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), "gpu");

    let network_node = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gonka"}},
                               "podSelector": {"matchLabels": {"app": "gonka-api"}}}]);
    let mut manifest = gonka_node_manifest("h100", "gpu");
    manifest["spec"]["networkNode"]["mlNodeApiFrom"] = network_node.clone();
    gonka_nodes.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    let monitoring = json!([null, [9090]]);
    let admitting = |from: serde_json::Value| json!([monitoring, [from, [8080, 5000]]]);
    let has_rules = |want: serde_json::Value| {
        let policies = policies.clone();
        move || {
            let (policies, want) = (policies.clone(), want.clone());
            async move {
                Ok::<_, anyhow::Error>(policies.get_opt("h100-ml-nodes").await?.is_some_and(|p| rules(&p) == want))
            }
        }
    };
    eventually("the NetworkPolicy admits the network node", WAIT, has_rules(admitting(network_node.clone()))).await?;
    let policy = policies.get("h100-ml-nodes").await?;
    assert_eq!(policy.spec.unwrap().pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"], "h100");

    // An edit is followed; without the field nobody reaches the API or inference ports (the
    // monitoring port stays open); `[]` admits every caller.
    let moved = json!([{"ipBlock": {"cidr": "10.20.0.5/32"}}]);
    let edit = json!({"spec": {"networkNode": {"mlNodeApiFrom": moved}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(edit)).await?;
    eventually("the policy follows the edit", WAIT, has_rules(admitting(moved))).await?;
    let drop = json!({"spec": {"networkNode": {"mlNodeApiFrom": null}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(drop)).await?;
    eventually("default-deny without the field", WAIT, has_rules(json!([monitoring]))).await?;
    let open = json!({"spec": {"networkNode": {"mlNodeApiFrom": []}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(open)).await?;
    eventually("every caller for []", WAIT, has_rules(admitting(serde_json::Value::Null))).await?;
    operator.stop().await?;
    Ok(())
}
