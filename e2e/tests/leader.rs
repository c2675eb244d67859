//! Two operator replicas on a real apiserver, installed from `manifests/` and running with
//! exactly the ServiceAccount's RBAC: only the Lease holder reconciles; when it stops the other
//! takes over; a replica whose lease is taken away stops writing. The leader labels its pod (the
//! report Service selects it); both serve the report stream under one CA kept in a Secret, so a
//! leader change leaves the daemons' trust (their daemon.json) as it was.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, admin_get, eventually, free_port, gonka_node_manifest};
use gonka_operator::RunError;
use gonka_protocol::daemon_config::DaemonConfig;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::ResourceExt;
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

    // The replicas' pods (no kubelet here: they only need to exist to be labelled).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), SYSTEM);
    for name in ["op-a", "op-b"] {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "gonka-operator"}},
            "spec": {"serviceAccountName": "gonka-operator", "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "operator", "image": "registry.test/operator:1",
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}});
        pods.create(&PostParams::default(), &serde_json::from_value(pod)?).await?;
    }
    let leader_label = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await?;
            anyhow::Ok(pod.labels().get(gonka_operator::runtime::LEADER_LABEL).cloned())
        }
    };

    let rights = cp.client_as(SYSTEM, "gonka-operator").await?;
    let a = cp.start_operator_with(rights.clone(), "op-a", SYSTEM, Some(free_port()?)).await?;
    eventually("op-a leads", WAIT, || async { Ok(holder(&leases).await?.as_deref() == Some("op-a")) }).await?;
    let b = cp.start_operator_with(rights, "op-b", SYSTEM, Some(free_port()?)).await?;
    eventually("op-a's pod carries the leader label, op-b's not", WAIT, || async {
        Ok(leader_label("op-a").await?.as_deref() == Some("true") && leader_label("op-b").await?.is_none())
    })
    .await?;
    // The report TLS Secret, made by the first replica with the ServiceAccount's rights.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), SYSTEM);
    let tls = secrets.get(gonka_operator::runtime::REPORT_TLS_SECRET).await?;
    let ca = String::from_utf8(tls.data.as_ref().unwrap()["ca.crt"].0.clone())?;
    assert_eq!(tls.annotations()[gonka_operator::report_tls::HOSTS_ANNOTATION], "127.0.0.1");

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
    let report_ca = || async {
        let cm = Api::<ConfigMap>::namespaced(admin.clone(), "gpu").get("a100-daemon-config").await?;
        let config = DaemonConfig::from_json(&cm.data.unwrap()["daemon.json"])?;
        anyhow::Ok(config.report.and_then(|r| r.ca_bundle))
    };
    assert_eq!(report_ca().await?.as_deref(), Some(ca.as_str()), "the daemons trust the operator's CA");

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
    eventually("the leader label moved to op-b's pod", WAIT, || async {
        Ok(leader_label("op-a").await?.is_none() && leader_label("op-b").await?.as_deref() == Some("true"))
    })
    .await?;
    // Same CA under the new leader: the daemons' config did not change.
    assert_eq!(report_ca().await?.as_deref(), Some(ca.as_str()));

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
    assert_eq!(leader_label("op-b").await?, None, "a replica that lost the lease takes its label off");
    Ok(())
}

fn now_micro() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}
