//! The install at scale (a benchmark, not a test): N kwok GPU nodes (default 1,000) and G
//! GonkaNodes (default 50, each placed on its own N/G nodes by a node label), the operator
//! installed with the Helm chart and running as its own process (the release binary, with the
//! chart's ServiceAccount and RBAC), registering with the devnet. Measures what a user sees:
//!
//! - time to join: `helm install` + the GonkaNodes applied → the first ML node registered;
//! - applied → every DaemonSet made and every GonkaNode's status converged (all registered);
//! - per ML node, its pod seen Ready (a watch) → registered on the devnet: p50 / p99;
//! - the operator process's peak RSS and CPU time; its apiserver requests by verb (its own
//!   `gonka_operator_apiserver_requests_total`);
//! - a rest period (default 5 minutes): writes to the apiserver and to the network node (target 0).
//!
//!   cargo build --release -p gonka-operator -p gonka-e2e --bin gonka-scale-bench
//!   target/release/gonka-scale-bench [--nodes N] [--gonka-nodes G] [--rest-seconds S] [--write]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, admin_get, free_port, gonka_node_manifest, start_devnet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

const NS: &str = "fleet";
const SYSTEM: &str = "gonka-system";
const GROUP_LABEL: &str = "bench.gonka.ai/group";

struct Args {
    nodes: usize,
    gonka_nodes: usize,
    rest: Duration,
    write: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { nodes: 1000, gonka_nodes: 50, rest: Duration::from_secs(300), write: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--nodes" => args.nodes = it.next().context("--nodes N")?.parse()?,
            "--gonka-nodes" => args.gonka_nodes = it.next().context("--gonka-nodes G")?.parse()?,
            "--rest-seconds" => args.rest = Duration::from_secs(it.next().context("--rest-seconds S")?.parse()?),
            "--write" => args.write = true,
            other => anyhow::bail!(
                "unknown argument {other}; usage: [--nodes N] [--gonka-nodes G] [--rest-seconds S] [--write]"
            ),
        }
    }
    anyhow::ensure!((1..=5000).contains(&args.nodes), "--nodes must be 1..=5000");
    anyhow::ensure!((1..=args.nodes).contains(&args.gonka_nodes), "--gonka-nodes must be 1..=nodes");
    Ok(args)
}

/// The operator process and what /proc says about it.
struct OperatorProcess {
    child: Child,
    admin: std::net::SocketAddr,
}

impl OperatorProcess {
    fn proc_field(&self, file: &str, key: &str) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).ok()?;
        status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
    }

    fn peak_rss_mib(&self) -> f64 {
        self.proc_field("status", "VmHWM:").map_or(f64::NAN, |kib| kib / 1024.0)
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else { return f64::NAN };
        // Fields after the command name (which may hold spaces) start at `) `.
        let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// The reconcile passes it has started, from its /metrics.
    async fn reconciles(&self) -> anyhow::Result<u64> {
        let (_, metrics) = admin_get(self.admin, "/metrics").await?;
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix("gonka_operator_reconciles_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Its apiserver requests by `(verb, resource)`, from its /metrics.
    async fn requests(&self) -> anyhow::Result<BTreeMap<(String, String), u64>> {
        let (_, metrics) = admin_get(self.admin, "/metrics").await?;
        Ok(metrics
            .lines()
            .filter_map(|l| l.strip_prefix("gonka_operator_apiserver_requests_total{verb=\""))
            .filter_map(|l| {
                let (verb, rest) = l.split_once("\",resource=\"")?;
                let (resource, count) = rest.split_once("\"} ")?;
                Some(((verb.to_string(), resource.to_string()), count.trim().parse().ok()?))
            })
            .collect())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

type Requests = BTreeMap<(String, String), u64>;

/// Writes, leaving out the leader Lease's renewals (every few seconds by design).
fn object_writes(requests: &Requests) -> u64 {
    requests
        .iter()
        .filter(|((verb, resource), _)| {
            ["create", "update", "patch", "delete"].contains(&verb.as_str()) && resource != "leases"
        })
        .map(|(_, n)| n)
        .sum()
}

fn lease_writes(requests: &Requests) -> u64 {
    requests
        .iter()
        .filter(|((verb, resource), _)| verb != "get" && verb != "watch" && resource == "leases")
        .map(|(_, n)| n)
        .sum()
}

/// `verb total (resource n, ...)` per verb.
fn by_verb(requests: &Requests) -> String {
    let mut verbs: BTreeMap<&str, (u64, Vec<String>)> = BTreeMap::new();
    for ((verb, resource), n) in requests {
        let entry = verbs.entry(verb).or_default();
        entry.0 += n;
        entry.1.push(format!("{resource} {n}"));
    }
    verbs.iter().map(|(v, (n, parts))| format!("{v} {n} ({})", parts.join(", "))).collect::<Vec<_>>().join("; ")
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn operator_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("gonka-operator");
    anyhow::ensure!(bin.exists(), "{bin:?} missing: cargo build --release -p gonka-operator first");
    Ok(bin)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    gonka_e2e::init_logging("warn,kube_client::client::builder=off");
    let started = Instant::now();
    let step = |msg: &str| eprintln!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());
    let per_group = args.nodes / args.gonka_nodes;

    let cp = ControlPlane::start(Components::Scheduled).await?;
    cp.namespace(NS).await?;
    cp.namespace(SYSTEM).await?;
    let nodes: Api<Node> = Api::all(cp.client().await?);
    futures::stream::iter(0..args.nodes)
        .map(|i| {
            let (cp, nodes) = (&cp, &nodes);
            async move {
                let name = format!("gpu-{i:04}");
                cp.kwok_node(&name, 8, "NVIDIA-H100-80GB-HBM3").await?;
                let group = format!("g{:02}", (i / per_group).min(args.gonka_nodes - 1));
                let labels = json!({"metadata": {"labels": {GROUP_LABEL: group}}});
                nodes.patch(&name, &PatchParams::default(), &Patch::Merge(labels)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    step(&format!("{} kwok GPU nodes ready, {} groups of {per_group}", args.nodes, args.gonka_nodes));
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;

    // Pods seen Ready, by Kubernetes node (a watch, so the time is when Kubernetes said so).
    let ready_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pods: Api<Pod> = Api::namespaced(cp.client().await?, NS);
    let watch = {
        let ready_at = ready_at.clone();
        let config = watcher::Config::default().labels("app.kubernetes.io/name=gonka-ml-node");
        tokio::spawn(watcher::watcher(pods, config).try_for_each(move |event| {
            let ready_at = ready_at.clone();
            async move {
                if let watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) = event {
                    let ready = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                    let node = pod.spec.and_then(|s| s.node_name);
                    if let (true, Some(node)) = (ready, node) {
                        ready_at.lock().unwrap().entry(node).or_insert_with(Instant::now);
                    }
                }
                Ok(())
            }
        }))
    };
    // Registrations as the devnet sees them, by Kubernetes node (the id ends with `@<node>`).
    let registered_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let poll = {
        let (registered_at, devnet) = (registered_at.clone(), devnet.clone());
        tokio::spawn(async move {
            loop {
                let ids: Vec<String> =
                    devnet.lock().unwrap().nodes().iter().map(|n| n.node.config.id.clone()).collect();
                let now = Instant::now();
                {
                    let mut seen = registered_at.lock().unwrap();
                    for id in ids {
                        if let Some((_, node)) = id.rsplit_once('@') {
                            seen.entry(node.to_string()).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Install: the chart, then the operator as its own process with the chart's ServiceAccount.
    let t_install = Instant::now();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gonka-operator");
    cp.helm(&["install", "gonka-operator", &chart.display().to_string(), "-n", SYSTEM])?;
    cp.crd_served().await?;
    let kubeconfig = cp.kubeconfig_as(SYSTEM, "gonka-operator").await?;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = std::fs::File::create(std::env::temp_dir().join("gonka-scale-bench-operator.log"))?;
    let child = Command::new(operator_binary()?)
        .args(["run", "--admin-addr", &admin.to_string(), "--report-addr", "off", "--identity", "bench"])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", SYSTEM)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let operator = OperatorProcess { child, admin };
    step("helm install done, the operator process started");

    let gonka_nodes: Api<GonkaNode> = Api::namespaced(cp.client().await?, NS);
    let t_apply = Instant::now();
    futures::stream::iter(0..args.gonka_nodes)
        .map(|g| {
            let (gonka_nodes, url) = (&gonka_nodes, &url);
            async move {
                let mut manifest = gonka_node_manifest(&format!("h100-g{g:02}"), NS);
                manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
                manifest["spec"]["placement"] = json!({"nodeSelector": {GROUP_LABEL: format!("g{g:02}")}});
                gonka_nodes.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    step(&format!("{} GonkaNodes applied", args.gonka_nodes));

    let total = args.nodes;
    let deadline = t_apply + Duration::from_secs(900);
    let mut first_registered = None;
    let converged = loop {
        anyhow::ensure!(Instant::now() < deadline, "not converged within 15 minutes");
        if first_registered.is_none() && !registered_at.lock().unwrap().is_empty() {
            first_registered = Some(t_install.elapsed());
            step("the first ML node is registered");
        }
        let list = gonka_nodes.list(&Default::default()).await?;
        let done = list.items.iter().all(|gn| {
            gn.status.as_ref().is_some_and(|s| {
                s.observed_generation == gn.metadata.generation
                    && s.desired_ml_nodes > 0
                    && s.ready_ml_nodes == s.desired_ml_nodes
                    && s.registered_ml_nodes == s.desired_ml_nodes
            })
        });
        let registered = registered_at.lock().unwrap().len();
        if done && registered >= total {
            break t_apply.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    step("every GonkaNode converged: all ML nodes ready and registered");
    let (up_requests, up_cpu, up_passes) =
        (operator.requests().await?, operator.cpu_seconds(), operator.reconciles().await?);

    // Per ML node: pod Ready → registered.
    let mut latencies: Vec<Duration> = {
        let (ready, registered) = (ready_at.lock().unwrap(), registered_at.lock().unwrap());
        registered.iter().filter_map(|(node, at)| Some(at.saturating_duration_since(*ready.get(node)?))).collect()
    };
    latencies.sort();
    let measured = latencies.len();

    // At rest.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rest_requests_before, rest_cpu_before) = (operator.requests().await?, operator.cpu_seconds());
    let rest_network_before = devnet.lock().unwrap().admin_writes;
    step(&format!("at rest for {}s", args.rest.as_secs()));
    tokio::time::sleep(args.rest).await;
    let (rest_requests, rest_cpu) = (operator.requests().await?, operator.cpu_seconds());
    let rest_network = devnet.lock().unwrap().admin_writes - rest_network_before;
    let rest_writes = object_writes(&rest_requests) - object_writes(&rest_requests_before);
    let rest_lease = lease_writes(&rest_requests) - lease_writes(&rest_requests_before);
    let rest_all: u64 = rest_requests.values().sum::<u64>() - rest_requests_before.values().sum::<u64>();
    let rss = operator.peak_rss_mib();
    watch.abort();
    poll.abort();
    drop(operator);

    let today = jiff::Timestamp::now().strftime("%Y-%m-%d");
    let report = format!(
        "\n## The install at scale, {today}\n\n\
         Machine: {machine}. `make bench-scale`: {nodes} kwok GPU nodes (8 GPUs each), {gns} GonkaNodes \
         of {per_group} nodes each; the chart installed with helm, the operator as its own process \
         (release build, the chart's ServiceAccount), the devnet as network node; kube-apiserver, \
         scheduler, controller-manager and kwok on the same machine.\n\n\
         | figure | value | target |\n|---|---|---|\n\
         | time to join: `helm install` + GonkaNodes applied → first ML node registered | {join:.1} s | |\n\
         | applied → every DaemonSet and status converged ({nodes} ML nodes registered) | {converged:.1} s | |\n\
         | pod Ready → registered, p50 ({measured} ML nodes) | {p50} ms | |\n\
         | pod Ready → registered, p99 | {p99} ms | < 1000 ms |\n\
         | operator peak RSS | {rss:.0} MiB | < 64 MiB |\n\
         | operator CPU until converged | {up_cpu:.1} s | |\n\
         | operator reconcile passes until converged | {up_passes} | |\n\
         | operator apiserver requests until converged | {up} | |\n\
         | at rest {rest}s: operator writes to objects (all but its Lease) | {rest_writes} | 0 |\n\
         | at rest: Lease renewals / all requests | {rest_lease} / {rest_all} | |\n\
         | at rest: network-node writes | {rest_network} | 0 |\n\
         | at rest: operator CPU | {rest_cpu_used:.1} s | |\n",
        machine = gonka_e2e::machine(),
        nodes = args.nodes,
        gns = args.gonka_nodes,
        join = first_registered.map_or(f64::NAN, |d| d.as_secs_f64()),
        converged = converged.as_secs_f64(),
        p50 = quantile(&latencies, 0.5).as_millis(),
        p99 = quantile(&latencies, 0.99).as_millis(),
        up = by_verb(&up_requests),
        rest = args.rest.as_secs(),
        rest_cpu_used = rest_cpu - rest_cpu_before,
    );
    print!("{report}");
    if args.write {
        let path = gonka_e2e::append_to_benchmarks(&report)?;
        step(&format!("appended to {}", path.display()));
    }
    Ok(())
}
