//! A real, throwaway Kubernetes control plane for tests: etcd, kube-apiserver and (optionally)
//! kube-controller-manager, built from Go modules by `e2e/controlplane/build.sh` and started on
//! free loopback ports with generated certificates and a static admin token. Everything is
//! stopped and deleted when the [`ControlPlane`] drops.
//!
//! Two ways to run pods. Most tests have no kubelet and no scheduler:
//! [`ControlPlane::simulate_kubelet`] binds and readies pods the way they would, at the moments a
//! test chooses, so the DaemonSet controller's status is real. [`Components::Scheduled`] adds the
//! real kube-scheduler and kwok, which runs the lifecycle of fake nodes ([`ControlPlane::kwok_node`])
//! and their pods: scheduling (resources, taints, affinity) is Kubernetes' own.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use rcgen::KeyPair;

/// Which processes a test needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Components {
    /// etcd + kube-apiserver: admission, validation, storage.
    ApiServer,
    /// Also kube-controller-manager with the DaemonSet controller and the garbage collector.
    WithControllers,
    /// Also kube-scheduler, and kwok running the nodes made by [`ControlPlane::kwok_node`] and
    /// their pods (Running and Ready, pod IPs from [`KWOK_POD_CIDR`]).
    Scheduled,
}

/// Pod IPs kwok hands out: loopback addresses, so a process standing in for a pod can listen on
/// its IP (all of 127.0.0.0/8 is loopback), apart from [`ControlPlane::simulate_kubelet`]'s.
pub const KWOK_POD_CIDR: &str = "127.100.0.0/16";
/// What every address in [`KWOK_POD_CIDR`] starts with.
pub const KWOK_POD_PREFIX: &str = "127.100.";

/// The annotation that puts a node in kwok's hands.
const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

pub struct ControlPlane {
    dir: tempfile::TempDir,
    processes: Vec<(&'static str, Child)>,
    bin: PathBuf,
    kubeconfig: PathBuf,
    pub url: String,
}

impl ControlPlane {
    /// Starts a control plane and waits until the apiserver is ready.
    pub async fn start(components: Components) -> anyhow::Result<Self> {
        init_logging("warn,kube_client::client::builder=off,gonka_operator=info");
        let bin = binaries()?;
        let dir = tempfile::Builder::new().prefix("gonka-e2e-").tempdir()?;
        let d = dir.path();

        // Certificates: a CA, the apiserver's serving cert, the service-account signing key.
        let ca = gonka_devnet::tls::TestCa::new("gonka-e2e-ca")?;
        let (server_cert, server_key) = ca.issue(&["localhost", "127.0.0.1"], "kube-apiserver")?;
        let sa_key = KeyPair::generate()?;
        std::fs::write(d.join("ca.crt"), &ca.pem)?;
        std::fs::write(d.join("apiserver.crt"), server_cert.pem())?;
        std::fs::write(d.join("apiserver.key"), server_key.serialize_pem())?;
        std::fs::write(d.join("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(d.join("sa.pub"), sa_key.public_key_pem())?;
        let token = format!("e2e-{}", std::process::id());
        std::fs::write(d.join("tokens.csv"), format!("{token},admin,admin-uid,\"system:masters\"\n"))?;

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = d.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &d.join("ca.crt"), &token)?;

        let mut cp = Self { dir, processes: Vec::new(), bin, kubeconfig, url };
        let d = cp.dir.path().to_path_buf();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cp.spawn(
            "etcd",
            &[
                "--name=e2e",
                &format!("--data-dir={}", d.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=e2e={peer_url}"),
                // Throwaway data: skip fsync, tests are I/O bound on small machines.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )?;
        let path = |f: &str| d.join(f).display().to_string();
        cp.spawn(
            "kube-apiserver",
            &[
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", path("apiserver-certs")),
                &format!("--tls-cert-file={}", path("apiserver.crt")),
                &format!("--tls-private-key-file={}", path("apiserver.key")),
                &format!("--token-auth-file={}", path("tokens.csv")),
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", path("sa.pub")),
                &format!("--service-account-signing-key-file={}", path("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--profiling=false",
                // The `kubernetes` Service cannot point at a loopback address; nothing needs it.
                "--endpoint-reconciler-type=none",
            ],
        )?;
        cp.wait_ready().await?;

        if components != Components::ApiServer {
            cp.spawn(
                "kube-controller-manager",
                &[
                    &format!("--kubeconfig={}", path("kubeconfig")),
                    "--controllers=daemonset-controller,garbage-collector-controller,disruption-controller",
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--concurrent-daemonset-syncs=2",
                ],
            )?;
        }
        if components == Components::Scheduled {
            // A kwok configuration of the tests' own (a ~/.kwok/kwok.yaml can't change them): kwok's
            // default node and pod lifecycle stages, which build.sh wrote out; default options.
            let stages = std::fs::read_to_string(cp.bin.join("kwok-stages.yaml")).context("kwok's stages")?;
            std::fs::write(d.join("kwok.yaml"), stages)?;
            cp.spawn(
                "kube-scheduler",
                &[&format!("--kubeconfig={}", path("kubeconfig")), "--leader-elect=false", "--secure-port=0"],
            )?;
            cp.spawn(
                "kwok",
                &[
                    &format!("--kubeconfig={}", path("kubeconfig")),
                    &format!("--config={}", path("kwok.yaml")),
                    &format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
                    &format!("--cidr={KWOK_POD_CIDR}"),
                    "--node-ip=127.0.0.1",
                ],
            )?;
        }
        Ok(cp)
    }

    /// A control plane with controllers, the GonkaNode CRD, `namespace`, and one 8-GPU H100
    /// node per name in `gpu_nodes`: the setup of the fleet tests.
    pub async fn start_h100_fleet(namespace: &str, gpu_nodes: &[&str]) -> anyhow::Result<Self> {
        let cp = Self::start(Components::WithControllers).await?;
        cp.install_crd().await?;
        cp.namespace(namespace).await?;
        for node in gpu_nodes {
            cp.gpu_node(node, 8, "NVIDIA-H100-80GB-HBM3").await?;
        }
        Ok(cp)
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> anyhow::Result<()> {
        let log = File::create(self.dir.path().join(format!("{name}.log")))?;
        let child = Command::new(self.bin.join(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} from {}", self.bin.display()))?;
        self.processes.push((name, child));
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let req = http_get("/readyz");
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("kube-apiserver not ready after 90s; log tail:\n{}", self.log_tail("kube-apiserver", 40))
                }
                _ => {}
            }
            let mut exited = None;
            for (name, child) in &mut self.processes {
                if let Some(status) = child.try_wait()? {
                    exited = Some((*name, status));
                }
            }
            if let Some((name, status)) = exited {
                bail!("{name} exited with {status}; log tail:\n{}", self.log_tail(name, 40));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last `lines` lines of a component's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// An admin client that hands every 429/503 back instead of retrying (kube's default client
    /// retries them), for tests that expect a refusal such as an eviction a budget forbids.
    pub async fn client_without_retries(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        config.default_retry = false;
        Ok(Client::try_from(config)?)
    }

    /// A client acting as ServiceAccount `namespace/name`, with only the rights RBAC gives it
    /// (a token from the TokenRequest API, as a pod would get).
    pub async fn client_as(&self, namespace: &str, name: &str) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig_as(namespace, name).await?).await
    }

    /// A kubeconfig acting as ServiceAccount `namespace/name` (see [`Self::client_as`]), for a
    /// process such as the operator binary; returns its path.
    pub async fn kubeconfig_as(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..Default::default() },
            ..Default::default()
        };
        let issued: TokenRequest = accounts.create_subresource("token", name, &PostParams::default(), &request).await?;
        let token = issued.status.context("TokenRequest without status")?.token;
        let path = self.dir.path().join(format!("kubeconfig-{namespace}-{name}"));
        write_kubeconfig(&path, &self.url, &self.dir.path().join("ca.crt"), &token)?;
        Ok(path)
    }

    /// Installs the operator as `manifests/` describes it (CRD, namespace, RBAC, Deployment)
    /// with `kubectl apply --server-side -k`, and waits for the CRD to be served.
    pub async fn apply_manifests(&self) -> anyhow::Result<()> {
        self.apply_kustomization("").await
    }

    /// [`Self::apply_manifests`] with the kustomization in `manifests/<variant>` (e.g.
    /// `namespaced`).
    pub async fn apply_kustomization(&self, variant: &str) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests").join(variant);
        self.kubectl(&["apply", "--server-side", "-k", &dir.display().to_string()])?;
        self.wait_crd_served().await
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs the control plane's own kubectl against it; returns stdout, or the error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs helm (built with the control plane) against it, with its own config and cache dirs;
    /// returns stdout, or the error with stderr.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let home = self.dir.path().join("helm");
        let out = Command::new(self.bin.join("helm"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()?;
        if !out.status.success() {
            bail!("helm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Waits until the GonkaNode CRD is served (after something else installed it).
    pub async fn crd_served(&self) -> anyhow::Result<()> {
        self.wait_crd_served().await
    }

    /// Installs the GonkaNode CRD and waits until it is served.
    pub async fn install_crd(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        api.patch("gonkanodes.gonka.ai", &PatchParams::apply("e2e").force(), &Patch::Apply(gonka_crds::crd())).await?;
        self.wait_crd_served().await
    }

    async fn wait_crd_served(&self) -> anyhow::Result<()> {
        let gonka: Api<gonka_crds::GonkaNode> = Api::all(self.client().await?);
        eventually("GonkaNode CRD served", Duration::from_secs(30), || async {
            Ok(gonka.list(&ListParams::default().limit(1)).await.is_ok())
        })
        .await
        .context("GonkaNode CRD never became served")
    }

    /// Creates a namespace.
    pub async fn namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns =
            Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
        api.create(&PostParams::default(), &ns).await?;
        Ok(())
    }

    /// A node run by kwok (needs [`Components::Scheduled`]): kwok reports it Ready and runs the
    /// pods the scheduler binds to it. `gpus > 0` makes it a GPU node as GPU Feature
    /// Discovery and the device plugin show one, with the `nvidia.com/gpu` taint GPU pools carry.
    pub async fn kwok_node(&self, name: &str, gpus: u32, product: &str) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.client().await?);
        let (mut labels, capacity) = node_shape(name, gpus, product);
        labels["type"] = "kwok".into();
        let taints = if gpus > 0 {
            serde_json::json!([{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        } else {
            serde_json::json!([])
        };
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels, "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
            "spec": {"taints": taints.clone()},
            "status": {"capacity": capacity, "allocatable": capacity},
        }))?;
        api.create(&PostParams::default(), &node).await?;
        // Admission taints a new node not-ready; once kwok reports it Ready, do what the node
        // lifecycle controller (not run here) would: lift that taint, keep the node's own.
        eventually(&format!("kwok runs node {name}"), Duration::from_secs(30), || async {
            let node = api.get(name).await?;
            let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await?;
        api.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"taints": taints}})))
            .await?;
        Ok(())
    }

    /// Registers a GPU node the way a kubelet with the NVIDIA device plugin and GPU Feature
    /// Discovery would show it: labelled, with `nvidia.com/gpu` capacity, Ready.
    pub async fn gpu_node(&self, name: &str, gpus: u32, product: &str) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.client().await?);
        let (labels, capacity) = node_shape(name, gpus, product);
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))?;
        api.create(&PostParams::default(), &node).await?;
        let status = serde_json::json!({"status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await?;
        // Admission taints new nodes not-ready until the node lifecycle controller sees a
        // healthy kubelet; do its part.
        api.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"taints": null}}))).await?;
        Ok(())
    }

    /// A fresh loopback address for a pod: 127.0.1.1, 127.0.1.2, ... Counted across every
    /// control plane of the process: tests running side by side put stand-in daemons on these
    /// addresses, which must not meet.
    fn next_pod_ip(&self) -> String {
        static NEXT_IP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT_IP.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        format!("127.0.{}.{}", 1 + n / 250, 1 + n % 250)
    }

    /// Does what a scheduler and kubelets would for the pods in `namespace` matching
    /// `selector`: binds each unbound pod to the node its DaemonSet affinity names, reports it
    /// Running and Ready, and finishes the deletion of pods being deleted (the kubelet's
    /// confirmation once containers stop). Returns how many pods it touched.
    pub async fn simulate_kubelet(&self, namespace: &str, selector: &str) -> anyhow::Result<usize> {
        let client = self.client().await?;
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let mut touched = 0;
        for pod in pods.list(&ListParams::default().labels(selector)).await? {
            let name = pod.name_any();
            if pod.metadata.deletion_timestamp.is_some() {
                pods.delete(&name, &kube::api::DeleteParams::default().grace_period(0)).await?;
                touched += 1;
                continue;
            }
            let spec = pod.spec.clone().unwrap_or_default();
            if spec.node_name.is_none() {
                let Some(node) = gonka_operator::controller::daemon_pod_target_node(&pod) else { continue };
                let binding = Binding {
                    metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                    target: ObjectReference { kind: Some("Node".into()), name: Some(node), ..Default::default() },
                };
                pods.create_subresource::<Binding, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await?;
            }
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                continue;
            }
            let status = serde_json::json!({"status": {
                "phase": "Running",
                "hostIP": "10.0.0.1",
                // A loopback address of its own, so a process standing in for the pod can listen
                // on it at the ML-node ports (127.0.0.0/8 is all loopback).
                "podIP": self.next_pod_ip(),
                "startTime": now(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now()},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now()},
                ],
                "containerStatuses": [{"name": "node-daemon", "ready": true, "restartCount": 0, "started": true,
                    "image": spec.containers.first().and_then(|c| c.image.clone()).unwrap_or_default(), "imageID": "",
                    "state": {"running": {"startedAt": now()}}}],
            }});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
            touched += 1;
        }
        Ok(touched)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Controllers first, etcd last, so nothing logs errors about a vanished store.
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("GONKA_E2E_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("control plane files kept in {}", kept.display());
        }
    }
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, token: &str) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": url, "certificate-authority": ca}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": "default"}}],
        "current-context": "e2e",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// A node's labels and capacity as GPU Feature Discovery and the NVIDIA device plugin show them
/// (`gpus == 0`: a node without GPUs).
fn node_shape(name: &str, gpus: u32, product: &str) -> (serde_json::Value, serde_json::Value) {
    let mut labels = serde_json::json!({"kubernetes.io/hostname": name});
    let mut capacity = serde_json::json!({"cpu": "64", "memory": "512Gi", "pods": "110"});
    if gpus > 0 {
        labels["nvidia.com/gpu.present"] = "true".into();
        labels["nvidia.com/gpu.product"] = product.into();
        labels["nvidia.com/gpu.count"] = gpus.to_string().into();
        capacity["nvidia.com/gpu"] = gpus.to_string().into();
    }
    (labels, capacity)
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The machine a benchmark ran on, for its figures: CPU model and core count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// A plain HTTP/1.1 GET to `addr` (the operator's admin server); returns status and body.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_string()))
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).expect("static request")
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).expect("rounding").to_string()
}

/// Polls `check` until it returns true or `timeout` passes; `what` names the wait in errors.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            return match last_error {
                Some(e) => Err(e.context(format!("{what}: not within {timeout:?}"))),
                None => bail!("{what}: not within {timeout:?}"),
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Directory holding the control-plane binaries: `GONKA_CONTROLPLANE_BIN`, else what
/// `e2e/controlplane/build.sh` builds (or finds in its cache).
fn binaries() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("GONKA_CONTROLPLANE_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout.lines().last().map(PathBuf::from).ok_or_else(|| format!("{} printed no directory", script.display()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// Where tests' ports come from: below Linux's ephemeral range (32768-60999 by default). A port
/// picked by binding port 0 is free only until the listener closes, and the kernel hands the
/// same range out again for every outgoing connection and every other `bind(0)`: a stop's CI
/// lost a run when a test's own HTTP server took etcd's port between the pick and etcd's bind
/// (kube-apiserver then spoke gRPC to it). Ports below the range are never handed out by the
/// kernel, so only another explicit pick could take one, and within a process the picks walk
/// the range without repeating.
const TEST_PORTS: std::ops::Range<u16> = 15000..32000;

/// `len` consecutive free ports, for a process that listens on a port and the ones above it
/// (vLLM's instances); returns the first. The picks of this process skip all of them.
pub fn free_port_block(len: u16) -> anyhow::Result<u16> {
    let (first, _held) = take_block(len)?;
    Ok(first)
}

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold every listener until all N are picked so the N ports differ.
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let (first, listeners) = take_block(1)?;
        *port = first;
        held.extend(listeners);
    }
    Ok(ports)
}

/// The next `len` consecutive ports of [`TEST_PORTS`] that all bind, and their listeners.
fn take_block(len: u16) -> anyhow::Result<(u16, Vec<TcpListener>)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    // Processes start at different places (tests of several binaries may run at once).
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        AtomicU32::new(std::process::id().wrapping_mul(7919).wrapping_add(nanos) % span)
    });
    for _ in 0..span {
        let offset = next.fetch_add(u32::from(len), Ordering::Relaxed) % span;
        if offset + u32::from(len) > span {
            continue;
        }
        let first = TEST_PORTS.start + offset as u16;
        let listeners: Result<Vec<_>, _> = (first..first + len).map(|p| TcpListener::bind(("127.0.0.1", p))).collect();
        if let Ok(listeners) = listeners {
            return Ok((first, listeners));
        }
    }
    bail!("no {len} free consecutive ports in {TEST_PORTS:?} on 127.0.0.1")
}

/// The project's Python (`GONKA_PYTHON`, as the Makefile exports it, else `.cache/pyenv`).
pub fn python() -> PathBuf {
    std::env::var_os("GONKA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/pyenv/bin/python"))
}

/// vLLM's CPU build in its own venv (`scripts/vllm-env.sh`, which installs it on first use):
/// `GONKA_VLLM_PYTHON` when set (the Makefile sets it), else what the script prints.
pub fn vllm_python() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("GONKA_VLLM_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vllm-env.sh");
    let out = Command::new(&script).stderr(std::process::Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "{} failed", script.display());
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Writes a tiny random checkpoint (`arch`: `qwen2`, `qwen3`, `qwen3_moe`, or `llama`, which
/// the native engine does not run) and a small tokenizer into `dir` with transformers (the
/// inference crate's reference script); `extra` adds request fields (`seed`, `shard_size`,
/// `config` overrides such as `{"head_dim": 64}`).
pub fn write_tiny_qwen(dir: &Path, arch: &str, extra: serde_json::Value) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/reference/qwen_reference.py");
    let mut request = serde_json::json!({"arch": arch, "dir": dir, "prompt": [1], "tokenizer": true});
    if let (Some(r), Some(e)) = (request.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    let py = python();
    let out = Command::new(&py)
        .arg(script)
        .arg(request.to_string())
        .output()
        .with_context(|| format!("running {} (`make pyenv` installs the project's Python)", py.display()))?;
    anyhow::ensure!(out.status.success(), "writing a tiny {arch}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Appends a benchmark's report to docs/benchmarks.md; returns the file's path.
pub fn append_to_benchmarks(report: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    std::fs::OpenOptions::new().append(true).open(&path)?.write_all(report.as_bytes())?;
    Ok(path)
}

/// Installs the log subscriber once: `RUST_LOG` if set, else `default_filter`. Later calls
/// (every [`ControlPlane::start`] makes one) keep the first choice.
pub fn init_logging(default_filter: &str) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A devnet (the network node's stand-in, a 2026 mainline one) on a free loopback port,
/// approving `models`; returns its state and base URL, which serves the admin API, the public
/// epoch endpoint and the ML callback server at once (upstream: ports 9200, 9000, 9100). It
/// serves until the test's runtime ends.
pub async fn start_devnet(models: &[&str]) -> anyhow::Result<(gonka_devnet::Shared, String)> {
    start_devnet_on(gonka_devnet::Generation::Mainline2026, models, 0).await
}

/// [`start_devnet`] playing a given generation of network node, on a given loopback port (0:
/// any), e.g. one a GonkaNode already names.
pub async fn start_devnet_on(
    generation: gonka_devnet::Generation,
    models: &[&str],
    port: u16,
) -> anyhow::Result<(gonka_devnet::Shared, String)> {
    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::of(
        generation,
        models.iter().map(|m| m.to_string()),
    )));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = gonka_devnet::admin_router(devnet.clone())
        .merge(gonka_devnet::public_router(devnet.clone()))
        .merge(gonka_devnet::callback_router(devnet.clone()));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((devnet, url))
}

/// Node-daemon processes standing in for ML-node pods (there is no kubelet to run the pods):
/// each listens on its pod's loopback IP at the ML-node port the operator registers, reads the
/// daemon config given, and sees the GPUs of a fake-NVML scenario. Killed when dropped.
pub struct PodStandIns {
    children: Vec<Child>,
    /// The fake-NVML scenario file of each Kubernetes node's daemon.
    gpu_files: std::collections::BTreeMap<String, PathBuf>,
    _scratch: tempfile::TempDir,
}

impl Drop for PodStandIns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl PodStandIns {
    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Changes the GPUs (or delivers XIDs) on `kubernetes_node` while its daemon runs.
    pub fn change_gpus(&self, kubernetes_node: &str, scenario: &fake_nvml::Scenario) -> anyhow::Result<()> {
        let file = self.gpu_files.get(kubernetes_node).with_context(|| format!("no daemon on {kubernetes_node}"))?;
        // A different mtime even within the same clock tick.
        std::thread::sleep(Duration::from_millis(20));
        Ok(scenario.write(file)?)
    }
}

impl ControlPlane {
    /// A token of `pod`'s ServiceAccount bound to the pod, for the operator's audience: what
    /// the kubelet projects into the pod's report-token volume.
    pub async fn pod_token(&self, pod: &Pod) -> anyhow::Result<String> {
        let namespace = pod.namespace().context("pod without namespace")?;
        let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).context("no ServiceAccount")?;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, &namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![gonka_protocol::report::TOKEN_AUDIENCE.into()],
                expiration_seconds: Some(3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name_any()),
                    uid: pod.uid(),
                }),
            },
            ..Default::default()
        };
        let issued: TokenRequest =
            accounts.create_subresource("token", &account, &PostParams::default(), &request).await?;
        Ok(issued.status.context("TokenRequest without status")?.token)
    }

    /// Starts a `daemon` binary for every running pod in `namespace` matching `selector`, with
    /// `daemon_config` as its `daemon.json`, the pod's identity in the downward-API variables,
    /// a pod-bound report token where the config asks for one, and the GPUs
    /// `gpus_for(<kubernetes node>)` describes; returns once each answers `/healthz`.
    pub async fn stand_in_for_pods(
        &self,
        namespace: &str,
        selector: &str,
        daemon: &Path,
        daemon_config: &str,
        gpus_for: impl Fn(&str) -> fake_nvml::Scenario,
    ) -> anyhow::Result<PodStandIns> {
        self.stand_in_for_pods_with_env(namespace, selector, daemon, daemon_config, gpus_for, &[]).await
    }

    /// As [`Self::stand_in_for_pods`], the daemons with `env` added (e.g. where vLLM is).
    pub async fn stand_in_for_pods_with_env(
        &self,
        namespace: &str,
        selector: &str,
        daemon: &Path,
        daemon_config: &str,
        gpus_for: impl Fn(&str) -> fake_nvml::Scenario,
        env: &[(&str, &str)],
    ) -> anyhow::Result<PodStandIns> {
        // Built first, so processes started before a failure are stopped by its Drop.
        let mut stand_ins =
            PodStandIns { children: Vec::new(), gpu_files: Default::default(), _scratch: tempfile::tempdir()? };
        let scratch = stand_ins._scratch.path().to_path_buf();
        let config: serde_json::Value = serde_json::from_str(daemon_config).context("daemon config")?;
        let pods: Api<Pod> = Api::namespaced(self.client().await?, namespace);
        let mut addresses = Vec::new();
        for pod in pods.list(&ListParams::default().labels(selector)).await? {
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let (Some(ip), Some(node), None) = (ip, node, pod.metadata.deletion_timestamp.as_ref()) else { continue };
            let gpus = scratch.join(format!("{node}.gpus"));
            gpus_for(&node).write(&gpus)?;
            let mut pod_config = config.clone();
            if pod_config.pointer("/report/tokenFile").is_some() {
                let token = scratch.join(format!("{}.token", pod.name_any()));
                std::fs::write(&token, self.pod_token(&pod).await?)?;
                pod_config["report"]["tokenFile"] = serde_json::json!(token);
            }
            let config_file = scratch.join(format!("{}.json", pod.name_any()));
            std::fs::write(&config_file, pod_config.to_string())?;
            let child = Command::new(daemon)
                .env("GONKA_LISTEN", format!("{ip}:8080"))
                .env("GONKA_DAEMON_CONFIG", &config_file)
                .env("POD_NAME", pod.name_any())
                .env("NODE_NAME", &node)
                .env("POD_IP", &ip)
                .env("GONKA_NVML_LIBRARY", fake_nvml::LIBRARY)
                // Fake GPUs: PoC runs on the CPU (the development setting).
                .env("GONKA_ALLOW_CPU_COMPUTE", "true")
                .env(fake_nvml::CONFIG_ENV, &gpus)
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", daemon.display()))?;
            stand_ins.children.push(child);
            stand_ins.gpu_files.insert(node, gpus);
            addresses.push(format!("http://{ip}:8080/healthz"));
        }
        gonka_operator::network_node::install_crypto_provider();
        let http = reqwest::Client::new();
        for health in addresses {
            let deadline = Instant::now() + Duration::from_secs(30);
            while http.get(&health).send().await.is_err() {
                anyhow::ensure!(Instant::now() < deadline, "the node-daemon at {health} did not come up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(stand_ins)
    }
}

impl ControlPlane {
    /// Creates `manifest` (a GonkaNode) and waits, playing the kubelet for the pods matching
    /// `pods`, until `ml_nodes` of them are ready and registered with the network node.
    pub async fn roll_out(
        &self,
        manifest: serde_json::Value,
        pods: &str,
        ml_nodes: i32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let gn: gonka_crds::GonkaNode = serde_json::from_value(manifest)?;
        let (name, namespace) = (gn.name_any(), gn.namespace().context("manifest without namespace")?);
        let api: Api<gonka_crds::GonkaNode> = Api::namespaced(self.client().await?, &namespace);
        api.create(&PostParams::default(), &gn).await?;
        eventually("fleet ready and registered", timeout, || async {
            self.simulate_kubelet(&namespace, pods).await?;
            let s = api.get(&name).await?.status.unwrap_or_default();
            Ok(s.ready_ml_nodes == ml_nodes && s.registered_ml_nodes == ml_nodes)
        })
        .await
    }
}

/// A minimal valid GonkaNode manifest (one model, the usual network-node URLs), as JSON so
/// tests can break or extend it before sending.
pub fn gonka_node_manifest(name: &str, namespace: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "gonka.ai/v1alpha1",
        "kind": "GonkaNode",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            // Loopback, nothing listening: tests that need a network node start a devnet.
            "networkNode": {"adminUrl": "http://127.0.0.1:9", "mlCallbackUrl": "http://gonka-api.gonka.svc:9100"},
            "gpusPerMlNode": 8,
            "models": [{"id": "Qwen/Qwen2.5-7B-Instruct", "args": ["--quantization", "fp8"]}],
        }
    })
}

/// An operator running in this process against a [`ControlPlane`], as a replica would in a pod.
pub struct Operator {
    pub identity: String,
    pub metrics: gonka_operator::metrics::Metrics,
    pub admin_addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), gonka_operator::RunError>>>,
}

/// Image the operator puts in DaemonSets when a GonkaNode names none.
pub const TEST_DAEMON_IMAGE: &str = "registry.test/gonka-node-daemon:e2e";
/// The host directory the e2e tests' operators allow for `modelStorage.hostPath`
/// (`--allowed-host-paths`), where the demo stages its models.
pub const TEST_ALLOWED_HOST_PATH: &str = "/srv/gonka-models";
/// The operator's default image for GonkaNodes with a model on vLLM, in the e2e tests.
pub const TEST_DAEMON_IMAGE_VLLM: &str = "registry.test/gonka-node-daemon-vllm:e2e";

impl ControlPlane {
    /// Starts an operator replica with `identity`, with admin rights, leasing in `default`.
    pub async fn start_operator(&self, identity: &str) -> anyhow::Result<Operator> {
        self.start_operator_as(self.client().await?, identity, "default").await
    }

    /// Starts an operator replica with `identity` using `client` (e.g. [`Self::client_as`] the
    /// operator's ServiceAccount), with its leader Lease in `lease_namespace`.
    pub async fn start_operator_as(
        &self,
        client: Client,
        identity: &str,
        lease_namespace: &str,
    ) -> anyhow::Result<Operator> {
        self.start_operator_with(client, identity, lease_namespace, None).await
    }

    /// [`Self::start_operator_as`], watching only `namespace` (`WATCH_NAMESPACE`) and leasing
    /// there, as the namespaced install runs it.
    pub async fn start_operator_watching(
        &self,
        client: Client,
        identity: &str,
        namespace: &str,
    ) -> anyhow::Result<Operator> {
        self.launch_operator(client, identity, namespace, None, Some(namespace), Default::default()).await
    }

    /// Starts an operator replica with admin rights whose report server listens on
    /// `127.0.0.1:report_port` (the URL its DaemonSets' daemons get), checking daemons' tokens
    /// with TokenReview. A restarted replica on the same port is the same endpoint to them.
    pub async fn start_reporting_operator(&self, identity: &str, report_port: u16) -> anyhow::Result<Operator> {
        self.start_operator_with(self.client().await?, identity, "default", Some(report_port)).await
    }

    /// Starts an operator replica using `client`, leasing in `lease_namespace`, with a report
    /// server on `127.0.0.1:<report_port>` if given (see [`Self::start_reporting_operator`]).
    pub async fn start_operator_with(
        &self,
        client: Client,
        identity: &str,
        lease_namespace: &str,
        report_port: Option<u16>,
    ) -> anyhow::Result<Operator> {
        self.launch_operator(client, identity, lease_namespace, report_port, None, Default::default()).await
    }

    /// An operator replica whose apiserver requests are counted in its metrics
    /// (`gonka_operator_apiserver_requests_total`), as the binary counts them.
    pub async fn start_counting_operator(&self, identity: &str) -> anyhow::Result<Operator> {
        let requests = gonka_operator::metrics::ApiRequests::default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = requests.client(config)?;
        self.launch_operator(client, identity, "default", None, None, requests).await
    }

    async fn launch_operator(
        &self,
        client: Client,
        identity: &str,
        lease_namespace: &str,
        report_port: Option<u16>,
        watch_namespace: Option<&str>,
        api_requests: gonka_operator::metrics::ApiRequests,
    ) -> anyhow::Result<Operator> {
        // The replica's pod, when the test made one: while it leads, the report Service's
        // endpoint (an address of its own; no kubelet gives it one here).
        let pod = Api::<Pod>::namespaced(self.client().await?, lease_namespace).get_opt(identity).await?;
        // (The apiserver refuses loopback endpoint addresses; nothing dials this one.)
        static NEXT_OPERATOR_IP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let pod_ip = pod.as_ref().map(|p| {
            p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_else(|| {
                format!("10.250.0.{}", NEXT_OPERATOR_IP.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            })
        });
        let options = gonka_operator::Options {
            controller: gonka_operator::ControllerConfig {
                namespace: watch_namespace.map(str::to_string),
                daemon_image: TEST_DAEMON_IMAGE.into(),
                daemon_image_vllm: TEST_DAEMON_IMAGE_VLLM.into(),
                instance: Some(identity.into()),
                retry: Duration::from_secs(2),
                rollout_recheck: Duration::from_secs(1),
                // https, as a cluster runs it: the report server's CA goes into daemon.json.
                report: report_port.map(|p| gonka_operator::build::ReportEndpoint {
                    url: format!("https://127.0.0.1:{p}"),
                    ca_bundle: None,
                }),
                report_flush: Duration::from_secs(2),
                policy: gonka_operator::validate::ClusterPolicy::new(vec![TEST_ALLOWED_HOST_PATH.into()], vec![])
                    .expect("a valid policy"),
                // An unreadable epoch phase holds evictions this long (30 minutes in a cluster).
                unknown_window_hold: Duration::from_secs(5),
                ..Default::default()
            },
            reports: gonka_operator::ReportOptions {
                addr: report_port.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p))),
                authenticate: true,
                heartbeat: Duration::from_secs(1),
                // The manifests' report Service, where they were applied.
                service: Some("gonka-operator".into()),
                ..Default::default()
            },
            lease: gonka_operator::LeaseOptions {
                name: "gonka-operator-leader".into(),
                namespace: lease_namespace.into(),
                identity: identity.into(),
                duration_seconds: 6,
                grace_seconds: 2,
                pod: pod.map(|_| identity.to_string()),
                pod_ip,
            },
            admin_addr: "127.0.0.1:0".parse()?,
            api_requests,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(gonka_operator::run(client, options, stop.clone(), Some(tx)));
        let Ok(running) = rx.await else {
            let ended = task.await?;
            anyhow::bail!("operator stopped before it was up: {ended:?}");
        };
        Ok(Operator {
            identity: identity.into(),
            metrics: running.metrics,
            admin_addr: running.admin_addr,
            stop,
            task: Some(task),
        })
    }
}

impl Operator {
    /// Reconciles this replica has started.
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// Stops the replica the way SIGTERM does and returns how its run ended.
    pub async fn stop(mut self) -> Result<(), gonka_operator::RunError> {
        self.stop.cancel();
        self.task.take().expect("running").await.expect("operator task panicked")
    }

    /// Waits for the replica to end on its own (e.g. after losing the lease).
    pub async fn finished(mut self, timeout: Duration) -> anyhow::Result<Result<(), gonka_operator::RunError>> {
        let task = self.task.take().expect("running");
        Ok(tokio::time::timeout(timeout, task).await.context("operator still running")??)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ports_differ_and_lie_below_the_kernels_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("a Linux host");
        let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).expect("the range's start");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let [a, b, c] = free_ports::<3>().expect("free ports");
            for port in [a, b, c] {
                assert!(port < low, "{port} is in the kernel's ephemeral range (from {low})");
                assert!(TEST_PORTS.contains(&port));
                assert!(seen.insert(port), "{port} was handed out twice");
            }
            let first = free_port_block(4).expect("a block");
            for port in first..first + 4 {
                assert!(port < low && TEST_PORTS.contains(&port));
                assert!(seen.insert(port), "{port} was handed out twice");
            }
        }
    }
}
