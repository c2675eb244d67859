//! The network node's admin API (upstream dapi `:9200`, `internal/server/admin`), in its JSON
//! shapes: the ML-node registration (`InferenceNodeConfig`), the node list
//! (`broker.NodeResponse`) and error bodies. The operator speaks it as a client, the devnet
//! serves it.
//!
//! Read as Go's `encoding/json` writes it: a nil slice or map is `null` (a node registered
//! without `hardware` lists `"hardware": null`, in 2025 also `"models": null` and
//! `"args": null`), unknown fields are ignored, errors are `{"error": ...}`
//! (`middleware.TransparentErrorHandler`). Two generations answer differently (see
//! [`Generation`]); `tests/fixtures/` holds their recorded answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Go writes a nil slice or map as `null`: read it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Engine arguments of one model (`apiconfig.ModelConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ModelArgs {
    #[serde(default, deserialize_with = "null_as_default")]
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
    #[serde(default, deserialize_with = "null_as_default")]
    pub models: BTreeMap<String, ModelArgs>,
    pub id: String,
    #[serde(default)]
    pub max_concurrent: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub hardware: Vec<Hardware>,
}

/// A registered node as the broker holds it: the config plus its broker number.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Node {
    #[serde(flatten)]
    pub config: InferenceNodeConfig,
    /// The broker's number for this node: the PoC `node_id` it is sent.
    pub node_num: u64,
    /// The ML node's version (2025 network nodes list it, always; 2026 ones have no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
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
    /// The ML-node version the node runs (2026 network nodes list it, always; 2025 ones have
    /// no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ml_node_version: Option<String>,
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

/// An error answer: `{"error": ...}` (upstream's `TransparentErrorHandler`; the value is a
/// string, or an object for a batch that failed whole).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AdminError {
    pub error: serde_json::Value,
}

impl AdminError {
    pub fn new(error: impl Into<serde_json::Value>) -> Self {
        Self { error: error.into() }
    }
}

/// The network node's words in an error answer: `error` (upstream), else echo's default
/// `message` (a handler that bypasses upstream's error handler), else the body itself.
pub fn error_message(body: &str) -> String {
    let words = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| ["error", "message"].iter().find_map(|k| v.get(*k).cloned()));
    match words {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => body.trim().to_string(),
    }
}

/// Which generation of network node answers. They differ in what a `POST /admin/v1/nodes` of a
/// known id does:
/// - [`Generation::Launch2025`] (gonka-ai/gonka `312044d`, `broker/node_admin_commands.go`
///   `RegisterNode`): registers the node again: a new broker number, its state reset (enabled),
///   a second entry in the network node's config file. There is no `PUT /admin/v1/nodes/:id`.
/// - [`Generation::Mainline2026`] (`UpdateNode`, also behind `PUT /admin/v1/nodes/:id`): an
///   upsert that keeps the broker number and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    Launch2025,
    Mainline2026,
}

impl Generation {
    /// Tells the generation from a node list: 2025 lists each node's `version`, 2026 each
    /// state's `ml_node_version`. `None` for an empty list (nothing registered, so nothing to
    /// update: a plain `POST` is safe on both).
    pub fn of(nodes: &[NodeResponse]) -> Option<Self> {
        nodes.iter().find_map(|n| {
            if n.state.ml_node_version.is_some() {
                Some(Self::Mainline2026)
            } else if n.node.version.is_some() {
                Some(Self::Launch2025)
            } else {
                None
            }
        })
    }
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
        let node = Node { config, node_num: 3, version: None };
        assert_eq!(serde_json::to_value(&node).unwrap()["node_num"], 3);
    }
}
