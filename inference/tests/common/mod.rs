//! Running the reference scripts in `tests/reference/` with the project's Python.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

pub fn python() -> PathBuf {
    std::env::var_os("GONKA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/pyenv/bin/python"))
}

/// Runs `tests/reference/<script>` with `request` as its argument and parses what it prints.
pub fn run_reference(script: &str, request: &Value) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(script);
    let py = python();
    let out =
        Command::new(&py).arg(path).arg(request.to_string()).output().unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): `make pyenv` installs the project's Python", py.display())
        });
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether this test process runs with libgomp's spinning bounded, as the daemon and the bench
/// run on the CPU (`gonka_inference::cpu_threads`), where the engine's own CPU kernels take
/// their work on several threads. libgomp reads the setting as it loads, so where it is not set
/// the test `name` is run again in a child process of this test binary with it, and must pass
/// there; the caller then returns (`false`). In the child, `true`: go on.
#[allow(dead_code)] // Not every test binary that includes this module has such a test.
pub fn with_spin_bounded(name: &str) -> bool {
    if gonka_inference::cpu_threads::openmp_sleeps_soon() {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("GOMP_SPINCOUNT", gonka_inference::cpu_threads::SPIN_COUNT.to_string())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} with GOMP_SPINCOUNT set: {log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(log.contains("1 passed"), "{name} did not run in the child: {log}");
    false
}
