//! Two operator replicas on a real apiserver, installed from `manifests/` and running with
//! exactly the ServiceAccount's RBAC: only the Lease holder reconciles; when it stops the other
//! takes over; a replica whose lease is taken away stops writing. The leader writes its address
//! as the report Service's endpoint (the Service has no selector: a pod wearing the operator's
//! labels draws nothing); both serve the report stream under one CA kept in a Secret of its own
//! (its key never in the serving Secret, both owned by the Service), so a leader change leaves
//! the daemons' trust (their daemon.json) as it was.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, admin_get, eventually, free_port, gonka_node_manifest};
use gonka_operator::RunError;
use gonka_protocol::daemon_config::DaemonConfig;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
    // Who the report Service routes to: the pods its EndpointSlice names.
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), SYSTEM);
    let routed = || {
        let slices = slices.clone();
        async move {
            let Some(slice) = slices.get_opt("gonka-operator-leader").await? else { return anyhow::Ok(Vec::new()) };
            anyhow::Ok(
                slice.endpoints.iter().filter_map(|e| e.target_ref.as_ref()?.name.clone()).collect::<Vec<String>>(),
            )
        }
    };
    // A pod wearing the operator's labels, and the old leader label: the Service has no
    // selector, so it draws nothing.
    let impostor = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "impostor",
            "labels": {"app.kubernetes.io/name": "gonka-operator", "app.kubernetes.io/instance": "gonka-operator",
                "gonka.ai/operator-leader": "true"}},
        "spec": {"serviceAccountName": "gonka-operator", "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "listener", "image": "registry.test/listener:1",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(impostor)?).await?;
    let service = Api::<Service>::namespaced(admin.clone(), SYSTEM).get("gonka-operator").await?;
    assert_eq!(service.spec.as_ref().unwrap().selector, None, "the report Service selects no pods");

    let rights = cp.client_as(SYSTEM, "gonka-operator").await?;
    let a = cp.start_operator_with(rights.clone(), "op-a", SYSTEM, Some(free_port()?)).await?;
    eventually("op-a leads", WAIT, || async { Ok(holder(&leases).await?.as_deref() == Some("op-a")) }).await?;
    let b = cp.start_operator_with(rights, "op-b", SYSTEM, Some(free_port()?)).await?;
    eventually("the report Service routes to op-a alone", WAIT, || async { Ok(routed().await? == ["op-a"]) }).await?;
    let slice = slices.get("gonka-operator-leader").await?;
    assert_eq!(slice.labels()["kubernetes.io/service-name"], "gonka-operator");
    assert_eq!(slice.endpoints[0].addresses.len(), 1);
    assert_eq!(slice.owner_references()[0].uid, service.metadata.uid.clone().unwrap());
    // The report TLS, made by the first replica with the ServiceAccount's rights: the CA's key
    // in its own Secret, both owned by the Service (they go when it goes).
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), SYSTEM);
    let tls = secrets.get(gonka_operator::runtime::REPORT_TLS_SECRET).await?;
    let ca = String::from_utf8(tls.data.as_ref().unwrap()["ca.crt"].0.clone())?;
    assert_eq!(tls.annotations()[gonka_operator::report_tls::HOSTS_ANNOTATION], "127.0.0.1");
    let mut keys: Vec<&String> = tls.data.as_ref().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"], "no CA key beside the serving certificate");
    let ca_secret = secrets.get(gonka_operator::runtime::REPORT_CA_SECRET).await?;
    assert!(ca_secret.data.as_ref().unwrap().contains_key("ca.key"));
    assert_eq!(String::from_utf8(ca_secret.data.as_ref().unwrap()["ca.crt"].0.clone())?, ca);
    for s in [&tls, &ca_secret] {
        assert_eq!(s.owner_references()[0].uid, service.metadata.uid.clone().unwrap(), "{:?}", s.metadata.name);
    }

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
    eventually("the report Service routes to op-b alone", WAIT, || async { Ok(routed().await? == ["op-b"]) }).await?;
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
    assert_eq!(routed().await?, Vec::<String>::new(), "a replica that lost the lease takes its address out");
    Ok(())
}

fn now_micro() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}
