//! Bake libtorch's directory into the test binaries' rpath, so they run without
//! LD_LIBRARY_PATH (torch-sys links against `$LIBTORCH/lib`), as node-daemon's build script does.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
