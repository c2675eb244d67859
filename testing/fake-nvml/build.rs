//! Compiles fake_nvml.c into `$OUT_DIR/libnvidia-ml.so.1` with the C compiler the `cc` crate
//! finds (the same one any `-sys` crate would use).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out.join("libnvidia-ml.so.1");
    let compiler = cc::Build::new().get_compiler();
    let status = Command::new(compiler.path())
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-pthread", "-o"])
        .arg(&lib)
        .arg("fake_nvml.c")
        .status()
        .expect("running the C compiler");
    assert!(status.success(), "compiling fake_nvml.c failed");
    println!("cargo:rerun-if-changed=fake_nvml.c");
    println!("cargo:rustc-env=FAKE_NVML_LIBRARY={}", lib.display());
}
