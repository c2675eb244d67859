//! ML-node pods run under the `restricted` Pod Security profile: the real apiserver's
//! PodSecurity admission, enforcing it on the GonkaNode's namespace, admits the pods the
//! DaemonSet controller creates (it refuses any pod that runs as root, may escalate, keeps
//! capabilities or lacks the runtime's seccomp profile). Each pod asks the device plugin for
//! its GPUs and has bounded memory for `/dev/shm`.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest};
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
