//! Fleet at scale (a benchmark, not a test): one GonkaNode over N GPU nodes simulated by kwok,
//! placed by the real kube-scheduler, registered with the devnet by the operator running in this
//! process. Measures how long until every ML node is ready and registered, how many reconciles
//! and network-node writes that took, what a steady fleet costs afterwards (reconciles,
//! network-node writes, GonkaNode writes: the last two should be zero), and how long a node an
//! autoscaler adds takes to serve: node Ready → its ML node registered, for `--join` nodes added
//! to the steady fleet.
//!
//!   cargo run --release -p gonka-e2e --bin gonka-fleet-bench -- [--nodes N] [--steady-seconds S] [--join K] [--write]
//!
//! `--write` appends the figures to docs/benchmarks.md with the machine and date.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, gonka_node_manifest, start_devnet};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, PostParams};
use serde_json::json;

const NS: &str = "fleet";

struct Args {
    nodes: usize,
    steady: Duration,
    join: usize,
    write: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { nodes: 100, steady: Duration::from_secs(30), join: 10, write: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--nodes" => args.nodes = it.next().context("--nodes N")?.parse()?,
            "--steady-seconds" => args.steady = Duration::from_secs(it.next().context("--steady-seconds S")?.parse()?),
            "--join" => args.join = it.next().context("--join K")?.parse()?,
            "--write" => args.write = true,
            other => {
                anyhow::bail!("unknown argument {other}; usage: [--nodes N] [--steady-seconds S] [--join K] [--write]")
            }
        }
    }
    anyhow::ensure!((1..=5000).contains(&args.nodes), "--nodes must be 1..=5000");
    anyhow::ensure!((1..=500).contains(&args.join), "--join must be 1..=500");
    Ok(args)
}

/// Peak resident memory of this process (operator, devnet, clients), from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    gonka_e2e::init_logging("warn,kube_client::client::builder=off");
    let started = Instant::now();
    let step = |msg: &str| eprintln!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());

    let cp = ControlPlane::start(Components::Scheduled).await?;
    cp.install_crd().await?;
    cp.namespace(NS).await?;
    futures::stream::iter(0..args.nodes)
        .map(|i| {
            let cp = &cp;
            async move { cp.kwok_node(&format!("gpu-{i:04}"), 8, "NVIDIA-H100-80GB-HBM3").await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    step(&format!("{} kwok GPU nodes ready", args.nodes));

    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("bench").await?;
    let api: Api<GonkaNode> = Api::namespaced(cp.client().await?, NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(cp.client().await?, NS);
    let mut manifest = gonka_node_manifest("fleet", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["gpusPerMlNode"] = json!(8);

    let t0 = Instant::now();
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;
    let n = args.nodes as i32;
    let (mut pods_ready, mut all_ready, mut all_registered) = (None, None, None);
    let deadline = t0 + Duration::from_secs(600);
    while all_ready.is_none() || all_registered.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the fleet did not come up within 10 minutes");
        // Kubernetes' share: the DaemonSet controller, the scheduler and kwok.
        if pods_ready.is_none() {
            let ds = daemon_sets.get_opt("fleet-ml-node").await?;
            if ds.and_then(|d| d.status).is_some_and(|s| s.number_ready >= n) {
                pods_ready = Some(t0.elapsed());
                step(&format!("{n} ML-node pods ready (as the DaemonSet shows)"));
            }
        }
        let status = api.get("fleet").await?.status.unwrap_or_default();
        if all_ready.is_none() && status.ready_ml_nodes >= n {
            all_ready = Some(t0.elapsed());
            step(&format!("{n} ML nodes ready (as status shows)"));
        }
        if all_registered.is_none() && status.registered_ml_nodes >= n {
            all_registered = Some(t0.elapsed());
            step(&format!("{n} ML nodes registered with the network node"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (reconciles_up, writes_up) = (operator.reconciles(), devnet.lock().unwrap().admin_writes);
    let registered = devnet.lock().unwrap().nodes().len();
    anyhow::ensure!(registered == args.nodes, "the devnet lists {registered} ML nodes, expected {}", args.nodes);

    // Let the last status write land, then watch a steady fleet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let version_before = api.get("fleet").await?.metadata.resource_version;
    let (reconciles_before, writes_before) = (operator.reconciles(), devnet.lock().unwrap().admin_writes);
    step(&format!("steady fleet for {}s", args.steady.as_secs()));
    tokio::time::sleep(args.steady).await;
    let version_after = api.get("fleet").await?.metadata.resource_version;
    let steady_reconciles = operator.reconciles() - reconciles_before;
    let steady_writes = devnet.lock().unwrap().admin_writes - writes_before;
    let gonka_node_written = version_before != version_after;

    // Scale-up as an autoscaler does it: nodes join the steady fleet, each timed from the moment
    // it is Ready (kwok reports it, its admission taint lifted as the node lifecycle controller
    // would) until the network node lists its ML node.
    step(&format!("{} nodes join the steady fleet", args.join));
    let mut joins: Vec<f64> = futures::stream::iter(0..args.join)
        .map(|i| {
            let (cp, devnet) = (&cp, &devnet);
            async move {
                let node = format!("gpu-join-{i:03}");
                cp.kwok_node(&node, 8, "NVIDIA-H100-80GB-HBM3").await?;
                let ready = Instant::now();
                let id = format!("fleet.{NS}@{node}");
                let deadline = ready + Duration::from_secs(300);
                while !devnet.lock().unwrap().nodes().iter().any(|n| n.node.config.id == id) {
                    anyhow::ensure!(Instant::now() < deadline, "{node} was not registered within 5 minutes");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok(ready.elapsed().as_secs_f64())
            }
        })
        .buffer_unordered(args.join)
        .try_collect()
        .await?;
    joins.sort_by(f64::total_cmp);
    let (join_median, join_max) = (joins[joins.len() / 2], joins[joins.len() - 1]);
    step(&format!("joined: node Ready → registered median {join_median:.2} s, max {join_max:.2} s"));
    operator.stop().await?;

    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    let today = jiff::Timestamp::now().strftime("%Y-%m-%d");
    let report = format!(
        "\n## Fleet at scale, {today}\n\n\
         Machine: {machine}. One GonkaNode (`gpusPerMlNode: 8`) over {nodes} kwok GPU nodes (8 GPUs each), \
         placed by kube-scheduler v1.35.4, registered with the devnet; operator, devnet and harness in one \
         release-built process.\n\n\
         | figure | value |\n|---|---|\n\
         | GonkaNode created → all {nodes} ML-node pods ready (DaemonSet controller, scheduler, kwok) | {pods:.1} s |\n\
         | GonkaNode created → all {nodes} ML nodes ready in status | {ready:.1} s |\n\
         | GonkaNode created → all {nodes} registered | {registered:.1} s |\n\
         | reconciles until registered | {reconciles_up} |\n\
         | network-node writes until registered | {writes_up} ({per_node:.2} per ML node) |\n\
         | steady fleet, {steady}s: reconciles | {steady_reconciles} |\n\
         | steady fleet: network-node writes | {steady_writes} |\n\
         | steady fleet: GonkaNode written | {written} |\n\
         | {join} nodes joining the steady fleet at once: node Ready → ML node registered, median (max) | {join_median:.2} s ({join_max:.2} s) |\n\
         | peak RSS of the process | {rss:.0} MiB |\n",
        machine = gonka_e2e::machine(),
        nodes = args.nodes,
        pods = secs(pods_ready),
        ready = secs(all_ready),
        registered = secs(all_registered),
        per_node = writes_up as f64 / args.nodes as f64,
        steady = args.steady.as_secs(),
        written = if gonka_node_written { "yes" } else { "no" },
        join = args.join,
        rss = peak_rss_mib().unwrap_or(f64::NAN),
    );
    print!("{report}");
    if args.write {
        let path = gonka_e2e::append_to_benchmarks(&report)?;
        step(&format!("appended to {}", path.display()));
    }
    Ok(())
}
