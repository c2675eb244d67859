//! ML-node pods run under the `restricted` Pod Security profile: the real apiserver's
//! PodSecurity admission, enforcing it on the GonkaNode's namespace, admits the pods the
//! DaemonSet controller creates (it refuses any pod that runs as root, may escalate, keeps
//! capabilities or lacks the runtime's seccomp profile). Each pod asks the device plugin for
//! its GPUs and has bounded memory for `/dev/shm`.
//!
//! A hostPath volume is outside that profile, and reads the GPU node's own files: the operator
//! builds one only under a directory the cluster admin allows (`--allowed-host-paths`).

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, TEST_ALLOWED_HOST_PATH, eventually, gonka_node_manifest};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, PostParams};

const NS: &str = "gpu-restricted";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ml_node_pods_are_admitted_by_the_restricted_pod_security_profile() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a"]).await?;
    cp.kubectl(&["label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted"])?;
    let client = cp.client().await?;
    let operator = cp.start_operator("op-a").await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    api.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("h100", NS))?).await?;

    let pods: Api<Pod> = Api::namespaced(client, NS);
    eventually("the DaemonSet's pod admitted", WAIT, || async {
        Ok(!pods.list(&ListParams::default().labels(PODS)).await?.items.is_empty())
    })
    .await?;
    let pod = pods.list(&ListParams::default().labels(PODS)).await?.items.remove(0);
    let spec = pod.spec.unwrap();
    let limits = spec.containers[0].resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
    assert_eq!(limits.get("nvidia.com/gpu"), Some(&Quantity("8".into())), "GPUs from the device plugin");
    let shm = spec.volumes.unwrap_or_default().into_iter().find(|v| v.name == "shm").unwrap();
    assert_eq!(shm.empty_dir.unwrap().size_limit, Some(Quantity("16Gi".into())));
    operator.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_only_where_the_admin_allows_and_never_in_a_restricted_namespace() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a"]).await?;
    cp.kubectl(&["label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted"])?;
    let client = cp.client().await?;
    let operator = cp.start_operator("op-a").await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);

    // The kubelet's directory (service-account tokens of every pod on the node): refused, the
    // status says which setting allows what, and nothing is built.
    let mut gn = gonka_node_manifest("kubelet", NS);
    gn["spec"]["modelStorage"] = serde_json::json!({"hostPath": "/var/lib/kubelet"});
    api.create(&PostParams::default(), &serde_json::from_value(gn)?).await?;
    eventually("the host path refused in status", WAIT, || async {
        let status = api.get("kubelet").await?.status.unwrap_or_default();
        Ok(status.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.reason == "InvalidSpec"
                && c.message.contains("spec.modelStorage.hostPath: /var/lib/kubelet is not under")
                && c.message.contains("--allowed-host-paths")
        }))
    })
    .await?;
    assert!(daemon_sets.get_opt("kubelet-ml-node").await?.is_none(), "nothing built for a refused spec");

    // Under the allowed directory: the DaemonSet mounts it read-only (recursively where the
    // kubelet can), and the apiserver takes that volume mount as written.
    let mut gn = gonka_node_manifest("staged", NS);
    gn["spec"]["modelStorage"] = serde_json::json!({"hostPath": format!("{TEST_ALLOWED_HOST_PATH}/hub")});
    api.create(&PostParams::default(), &serde_json::from_value(gn)?).await?;
    eventually("the DaemonSet with the host path", WAIT, || async {
        Ok(daemon_sets.get_opt("staged-ml-node").await?.is_some())
    })
    .await?;
    let ds = daemon_sets.get("staged-ml-node").await?;
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "models").unwrap();
    assert_eq!(volume.host_path.unwrap().path, format!("{TEST_ALLOWED_HOST_PATH}/hub"));
    let mount = pod.containers[0].volume_mounts.clone().unwrap().into_iter().find(|m| m.name == "models").unwrap();
    assert_eq!((mount.read_only, mount.recursive_read_only.as_deref()), (Some(true), Some("IfPossible")));

    // The restricted profile still refuses its pods: the DaemonSet controller's attempts fail
    // with PodSecurity's words, which is why the README sends restricted namespaces to a
    // PersistentVolumeClaim.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), NS);
    eventually("PodSecurity refuses the hostPath pod", WAIT, || async {
        Ok(events.list(&ListParams::default()).await?.items.iter().any(|e| {
            e.involved_object.name.as_deref() == Some("staged-ml-node")
                && e.message.as_deref().is_some_and(|m| m.contains("violates PodSecurity") && m.contains("hostPath"))
        }))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let staged = "app.kubernetes.io/instance=staged,app.kubernetes.io/name=gonka-ml-node";
    assert!(pods.list(&ListParams::default().labels(staged)).await?.items.is_empty());
    operator.stop().await?;
    Ok(())
}
