//! The namespaced install (`manifests/namespaced/`): the operator, with exactly that install's
//! rights (Roles in its namespace, a ClusterRole only for nodes and TokenReviews), runs the
//! GonkaNodes of its namespace and has no rights anywhere else.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, eventually, gonka_node_manifest};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, ListParams, PostParams};

const SYSTEM: &str = "gonka-system";
const WAIT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_install_runs_its_namespace_and_nothing_else() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.apply_kustomization("namespaced").await?;
    cp.namespace("elsewhere").await?;
    let admin = cp.client().await?;
    let operator_rights = cp.client_as(SYSTEM, "gonka-operator").await?;
    let operator = cp.start_operator_watching(operator_rights.clone(), "op-a", SYSTEM).await?;

    let here: Api<GonkaNode> = Api::namespaced(admin.clone(), SYSTEM);
    here.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("h100", SYSTEM))?).await?;
    let there: Api<GonkaNode> = Api::namespaced(admin.clone(), "elsewhere");
    there.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("a100", "elsewhere"))?).await?;

    let daemon_sets: Api<DaemonSet> = Api::namespaced(admin.clone(), SYSTEM);
    eventually("the GonkaNode of its namespace rolled out", WAIT, || async {
        Ok(daemon_sets.get_opt("h100-ml-node").await?.is_some())
    })
    .await?;
    let status = |gn: GonkaNode| gn.status.map(|s| s.observed_generation.is_some()).unwrap_or(false);
    eventually("and its status written", WAIT, || async { Ok(status(here.get("h100").await?)) }).await?;

    // The other namespace's GonkaNode is not the operator's: no finalizer, no status, and its
    // rights end at its namespace.
    let other = there.get("a100").await?;
    assert!(other.metadata.finalizers.unwrap_or_default().is_empty() && other.status.is_none());
    let outside: Api<DaemonSet> = Api::namespaced(operator_rights.clone(), "elsewhere");
    match outside.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => anyhow::bail!("the operator could list DaemonSets elsewhere: {other:?}"),
    }
    let cluster_wide: Api<DaemonSet> = Api::all(operator_rights);
    match cluster_wide.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => anyhow::bail!("the operator could list DaemonSets cluster-wide: {other:?}"),
    }
    operator.stop().await?;
    Ok(())
}
