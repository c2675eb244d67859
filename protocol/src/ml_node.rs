//! The ML-node management API as the network node (upstream "dapi") calls it, in upstream's
//! JSON shapes (`mlnode/packages/api`: `routes.py`, `gpu/types.py`, `health.py`). Field names,
//! status strings and `null`s are part of the contract: upstream's pydantic models serialize
//! `None` as `null`, so optional fields here do too.

use serde::{Deserialize, Serialize};

/// Which manager runs (upstream `ServiceState`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServiceState {
    Pow,
    Inference,
    Train,
    Stopped,
}

impl ServiceState {
    /// Upstream's name of the state, as it appears on the wire (`"POW"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pow => "POW",
            Self::Inference => "INFERENCE",
            Self::Train => "TRAIN",
            Self::Stopped => "STOPPED",
        }
    }
}

/// `GET /api/v1/state`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StateResponse {
    pub state: ServiceState,
    /// The ML node's package version.
    pub version: String,
    /// `IDLE`, `GENERATING`, `VALIDATING`, `MIXED`, `NO_BACKENDS`; only in INFERENCE.
    pub poc_status: Option<String>,
    pub inference_healthy: Option<bool>,
    pub loaded_model: Option<String>,
    /// Whether PoC validation can run while inference is served (newest mlnode; older network
    /// nodes ignore it, older ML nodes omit it).
    #[serde(default)]
    pub poc_validation_inference: bool,
}

/// `GET /api/v1/versions` and `/api/v1/inference/pow/versions` (newest mlnode's
/// `VersionsResponse`): what the network node checks before using newer PoC features.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VersionsResponse {
    pub version: String,
    /// The inference engine's version; `null` with no engine running.
    pub vllm_version: Option<String>,
    pub poc_validation_inference: bool,
}

/// `{"status": "OK"}`, the answer of `POST /api/v1/stop` and friends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StatusResponse {
    pub status: String,
}

impl StatusResponse {
    pub fn ok() -> Self {
        Self { status: "OK".into() }
    }
}

/// The answer of `POST /api/v1/inference/up`: `{"status": "OK"}`, or, when the engine cannot
/// start, still a 200 with `{"status": "ERROR", "message": ...}` (upstream's
/// `api/inference/routes.py`; the network node reads neither).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InferenceUpResponse {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /api/v1/inference/up` (upstream `InferenceInitRequest`): the model to serve, its dtype
/// and the engine's extra arguments.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InferenceUpRequest {
    pub model: String,
    pub dtype: String,
    #[serde(default)]
    pub additional_args: Vec<String>,
}

/// One GPU in `GET /api/v1/gpu/devices` (upstream `GPUDevice`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GpuDevice {
    pub index: u32,
    /// NVML name, e.g. `NVIDIA H100 80GB HBM3`; `Unknown` when the GPU can't be queried.
    pub name: String,
    pub total_memory_mb: Option<u64>,
    pub free_memory_mb: Option<u64>,
    pub used_memory_mb: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub is_available: bool,
    pub error_message: Option<String>,
}

/// `GET /api/v1/gpu/devices`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GpuDevicesResponse {
    pub devices: Vec<GpuDevice>,
    pub count: usize,
}

/// `GET /api/v1/gpu/driver` (upstream `DriverInfo`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// e.g. `535.104.05`.
    pub driver_version: String,
    /// Highest CUDA version the driver supports, `major.minor`, e.g. `12.2`.
    pub cuda_driver_version: String,
    pub nvml_version: String,
}

/// `gpu` in the health answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub available: bool,
    pub count: usize,
    pub devices: Vec<GpuDevice>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagerStatus {
    pub running: bool,
    pub healthy: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagersInfo {
    pub pow: ManagerStatus,
    pub inference: ManagerStatus,
    pub train: ManagerStatus,
}

/// `GET /health` and `GET /livez`: 200 when `status` is `healthy`, else 503.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HealthResponse {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub service_state: ServiceState,
    pub gpu: GpuInfo,
    pub managers: ManagersInfo,
}

/// `GET /readyz`: upstream's `{ready}`, and why not.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReadinessResponse {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An error answer, FastAPI's shape: `{"detail": "..."}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub detail: String,
}

/// Upstream's hardware string for a GPU model: `"<NVML name> | <total_memory_mb / 1024>GB"`
/// (integer division, as dapi's auto-detection does), e.g. `NVIDIA H100 80GB HBM3 | 79GB`.
pub fn hardware_type(name: &str, total_memory_mb: u64) -> String {
    format!("{name} | {}GB", total_memory_mb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_wire_names() {
        for state in [ServiceState::Pow, ServiceState::Inference, ServiceState::Train, ServiceState::Stopped] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }
    use serde_json::json;

    #[test]
    fn state_serializes_like_upstream_with_nulls() {
        let s = StateResponse {
            state: ServiceState::Stopped,
            version: "0.1.0".into(),
            poc_status: None,
            inference_healthy: None,
            loaded_model: None,
            poc_validation_inference: false,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"state": "STOPPED", "version": "0.1.0", "poc_status": null, "inference_healthy": null,
                   "loaded_model": null, "poc_validation_inference": false})
        );
    }

    #[test]
    fn gpu_device_of_a_lost_gpu() {
        let d = GpuDevice {
            index: 3,
            name: "Unknown".into(),
            total_memory_mb: None,
            free_memory_mb: None,
            used_memory_mb: None,
            utilization_percent: None,
            temperature_c: None,
            is_available: false,
            error_message: Some("GPU is lost".into()),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["total_memory_mb"], json!(null));
        assert_eq!(v["is_available"], json!(false));
    }

    #[test]
    fn hardware_string_matches_dapi_auto_detection() {
        // An H100 80GB reports 81559 MiB: 81559 / 1024 = 79.
        assert_eq!(hardware_type("NVIDIA H100 80GB HBM3", 81559), "NVIDIA H100 80GB HBM3 | 79GB");
        assert_eq!(hardware_type("NVIDIA A100-SXM4-40GB", 40960), "NVIDIA A100-SXM4-40GB | 40GB");
    }
}
