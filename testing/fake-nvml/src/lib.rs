//! A fake `libnvidia-ml.so.1` for tests, and the scenarios that describe its GPUs.
//!
//! The library (built from `fake_nvml.c` by this crate's build script) is loaded by the real
//! nvml-wrapper code path; it reads its GPUs from the file in `FAKE_NVML_CONFIG` and re-reads
//! it when it changes, so a test can make a GPU fall off the bus or raise an XID mid-run.

use std::fmt::Write as _;
use std::path::Path;

/// Path of the built fake library.
pub const LIBRARY: &str = env!("FAKE_NVML_LIBRARY");

/// The environment variable naming the scenario file.
pub const CONFIG_ENV: &str = "FAKE_NVML_CONFIG";

/// One simulated GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeGpu {
    pub name: String,
    pub uuid: String,
    pub total_mb: u64,
    pub used_mb: u64,
    pub utilization: u32,
    pub temperature_c: u32,
    pub power_mw: u32,
    pub mig: bool,
    pub ecc_corrected: u64,
    pub ecc_uncorrected: u64,
    pub state: GpuState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuState {
    Ok,
    /// Fallen off the bus: every query answers `NVML_ERROR_GPU_IS_LOST`.
    Lost,
    /// ECC queries answer `NVML_ERROR_NOT_SUPPORTED` (consumer GPUs).
    NoEcc,
}

impl FakeGpu {
    pub fn h100(i: u32) -> Self {
        Self {
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-h100-{i:04}"),
            total_mb: 81559,
            used_mb: 1024,
            utilization: 37,
            temperature_c: 41,
            power_mw: 350_000,
            mig: false,
            ecc_corrected: 0,
            ecc_uncorrected: 0,
            state: GpuState::Ok,
        }
    }

    pub fn a100_40(i: u32) -> Self {
        Self {
            name: "NVIDIA A100-SXM4-40GB".into(),
            uuid: format!("GPU-a100-{i:04}"),
            total_mb: 40960,
            used_mb: 512,
            utilization: 5,
            temperature_c: 33,
            power_mw: 90_000,
            ..Self::h100(i)
        }
    }

    pub fn a100_80(i: u32) -> Self {
        Self { name: "NVIDIA A100-SXM4-80GB".into(), total_mb: 81920, ..Self::a100_40(i) }
    }

    pub fn rtx4090(i: u32) -> Self {
        Self {
            name: "NVIDIA GeForce RTX 4090".into(),
            uuid: format!("GPU-4090-{i:04}"),
            total_mb: 24564,
            used_mb: 300,
            utilization: 0,
            temperature_c: 30,
            power_mw: 25_000,
            state: GpuState::NoEcc,
            ..Self::h100(i)
        }
    }
}

/// A machine's GPUs, driver and pending XID events.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub driver: String,
    /// CUDA driver version as NVML encodes it: 1000 * major + 10 * minor.
    pub cuda: u32,
    pub nvml: String,
    pub gpus: Vec<FakeGpu>,
    /// `(gpu index, XID code)`, delivered once each, in order.
    pub xids: Vec<(u32, u64)>,
    /// Make `nvmlInit` fail with this NVML return code (e.g. 9, driver not loaded).
    pub fail_init: Option<u32>,
    /// Compute processes on the GPUs (`nvmlDeviceGetComputeRunningProcesses_v3`).
    pub processes: Vec<FakeProcess>,
}

/// A compute process on a GPU, as NVML lists it: the host's PID and the memory it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeProcess {
    pub gpu: u32,
    pub pid: u32,
    pub used_mb: u64,
}

impl Scenario {
    fn with(gpus: Vec<FakeGpu>) -> Self {
        Self {
            driver: "550.54.15".into(),
            cuda: 12040,
            nvml: "12.550.54.15".into(),
            gpus,
            xids: Vec::new(),
            fail_init: None,
            processes: Vec::new(),
        }
    }

    /// An 8x H100 HGX box.
    pub fn hgx_h100() -> Self {
        Self::with((0..8).map(FakeGpu::h100).collect())
    }

    /// A mixed box: two A100 40GB and two RTX 4090.
    pub fn mixed() -> Self {
        Self::with(vec![FakeGpu::a100_40(0), FakeGpu::a100_40(1), FakeGpu::rtx4090(2), FakeGpu::rtx4090(3)])
    }

    /// Four H100s, one of them counting ECC errors.
    pub fn ecc_errors() -> Self {
        let mut s = Self::with((0..4).map(FakeGpu::h100).collect());
        s.gpus[2].ecc_corrected = 1200;
        s.gpus[2].ecc_uncorrected = 3;
        s
    }

    /// No driver: `nvmlInit` answers "driver not loaded".
    pub fn no_driver() -> Self {
        let mut s = Self::with(Vec::new());
        s.fail_init = Some(9);
        s
    }

    /// The file the fake library reads.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "driver {}\ncuda {}\nnvml {}", self.driver, self.cuda, self.nvml);
        if let Some(code) = self.fail_init {
            let _ = writeln!(out, "fail_init {code}");
        }
        for g in &self.gpus {
            let state = match g.state {
                GpuState::Ok => "ok",
                GpuState::Lost => "lost",
                GpuState::NoEcc => "noecc",
            };
            let _ = writeln!(
                out,
                "gpu {} {} {} {} {} {} {} {} {state} {} {}",
                g.total_mb,
                g.used_mb,
                g.utilization,
                g.temperature_c,
                g.power_mw,
                u8::from(g.mig),
                g.ecc_corrected,
                g.ecc_uncorrected,
                g.uuid,
                g.name
            );
        }
        for (gpu, code) in &self.xids {
            let _ = writeln!(out, "xid {gpu} {code}");
        }
        for p in &self.processes {
            let _ = writeln!(out, "process {} {} {}", p.gpu, p.pid, p.used_mb);
        }
        out
    }

    /// Writes the scenario atomically (rename), so the library never reads half a file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_built() {
        assert!(Path::new(LIBRARY).is_file(), "{LIBRARY} missing");
    }

    #[test]
    fn renders_one_line_per_gpu_with_the_name_last() {
        let text = Scenario::mixed().render();
        assert!(text.contains("gpu 40960 512 5 33 90000 0 0 0 ok GPU-a100-0000 NVIDIA A100-SXM4-40GB\n"), "{text}");
        assert!(text.contains("noecc GPU-4090-0002 NVIDIA GeForce RTX 4090\n"), "{text}");
        let mut busy = Scenario::mixed();
        busy.processes.push(FakeProcess { gpu: 3, pid: 4242, used_mb: 20480 });
        assert!(busy.render().ends_with("process 3 4242 20480\n"), "{}", busy.render());
    }
}
