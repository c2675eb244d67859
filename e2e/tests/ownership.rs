//! The operator takes over nothing it did not create: an object that already has the name of
//! one a GonkaNode owns (someone's ConfigMap) is left as it is, and the GonkaNode says why in
//! status; once the name is free, the object is created and owned. (Taken over, it would have
//! been rewritten, and garbage collection would have deleted it with the GonkaNode.)

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_the_same_name_are_not_taken_over() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a"]).await?;
    let client = cp.client().await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let theirs: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "h100-daemon-config", "namespace": NS},
        "data": {"owner": "someone else"},
    }))?;
    config_maps.create(&PostParams::default(), &theirs).await?;
    let operator = cp.start_operator("op-a").await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    api.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("h100", NS))?).await?;

    eventually("the refusal in status", WAIT, || async {
        let status = api.get("h100").await?.status.unwrap_or_default();
        Ok(status.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.reason == "ApplyFailed"
                && c.message.contains("ConfigMap h100-daemon-config exists and this GonkaNode does not own it")
        }))
    })
    .await?;
    let kept = config_maps.get("h100-daemon-config").await?;
    assert_eq!(kept.data.unwrap_or_default().get("owner").map(String::as_str), Some("someone else"));
    assert!(kept.metadata.owner_references.unwrap_or_default().is_empty(), "not adopted");
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client, NS);
    assert!(daemon_sets.get_opt("h100-ml-node").await?.is_none(), "no fleet on a config that is not ours");

    // The name freed, the GonkaNode gets its own.
    config_maps.delete("h100-daemon-config", &DeleteParams::default()).await?;
    eventually("the GonkaNode's own ConfigMap", WAIT, || async {
        let owned = config_maps.get_opt("h100-daemon-config").await?;
        Ok(owned.is_some_and(|c| c.metadata.owner_references.unwrap_or_default().iter().any(|o| o.name == "h100")))
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
