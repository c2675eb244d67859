//! `spec.networkNode.mlNodeApiFrom` on a real apiserver, with the operator holding exactly the
//! manifests' RBAC: the operator makes a NetworkPolicy admitting only those callers to the
//! ML-node ports, follows edits, and deletes it when the field goes.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, eventually, gonka_node_manifest};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = "gonka-system";
const WAIT: Duration = Duration::from_secs(45);

fn sources(policy: &NetworkPolicy) -> serde_json::Value {
    json!(policy.spec.as_ref().and_then(|s| s.ingress.as_ref()).map(|i| i[0].from.clone()))
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
    eventually("the NetworkPolicy admits the network node", WAIT, || async {
        Ok(policies.get_opt("h100-ml-nodes").await?.is_some_and(|p| sources(&p) == network_node))
    })
    .await?;
    let policy = policies.get("h100-ml-nodes").await?;
    let ports: Vec<_> =
        policy.spec.unwrap().ingress.unwrap()[0].ports.clone().unwrap().into_iter().map(|p| p.port).collect();
    assert_eq!(ports, [Some(IntOrString::Int(8080)), Some(IntOrString::Int(5000))]);

    // An edit is followed; removing the field removes the policy.
    let moved = json!([{"ipBlock": {"cidr": "10.20.0.5/32"}}]);
    let edit = json!({"spec": {"networkNode": {"mlNodeApiFrom": moved}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(edit)).await?;
    eventually("the policy follows the edit", WAIT, || async {
        Ok(policies.get_opt("h100-ml-nodes").await?.is_some_and(|p| sources(&p) == moved))
    })
    .await?;
    let drop = json!({"spec": {"networkNode": {"mlNodeApiFrom": null}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(drop)).await?;
    eventually("the policy is deleted with the field", WAIT, || async {
        Ok(policies.get_opt("h100-ml-nodes").await?.is_none())
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
