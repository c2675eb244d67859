//! Two operator replicas on a real apiserver, installed from `manifests/` and running with
//! exactly the ServiceAccount's RBAC: only the Lease holder reconciles; when it stops the other
//! takes over; a replica whose lease is taken away stops writing.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, admin_get, eventually, gonka_node_manifest};
use gonka_operator::RunError;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(45);
const LEASE: &str = "gonka-operator-leader";
const SYSTEM: &str = "gonka-system";

async fn holder(leases: &Api<Lease>) -> anyhow::Result<Option<String>> {
    Ok(leases.get_opt(LEASE).await?.and_then(|l| l.spec?.holder_identity))
}

fn image(ds: &DaemonSet) -> String {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].image.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_follower_takes_over() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.apply_manifests().await?;
    cp.namespace("gpu").await?;
    let admin = cp.client().await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), SYSTEM);
    let gonka_nodes: Api<GonkaNode> = Api::namespaced(admin.clone(), "gpu");
    let daemon_sets: Api<DaemonSet> = Api::namespaced(admin.clone(), "gpu");

    let a = cp.start_operator_as(cp.client_as(SYSTEM, "gonka-operator").await?, "op-a", SYSTEM).await?;
    eventually("op-a leads", WAIT, || async { Ok(holder(&leases).await?.as_deref() == Some("op-a")) }).await?;
    let b = cp.start_operator_as(cp.client_as(SYSTEM, "gonka-operator").await?, "op-b", SYSTEM).await?;

    // Both replicas serve health; only the leader says so in its metrics.
    for op in [&a, &b] {
        assert_eq!(admin_get(op.admin_addr, "/healthz").await?.0, 200);
        eventually("replica ready", WAIT, || async { Ok(admin_get(op.admin_addr, "/readyz").await?.0 == 200) }).await?;
    }
    let (_, metrics) = admin_get(a.admin_addr, "/metrics").await?;
    assert!(metrics.contains("gonka_operator_leader 1"), "{metrics}");
    let (_, metrics) = admin_get(b.admin_addr, "/metrics").await?;
    assert!(metrics.contains("gonka_operator_leader 0"), "{metrics}");

    let gn: GonkaNode = serde_json::from_value(gonka_node_manifest("a100", "gpu"))?;
    gonka_nodes.create(&PostParams::default(), &gn).await?;
    eventually("op-a creates the DaemonSet", WAIT, || async {
        Ok(daemon_sets.get_opt("a100-ml-node").await?.is_some())
    })
    .await?;
    eventually("op-a writes status", WAIT, || async {
        Ok(gonka_nodes.get("a100").await?.status.is_some_and(|s| s.observed_generation == Some(1)))
    })
    .await?;
    assert!(a.reconciles() > 0);
    assert_eq!(b.reconciles(), 0, "the follower must not reconcile");
    assert!(!b.is_leader());

    // The leader goes away cleanly: it releases the lease and the follower takes over at once,
    // well before the lease would have expired.
    a.stop().await?;
    eventually("op-b leads", WAIT, || async { Ok(holder(&leases).await?.as_deref() == Some("op-b")) }).await?;
    gonka_nodes
        .patch("a100", &PatchParams::default(), &Patch::Merge(json!({"spec": {"image": "registry.test/daemon:v2"}})))
        .await?;
    eventually("op-b rolls the change", WAIT, || async {
        Ok(image(&daemon_sets.get("a100-ml-node").await?) == "registry.test/daemon:v2")
    })
    .await?;
    assert!(b.reconciles() > 0);

    // Someone else takes the lease (a replica on the far side of a partition): op-b must stop.
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": "intruder",
                "leaseDurationSeconds": 60,
                "acquireTime": now_micro(),
                "renewTime": now_micro(),
            }})),
        )
        .await?;
    let ended = b.finished(WAIT).await?;
    assert!(matches!(ended, Err(RunError::LostLeadership)), "{ended:?}");
    assert_eq!(holder(&leases).await?.as_deref(), Some("intruder"));
    Ok(())
}

fn now_micro() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}
