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
