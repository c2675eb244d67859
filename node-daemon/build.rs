//! With the `torch` feature, bake libtorch's directory into the binaries' rpath, so the daemon
//! and its tests run without LD_LIBRARY_PATH (torch-sys links against `$LIBTORCH/lib`).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
