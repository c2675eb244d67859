//! The whole chain on a real control plane: the operator rolls out a GonkaNode and registers
//! its pods with the devnet network node; node-daemon processes stand in for the pods on their
//! addresses and report to the operator; the devnet drives them through a PoC round; both earn
//! weight, and the GonkaNode's status shows it; deleting the GonkaNode leaves no registration
//! behind.
#![cfg(feature = "torch")]

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_devnet::round::{RoundConfig, run_round};
use gonka_e2e::{ControlPlane, eventually, free_port, gonka_node_manifest, start_devnet_on};
use kube::api::{Api, DeleteParams};
use serde_json::json;

const NS: &str = "gpu";
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_registers_the_daemons_and_a_poc_round_weighs_them() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    // A 2025 network node: the PoC v1 round is its flow.
    let (devnet, url) = start_devnet_on(gonka_devnet::Generation::Launch2025, &["Qwen/Qwen2.5-7B-Instruct"], 0).await?;
    let operator = cp.start_reporting_operator("op-a", free_port()?).await?;

    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    // Proofs go out only while generating, at this interval: well within the round's window.
    manifest["spec"]["poc"] = json!({"sendIntervalSeconds": 1});
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    cp.roll_out(manifest, PODS, 2, WAIT).await?;

    // The daemons take the pods' places: the address the operator registered, the daemon config
    // the operator rendered (its ConfigMap), GPUs from fake NVML.
    let cm =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let stand_ins = cp
        .stand_in_for_pods(NS, PODS, daemon, &cm.data.unwrap()["daemon.json"], |_| fake_nvml::Scenario::hgx_h100())
        .await?;
    assert_eq!(stand_ins.len(), 2);
    let cfg = RoundConfig {
        block_hash: "0xfleet".into(),
        block_height: 42,
        public_key: "host".into(),
        params: serde_json::from_value(
            json!({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 96,
            "ffn_dim_multiplier": 1.3, "multiple_of": 32, "rope_theta": 10000.0, "seq_len": 8}),
        )?,
        r_target: 1.41,
        fraud_threshold: 1e-7,
        batch_size: 8,
        generate_for: Duration::from_secs(4),
        settle_for: Duration::from_secs(6),
        validation_sample: 200,
        callback_url: format!("{url}/v1/poc-batches"),
    };
    let results = run_round(&devnet, &cfg, |_| {}).await?;
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.weight > 0 && r.fraud_detected == Some(false), "{r:?}");
    }
    // The daemons report the round to the operator: status counts at least what the network
    // node accepted in the round (a batch that arrives after the devnet closed the round still
    // counts on the daemon's side).
    let accepted: usize = results.iter().map(|r| r.weight).sum();
    eventually("status shows the round's weight", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.poc_block_height == Some(42) && s.weight.is_some_and(|w| w as usize >= accepted))
    })
    .await?;
    // And exactly what the daemons counted: the sum of their own proof counters, read from each
    // one's metrics port (their only round), once both agree.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), NS);
    let ips: Vec<String> = pods
        .list(&kube::api::ListParams::default().labels(PODS))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.status?.pod_ip)
        .collect();
    assert_eq!(ips.len(), 2);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let counted = || async {
        let mut total = 0u64;
        for ip in &ips {
            let metrics = reqwest::get(format!("http://{ip}:9090/metrics")).await?.text().await?;
            let valid = metrics
                .lines()
                .find_map(|l| l.strip_prefix("gonka_ml_node_poc_nonces_valid_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .ok_or_else(|| anyhow::anyhow!("no proof counter on {ip}:\n{metrics}"))?;
            total += valid as u64;
        }
        anyhow::Ok(total)
    };
    eventually("status weight is the sum the daemons counted", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        let total = counted().await?;
        Ok(total > 0 && s.weight == Some(total as i64))
    })
    .await?;

    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    assert!(devnet.lock().unwrap().nodes().is_empty(), "no registration left behind");
    drop(stand_ins);
    operator.stop().await?;
    Ok(())
}

/// A GonkaNode with `modelStorage` on a real control plane: the DaemonSet mounts the weights
/// and the daemons load the preloaded model as they start (the stand-ins read the volume's
/// contents where the kubelet would have mounted it), report INFERENCE to the operator, are
/// registered with the model, and a 2026 network node's PoC v2 round weighs them, the weight
/// reaching the GonkaNode's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_storage_brings_the_preloaded_model_up_and_poc_v2_weighs_it() -> anyhow::Result<()> {
    const MODEL: &str = "Qwen/Tiny-Qwen3";
    let models = tempfile::tempdir()?;
    gonka_e2e::write_tiny_qwen(&models.path().join(MODEL), "qwen3", json!({}))?;

    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let (devnet, url) = start_devnet_on(gonka_devnet::Generation::Mainline2026, &[MODEL], 0).await?;
    let operator = cp.start_reporting_operator("op-m", free_port()?).await?;

    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    manifest["spec"]["models"] = json!([{"id": MODEL, "args": ["--max-model-len", "256"]}]);
    manifest["spec"]["modelStorage"] = json!({"hostPath": "/srv/gonka-models", "preload": MODEL});
    cp.roll_out(manifest, PODS, 2, WAIT).await?;

    // The apiserver took the pod template with the weights volume, read-only at /models.
    let ds = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), NS).get("h100-ml-node").await?;
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "models").expect("models volume");
    assert_eq!(volume.host_path.unwrap().path, "/srv/gonka-models");
    let mount = pod.containers[0].volume_mounts.clone().unwrap().into_iter().find(|m| m.name == "models").unwrap();
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/models", Some(true)));
    let cm =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let mut daemon_json: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["daemon.json"])?;
    assert_eq!(
        (daemon_json["modelsDir"].as_str(), daemon_json["preloadModel"].as_str()),
        (Some("/models"), Some(MODEL))
    );
    // Where the kubelet would mount the volume, the stand-ins read the directory itself.
    daemon_json["modelsDir"] = json!(models.path());
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let stand_ins =
        cp.stand_in_for_pods(NS, PODS, daemon, &daemon_json.to_string(), |_| fake_nvml::Scenario::hgx_h100()).await?;
    assert_eq!(stand_ins.len(), 2);

    eventually("both ML nodes report serving the model", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.ml_nodes.len() == 2 && s.ml_nodes.iter().all(|n| n.state.as_deref() == Some("INFERENCE")))
    })
    .await?;
    let registered = devnet.lock().unwrap().nodes();
    assert_eq!(registered.len(), 2);
    assert!(registered.iter().all(|n| n.node.config.models.contains_key(MODEL)));

    let cfg = gonka_devnet::round_v2::RoundConfig {
        block_hash: "77aa".repeat(16),
        block_height: 4200,
        public_key: "host".into(),
        model: MODEL.into(),
        seq_len: 8,
        stronger_rng: false,
        generate_for: Duration::from_secs(3),
        settle_for: Duration::from_secs(2),
        validation_sample: 20,
        callback_base: url.clone(),
        stat_test: json!({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}),
    };
    let results = gonka_devnet::round_v2::run_round(&devnet, &cfg, |_| {}).await?;
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.weight > 0 && r.fraud_detected == Some(false), "{r:?}");
    }
    // The daemons report the round (every v2 nonce an artifact) and status shows its weight.
    let accepted: usize = results.iter().map(|r| r.weight).sum();
    eventually("status shows the PoC v2 round's weight", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.poc_block_height == Some(4200) && s.weight.is_some_and(|w| w as usize >= accepted))
    })
    .await?;

    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    drop(stand_ins);
    operator.stop().await?;
    Ok(())
}

/// A GonkaNode whose model is served by vLLM (`engine: vllm`) on a real control plane: the
/// operator picks the vLLM image and renders the engine into `daemon.json`; the stand-in
/// daemons (given vLLM's CPU build and the stand-in of the `gonka_poc` plugin's routes) bring the
/// preloaded model up in vLLM, report it — engine, instances serving — to the operator, are
/// registered with it, and a 2026 network node's PoC v2 round fanned out to the plugin weighs
/// them, the weight reaching the GonkaNode's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_engined_gonka_node_serves_reports_and_is_weighed_by_a_poc_v2_round() -> anyhow::Result<()> {
    const MODEL: &str = "Meta/Tiny-Llama";
    const START: Duration = Duration::from_secs(600);
    let models = tempfile::tempdir()?;
    gonka_e2e::write_tiny_qwen(&models.path().join(MODEL), "llama", json!({}))?;
    let python = gonka_e2e::vllm_python()?;
    let standin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testing/vllm-poc-standin");

    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let (devnet, url) = start_devnet_on(gonka_devnet::Generation::Mainline2026, &[MODEL], 0).await?;
    let operator = cp.start_reporting_operator("op-v", free_port()?).await?;

    let args = ["--enforce-eager", "--max-model-len=256", "--middleware", "gonka_poc_standin.PocRoutes"];
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    manifest["spec"]["models"] = json!([{"id": MODEL, "engine": "vllm", "args": args}]);
    manifest["spec"]["modelStorage"] = json!({"hostPath": "/srv/gonka-models", "preload": MODEL});
    cp.roll_out(manifest, PODS, 2, WAIT).await?;

    let ds = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), NS).get("h100-ml-node").await?;
    let image = ds.spec.unwrap().template.spec.unwrap().containers[0].image.clone().unwrap();
    assert_eq!(image, gonka_e2e::TEST_DAEMON_IMAGE_VLLM, "a model on vLLM: the vLLM image");
    let cm =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let mut daemon_json: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["daemon.json"])?;
    assert_eq!(daemon_json["models"][0]["engine"], "vllm");
    daemon_json["modelsDir"] = json!(models.path());
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let one_gpu = || fake_nvml::Scenario { gpus: vec![fake_nvml::FakeGpu::h100(0)], ..fake_nvml::Scenario::hgx_h100() };
    let env = [
        ("VLLM_PYTHON_PATH", python.to_str().unwrap()),
        ("VLLM_CPU_KVCACHE_SPACE", "1"),
        ("PYTHONPATH", standin.to_str().unwrap()),
        ("GONKA_STANDIN_CALLBACK_INTERVAL", "1"),
    ];
    let stand_ins =
        cp.stand_in_for_pods_with_env(NS, PODS, daemon, &daemon_json.to_string(), |_| one_gpu(), &env).await?;
    assert_eq!(stand_ins.len(), 2);

    eventually("both ML nodes report their model serving on vLLM", START, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.ml_nodes.len() == 2
            && s.ml_nodes.iter().all(|n| {
                n.state.as_deref() == Some("INFERENCE")
                    && n.inference.as_ref().is_some_and(|i| {
                        (i.engine.as_str(), i.model.as_str(), i.instances, i.instances_healthy) == ("vllm", MODEL, 1, 1)
                    })
            }))
    })
    .await?;
    assert!(devnet.lock().unwrap().nodes().iter().all(|n| n.node.config.models.contains_key(MODEL)));

    let cfg = gonka_devnet::round_v2::RoundConfig {
        block_hash: "5eed".repeat(16),
        block_height: 5100,
        public_key: "host".into(),
        model: MODEL.into(),
        seq_len: 8,
        stronger_rng: false,
        generate_for: Duration::from_secs(4),
        settle_for: Duration::from_secs(3),
        validation_sample: 20,
        callback_base: url.clone(),
        stat_test: json!({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}),
    };
    let results = gonka_devnet::round_v2::run_round(&devnet, &cfg, |_| {}).await?;
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.weight > 0 && r.fraud_detected == Some(false), "{r:?}");
    }
    // The plugin's count of the round reaches status (what the daemons saw the plugin compute).
    eventually("status shows the vLLM round's weight", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.poc_block_height == Some(5100) && s.weight.is_some_and(|w| w > 0))
    })
    .await?;

    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    assert!(devnet.lock().unwrap().nodes().is_empty(), "no registration left behind");
    drop(stand_ins);
    operator.stop().await?;
    Ok(())
}
