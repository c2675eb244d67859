//! The container images (`images/*/Dockerfile`), built and run the way a cluster would, with no
//! container daemon and no registry: buildah (`--isolation chroot`) on a Debian base made from
//! Debian's packages by mmdebstrap (`images/test-base.sh`), standing in for the Dockerfiles'
//! public bases. The binaries come prebuilt (`BINARY_FROM=prebuilt`, the ones this test run
//! built); the Dockerfiles' own build stages need the public Rust and CUDA images.
//!
//! The operator image prints its version as uid 65532. The node-daemon image, as uid 65532 with
//! its root file system mounted read-only (only /tmp writable, as the pod has it), serves
//! `/health` with the fake NVML, its libtorch found through the image's library path.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gonka_e2e::{admin_get, eventually, free_port};

const BASE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../images/test-base.sh");
const RUN_AS: &str = "65532:65532";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd`, returning stdout; the error carries stderr.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// buildah with the test's own storage (flags from `test-base.sh`).
struct Buildah {
    flags: Vec<String>,
    base: String,
}

impl Buildah {
    fn prepare() -> anyhow::Result<Self> {
        let out = run(Command::new("bash").arg(BASE_SCRIPT).stderr(Stdio::inherit()))?;
        let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
        let base = lines.pop().context("test-base.sh printed no base image")?;
        Ok(Self { flags: lines, base })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.args(&self.flags);
        c
    }

    /// Builds `dockerfile` with `context` (prebuilt binaries), the runtime base replaced by the
    /// Debian-made one; returns the image name.
    fn build(&self, dockerfile: &str, context: &Path, tag: &str) -> anyhow::Result<String> {
        let dockerfile = repo().join(dockerfile);
        run(self.cmd().args(["bud", "--isolation", "chroot", "--quiet"]).args([
            "-f",
            dockerfile.to_str().unwrap(),
            "--build-arg",
            &format!("RUNTIME_IMAGE={}", self.base),
            "--build-arg",
            "BINARY_FROM=prebuilt",
            "-t",
            tag,
            context.to_str().unwrap(),
        ]))?;
        Ok(tag.to_string())
    }

    /// Removes what the test built (the storage is the test's own; the base image stays cached).
    fn clean(&self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        for image in ["localhost/gonka-operator:test", "localhost/gonka-node-daemon:test"] {
            let _ = self.cmd().args(["rmi", "--force", image]).output();
        }
        let _ = self.cmd().args(["rmi", "--prune", "--force"]).output();
    }

    fn config(&self, image: &str, field: &str) -> anyhow::Result<String> {
        Ok(run(self.cmd().args(["inspect", "--format", &format!("{{{{.OCIv1.Config.{field}}}}}"), image]))?
            .trim()
            .to_string())
    }

    fn size_mb(&self, image: &str) -> anyhow::Result<String> {
        Ok(run(self.cmd().args(["images", "--format", "{{.Size}}", image]))?.trim().to_string())
    }
}

/// The shared libraries of `binary` that come from the project's venv (libtorch and the CUDA
/// runtime it loads): `(soname, path)`.
fn venv_libraries(binary: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = run(Command::new("ldd").arg(binary))?;
    let libs: Vec<(String, PathBuf)> = out
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(" => ")?;
            let path = rest.split(" (").next()?;
            path.contains("/.cache/pyenv/").then(|| (name.to_string(), PathBuf::from(path)))
        })
        .collect();
    ensure!(
        libs.iter().any(|(n, _)| n.starts_with("libtorch_cpu")),
        "{binary:?} does not load libtorch from the venv:\n{out}"
    );
    Ok(libs)
}

/// Where `program` is on this process's PATH (a Command with a cleared environment would not
/// find it).
fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found"))
}

/// Puts `from` at `to` without a second copy on disk where both are on one file system (the
/// daemon and its libtorch are half a gigabyte).
fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    // The file itself, not a symbolic link to it (which `link` would link).
    let from = &std::fs::canonicalize(from)?;
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copying {from:?} to {to:?}"))?;
    }
    Ok(())
}

fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path)?;
    Ok(())
}

/// Unmounts what the test mounted, in reverse, even when it fails half-way.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_build_and_run_as_non_root_with_a_read_only_root() -> anyhow::Result<()> {
    let buildah = Buildah::prepare()?;
    buildah.clean();
    let work = tempfile::Builder::new().prefix("gonka-images-").tempdir()?;

    // The operator image.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let operator_bin = target.join("debug/gonka-operator");
    ensure!(operator_bin.exists(), "{operator_bin:?} missing: build the workspace first (`make test` does)");
    let context = work.path().join("operator");
    fresh_dir(&context.join("prebuilt"))?;
    std::fs::copy(&operator_bin, context.join("prebuilt/gonka-operator"))?;
    let operator = buildah.build("images/operator/Dockerfile", &context, "localhost/gonka-operator:test")?;
    assert_eq!(buildah.config(&operator, "User")?, RUN_AS);
    assert_eq!(buildah.config(&operator, "Entrypoint")?, "[/usr/local/bin/gonka-operator]");
    let ctr = run(buildah.cmd().args(["from", "--quiet", &operator]))?.trim().to_string();
    let version = run(buildah
        .cmd()
        .args(["run", "--isolation", "chroot", "--user", RUN_AS, &ctr, "--"])
        .args(["/usr/local/bin/gonka-operator", "--version"]));
    run(buildah.cmd().args(["rm", &ctr]))?;
    assert_eq!(version?.trim(), format!("gonka-operator {}", env!("CARGO_PKG_VERSION")));

    // The node-daemon image: this test's own binary and the venv's libtorch.
    let daemon_bin = Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let context = work.path().join("node-daemon");
    fresh_dir(&context.join("prebuilt/bin"))?;
    fresh_dir(&context.join("prebuilt/lib"))?;
    link_or_copy(daemon_bin, &context.join("prebuilt/bin/gonka-node-daemon"))?;
    for (name, path) in venv_libraries(daemon_bin)? {
        link_or_copy(&path, &context.join("prebuilt/lib").join(name))?;
    }
    let daemon = buildah.build("images/node-daemon/Dockerfile", &context, "localhost/gonka-node-daemon:test")?;
    assert_eq!(buildah.config(&daemon, "User")?, RUN_AS);
    let env = buildah.config(&daemon, "Env")?;
    assert!(env.contains("LD_LIBRARY_PATH=/opt/gonka/lib"), "{env}");
    assert!(env.contains("NVIDIA_DRIVER_CAPABILITIES=compute,utility"), "{env}");
    let sizes = format!("operator {}, node-daemon {}", buildah.size_mb(&operator)?, buildah.size_mb(&daemon)?);
    eprintln!("image sizes (test bases, debug binaries): {sizes}");

    // Its file system, mounted read-only as a pod's root with readOnlyRootFilesystem, /tmp a
    // tmpfs, /proc the host's; the fake NVML and its GPUs bound in read-only.
    let ctr = run(buildah.cmd().args(["from", "--quiet", &daemon]))?.trim().to_string();
    let result = async {
        let rootfs = PathBuf::from(run(buildah.cmd().args(["mount", &ctr]))?.trim());
        ensure!(rootfs.join("usr/local/bin/gonka-node-daemon").exists(), "{rootfs:?} is not the image's root");
        let nvml_dir = work.path().join("nvml");
        fresh_dir(&nvml_dir)?;
        std::fs::copy(fake_nvml::LIBRARY, nvml_dir.join("libnvidia-ml.so.1")).context("copying the fake NVML")?;
        fake_nvml::Scenario::hgx_h100().write(&nvml_dir.join("gpus.json")).context("writing the GPUs")?;
        std::fs::create_dir_all(rootfs.join("opt/nvml")).with_context(|| format!("in {rootfs:?}"))?;
        let root = work.path().join("root");
        std::fs::create_dir_all(&root)?;
        let mut mounts = Mounts(Vec::new());
        let mount = |args: &[&str], at: &Path, mounts: &mut Mounts| -> anyhow::Result<()> {
            run(Command::new("mount").args(args).arg(at))?;
            mounts.0.push(at.to_path_buf());
            Ok(())
        };
        mount(&["--bind", rootfs.to_str().unwrap()], &root, &mut mounts)?;
        run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&root))?;
        mount(&["-t", "tmpfs", "tmpfs"], &root.join("tmp"), &mut mounts)?;
        mount(&["--rbind", "/proc"], &root.join("proc"), &mut mounts)?;
        mount(&["--bind", "-o", "ro", nvml_dir.to_str().unwrap()], &root.join("opt/nvml"), &mut mounts)?;

        // The image's environment, as a container runtime would set it (PATH inside the root;
        // setting it on the Command would change where `chroot` itself is looked up).
        let chroot_bin = which("chroot")?;
        let chroot = |args: &[&str]| {
            let mut c = Command::new(&chroot_bin);
            c.arg(format!("--userspec={RUN_AS}")).arg(&root).env_clear();
            c.args(["/usr/bin/env", "PATH=/usr/local/bin:/usr/bin:/bin", "LD_LIBRARY_PATH=/opt/gonka/lib"]).args(args);
            c
        };
        // Read-only for root too (uid 65532 could not write a root-owned / anyway): the mount
        // refuses with EROFS; /tmp, as in the pod, takes writes (the positive control).
        let as_root = Command::new(&chroot_bin)
            .arg(&root)
            .env_clear()
            .args(["/bin/sh", "-c", "touch /written-at-run-time"])
            .output()?;
        let refusal = String::from_utf8_lossy(&as_root.stderr);
        ensure!(
            !as_root.status.success() && refusal.contains("Read-only file system"),
            "root wrote to the root file system, or failed otherwise: {refusal}"
        );
        let tmp = chroot(&["/bin/sh", "-c", "touch /tmp/written-at-run-time"]).status()?;
        ensure!(tmp.success(), "/tmp is not writable for the daemon's user");

        let port = free_port()?;
        let child = chroot(&[
            "/usr/local/bin/gonka-node-daemon",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--inference-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("GONKA_NVML_LIBRARY", "/opt/nvml/libnvidia-ml.so.1")
        .env(fake_nvml::CONFIG_ENV, "/opt/nvml/gpus.json")
        .env("GONKA_ALLOW_CPU_COMPUTE", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
        let mut daemon = Daemon(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let served = eventually("the daemon in its image serves /health", Duration::from_secs(60), || async {
            Ok(admin_get(addr, "/health").await.is_ok_and(|(code, _)| code == 200))
        })
        .await;
        if served.is_err() {
            let _ = daemon.0.kill();
            let mut stderr = String::new();
            use std::io::Read;
            daemon.0.stderr.take().map(|mut s| s.read_to_string(&mut stderr));
            return served.context(stderr);
        }
        let (_, devices) = admin_get(addr, "/api/v1/gpu/devices").await?;
        assert!(devices.contains("NVIDIA H100 80GB HBM3"), "{devices}");
        drop(daemon);
        drop(mounts);
        anyhow::Ok(())
    }
    .await;
    let _ = run(buildah.cmd().args(["umount", &ctr]));
    run(buildah.cmd().args(["rm", &ctr]))?;
    buildah.clean();
    result
}
