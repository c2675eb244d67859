//! What the node-daemons report, held in memory for the reconciles: one entry per pod, the
//! latest snapshot and whether its stream is up. The report server ([`crate::report_server`])
//! writes here; reconciles read a GonkaNode's entries and turn them into status and
//! registration hardware ([`fleet`], pure).
//!
//! Memory only, by design: after an operator restart or a leader change every daemon
//! reconnects within seconds and sends its whole picture again; until then the status keeps
//! what it said. Entries of pods that are gone are pruned at every reconcile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use gonka_crds::{GonkaNode, GpuCount, MlNodeInference, MlNodeStatus, MlNodeYield};
use gonka_protocol::admin::Hardware;
use gonka_protocol::report::{self as proto, daemon_message::Body};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

/// `(namespace, name)` of a GonkaNode.
pub type GonkaNodeKey = (String, String);

/// What one daemon's report may hold once taken in: a daemon (or something with its pod's
/// token) must not be able to grow the operator's memory or the GonkaNode's status (etcd keeps
/// objects under 1.5 MB) by sending more. Longer strings are cut, longer lists shortened.
pub mod limits {
    /// GPUs of one ML node (the GonkaNode allows 64).
    pub const GPUS: usize = 64;
    /// Distinct GPU models of one ML node.
    pub const HARDWARE: usize = 16;
    /// A GPU model name or hardware string.
    pub const NAME: usize = 128;
    /// An error text.
    pub const ERROR: usize = 256;
    /// An inference error's end (the server's last lines are there).
    pub const INFERENCE_ERROR: usize = 512;
    /// A model id.
    pub const MODEL: usize = 256;
    /// A state, version or identity string.
    pub const SHORT: usize = 64;
    /// ML nodes listed in `status.mlNodes` (the counts cover all of them).
    pub const ML_NODES_IN_STATUS: usize = 1000;
    /// GPU models listed in `status.gpus` (the total covers all of them).
    pub const GPU_MODELS_IN_STATUS: usize = 64;
}

/// `text` cut to `max` characters.
fn cut(text: &mut String, max: usize) {
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
    }
}

/// `text` cut to its last `max` characters (an error's end says why).
fn cut_front(text: &mut String, max: usize) {
    let count = text.chars().count();
    if count > max
        && let Some((at, _)) = text.char_indices().nth(count - max)
    {
        text.replace_range(..at, "");
    }
}

/// A snapshot within [`limits`].
fn bounded(mut snapshot: proto::Snapshot) -> proto::Snapshot {
    if let Some(inference) = &mut snapshot.inference {
        cut(&mut inference.model, limits::MODEL);
        cut(&mut inference.engine, limits::SHORT);
        cut_front(&mut inference.last_error, limits::INFERENCE_ERROR);
    }
    if let Some(yielded) = &mut snapshot.yielded {
        cut(&mut yielded.reason, limits::ERROR);
    }
    cut(&mut snapshot.state, limits::SHORT);
    cut(&mut snapshot.driver_version, limits::SHORT);
    cut(&mut snapshot.cuda_driver_version, limits::SHORT);
    cut(&mut snapshot.nvml_error, limits::ERROR);
    snapshot.gpus.truncate(limits::GPUS);
    for gpu in &mut snapshot.gpus {
        cut(&mut gpu.name, limits::NAME);
        cut(&mut gpu.error, limits::ERROR);
    }
    snapshot.hardware.truncate(limits::HARDWARE);
    for h in &mut snapshot.hardware {
        cut(&mut h.r#type, limits::NAME);
        h.count = h.count.min(limits::GPUS as u32);
    }
    snapshot
}

/// A hello within [`limits`] (its pod and GonkaNode are checked against the token already).
fn bounded_hello(mut hello: proto::Hello) -> proto::Hello {
    for field in [&mut hello.kubernetes_node, &mut hello.pod_ip, &mut hello.daemon_version, &mut hello.boot_id] {
        cut(field, limits::SHORT);
    }
    hello
}

/// One pod's daemon as last heard.
#[derive(Clone, Debug, PartialEq)]
pub struct MlNodeReport {
    pub hello: proto::Hello,
    pub snapshot: Option<proto::Snapshot>,
    /// The report stream is up.
    pub connected: bool,
    /// When the current stream came up, or when the last one went down.
    pub since: jiff::Timestamp,
    connection: u64,
    /// Highest `seq` taken in from this daemon process (`hello.boot_id`).
    highest_seq: u64,
    /// `highest_seq` when the current stream began: an event numbered at or below it was
    /// taken in before and is being resent.
    seen_before: u64,
}

/// A stream's claim on its pod's entry; a newer stream from the same pod supersedes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub gonka_node: GonkaNodeKey,
    pub pod: String,
    id: u64,
}

/// What one message from a daemon gave.
#[derive(Debug, Default, PartialEq)]
pub struct Received {
    /// Acknowledge up to here.
    pub ack: u64,
    /// A GPU event not seen before.
    pub event: Option<proto::GpuEvent>,
    /// This stream was superseded by a newer one from the same pod; close it.
    pub superseded: bool,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<GonkaNodeKey, BTreeMap<String, MlNodeReport>>,
    next_connection: u64,
    /// GonkaNodes with changes that only move counters, reconciled at the next flush.
    dirty: BTreeSet<GonkaNodeKey>,
    notify: Option<mpsc::Sender<ObjectRef<GonkaNode>>>,
}

impl Inner {
    fn trigger(&mut self, key: &GonkaNodeKey) {
        self.dirty.remove(key);
        if let Some(notify) = &self.notify {
            // Full means a reconcile is queued for it already, or the controller is behind and
            // its periodic resync catches up: dropping a trigger loses nothing.
            let _ = notify.try_send(ObjectRef::new(&key.1).within(&key.0));
        }
    }
}

/// Cheap to clone; clones share the store.
#[derive(Clone, Default)]
pub struct ReportStore {
    inner: Arc<Mutex<Inner>>,
}

/// Snapshot changes that should show in status at once; the PoC round's valid nonces wait for
/// the next flush, and what status does not show (GPU utilization, temperature) for nothing.
fn significant(before: Option<&proto::Snapshot>, after: &proto::Snapshot) -> bool {
    let Some(before) = before else { return true };
    let gpus = |s: &proto::Snapshot| s.gpus.iter().map(|g| (g.index, g.available)).collect::<Vec<_>>();
    before.state != after.state
        || before.hardware != after.hardware
        || before.nvml_error != after.nvml_error
        || gpus(before) != gpus(after)
        || before.poc.as_ref().and_then(|p| p.block_height) != after.poc.as_ref().and_then(|p| p.block_height)
        || before.inference != after.inference
        // A yield disables the ML node on the network node; its idle time shows in status.
        || before.yielded != after.yielded
}

impl ReportStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// GonkaNodes whose reports changed, for the controller to reconcile. One subscriber: a
    /// second call takes over.
    pub fn changes(&self) -> mpsc::Receiver<ObjectRef<GonkaNode>> {
        let (tx, rx) = mpsc::channel(1024);
        self.lock().notify = Some(tx);
        rx
    }

    /// A stream from `hello`'s pod came up (its identity already checked).
    pub fn connect(&self, gonka_node: GonkaNodeKey, hello: proto::Hello, seq: u64) -> Connection {
        let hello = bounded_hello(hello);
        let mut inner = self.lock();
        inner.next_connection += 1;
        let id = inner.next_connection;
        let now = jiff::Timestamp::now();
        let pods = inner.nodes.entry(gonka_node.clone()).or_default();
        let pod = hello.pod_name.clone();
        match pods.get_mut(&pod) {
            Some(entry) if entry.hello.boot_id == hello.boot_id => {
                entry.seen_before = entry.highest_seq;
                entry.highest_seq = entry.highest_seq.max(seq);
                entry.hello = hello;
                entry.connection = id;
                if !entry.connected {
                    entry.since = now;
                }
                entry.connected = true;
            }
            _ => {
                let entry = MlNodeReport {
                    hello,
                    snapshot: None,
                    connected: true,
                    since: now,
                    connection: id,
                    highest_seq: seq,
                    seen_before: 0,
                };
                pods.insert(pod.clone(), entry);
            }
        }
        inner.trigger(&gonka_node);
        Connection { gonka_node, pod, id }
    }

    /// Takes in one message of `connection`'s stream.
    pub fn receive(&self, connection: &Connection, message: proto::DaemonMessage) -> Received {
        let mut inner = self.lock();
        let Some(entry) = inner.nodes.get_mut(&connection.gonka_node).and_then(|pods| pods.get_mut(&connection.pod))
        else {
            return Received { superseded: true, ..Received::default() };
        };
        if entry.connection != connection.id {
            return Received { superseded: true, ..Received::default() };
        }
        let seq = message.seq;
        let mut received = Received { ack: seq, ..Received::default() };
        // Heartbeats and events change nothing status shows; snapshots may.
        let (mut trigger, mut dirty) = (false, false);
        match message.body {
            Some(Body::Snapshot(snapshot)) => {
                let snapshot = bounded(snapshot);
                trigger = significant(entry.snapshot.as_ref(), &snapshot);
                let nonces = |s: Option<&proto::Snapshot>| s.and_then(|s| s.poc.as_ref()).map(|p| p.nonces_valid);
                // Only what status shows: GPU utilization or temperature moving is no reason.
                dirty = nonces(entry.snapshot.as_ref()) != nonces(Some(&snapshot));
                entry.snapshot = Some(snapshot);
            }
            Some(Body::GpuEvent(event)) if seq > entry.seen_before => received.event = Some(event),
            _ => {}
        }
        entry.highest_seq = entry.highest_seq.max(seq);
        if trigger {
            inner.trigger(&connection.gonka_node);
        } else if dirty {
            inner.dirty.insert(connection.gonka_node.clone());
        }
        received
    }

    /// `connection`'s stream ended; a superseded one changes nothing.
    pub fn disconnect(&self, connection: &Connection) {
        let mut inner = self.lock();
        let Some(entry) = inner.nodes.get_mut(&connection.gonka_node).and_then(|pods| pods.get_mut(&connection.pod))
        else {
            return;
        };
        if entry.connection == connection.id && entry.connected {
            entry.connected = false;
            entry.since = jiff::Timestamp::now();
            inner.trigger(&connection.gonka_node);
        }
    }

    /// Reconciles GonkaNodes whose counters moved since the last flush.
    pub fn flush(&self) {
        let mut inner = self.lock();
        for key in std::mem::take(&mut inner.dirty) {
            inner.trigger(&key);
        }
    }

    /// The reports of a GonkaNode's pods, by pod name.
    pub fn of(&self, gonka_node: &GonkaNodeKey) -> BTreeMap<String, MlNodeReport> {
        self.lock().nodes.get(gonka_node).cloned().unwrap_or_default()
    }

    /// Forgets pods not in `keep` (gone, or not this GonkaNode's any more).
    pub fn prune(&self, gonka_node: &GonkaNodeKey, keep: &BTreeSet<String>) {
        let mut inner = self.lock();
        if let Some(pods) = inner.nodes.get_mut(gonka_node) {
            pods.retain(|pod, _| keep.contains(pod));
            if pods.is_empty() {
                inner.nodes.remove(gonka_node);
            }
        }
    }
}

/// A pod of the GonkaNode, as the fleet summary needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub kubernetes_node: String,
}

/// What the reports say about a GonkaNode's fleet, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    pub ml_nodes: Vec<MlNodeStatus>,
    pub gpus: Vec<GpuCount>,
    pub total_gpus: i32,
    /// Valid nonces of the latest PoC round any ML node reported, summed, and that round.
    pub weight: Option<(i64, i64)>,
}

/// Joins the pods with their reports. A pod that has not reported since this operator started
/// keeps the entry `previous` had for it, as not reporting (the daemon is on its way back), so
/// a restart does not blank the fleet's GPUs.
pub fn fleet(pods: &[PodRef], reports: &BTreeMap<String, MlNodeReport>, previous: &[MlNodeStatus]) -> Fleet {
    let mut ml_nodes = Vec::new();
    for pod in pods {
        match reports.get(&pod.name) {
            Some(report) => ml_nodes.push(ml_node_status(pod, report)),
            None => {
                if let Some(p) = previous.iter().find(|p| p.pod == pod.name) {
                    ml_nodes.push(MlNodeStatus { reporting: false, ..p.clone() });
                }
            }
        }
    }
    ml_nodes.sort_by(|a, b| a.node.cmp(&b.node).then(a.pod.cmp(&b.pod)));

    let mut by_type: BTreeMap<String, i32> = BTreeMap::new();
    for node in &ml_nodes {
        for h in &node.hardware {
            *by_type.entry(h.type_.clone()).or_default() += h.count;
        }
    }
    let mut gpus: Vec<GpuCount> = by_type.into_iter().map(|(type_, count)| GpuCount { type_, count }).collect();
    let total_gpus = gpus.iter().map(|g| g.count).sum();
    gpus.truncate(limits::GPU_MODELS_IN_STATUS);
    let latest = ml_nodes.iter().filter_map(|n| n.poc_block_height).max();
    let weight = latest.map(|height| {
        let nonces =
            ml_nodes.iter().filter(|n| n.poc_block_height == Some(height)).filter_map(|n| n.poc_valid_nonces).sum();
        (nonces, height)
    });
    // The counts above cover every ML node; the list stops where status would grow too large.
    ml_nodes.truncate(limits::ML_NODES_IN_STATUS);
    Fleet { ml_nodes, gpus, total_gpus, weight }
}

fn ml_node_status(pod: &PodRef, report: &MlNodeReport) -> MlNodeStatus {
    let snapshot = report.snapshot.as_ref();
    let poc = snapshot.and_then(|s| s.poc.as_ref());
    MlNodeStatus {
        node: pod.kubernetes_node.clone(),
        pod: pod.name.clone(),
        state: snapshot.map(|s| s.state.clone()).filter(|s| !s.is_empty()),
        gpus: snapshot.map_or(0, |s| s.gpus.len() as i32),
        gpus_available: snapshot.map_or(0, |s| s.gpus.iter().filter(|g| g.available).count() as i32),
        hardware: snapshot.map(|s| hardware(s).into_iter().map(gpu_count).collect()).unwrap_or_default(),
        gpu_error: snapshot.map(|s| s.nvml_error.clone()).filter(|e| !e.is_empty()),
        reporting: report.connected,
        since: Time(report.since),
        poc_block_height: poc.and_then(|p| p.block_height),
        poc_valid_nonces: poc.and_then(|p| p.block_height.map(|_| p.nonces_valid as i64)),
        inference: snapshot.and_then(|s| s.inference.as_ref()).map(|i| MlNodeInference {
            model: i.model.clone(),
            engine: i.engine.clone(),
            instances: i.instances.min(i32::MAX as u32) as i32,
            instances_healthy: i.instances_healthy.min(i32::MAX as u32) as i32,
            restarts: i.restarts.min(i64::MAX as u64) as i64,
            last_error: Some(i.last_error.clone()).filter(|e| !e.is_empty()),
        }),
        yielded: snapshot.and_then(|s| s.yielded.as_ref()).map(|y| MlNodeYield {
            reason: y.reason.clone(),
            since: unix_time(y.since),
            idle_since: (y.idle_since > 0).then(|| unix_time(y.idle_since)),
        }),
    }
}

fn unix_time(seconds: i64) -> Time {
    Time(jiff::Timestamp::from_second(seconds).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

fn gpu_count(h: Hardware) -> GpuCount {
    GpuCount { type_: h.type_, count: h.count as i32 }
}

/// A snapshot's hardware in the admin API's form, sorted.
pub fn hardware(snapshot: &proto::Snapshot) -> Vec<Hardware> {
    let mut hardware: Vec<Hardware> =
        snapshot.hardware.iter().map(|h| Hardware { type_: h.r#type.clone(), count: h.count }).collect();
    hardware.sort();
    hardware
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GonkaNodeKey {
        ("gpu".into(), "h100".into())
    }

    fn hello(pod: &str, boot: &str) -> proto::Hello {
        proto::Hello { gonka_node: "gpu/h100".into(), pod_name: pod.into(), boot_id: boot.into(), ..Default::default() }
    }

    fn snapshot(state: &str, h100s: u32, block: Option<i64>, valid: u64) -> proto::Snapshot {
        proto::Snapshot {
            state: state.into(),
            hardware: vec![proto::HardwareCount { r#type: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: h100s }],
            gpus: (0..h100s).map(|index| proto::Gpu { index, available: true, ..Default::default() }).collect(),
            poc: Some(proto::PocProgress { block_height: block, nonces_valid: valid, ..Default::default() }),
            ..Default::default()
        }
    }

    fn message(seq: u64, body: Body) -> proto::DaemonMessage {
        proto::DaemonMessage { seq, body: Some(body) }
    }

    fn xid(seq: u64) -> proto::DaemonMessage {
        message(seq, Body::GpuEvent(proto::GpuEvent { gpu: 1, xid: 79, class: 3, observed_at: 0 }))
    }

    #[tokio::test]
    async fn significant_changes_trigger_a_reconcile_counters_wait_for_the_flush() {
        let store = ReportStore::default();
        let mut changes = store.changes();
        let c = store.connect(key(), hello("h100-ml-node-a", "boot1"), 1);
        assert_eq!(changes.try_recv().unwrap(), ObjectRef::new("h100").within("gpu"));
        store.receive(&c, message(2, Body::Snapshot(snapshot("STOPPED", 8, None, 0))));
        assert!(changes.try_recv().is_ok(), "first snapshot");
        store.receive(&c, message(3, Body::Snapshot(snapshot("POW", 8, Some(10), 0))));
        assert!(changes.try_recv().is_ok(), "state change");
        let r = store.receive(&c, message(4, Body::Snapshot(snapshot("POW", 8, Some(10), 55))));
        assert_eq!(r.ack, 4);
        assert!(changes.try_recv().is_err(), "counters only: no reconcile yet");
        store.flush();
        assert!(changes.try_recv().is_ok(), "flushed");
        store.receive(&c, message(5, Body::Heartbeat(proto::Heartbeat {})));
        let mut warmer = snapshot("POW", 8, Some(10), 55);
        warmer.gpus[0].temperature_c = Some(80);
        store.receive(&c, message(6, Body::Snapshot(warmer)));
        store.flush();
        assert!(changes.try_recv().is_err(), "heartbeats and a warmer GPU: nothing status shows");
        store.disconnect(&c);
        assert!(changes.try_recv().is_ok(), "disconnect");
        let pods = store.of(&key());
        let entry = &pods["h100-ml-node-a"];
        assert!(!entry.connected);
        assert_eq!(entry.snapshot.as_ref().unwrap().poc.unwrap().nonces_valid, 55);
    }

    #[test]
    fn a_resent_event_is_taken_once_and_a_newer_stream_supersedes_an_older_one() {
        let store = ReportStore::default();
        let first = store.connect(key(), hello("p", "boot1"), 1);
        assert!(store.receive(&first, xid(2)).event.is_some());
        // The ack of 2 was lost: the daemon reconnects and resends it, plus one it never got
        // through (3), after its new hello (4).
        let second = store.connect(key(), hello("p", "boot1"), 4);
        assert!(store.receive(&first, xid(9)).superseded, "the old stream is closed");
        store.disconnect(&first);
        assert!(store.of(&key())["p"].connected, "a superseded stream's end changes nothing");
        assert!(store.receive(&second, xid(2)).event.is_none(), "seen before");
        assert!(store.receive(&second, xid(3)).event.is_some(), "not seen before");
        // A restarted daemon (new boot id) numbers from 1 again.
        let third = store.connect(key(), hello("p", "boot2"), 1);
        assert!(store.receive(&third, xid(2)).event.is_some());
    }

    #[test]
    fn the_fleet_joins_pods_and_reports() {
        let store = ReportStore::default();
        let a = store.connect(key(), hello("pa", "b"), 1);
        store.receive(&a, message(2, Body::Snapshot(snapshot("POW", 8, Some(20), 40))));
        let b = store.connect(key(), hello("pb", "b"), 1);
        store.receive(&b, message(2, Body::Snapshot(snapshot("POW", 4, Some(20), 2))));
        let c = store.connect(key(), hello("pc", "b"), 1);
        store.receive(&c, message(2, Body::Snapshot(snapshot("POW", 8, Some(10), 900))));
        let gone = store.connect(key(), hello("gone", "b"), 1);
        store.receive(&gone, message(2, Body::Snapshot(snapshot("POW", 8, Some(20), 1000))));
        store.disconnect(&b);

        let pod = |name: &str, node: &str| PodRef { name: name.into(), kubernetes_node: node.into() };
        let previous = MlNodeStatus { pod: "pd".into(), node: "gpu-d".into(), reporting: true, ..fleet_entry() };
        let pods = [pod("pa", "gpu-a"), pod("pb", "gpu-b"), pod("pc", "gpu-c"), pod("pd", "gpu-d"), pod("pe", "gpu-e")];
        let f = fleet(&pods, &store.of(&key()), std::slice::from_ref(&previous));
        let nodes: Vec<_> = f.ml_nodes.iter().map(|n| (n.node.as_str(), n.reporting, n.gpus)).collect();
        // pd has not reported since the restart: its previous entry stays, as not reporting; pe
        // never reported.
        assert_eq!(nodes, [("gpu-a", true, 8), ("gpu-b", false, 4), ("gpu-c", true, 8), ("gpu-d", false, 2)]);
        assert_eq!(f.gpus, [GpuCount { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 22 }]);
        assert_eq!(f.total_gpus, 22);
        // The latest round (20) counts: pa and pb, not pc's older round, not the gone pod.
        assert_eq!(f.weight, Some((42, 20)));

        store.prune(&key(), &BTreeSet::from(["pa".to_string()]));
        assert_eq!(store.of(&key()).keys().collect::<Vec<_>>(), ["pa"]);
    }

    #[tokio::test]
    async fn the_engine_and_its_health_reach_status_and_a_change_reconciles_at_once() {
        let store = ReportStore::default();
        let mut changes = store.changes();
        let c = store.connect(key(), hello("pa", "b"), 1);
        let _ = changes.try_recv();
        let mut report = snapshot("INFERENCE", 8, None, 0);
        let serving = proto::Inference {
            model: "MiniMaxAI/MiniMax-M2.7".into(),
            engine: "vllm".into(),
            instances: 4,
            instances_healthy: 4,
            ..Default::default()
        };
        report.inference = Some(serving.clone());
        store.receive(&c, message(2, Body::Snapshot(report.clone())));
        assert!(changes.try_recv().is_ok());
        // An instance crash-looping: status shows it now, with the end of its error.
        let tail = "ValueError: the checkpoint needs --trust-remote-code";
        report.inference = Some(proto::Inference {
            instances_healthy: 3,
            restarts: 6,
            last_error: format!("crash loop: 5 restarts within 600s; last: {}{tail}", "x".repeat(2000)),
            ..serving
        });
        store.receive(&c, message(3, Body::Snapshot(report)));
        assert!(changes.try_recv().is_ok(), "an instance down shows at once");
        let pods = [PodRef { name: "pa".into(), kubernetes_node: "gpu-a".into() }];
        let f = fleet(&pods, &store.of(&key()), &[]);
        let inference = f.ml_nodes[0].inference.clone().unwrap();
        assert_eq!(
            (inference.engine.as_str(), inference.instances, inference.instances_healthy, inference.restarts),
            ("vllm", 4, 3, 6)
        );
        let error = inference.last_error.unwrap();
        assert_eq!(error.chars().count(), limits::INFERENCE_ERROR);
        assert!(error.ends_with(tail), "the end, which says why, is kept: {error}");
    }

    fn fleet_entry() -> MlNodeStatus {
        MlNodeStatus {
            node: String::new(),
            pod: String::new(),
            state: Some("POW".into()),
            gpus: 2,
            gpus_available: 2,
            hardware: vec![GpuCount { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 2 }],
            gpu_error: None,
            reporting: false,
            since: Time(jiff::Timestamp::UNIX_EPOCH),
            poc_block_height: None,
            poc_valid_nonces: None,
            inference: None,
            yielded: None,
        }
    }

    #[tokio::test]
    async fn a_yield_reaches_status_at_once_bounded() {
        let store = ReportStore::default();
        let mut changes = store.changes();
        let c = store.connect(key(), hello("pa", "b"), 1);
        let _ = changes.try_recv();
        // Stopped, and still stopped when it yields: the yield alone must reconcile.
        store.receive(&c, message(2, Body::Snapshot(snapshot("STOPPED", 8, None, 0))));
        let _ = changes.try_recv();
        let pods = [PodRef { name: "pa".into(), kubernetes_node: "gpu-a".into() }];
        assert_eq!(fleet(&pods, &store.of(&key()), &[]).ml_nodes[0].yielded, None);
        let mut report = snapshot("STOPPED", 8, None, 0);
        report.yielded = Some(proto::Yield {
            reason: format!("GPU 1: process 4242 is not this ML node's{}", "x".repeat(1000)),
            since: 1_800_000_000,
            idle_since: 0,
            rejoin_after_idle_seconds: 600,
        });
        store.receive(&c, message(3, Body::Snapshot(report.clone())));
        assert!(changes.try_recv().is_ok(), "a yield reconciles at once: the ML node is disabled");
        let y = fleet(&pods, &store.of(&key()), &[]).ml_nodes[0].yielded.clone().unwrap();
        assert!(y.reason.starts_with("GPU 1: process 4242 is not this ML node's"), "{}", y.reason);
        assert_eq!(y.reason.chars().count(), limits::ERROR);
        assert_eq!((y.since.0.as_second(), y.idle_since), (1_800_000_000, None));
        report.yielded.as_mut().unwrap().idle_since = 1_800_000_100;
        store.receive(&c, message(4, Body::Snapshot(report.clone())));
        assert!(changes.try_recv().is_ok(), "the GPUs going idle shows at once");
        let y = fleet(&pods, &store.of(&key()), &[]).ml_nodes[0].yielded.clone().unwrap();
        assert_eq!(y.idle_since.map(|t| t.0.as_second()), Some(1_800_000_100));
        // Rejoined: enabled again at once.
        report.yielded = None;
        store.receive(&c, message(5, Body::Snapshot(report)));
        assert!(changes.try_recv().is_ok(), "a rejoin reconciles at once");
        assert_eq!(fleet(&pods, &store.of(&key()), &[]).ml_nodes[0].yielded, None);
    }

    #[tokio::test]
    async fn a_daemon_cannot_grow_memory_or_status_by_sending_more() {
        let store = ReportStore::default();
        let huge = "x".repeat(1 << 20);
        let mut greedy = hello("h100-ml-node-a", "boot-1");
        greedy.daemon_version = huge.clone();
        let connection = store.connect(key(), greedy, 0);
        let mut report = snapshot(&huge, 8, Some(3), 10);
        report.nvml_error = huge.clone();
        let long = "y".repeat(1000);
        report.gpus =
            (0..100_000).map(|index| proto::Gpu { index, name: long.clone(), ..Default::default() }).collect();
        report.hardware =
            (0..10_000).map(|i| proto::HardwareCount { r#type: format!("{i}{long}"), count: u32::MAX }).collect();
        store.receive(&connection, message(1, Body::Snapshot(report)));

        let entry = &store.of(&key())["h100-ml-node-a"];
        assert!(entry.hello.daemon_version.len() <= limits::SHORT);
        let kept = entry.snapshot.as_ref().unwrap();
        assert_eq!((kept.gpus.len(), kept.hardware.len()), (limits::GPUS, limits::HARDWARE));
        assert!(kept.gpus.iter().all(|g| g.name.len() <= limits::NAME));
        let pods = [PodRef { name: "h100-ml-node-a".into(), kubernetes_node: "gpu-a".into() }];
        let status = fleet(&pods, &store.of(&key()), &[]);
        let bytes = serde_json::to_vec(&status.ml_nodes).unwrap().len();
        assert!(bytes < 8 << 10, "one ML node's status is {bytes} bytes");
        assert!(status.ml_nodes[0].state.as_ref().unwrap().len() <= limits::SHORT);
    }

    #[test]
    fn status_lists_at_most_so_many_ml_nodes_and_counts_them_all() {
        let reports: BTreeMap<String, MlNodeReport> = (0..1500)
            .map(|i| {
                let pod = format!("pod-{i:04}");
                let report = MlNodeReport {
                    hello: hello(&pod, "b"),
                    snapshot: Some(snapshot("POW", 8, Some(1), 1)),
                    connected: true,
                    since: jiff::Timestamp::UNIX_EPOCH,
                    connection: 0,
                    highest_seq: 0,
                    seen_before: 0,
                };
                (pod, report)
            })
            .collect();
        let pods: Vec<PodRef> =
            reports.keys().map(|p| PodRef { name: p.clone(), kubernetes_node: format!("node-{p}") }).collect();
        let f = fleet(&pods, &reports, &[]);
        assert_eq!((f.ml_nodes.len(), f.total_gpus, f.weight), (limits::ML_NODES_IN_STATUS, 1500 * 8, Some((1500, 1))));
    }
}
