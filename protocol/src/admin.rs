//! The network node's admin API (upstream dapi `:9200`, `internal/server/admin`), in its JSON
//! shapes: the ML-node registration (`InferenceNodeConfig`) and the node list
//! (`broker.NodeResponse`). The operator speaks it as a client, the devnet serves it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Engine arguments of one model (`apiconfig.ModelConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ModelArgs {
    #[serde(default)]
    pub args: Vec<String>,
}

/// A number of GPUs of one kind, `type` in upstream's `"<NVML name> | <N>GB"` form.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hardware {
    #[serde(rename = "type")]
    pub type_: String,
    pub count: u32,
}

/// `POST /admin/v1/nodes` (upsert) body, `apiconfig.InferenceNodeConfig`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InferenceNodeConfig {
    pub host: String,
    #[serde(default)]
    pub inference_segment: String,
    pub inference_port: u16,
    #[serde(default)]
    pub poc_segment: String,
    pub poc_port: u16,
    /// By Hugging Face model id; each must be approved by governance.
    pub models: BTreeMap<String, ModelArgs>,
    pub id: String,
    #[serde(default)]
    pub max_concurrent: u32,
    #[serde(default)]
    pub hardware: Vec<Hardware>,
}

/// A registered node as the broker holds it: the config plus its broker number.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Node {
    #[serde(flatten)]
    pub config: InferenceNodeConfig,
    /// The broker's number for this node: the PoC `node_id` it is sent.
    pub node_num: u64,
}

/// Whether the operator of the network node lets the node work (`broker.AdminState`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AdminState {
    pub enabled: bool,
    /// The epoch the last enable/disable applies from.
    pub epoch: u64,
}

/// The broker's view of a node (`broker.NodeState`); status fields are kept as upstream sends
/// them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NodeState {
    #[serde(default)]
    pub intended_status: serde_json::Value,
    #[serde(default)]
    pub current_status: serde_json::Value,
    #[serde(default)]
    pub poc_intended_status: serde_json::Value,
    #[serde(default)]
    pub poc_current_status: serde_json::Value,
    #[serde(default)]
    pub lock_count: i64,
    #[serde(default)]
    pub failure_reason: String,
    #[serde(default)]
    pub status_timestamp: String,
    #[serde(default)]
    pub admin_state: AdminState,
    #[serde(default)]
    pub ml_node_version: String,
}

/// One entry of `GET /admin/v1/nodes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeResponse {
    pub node: Node,
    pub state: NodeState,
}

/// `POST /admin/v1/nodes/:id/enable|disable` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeToggleResponse {
    pub message: String,
    pub node_id: String,
}

/// An error answer (echo's `{"message": ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AdminError {
    pub message: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_config_reads_and_writes_upstreams_json() {
        let upstream = json!({
            "host": "10.244.1.7", "inference_segment": "", "inference_port": 5000,
            "poc_segment": "", "poc_port": 8080,
            "models": {"Qwen/QwQ-32B": {"args": ["--tensor-parallel-size", "4"]}},
            "id": "gpu-h100-gpu-a", "max_concurrent": 500,
            "hardware": [{"type": "NVIDIA H100 80GB HBM3 | 79GB", "count": 8}]
        });
        let config: InferenceNodeConfig = serde_json::from_value(upstream.clone()).unwrap();
        assert_eq!(config.hardware[0].count, 8);
        assert_eq!(serde_json::to_value(&config).unwrap(), upstream);
        let node = Node { config, node_num: 3 };
        assert_eq!(serde_json::to_value(&node).unwrap()["node_num"], 3);
    }
}
