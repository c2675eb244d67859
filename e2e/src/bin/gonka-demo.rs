//! The local demo: a real control plane on this machine (etcd, kube-apiserver,
//! kube-controller-manager built from Go modules), simulated GPU nodes, the operator installed
//! from `manifests/` and running with its ServiceAccount's rights, and the sample GonkaNodes
//! from `manifests/samples/` rolled out to ML-node pods. Prints progress, then the fleet.
//!
//!   cargo run -p gonka-e2e --bin gonka-demo [-- --keep]
//!
//! `--keep` leaves everything running and prints a KUBECONFIG to explore with; Ctrl-C stops.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

const NAMESPACE: &str = "gonka-demo";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    // The progress lines tell the story; operator logs only when something is wrong.
    gonka_e2e::init_logging("warn,kube_client::client::builder=off");
    let started = Instant::now();
    let step = |msg: &str| println!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());

    step("starting etcd, kube-apiserver and kube-controller-manager (first run builds them from Go modules)");
    let cp = ControlPlane::start(Components::WithControllers).await?;
    step(&format!("control plane up at {}", cp.url));

    cp.apply_manifests().await?;
    step("installed the operator from manifests/ (CRD, namespace, RBAC, Deployment)");

    let gpu_nodes = [
        ("gpu-h100-a", 8, "NVIDIA-H100-80GB-HBM3"),
        ("gpu-h100-b", 8, "NVIDIA-H100-80GB-HBM3"),
        ("gpu-a100-a", 8, "NVIDIA-A100-SXM4-80GB"),
    ];
    for (name, gpus, product) in gpu_nodes {
        cp.gpu_node(name, gpus, product).await?;
    }
    step(&format!("registered {} simulated GPU nodes (2x H100, 1x A100)", gpu_nodes.len()));

    // The Deployment in manifests/ has no kubelet to run it here; the operator runs in this
    // process instead, with exactly the ServiceAccount's RBAC.
    let operator = cp
        .start_operator_as(cp.client_as("gonka-system", "gonka-operator").await?, "demo-operator", "gonka-system")
        .await?;
    step(&format!("operator running (metrics on http://{}/metrics)", operator.admin_addr));

    let (devnet, admin_url) = gonka_e2e::start_devnet(&["Qwen/QwQ-32B", "Qwen/Qwen2.5-7B-Instruct"]).await?;
    step(&format!("devnet (the network node's stand-in) serving its admin API at {admin_url}"));

    cp.namespace(NAMESPACE).await?;
    // The samples name an in-cluster network node; here it is the devnet on loopback.
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let rewritten = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&samples)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?
            .replace("http://gonka-api.gonka.svc:9200", &admin_url)
            .replace("http://gonka-api.gonka.svc:9000", &admin_url);
        std::fs::write(rewritten.path().join(path.file_name().context("file name")?), text)?;
    }
    cp.kubectl(&["apply", "--server-side", "-f", &rewritten.path().display().to_string()])?;
    step("applied manifests/samples/ (GonkaNodes h100 and a100), network node URLs pointed at the devnet");

    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        // Stand in for the scheduler and kubelets: bind the DaemonSet pods and report them ready.
        cp.simulate_kubelet(NAMESPACE, "app.kubernetes.io/name=gonka-ml-node").await?;
        let fleet = api.list(&ListParams::default()).await?;
        let summary: Vec<String> = fleet
            .iter()
            .map(|gn| {
                let s = gn.status.clone().unwrap_or_default();
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready");
                format!(
                    "{}: {}/{} ML nodes ready ({}), {} registered",
                    gn.name_any(),
                    s.ready_ml_nodes,
                    s.desired_ml_nodes,
                    ready.map_or("no status yet", |c| c.reason.as_str()),
                    s.registered_ml_nodes
                )
            })
            .collect();
        let line = summary.join("; ");
        if line != last {
            step(&line);
            last = line;
        }
        let all_ready = !fleet.items.is_empty()
            && fleet.iter().all(|gn| {
                gn.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
        if all_ready {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the fleet did not become ready within 120s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    println!("\n$ kubectl get gonkanodes -n {NAMESPACE} -o wide");
    print!("{}", cp.kubectl(&["get", "gonkanodes", "-n", NAMESPACE, "-o", "wide"])?);
    println!("\n$ kubectl get daemonsets,pods -n {NAMESPACE} -o wide");
    print!("{}", cp.kubectl(&["get", "daemonsets,pods", "-n", NAMESPACE, "-o", "wide"])?);
    println!("\n$ kubectl get events -n {NAMESPACE} --field-selector involvedObject.kind=GonkaNode");
    print!("{}", cp.kubectl(&["get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.kind=GonkaNode"])?);
    println!("\nThe network node (devnet) lists these ML nodes:");
    for n in devnet.lock().expect("devnet").nodes() {
        let models: Vec<&String> = n.node.config.models.keys().collect();
        println!(
            "  {:<28} node_num {}  host {:<12} enabled {}  models {:?}",
            n.node.config.id, n.node.node_num, n.node.config.host, n.state.admin_state.enabled, models
        );
    }
    println!(
        "\nNot in this demo yet: node-daemons answering the network node, PoC rounds and weights (the \
         devnet's round driver and the daemon report stream come next); the GPUS and WEIGHT columns stay empty."
    );

    if keep {
        println!("\nKeeping it running. In another shell:\n  export KUBECONFIG={}", cp.kubeconfig().display());
        println!("  kubectl get gonkanodes -A\nCtrl-C to stop.");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    }
    operator.stop().await?;
    step("stopped; the control plane and its files are removed");
    Ok(())
}
