//! The local demo: a real control plane on this machine (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from Go modules), GPU nodes simulated by kwok
//! (which also runs their pods and gives them IPs), the operator installed
//! from `manifests/` and running with its ServiceAccount's rights, and the sample GonkaNodes
//! from `manifests/samples/` rolled out to ML-node pods. Prints progress, then the fleet, a PoC
//! v1 round as a 2025 network node runs it, and — what a 2026 network node does — a GonkaNode
//! whose ML nodes preload a tiny Qwen3 from their model volume, prove it with PoC v2 and chat,
//! one ML node's answer validated by the other as the network node validates inferences;
//! then, with vLLM's CPU build at hand (`GONKA_VLLM_PYTHON`, as `make demo` sets it), the same
//! for a GonkaNode whose model runs on vLLM (`engine: vllm`).
//!
//!   cargo run -p gonka-e2e --bin gonka-demo [-- --keep]
//!
//! `--keep` leaves everything running and prints a KUBECONFIG to explore with; Ctrl-C stops.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane};
use k8s_openapi::api::core::v1::ConfigMap;
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

    step(
        "starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok \
         (first run builds them from Go modules)",
    );
    let cp = ControlPlane::start(Components::Scheduled).await?;
    step(&format!("control plane up at {}", cp.url));

    cp.apply_manifests().await?;
    step("installed the operator from manifests/ (CRD, namespace, RBAC, Deployment)");

    let gpu_nodes = [
        ("gpu-h100-a", 8, "NVIDIA-H100-80GB-HBM3"),
        ("gpu-h100-b", 8, "NVIDIA-H100-80GB-HBM3"),
        ("gpu-a100-a", 8, "NVIDIA-A100-SXM4-80GB"),
    ];
    for (name, gpus, product) in gpu_nodes {
        cp.kwok_node(name, gpus, product).await?;
    }
    step(&format!("{} simulated GPU nodes run by kwok (2x H100, 1x A100, 8 GPUs each)", gpu_nodes.len()));

    // The Deployment in manifests/ has no kubelet to run it here; the operator runs in this
    // process instead, with exactly the ServiceAccount's RBAC.
    let report_port = gonka_e2e::free_port()?;
    let operator = cp
        .start_operator_with(
            cp.client_as("gonka-system", "gonka-operator").await?,
            "demo-operator",
            "gonka-system",
            Some(report_port),
        )
        .await?;
    step(&format!(
        "operator running (metrics on http://{}/metrics, node-daemon reports on 127.0.0.1:{report_port})",
        operator.admin_addr
    ));

    // A 2025 network node: the PoC v1 round below is its flow (2026 ones prove with PoC v2).
    let (devnet, admin_url) = gonka_e2e::start_devnet_on(
        gonka_devnet::Generation::Launch2025,
        &["Qwen/QwQ-32B", "Qwen/Qwen2.5-7B-Instruct"],
        0,
    )
    .await?;
    step(&format!("devnet (the network node's stand-in) serving its admin API at {admin_url}"));

    cp.namespace(NAMESPACE).await?;
    // The samples name an in-cluster network node; here it is the devnet on loopback.
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let rewritten = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&samples)? {
        let path = entry?.path();
        // The vLLM samples (samples/vllm/) need real H200/B200 nodes and their weights.
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)?
            .replace("http://gonka-api.gonka.svc:9200", &admin_url)
            .replace("http://gonka-api.gonka.svc:9100", &admin_url)
            .replace("http://gonka-api.gonka.svc:9000", &admin_url);
        std::fs::write(rewritten.path().join(path.file_name().context("file name")?), text)?;
    }
    cp.kubectl(&["apply", "--server-side", "-f", &rewritten.path().display().to_string()])?;
    step("applied manifests/samples/ (GonkaNodes h100 and a100), network node URLs pointed at the devnet");

    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
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
    match std::env::var_os("GONKA_DAEMON_BIN") {
        Some(bin) => {
            poc_round(&cp, &api, &devnet, &admin_url, Path::new(&bin), &step).await?;
            poc_v2_round(&cp, &api, Path::new(&bin), &step, &V2Fleet::native()).await?;
            match std::env::var_os("GONKA_VLLM_PYTHON") {
                Some(python) => poc_v2_round(&cp, &api, Path::new(&bin), &step, &V2Fleet::vllm(python)?).await?,
                None => println!(
                    "\nNo vLLM part: set GONKA_VLLM_PYTHON to vLLM's Python (`make demo` installs its CPU \
                     build with scripts/vllm-env.sh and sets it)."
                ),
            }
        }
        None => println!(
            "\nNo PoC round: set GONKA_DAEMON_BIN to a node-daemon built with `--features torch` \
             (`make demo` does) to run one."
        ),
    }

    if keep {
        println!("\nKeeping it running. In another shell:\n  export KUBECONFIG={}", cp.kubeconfig().display());
        println!("  kubectl get gonkanodes -A\nCtrl-C to stop.");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    }
    operator.stop().await?;
    step("stopped; the control plane and its files are removed");
    Ok(())
}

/// Node-daemon processes stand in for the ML-node pods (each listens on its pod's loopback IP at
/// the ML-node port the operator registered, runs on the `daemon.json` the operator rendered and
/// reports to the operator with its pod's token), with fake-NVML GPUs matching their nodes; the
/// devnet drives them through a PoC v1 round; the result is a table.
async fn poc_round(
    cp: &ControlPlane,
    api: &Api<GonkaNode>,
    devnet: &gonka_devnet::Shared,
    base_url: &str,
    daemon: &Path,
    step: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let gpus_for = |node: &str| {
        let mut scenario = fake_nvml::Scenario::hgx_h100();
        if node.contains("a100") {
            scenario.gpus = (0..8).map(fake_nvml::FakeGpu::a100_80).collect();
        }
        scenario
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(cp.client().await?, NAMESPACE);
    let mut stand_ins = Vec::new();
    for gn in api.list(&ListParams::default()).await? {
        let name = gn.name_any();
        let config = config_maps.get(&format!("{name}-daemon-config")).await?;
        let daemon_json = config.data.as_ref().and_then(|d| d.get("daemon.json")).context("daemon.json")?;
        let pods = format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=gonka-ml-node");
        stand_ins.push(cp.stand_in_for_pods(NAMESPACE, &pods, daemon, daemon_json, gpus_for).await?);
    }
    let stand_ins_count: usize = stand_ins.iter().map(|s| s.len()).sum();
    step(&format!("{stand_ins_count} node-daemons up on the pods' addresses, GPUs from fake NVML"));
    wait_for_fleet(api, "reports: every ML node reporting its GPUs", |s| {
        !s.ml_nodes.is_empty() && s.ml_nodes.iter().all(|n| n.reporting) && s.total_gpus > 0
    })
    .await?;
    for gn in api.list(&ListParams::default()).await? {
        let s = gn.status.unwrap_or_default();
        let gpus: Vec<String> = s.gpus.iter().map(|g| format!("{} x {}", g.count, g.type_)).collect();
        step(&format!("{} reports {} GPUs: {}", gn.metadata.name.unwrap_or_default(), s.total_gpus, gpus.join(", ")));
    }
    gonka_operator::network_node::install_crypto_provider();
    let http = reqwest::Client::new();
    let targets: Vec<(String, String)> = devnet
        .lock()
        .expect("devnet")
        .nodes()
        .into_iter()
        .map(|n| (n.node.config.id, format!("http://{}:{}", n.node.config.host, n.node.config.poc_port)))
        .collect();

    let cfg = gonka_devnet::round::RoundConfig {
        block_hash: "0xdemo-block".into(),
        block_height: 1000,
        public_key: "demo-host".into(),
        // A small proof model, so a CPU proves a few hundred nonces in seconds.
        params: serde_json::from_value(serde_json::json!({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
            "vocab_size": 96, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "rope_theta": 10000.0, "seq_len": 8}))?,
        r_target: 1.41,
        fraud_threshold: 1e-7,
        batch_size: 8,
        // The daemons post proofs every 5 s (the samples' default, upstream's interval) and only
        // while generating: two posts fit.
        generate_for: Duration::from_secs(12),
        settle_for: Duration::from_secs(3),
        validation_sample: 200,
        callback_url: format!("{base_url}/v1/poc-batches"),
    };
    let results = gonka_devnet::round::run_round(devnet, &cfg, |m| step(m)).await?;

    println!("\nPoC round at block {} (devnet):", cfg.block_height);
    println!("  {:<28} {:<34} {:>12} {:>8}  validation", "ML NODE", "GPUS", "VALID NONCES", "WEIGHT");
    for r in &results {
        let url = &targets.iter().find(|(id, _)| *id == r.id).map(|(_, u)| u.clone()).unwrap_or_default();
        let devices: serde_json::Value =
            http.get(format!("{url}/api/v1/gpu/devices")).send().await?.json().await.unwrap_or_default();
        let gpus = devices["devices"]
            .as_array()
            .map(|d| format!("{} x {}", d.len(), d.first().and_then(|g| g["name"].as_str()).unwrap_or("?")))
            .unwrap_or_else(|| "?".into());
        let validation = match (&r.validated_by, r.fraud_detected, r.n_invalid) {
            (Some(by), Some(false), Some(n)) => format!("passed ({n} misses, by {by})"),
            (Some(by), Some(true), Some(n)) => format!("FRAUD ({n} misses, by {by})"),
            _ => "not validated".into(),
        };
        println!("  {:<28} {:<34} {:>12} {:>8}  {validation}", r.id, gpus, r.valid_nonces, r.weight);
    }

    // The daemons report their round to the operator, which writes it into status.
    wait_for_fleet(api, "status: the round's valid nonces", |s| s.poc_block_height == Some(cfg.block_height)).await?;
    println!("\n$ kubectl get gonkanodes -n {NAMESPACE}   # GPUs and weight as the node-daemons reported them");
    print!("{}", cp.kubectl(&["get", "gonkanodes", "-n", NAMESPACE])?);
    println!("\nPer ML node (status.mlNodes):");
    println!(
        "  {:<12} {:<12} {:<8} {:>4} {:>9}  {:>12}",
        "GONKANODE", "NODE", "STATE", "GPUS", "REPORTING", "VALID NONCES"
    );
    for gn in api.list(&ListParams::default()).await? {
        for n in gn.status.clone().unwrap_or_default().ml_nodes {
            println!(
                "  {:<12} {:<12} {:<8} {:>4} {:>9}  {:>12}",
                gn.name_any(),
                n.node,
                n.state.unwrap_or_default(),
                n.gpus_available,
                n.reporting,
                n.poc_valid_nonces.map_or("-".into(), |v| v.to_string())
            );
        }
    }
    drop(stand_ins);
    Ok(())
}

/// Waits until every GonkaNode's status passes `check`.
async fn wait_for_fleet(
    api: &Api<GonkaNode>,
    what: &str,
    check: impl Fn(&gonka_crds::GonkaNodeStatus) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleet = api.list(&ListParams::default()).await?;
        if fleet.iter().all(|gn| gn.status.as_ref().is_some_and(&check)) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within 60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One GonkaNode of the 2026 part: which model on which engine, on which simulated nodes.
struct V2Fleet {
    /// The GonkaNode.
    name: &'static str,
    model: &'static str,
    /// The tiny checkpoint's architecture (`write_tiny_qwen`).
    arch: &'static str,
    what: &'static str,
    /// `models[].engine`, when not `auto`.
    engine: Option<&'static str>,
    args: Vec<&'static str>,
    /// Two kwok nodes of this product, this many GPUs each (the ML node's `gpusPerMlNode`).
    nodes: [&'static str; 2],
    product: &'static str,
    gpus: u32,
    /// Each GPU's memory, as NVML shows it.
    gpu_mb: u64,
    /// What the stand-in daemons need besides the pod's (where vLLM is).
    env: Vec<(&'static str, String)>,
    /// How long the model may take to come up.
    start_within: Duration,
}

impl V2Fleet {
    fn native() -> Self {
        Self {
            name: "tiny",
            model: "gonka-demo/tiny-qwen3",
            arch: "qwen3",
            what: "a tiny random Qwen3 (3 layers, hidden 64) on the node-daemon's own engine",
            engine: None,
            args: vec!["--max-model-len", "256"],
            nodes: ["gpu-h200-a", "gpu-h200-b"],
            product: "NVIDIA-H200",
            gpus: 8,
            gpu_mb: 143_771,
            env: Vec::new(),
            start_within: Duration::from_secs(120),
        }
    }

    /// vLLM's CPU build serves a tiny Llama (an architecture the native engine does not run);
    /// the `gonka_poc` plugin is not on PyPI, so a stand-in of its routes answers PoC v2 inside
    /// vLLM (testing/vllm-poc-standin: upstream's shapes, hash vectors instead of PoC).
    fn vllm(python: std::ffi::OsString) -> anyhow::Result<Self> {
        let standin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testing/vllm-poc-standin");
        let python = python.into_string().map_err(|p| anyhow::anyhow!("GONKA_VLLM_PYTHON is not UTF-8: {p:?}"))?;
        Ok(Self {
            name: "tiny-vllm",
            model: "gonka-demo/tiny-llama",
            arch: "llama",
            what: "a tiny random Llama on vLLM (its CPU build; the gonka_poc plugin's routes by a stand-in)",
            engine: Some("vllm"),
            args: vec!["--enforce-eager", "--max-model-len", "256", "--middleware", "gonka_poc_standin.PocRoutes"],
            nodes: ["gpu-b200-a", "gpu-b200-b"],
            product: "NVIDIA-B200",
            gpus: 1,
            gpu_mb: 183_359,
            env: vec![
                ("VLLM_PYTHON_PATH", python),
                ("VLLM_CPU_KVCACHE_SPACE", "1".into()),
                ("PYTHONPATH", standin.display().to_string()),
                ("GONKA_STANDIN_CALLBACK_INTERVAL", "1".into()),
            ],
            start_within: Duration::from_secs(600),
        })
    }
}

/// What a 2026 network node does with a GonkaNode whose ML nodes preload a model: a tiny
/// checkpoint written with transformers into a models directory, the GonkaNode (`fleet`) whose
/// `modelStorage` mounts it and preloads the model, registered with a devnet playing a 2026
/// network node; node-daemons stand in for its pods (reading the directory where the kubelet
/// would mount the volume), the devnet runs a PoC v2 round, the weight reaches the GonkaNode's
/// status, and a chat answer streams from a pod's inference port (on the native engine, then
/// validated: [`validate_inference`]).
async fn poc_v2_round(
    cp: &ControlPlane,
    api: &Api<GonkaNode>,
    daemon: &Path,
    step: &dyn Fn(&str),
    fleet: &V2Fleet,
) -> anyhow::Result<()> {
    let (name, model) = (fleet.name, fleet.model);
    let pods = format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=gonka-ml-node");
    let models = tempfile::tempdir()?;
    gonka_e2e::write_tiny_qwen(&models.path().join(model), fleet.arch, serde_json::json!({}))?;
    println!();
    step(&format!("[PoC v2] {model}: {}, written with transformers", fleet.what));

    for node in fleet.nodes {
        cp.kwok_node(node, fleet.gpus, fleet.product).await?;
    }
    let (devnet, base) = gonka_e2e::start_devnet_on(gonka_devnet::Generation::Mainline2026, &[model], 0).await?;
    let mut model_spec = serde_json::json!({"id": model, "args": fleet.args});
    if let Some(engine) = fleet.engine {
        model_spec["engine"] = engine.into();
    }
    let manifest = serde_json::json!({
        "apiVersion": "gonka.ai/v1alpha1", "kind": "GonkaNode",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "networkNode": {"adminUrl": base, "mlCallbackUrl": base},
            "placement": {"nodeSelector": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": fleet.product}},
            "gpusPerMlNode": fleet.gpus,
            "models": [model_spec],
            "modelStorage": {"hostPath": "/srv/gonka-models", "preload": model},
        },
    });
    api.patch(name, &kube::api::PatchParams::apply("gonka-demo"), &kube::api::Patch::Apply(&manifest)).await?;
    step(&format!(
        "[PoC v2] 2 {} nodes (kwok), a 2026 network node (devnet), GonkaNode {name}{}: modelStorage hostPath /srv/gonka-models, preload",
        fleet.product,
        fleet.engine.map(|e| format!(" (engine: {e})")).unwrap_or_default(),
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = api.get(name).await?.status.unwrap_or_default();
        if s.registered_ml_nodes == 2 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "GonkaNode {name}: not registered within 120s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(cp.client().await?, NAMESPACE);
    let config = config_maps.get(&format!("{name}-daemon-config")).await?;
    let mut daemon_json: serde_json::Value =
        serde_json::from_str(config.data.as_ref().and_then(|d| d.get("daemon.json")).context("daemon.json")?)?;
    // Where the kubelet would mount the hostPath volume, the stand-ins read the directory.
    daemon_json["modelsDir"] = serde_json::json!(models.path());
    let gpus = |_: &str| {
        let mut scenario = fake_nvml::Scenario::hgx_h100();
        let label = fleet.product.replace('-', " ");
        scenario.gpus = (0..fleet.gpus)
            .map(|i| fake_nvml::FakeGpu {
                name: label.clone(),
                uuid: format!("GPU-{}-{i:04}", fleet.product),
                total_mb: fleet.gpu_mb,
                ..fake_nvml::FakeGpu::h100(i)
            })
            .collect();
        scenario
    };
    let env: Vec<(&str, &str)> = fleet.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stand_ins =
        cp.stand_in_for_pods_with_env(NAMESPACE, &pods, daemon, &daemon_json.to_string(), gpus, &env).await?;
    let deadline = Instant::now() + fleet.start_within;
    let serving = loop {
        let s = api.get(name).await?.status.unwrap_or_default();
        let up = |n: &gonka_crds::MlNodeStatus| {
            n.state.as_deref() == Some("INFERENCE") && n.inference.as_ref().is_some_and(|i| i.instances_healthy > 0)
        };
        if s.ml_nodes.len() == 2 && s.ml_nodes.iter().all(up) {
            break s.ml_nodes;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "GonkaNode {name}: ML nodes not serving within {:?}",
            fleet.start_within
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    step(&format!("[PoC v2] {} node-daemons preloaded {model} and report INFERENCE", stand_ins.len()));
    for n in &serving {
        if let Some(i) = &n.inference {
            println!(
                "  {:<12} engine {:<6} instances serving {}/{}  restarts {}",
                n.node, i.engine, i.instances_healthy, i.instances, i.restarts
            );
        }
    }

    let cfg = gonka_devnet::round_v2::RoundConfig {
        block_hash: "3f8a1c2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8".into(),
        block_height: 2000,
        public_key: "demo-host".into(),
        model: model.into(),
        seq_len: 32,
        stronger_rng: true,
        generate_for: Duration::from_secs(8),
        settle_for: Duration::from_secs(2),
        validation_sample: 200,
        callback_base: base,
        stat_test: serde_json::json!({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}),
    };
    let results = gonka_devnet::round_v2::run_round(&devnet, &cfg, |m| step(&format!("[PoC v2] {m}"))).await?;
    println!("\nPoC v2 round at block {} on {model} (devnet as a 2026 network node):", cfg.block_height);
    println!("  {:<28} {:>10} {:>8}  validation", "ML NODE", "ARTIFACTS", "WEIGHT");
    for r in &results {
        let validation = match (&r.validated_by, r.fraud_detected, r.n_mismatch) {
            (Some(by), Some(false), Some(n)) => format!("passed ({n} mismatches, by {by})"),
            (Some(by), Some(true), Some(n)) => format!("FRAUD ({n} mismatches, by {by})"),
            _ => "not validated".into(),
        };
        println!("  {:<28} {:>10} {:>8}  {validation}", r.id, r.artifacts, r.weight);
    }
    // The daemons' counts reach status within the operator's flush: wait for the round and at
    // least the artifacts the network node took (on vLLM the plugin's count, read every 2 s).
    let accepted: usize = results.iter().map(|r| r.artifacts).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = api.get(name).await?.status.unwrap_or_default();
        if s.poc_block_height == Some(cfg.block_height) && s.weight.is_some_and(|w| w as usize >= accepted) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "status: the PoC v2 round not reported within 60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("\n$ kubectl get gonkanodes -n {NAMESPACE}   # {name}: weight from the PoC v2 round");
    print!("{}", cp.kubectl(&["get", "gonkanodes", "-n", NAMESPACE])?);

    let pod_ip =
        devnet.lock().expect("devnet").nodes().first().map(|n| n.node.config.host.clone()).context("a node")?;
    gonka_operator::network_node::install_crypto_provider();
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let url = format!("http://{pod_ip}:5000/v1/chat/completions");
    let answer = reqwest::Client::new().post(&url).json(&body).send().await?.text().await?;
    let events: Vec<&str> = answer.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    println!(
        "\n$ curl {url} -d '{{\"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], ...}}'"
    );
    println!("  {} server-sent events (random weights: the words are noise), the last two:", events.len());
    for e in events.iter().rev().take(2).rev() {
        println!("  data: {e}");
    }
    if fleet.engine.is_none() {
        validate_inference(&devnet, model).await?;
    }
    drop(stand_ins);
    Ok(())
}

/// What a 2026 network node does with an inference (`gonka_devnet::inference_validation`): the
/// user's request rewritten for validation and executed on one ML node, its answer replayed on
/// the other with the executor's tokens enforced, the two compared. (Only on the native engine
/// here: vLLM's CPU build is not gonka's fork, which replays.)
async fn validate_inference(devnet: &gonka_devnet::Shared, model: &str) -> anyhow::Result<()> {
    use gonka_devnet::inference_validation::{Answer, executor_request, judge, validation_request};
    let hosts: Vec<String> =
        devnet.lock().expect("devnet").nodes().iter().map(|n| n.node.config.host.clone()).collect();
    let (executor, validator) = (hosts.first().context("a node")?, hosts.last().context("a node")?);
    let user = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 24, "stream": true});
    let mode = Some("processed_logprobs");
    let http = reqwest::Client::new();
    let post = |host: &str, body: serde_json::Value| {
        let request = http.post(format!("http://{host}:5000/v1/chat/completions")).json(&body);
        async move { anyhow::Ok(request.send().await?.error_for_status()?.text().await?) }
    };
    let executed =
        Answer::read(&post(executor, executor_request(&user, 42, mode)).await?).map_err(anyhow::Error::msg)?;
    let replay = validation_request(&user, &executed, 42, mode);
    let replayed = Answer::read(&post(validator, replay).await?).map_err(anyhow::Error::msg)?;
    let verdict = judge(&executed, &replayed);
    println!(
        "\n# inference validation: {} tokens with their top-5 logprobs from {executor}, replayed on {validator}: {verdict:?} ({})",
        executed.logprobs.len(),
        if verdict.is_valid() { "valid" } else { "INVALID" }
    );
    anyhow::ensure!(verdict.is_valid(), "the replay did not validate the answer: {verdict:?}");
    Ok(())
}
