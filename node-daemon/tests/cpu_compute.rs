//! The daemon computing on the CPU (`--allow-cpu-compute`, development) runs with libgomp's idle
//! workers bounded (gonka_inference::cpu_threads), so that the engine's own CPU threads get the
//! cores: libgomp reads the bound as it loads, so the daemon starts itself again with it set,
//! keeping its PID; an operator's own setting stands, and on GPUs nothing changes.
#![cfg(feature = "torch")]

mod common;

use common::Daemon;
use fake_nvml::Scenario;
use gonka_inference::cpu_threads::SPIN_COUNT;

fn spin_settings(d: &Daemon) -> Vec<String> {
    d.environment()
        .into_iter()
        .filter(|v| v.starts_with("GOMP_SPINCOUNT=") || v.starts_with("OMP_WAIT_POLICY="))
        .collect()
}

#[test]
fn on_the_cpu_the_daemon_runs_with_libgomp_spinning_bounded_unless_told_otherwise() {
    let bounded = Daemon::start(&Scenario::hgx_h100());
    assert_eq!(spin_settings(&bounded), [format!("GOMP_SPINCOUNT={SPIN_COUNT}")]);
    // Restarted in place: the API answers from the process the test started.
    assert_eq!(bounded.json("GET", "/api/v1/state").0, 200);

    let told = Daemon::start_with_env(&Scenario::hgx_h100(), &[("OMP_WAIT_POLICY", "active")]);
    assert_eq!(spin_settings(&told), ["OMP_WAIT_POLICY=active"]);

    let on_gpus = Daemon::start_on_gpus_only(&Scenario::hgx_h100(), None);
    assert_eq!(spin_settings(&on_gpus), Vec::<String>::new());
}
