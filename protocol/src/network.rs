//! The network node's public API pieces the operator reads (upstream dapi `:9000`, behind the
//! `:8000` proxy): the epoch and its phase, to hold rollouts out of PoC windows.

use serde::{Deserialize, Serialize};

/// Upstream's `EpochPhase` (`inference-chain/x/inference/types/epoch_params.go`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochPhase {
    #[serde(rename = "PoCGenerate")]
    PocGenerate,
    #[serde(rename = "PoCGenerateWindDown")]
    PocGenerateWindDown,
    #[serde(rename = "PoCValidate")]
    PocValidate,
    #[serde(rename = "PoCValidateWindDown")]
    PocValidateWindDown,
    Inference,
}

impl EpochPhase {
    /// ML nodes prove or validate now: restarting one costs its weight.
    pub fn is_poc(self) -> bool {
        self != Self::Inference
    }
}

/// `latest_epoch` of the epoch answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LatestEpoch {
    pub index: u64,
    pub poc_start_block_height: i64,
}

/// `GET /v1/epochs/latest` (upstream `EpochResponse`); the stage tables it also carries are
/// kept as JSON.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EpochResponse {
    pub block_height: i64,
    pub latest_epoch: LatestEpoch,
    pub phase: EpochPhase,
    #[serde(default)]
    pub epoch_stages: serde_json::Value,
    #[serde(default)]
    pub next_epoch_stages: serde_json::Value,
    #[serde(default)]
    pub epoch_params: serde_json::Value,
    /// A confirmation PoC (random PoC during inference) is running.
    #[serde(default)]
    pub is_confirmation_poc_active: bool,
}

impl EpochResponse {
    /// A PoC window or a confirmation PoC is on: hold restarts.
    pub fn poc_window(&self) -> bool {
        self.phase.is_poc() || self.is_confirmation_poc_active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_upstreams_epoch_answer() {
        let upstream = json!({
            "block_height": 17400, "latest_epoch": {"index": 12, "poc_start_block_height": 17280},
            "phase": "PoCGenerate", "epoch_stages": {"poc_start": 17280}, "next_epoch_stages": {},
            "epoch_params": {"epoch_length": 17280}, "is_confirmation_poc_active": false
        });
        let e: EpochResponse = serde_json::from_value(upstream).unwrap();
        assert_eq!((e.phase, e.latest_epoch.index, e.poc_window()), (EpochPhase::PocGenerate, 12, true));
        let inference: EpochResponse = serde_json::from_value(json!({
            "block_height": 1, "latest_epoch": {"index": 1, "poc_start_block_height": 0}, "phase": "Inference"
        }))
        .unwrap();
        assert!(!inference.poc_window());
        assert!(EpochResponse { is_confirmation_poc_active: true, ..inference }.poc_window());
    }
}
