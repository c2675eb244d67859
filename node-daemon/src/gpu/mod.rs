//! GPU probe through NVML (nvml-wrapper): inventory, health, driver, XID events.
//!
//! Loading NVML never fails the daemon: without the library (no driver, a CPU node) the probe
//! reports "no GPUs" and says why. Every query here blocks (NVML is synchronous); async callers
//! wrap them in `spawn_blocking`.

pub mod xid;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gonka_protocol::ml_node::{DriverInfo, GpuDevice, hardware_type};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

pub use xid::{XidClass, classify};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available: {0}")]
    Unavailable(String),
    #[error("NVML query failed: {0}")]
    Query(#[from] NvmlError),
}

/// One XID event as seen on a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidRecord {
    pub code: u64,
    pub class: XidClass,
    pub title: &'static str,
}

/// Everything the probe knows about one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub total_memory_mb: Option<u64>,
    pub free_memory_mb: Option<u64>,
    pub used_memory_mb: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
    pub mig_enabled: Option<bool>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// Why the GPU could not be queried (e.g. fallen off the bus).
    pub error: Option<String>,
    /// XIDs seen since the daemon started.
    pub xids: Vec<XidRecord>,
}

impl GpuStatus {
    /// The worst XID class seen on this GPU.
    pub fn worst_xid(&self) -> Option<XidClass> {
        self.xids.iter().map(|x| x.class).max()
    }

    /// Fit for proof and inference: queryable, and no XID that calls for a reset or worse.
    pub fn is_available(&self) -> bool {
        self.error.is_none() && self.worst_xid().is_none_or(|c| c == XidClass::Transient)
    }

    /// Upstream's `/gpu/devices` entry.
    pub fn to_device(&self) -> GpuDevice {
        let error_message = self.error.clone().or_else(|| {
            let worst = self.xids.iter().filter(|x| x.class != XidClass::Transient).max_by_key(|x| x.class)?;
            Some(format!("XID {} ({}): {}", worst.code, worst.title, worst.class))
        });
        GpuDevice {
            index: self.index,
            name: self.name.clone(),
            total_memory_mb: self.total_memory_mb,
            free_memory_mb: self.free_memory_mb,
            used_memory_mb: self.used_memory_mb,
            utilization_percent: self.utilization_percent,
            temperature_c: self.temperature_c,
            is_available: self.is_available(),
            error_message,
        }
    }
}

/// Who is using one GPU now: what opportunistic mode watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuActivity {
    pub index: u32,
    /// Host PIDs of the compute processes on it (NVML's view); `None` when the driver cannot
    /// list them (an old driver), so only utilisation tells.
    pub processes: Option<Vec<u32>>,
    pub utilization_percent: Option<u32>,
}

/// Available GPUs grouped in upstream's hardware form, `("<name> | <N>GB", count)`, sorted.
pub fn hardware(gpus: &[GpuStatus]) -> Vec<(String, u32)> {
    let mut groups: BTreeMap<String, u32> = BTreeMap::new();
    for g in gpus.iter().filter(|g| g.is_available()) {
        if let Some(total) = g.total_memory_mb {
            *groups.entry(hardware_type(&g.name, total)).or_default() += 1;
        }
    }
    groups.into_iter().collect()
}

/// XID records kept per GPU (the metrics count them all).
pub const MAX_XID_HISTORY: usize = 64;

/// The probe. Cheap to clone; clones share NVML and the XID history.
#[derive(Clone)]
pub struct GpuProbe {
    nvml: Result<Arc<Nvml>, String>,
    xids: Arc<Mutex<BTreeMap<u32, Vec<XidRecord>>>>,
}

impl GpuProbe {
    /// Loads NVML from `library` (default: the system's `libnvidia-ml.so.1`).
    pub fn open(library: Option<&Path>) -> Self {
        let loaded = match library {
            Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
            None => Nvml::init(),
        };
        let nvml = loaded.map(Arc::new).map_err(|e| match e {
            NvmlError::LibloadingError(e) => {
                format!("the NVML library could not be loaded ({e}); no GPU driver on this node?")
            }
            other => format!("NVML did not initialise: {other}"),
        });
        if let Err(why) = &nvml {
            tracing::warn!(%why, "no GPUs: NVML unavailable");
        }
        Self { nvml, xids: Arc::default() }
    }

    /// NVML loaded and initialised.
    pub fn available(&self) -> bool {
        self.nvml.is_ok()
    }

    /// Why NVML is not available, if it is not.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.nvml.as_ref().err().map(String::as_str)
    }

    fn nvml(&self) -> Result<&Nvml, GpuError> {
        self.nvml.as_deref().map_err(|e| GpuError::Unavailable(e.clone()))
    }

    /// Queries every GPU. A GPU that fails a query is still listed, with the error.
    pub fn snapshot(&self) -> Vec<GpuStatus> {
        let Ok(nvml) = self.nvml() else { return Vec::new() };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "counting GPUs failed");
                return Vec::new();
            }
        };
        let xids = self.xids.lock().expect("xid history").clone();
        (0..count).map(|i| query(nvml, i, xids.get(&i).cloned().unwrap_or_default())).collect()
    }

    /// Compute processes and utilisation of every GPU (blocking). A GPU that fails the
    /// queries is listed with what it answered.
    pub fn activity(&self) -> Vec<GpuActivity> {
        let Ok(nvml) = self.nvml() else { return Vec::new() };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .map(|index| match nvml.device_by_index(index) {
                Ok(device) => GpuActivity {
                    index,
                    processes: device.running_compute_processes().ok().map(|ps| ps.iter().map(|p| p.pid).collect()),
                    utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                },
                Err(_) => GpuActivity { index, ..GpuActivity::default() },
            })
            .collect()
    }

    /// Driver, CUDA driver and NVML versions (upstream `/gpu/driver`).
    pub fn driver(&self) -> Result<DriverInfo, GpuError> {
        let nvml = self.nvml()?;
        let cuda = nvml.sys_cuda_driver_version()?;
        Ok(DriverInfo {
            driver_version: nvml.sys_driver_version()?,
            cuda_driver_version: format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(cuda),
                nvml_wrapper::cuda_driver_version_minor(cuda)
            ),
            nvml_version: nvml.sys_nvml_version()?,
        })
    }

    /// Records an XID on GPU `index`; returns its class. The history of a GPU keeps at most
    /// [`MAX_XID_HISTORY`] records: beyond that the oldest of the least severe goes, so a GPU
    /// that needs a reset stays out however many transient XIDs follow.
    pub fn record_xid(&self, index: u32, code: u64) -> XidClass {
        let (class, title) = classify(code);
        tracing::warn!(gpu = index, xid = code, %class, title, "XID event");
        let mut xids = self.xids.lock().expect("xid history");
        let history = xids.entry(index).or_default();
        history.push(XidRecord { code, class, title });
        if history.len() > MAX_XID_HISTORY {
            let least = history.iter().map(|x| x.class).min().expect("not empty");
            let oldest = history.iter().position(|x| x.class == least).expect("present");
            history.remove(oldest);
        }
        class
    }

    /// Watches for XID events on a thread of its own until `stop` is set; each event is
    /// recorded and passed to `on_xid`. Returns `None` when NVML is unavailable.
    pub fn watch_xids(
        &self,
        stop: Arc<AtomicBool>,
        on_xid: impl Fn(u32, u64, XidClass) + Send + 'static,
    ) -> Option<std::thread::JoinHandle<()>> {
        let nvml = self.nvml.as_ref().ok()?.clone();
        let probe = self.clone();
        Some(std::thread::spawn(move || {
            if let Err(e) = watch_loop(&nvml, &probe, &stop, &on_xid) {
                tracing::warn!(error = %e, "XID events unavailable; GPU health comes from queries only");
            }
        }))
    }
}

fn watch_loop(
    nvml: &Nvml,
    probe: &GpuProbe,
    stop: &AtomicBool,
    on_xid: &dyn Fn(u32, u64, XidClass),
) -> Result<(), NvmlError> {
    let mut set = nvml.create_event_set()?;
    for i in 0..nvml.device_count()? {
        let device = nvml.device_by_index(i)?;
        set = device.register_events(EventTypes::CRITICAL_XID_ERROR, set).map_err(|e| e.error)?;
    }
    while !stop.load(Ordering::Relaxed) {
        match set.wait(200) {
            Ok(event) => {
                let code = match event.event_data {
                    Some(XidError::Value(code)) => code,
                    // The driver could not name it: treat as an unknown XID (needs-reset).
                    Some(XidError::Unknown) => u64::MAX,
                    None => continue,
                };
                let index = event.device.index().unwrap_or(u32::MAX);
                let class = probe.record_xid(index, code);
                on_xid(index, code, class);
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waiting for XID events");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

fn query(nvml: &Nvml, index: u32, xids: Vec<XidRecord>) -> GpuStatus {
    let lost = |error: String| GpuStatus {
        index,
        name: "Unknown".into(),
        uuid: None,
        total_memory_mb: None,
        free_memory_mb: None,
        used_memory_mb: None,
        utilization_percent: None,
        temperature_c: None,
        power_watts: None,
        mig_enabled: None,
        ecc_corrected: None,
        ecc_uncorrected: None,
        error: Some(error),
        xids: xids.clone(),
    };
    let device = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => return lost(e.to_string()),
    };
    let name = match device.name() {
        Ok(n) => n,
        Err(e) => return lost(e.to_string()),
    };
    const MIB: u64 = 1024 * 1024;
    let memory = device.memory_info();
    let ecc = |kind| device.total_ecc_errors(kind, EccCounter::Aggregate).ok();
    GpuStatus {
        index,
        name,
        uuid: device.uuid().ok(),
        total_memory_mb: memory.as_ref().ok().map(|m| m.total / MIB),
        free_memory_mb: memory.as_ref().ok().map(|m| m.free / MIB),
        used_memory_mb: memory.as_ref().ok().map(|m| m.used / MIB),
        utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
        temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        mig_enabled: device.mig_mode().ok().map(|m| m.current == 1),
        ecc_corrected: ecc(MemoryError::Corrected),
        ecc_uncorrected: ecc(MemoryError::Uncorrected),
        error: memory.err().map(|e| format!("memory query failed: {e}")),
        xids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, total: u64) -> GpuStatus {
        GpuStatus {
            index: 0,
            name: name.into(),
            uuid: None,
            total_memory_mb: Some(total),
            free_memory_mb: Some(total),
            used_memory_mb: Some(0),
            utilization_percent: Some(0),
            temperature_c: Some(30),
            power_watts: None,
            mig_enabled: None,
            ecc_corrected: None,
            ecc_uncorrected: None,
            error: None,
            xids: Vec::new(),
        }
    }

    #[test]
    fn hardware_groups_available_gpus_by_model() {
        let mut lost = gpu("NVIDIA H100 80GB HBM3", 81559);
        lost.error = Some("GPU is lost".into());
        let mut reset = gpu("NVIDIA H100 80GB HBM3", 81559);
        reset.xids.push(XidRecord { code: 48, class: XidClass::NeedsReset, title: "double-bit ECC error" });
        let mut noisy = gpu("NVIDIA H100 80GB HBM3", 81559);
        noisy.xids.push(XidRecord { code: 13, class: XidClass::Transient, title: "graphics engine exception" });
        let gpus = vec![gpu("NVIDIA H100 80GB HBM3", 81559), noisy, lost, reset, gpu("NVIDIA A100-SXM4-40GB", 40960)];
        assert_eq!(
            hardware(&gpus),
            [("NVIDIA A100-SXM4-40GB | 40GB".to_string(), 1), ("NVIDIA H100 80GB HBM3 | 79GB".to_string(), 2)]
        );
    }

    #[test]
    fn a_needs_reset_xid_makes_the_gpu_unavailable_and_says_why() {
        let mut g = gpu("NVIDIA H100 80GB HBM3", 81559);
        g.xids.push(XidRecord { code: 13, class: XidClass::Transient, title: "graphics engine exception" });
        assert!(g.to_device().is_available);
        g.xids.push(XidRecord { code: 79, class: XidClass::Fatal, title: "GPU has fallen off the bus" });
        let d = g.to_device();
        assert!(!d.is_available);
        assert_eq!(d.error_message.as_deref(), Some("XID 79 (GPU has fallen off the bus): fatal"));
    }

    #[test]
    fn a_missing_library_means_no_gpus_with_a_reason() {
        let probe = GpuProbe::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
        assert!(!probe.available());
        assert!(probe.unavailable_reason().unwrap().contains("could not be loaded"));
        assert!(probe.snapshot().is_empty());
        assert!(matches!(probe.driver(), Err(GpuError::Unavailable(_))));
    }

    #[test]
    fn the_xid_history_is_bounded_and_keeps_the_worst() {
        let probe = GpuProbe::open(Some(std::path::Path::new("/nonexistent/libnvidia-ml.so.1")));
        probe.record_xid(2, 48); // needs a reset
        for _ in 0..1000 {
            probe.record_xid(2, 13); // transient
        }
        let xids = probe.xids.lock().unwrap();
        let history = &xids[&2];
        assert_eq!(history.len(), MAX_XID_HISTORY);
        assert_eq!(history.iter().map(|x| x.class).max(), Some(XidClass::NeedsReset));
    }
}
