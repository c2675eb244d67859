//! `daemon.json`: the node-daemon's configuration, written by the operator.
//!
//! Field names are camelCase like the GonkaNode spec they come from. Unknown fields are
//! rejected so that an operator/daemon version skew is loud, not silent.

use serde::{Deserialize, Serialize};

/// The file name inside the ConfigMap and the mount path the pod reads it from.
pub const FILE_NAME: &str = "daemon.json";
pub const MOUNT_DIR: &str = "/etc/gonka";

/// Configuration of one node-daemon (one ML node).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DaemonConfig {
    /// `namespace/name` of the GonkaNode this daemon belongs to.
    pub gonka_node: String,
    /// Network node ML callback base URL (upstream `DAPI_API__POC_CALLBACK_URL`).
    pub ml_callback_url: String,
    /// PEM certificates trusted, besides the system's, for an `https` callback URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Port of the ML-node management and PoC API (upstream 8080).
    pub poc_port: u16,
    /// Port of the inference API (upstream 5000).
    pub inference_port: u16,
    /// Port of `/metrics` and the kubelet's probes, apart from the ML-node API so that a
    /// scraper or the kubelet needs no access to it; `None`: the daemon's default (9090).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// GPUs this ML node owns; `None` = every GPU visible to the container.
    pub gpus: Option<u32>,
    /// Models to serve, with engine arguments.
    pub models: Vec<ModelConfig>,
    /// Where model weights are mounted (the GonkaNode's `modelStorage`); `None`: no models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<String>,
    /// The model to load at start (`modelStorage.preload`), with its `models` args.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_model: Option<String>,
    /// Proof-of-compute settings.
    pub poc: PocConfig,
    /// Where to stream reports to the operator; `None` = don't report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportConfig>,
    /// Opportunistic mode (the GonkaNode's `spec.opportunistic`): yield the GPUs to other work
    /// and rejoin when they are idle; `None`: the GPUs are the ML node's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opportunistic: Option<OpportunisticConfig>,
}

/// When an opportunistic ML node yields its GPUs and when it takes them again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpportunisticConfig {
    /// Seconds the GPUs must be idle before a yielded ML node rejoins.
    pub rejoin_after_idle_seconds: u32,
    /// Utilisation, in percent, above which a GPU counts as busy with other work while this
    /// ML node runs nothing on it.
    pub busy_utilization_percent: u32,
}

/// The operator's report endpoint (gRPC, `gonka.report.v1.FleetReports`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportConfig {
    /// e.g. `https://gonka-operator.gonka-system.svc:8082`.
    pub url: String,
    /// The bearer token to send (a projected ServiceAccount token, re-read at every connect);
    /// `None` = send none (an operator running with `--report-auth none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// The CA (PEM) to trust for an `https://` url: the operator's own report CA. Required for
    /// https (the report server's certificate is not from a public CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    pub id: String,
    pub args: Vec<String>,
    /// Which engine serves it; absent (`auto`) keeps `daemon.json` as it was before engines
    /// could be chosen, so existing fleets see no rollout.
    #[serde(default, skip_serializing_if = "ModelEngine::is_auto")]
    pub engine: ModelEngine,
}

/// The engine that serves a model (GonkaNode `spec.models[].engine`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelEngine {
    /// The native engine when it runs the checkpoint's architecture (and dtype), else vLLM.
    #[default]
    Auto,
    /// The daemon's own libtorch engine.
    Native,
    /// vLLM servers the daemon runs and fronts, as upstream's ML node runs them.
    Vllm,
}

impl ModelEngine {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Vllm => "vllm",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PocConfig {
    pub batch_size: u32,
    pub send_interval_seconds: u32,
    pub max_pending_batches: u32,
}

impl DaemonConfig {
    /// Stable JSON (struct field order), so equal configs render to equal bytes and hashes.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("DaemonConfig always serializes")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DaemonConfig {
        DaemonConfig {
            gonka_node: "gpu/h100".into(),
            ml_callback_url: "http://api:9100".into(),
            ca_bundle: None,
            poc_port: 8080,
            inference_port: 5000,
            metrics_port: Some(9090),
            gpus: Some(8),
            models: vec![ModelConfig {
                id: "Qwen/QwQ-32B".into(),
                args: vec!["--tensor-parallel-size".into(), "4".into()],
                engine: ModelEngine::Vllm,
            }],
            models_dir: Some("/models".into()),
            preload_model: Some("Qwen/QwQ-32B".into()),
            poc: PocConfig { batch_size: 32, send_interval_seconds: 5, max_pending_batches: 100 },
            report: Some(ReportConfig {
                url: "https://gonka-operator.gonka-system.svc:8082".into(),
                token_file: Some("/var/run/secrets/gonka.ai/report/token".into()),
                ca_bundle: Some("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n".into()),
            }),
            opportunistic: Some(OpportunisticConfig { rejoin_after_idle_seconds: 600, busy_utilization_percent: 10 }),
        }
    }

    #[test]
    fn round_trips() {
        let c = sample();
        assert_eq!(DaemonConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn the_engine_is_written_only_when_chosen() {
        let mut c = sample();
        assert!(c.to_json().contains(r#""engine": "vllm""#), "{}", c.to_json());
        c.models[0].engine = ModelEngine::Auto;
        assert!(!c.to_json().contains("engine"), "auto leaves daemon.json as it was: {}", c.to_json());
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        v["models"][0]["engine"] = serde_json::json!("tensorrt");
        assert!(DaemonConfig::from_json(&v.to_string()).unwrap_err().to_string().contains("unknown variant"));
    }

    #[test]
    fn rejects_unknown_fields() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["surprise"] = serde_json::json!(1);
        let err = DaemonConfig::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("unknown field `surprise`"), "{err}");
    }
}
