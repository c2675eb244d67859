//! What a reconcile costs the apiserver once the fleet has converged: the owned objects and the
//! ML-node pods come from the controller's watches, so passes over an unchanged fleet read
//! none of them (no GET, no pod list) and write nothing; an owned object someone deletes is a
//! miss, read once and made again.

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest, start_devnet};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";
/// The owned kinds, and the pods (a pass used to list them; a list counts as a `get`).
const READ: [&str; 7] =
    ["daemonsets", "configmaps", "services", "serviceaccounts", "networkpolicies", "poddisruptionbudgets", "pods"];

/// The operator's apiserver requests of `verb` on the owned kinds and pods, by resource.
fn requests(metrics: &str, verb: &str) -> BTreeMap<String, u64> {
    READ.iter()
        .map(|resource| {
            let series = format!("gonka_operator_apiserver_requests_total{{verb=\"{verb}\",resource=\"{resource}\"}} ");
            let n = metrics.lines().find_map(|l| l.strip_prefix(&series)?.trim().parse().ok()).unwrap_or(0);
            (resource.to_string(), n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_fleet_is_reconciled_from_the_watches_without_reading_what_it_owns() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let (_devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_counting_operator("op-a").await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    cp.roll_out(manifest, PODS, 2, WAIT).await?;

    // Converged: two passes in a row that write nothing. A change of a node's labels
    // reconciles every GonkaNode: keep passes coming.
    let op = &operator;
    let mut last = (requests(&op.metrics.encode(), "patch"), op.reconciles());
    let mut tick = 0;
    eventually("passes that write no owned object", WAIT, || {
        let (writes, passes) = (requests(&op.metrics.encode(), "patch"), op.reconciles());
        let settled = writes == last.0 && passes >= last.1 + 2;
        if writes != last.0 {
            last = (writes, passes);
        }
        tick += 1;
        let labelled = cp.kubectl(&["label", "--overwrite", "node", "gpu-a", &format!("e2e-settle={tick}")]);
        async move {
            labelled?;
            Ok(settled)
        }
    })
    .await?;

    let before = op.metrics.encode();
    // The requests are counted: rolling out created (read, then applied) every owned object;
    // the pod watch listed the pods.
    assert!(requests(&before, "get").values().all(|n| *n >= 1), "{:?}", requests(&before, "get"));
    let passes = op.reconciles();
    // Passes over the unchanged fleet: a node's labels change (every GonkaNode looks again).
    for tick in 0..3 {
        cp.kubectl(&["label", "--overwrite", "node", "gpu-b", &format!("e2e-reads={tick}")])?;
        let want = passes + tick + 1;
        eventually("another pass", WAIT, || async move { Ok(op.reconciles() >= want) }).await?;
    }
    let after = op.metrics.encode();
    assert_eq!(requests(&after, "get"), requests(&before, "get"), "owned objects or pods read over an unchanged fleet");
    assert_eq!(requests(&after, "patch"), requests(&before, "patch"), "owned objects written over an unchanged fleet");

    // Someone deletes the ML nodes' Service: its watch drops it, the next pass misses it, reads
    // it once (not found) and makes it again.
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let uid = services.get("h100-ml-nodes").await?.metadata.uid;
    services.delete("h100-ml-nodes", &DeleteParams::default()).await?;
    eventually("the Service made again", WAIT, || async {
        Ok(services.get_opt("h100-ml-nodes").await?.is_some_and(|s| s.metadata.uid != uid))
    })
    .await?;
    let reads = requests(&op.metrics.encode(), "get");
    assert!(reads["services"] > requests(&after, "get")["services"], "a miss is read: {reads:?}");
    operator.stop().await?;
    Ok(())
}
