//! Runs a [`plan`](super::plan)'s vLLM instances and keeps them serving: each one in a process
//! group of its own (so its engine processes go with it), its output in the daemon's log under
//! its name, checked every [`Supervision::health_interval`] (`/health` for routing, `/metrics`
//! for the hang watch, the PoC plugin's status), restarted with backoff when it dies or hangs
//! after start-up, given up on past the crash-loop limit. Stopping sends SIGTERM to the group,
//! then SIGKILL; nothing it started outlives [`VllmServer::stop`].
//!
//! Start-up is upstream's: the start succeeds once every instance answers `/health` and its
//! metrics; an instance that exits or times out before that fails the whole start (no
//! restart), naming its last lines of output.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::heartbeat::{Beat, Watch};
use super::plan::InstancePlan;

/// How instances are watched and restarted.
#[derive(Clone, Debug)]
pub struct Supervision {
    /// Between checks (upstream 2 s).
    pub health_interval: Duration,
    /// A busy instance without a scheduler step this long is hung (`MLNODE_HANG_GRACE_SEC`,
    /// upstream 120 s; zero: never).
    pub hang_grace: Duration,
    /// Longest an instance may take to serve (`VLLM_RUNNER_TIMEOUT`, upstream 1200 s).
    pub startup_timeout: Duration,
    /// SIGTERM to SIGKILL (upstream 20 s).
    pub termination_timeout: Duration,
    /// First wait before a restart; doubled each time up to [`Self::restart_backoff_max`].
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// More restarts than this within [`Self::crash_loop_window`]: the instance is given up.
    pub crash_loop_restarts: usize,
    pub crash_loop_window: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_secs(2),
            hang_grace: Duration::from_secs(120),
            startup_timeout: Duration::from_secs(1200),
            termination_timeout: Duration::from_secs(20),
            restart_backoff: Duration::from_secs(2),
            restart_backoff_max: Duration::from_secs(60),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(600),
        }
    }
}

/// Lines of an instance's output kept for error messages.
const TAIL_LINES: usize = 20;
/// Lines of that tail an error message quotes.
const ERROR_LINES: usize = 8;
/// Per-request limits of the checks.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const METRICS_TIMEOUT: Duration = Duration::from_secs(3);

/// Where an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Process started, not serving yet.
    Starting,
    /// Answers `/health`: takes traffic.
    Healthy,
    /// Running, but `/health` fails: takes no traffic.
    Unhealthy,
    /// Died or hung; waiting to start again.
    Restarting,
    /// Given up (crash loop, or a failed start-up).
    Failed,
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// What an instance shows of itself (`/api/v1/inference/instances`, metrics, reports).
#[derive(Clone, Debug, Serialize)]
pub struct InstanceReport {
    pub index: usize,
    pub port: u16,
    pub gpus: Vec<u32>,
    pub phase: Phase,
    /// The vLLM server's process (its process group has the same id).
    pub pid: Option<u32>,
    pub restarts: u64,
    /// Why it last ended, with its last lines of output.
    pub last_error: Option<String>,
    /// Requests queued and running in vLLM (its scheduler's gauges).
    pub requests_waiting: Option<f64>,
    pub requests_running: Option<f64>,
    /// The PoC plugin's state on this instance (`IDLE`, `GENERATING`, ...; empty when unknown).
    pub poc_status: String,
    /// Nonces the plugin computed in the current round.
    pub poc_processed: u64,
}

pub struct Instance {
    pub plan: InstancePlan,
    report: Mutex<InstanceReport>,
    /// Requests the proxy has in flight here (least-connections picking).
    in_flight: AtomicUsize,
    tail: Mutex<VecDeque<String>>,
}

impl Instance {
    fn new(plan: InstancePlan) -> Self {
        let report = InstanceReport {
            index: plan.index,
            port: plan.port,
            gpus: plan.gpus.clone(),
            phase: Phase::Starting,
            pid: None,
            restarts: 0,
            last_error: None,
            requests_waiting: None,
            requests_running: None,
            poc_status: String::new(),
            poc_processed: 0,
        };
        Self { plan, report: Mutex::new(report), in_flight: AtomicUsize::new(0), tail: Mutex::new(VecDeque::new()) }
    }

    pub fn port(&self) -> u16 {
        self.plan.port
    }

    /// `http://host:port`, where it serves.
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.plan.host, self.plan.port)
    }

    pub fn is_healthy(&self) -> bool {
        self.report.lock().expect("report").phase == Phase::Healthy
    }

    pub fn report(&self) -> InstanceReport {
        self.report.lock().expect("report").clone()
    }

    fn update(&self, f: impl FnOnce(&mut InstanceReport)) {
        f(&mut self.report.lock().expect("report"));
    }

    fn set_phase(&self, phase: Phase) {
        self.update(|r| r.phase = phase);
    }

    fn remember(&self, line: String) {
        let mut tail = self.tail.lock().expect("tail");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// The last lines of output, for an error message.
    fn last_lines(&self) -> String {
        let tail = self.tail.lock().expect("tail");
        let skip = tail.len().saturating_sub(ERROR_LINES);
        tail.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Counts a proxied request until the returned guard drops.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Lease(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// A request in flight on an instance.
pub struct Lease(Arc<Instance>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The instances serving one model.
pub struct VllmServer {
    /// The model as requested (upstream's `loaded_model`).
    pub model: String,
    /// The name its OpenAI API answers to.
    pub served_name: String,
    pub instances: Vec<Arc<Instance>>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Round-robin position for PoC `generate`.
    next_generate: AtomicUsize,
}

impl VllmServer {
    /// Starts every instance of `plans`; the returned future ends when all serve (`Ok`) or one
    /// failed its start-up (`Err`, naming why; call [`Self::stop`] then).
    pub fn start(
        model: String,
        served_name: String,
        plans: Vec<InstancePlan>,
        supervision: Supervision,
        http: reqwest::Client,
    ) -> (Arc<Self>, impl std::future::Future<Output = Result<(), String>> + Send + 'static) {
        let stop = CancellationToken::new();
        let instances: Vec<_> = plans.into_iter().map(|p| Arc::new(Instance::new(p))).collect();
        let mut started = Vec::new();
        let mut tasks = Vec::new();
        for instance in &instances {
            let (tx, rx) = oneshot::channel();
            started.push(rx);
            tasks.push(tokio::spawn(supervise(instance.clone(), supervision.clone(), http.clone(), stop.clone(), tx)));
        }
        let server = Arc::new(Self {
            model,
            served_name,
            instances,
            stop,
            tasks: Mutex::new(tasks),
            next_generate: AtomicUsize::new(0),
        });
        let all_started = async move {
            // The first failure decides; a dropped sender is an instance stopped first.
            let mut pending: futures::stream::FuturesUnordered<_> = started.into_iter().collect();
            use futures::StreamExt;
            while let Some(outcome) = pending.next().await {
                outcome.map_err(|_| "stopped while starting".to_string())??;
            }
            Ok(())
        };
        (server, all_started)
    }

    /// Instances taking traffic, in port order.
    pub fn healthy(&self) -> Vec<Arc<Instance>> {
        self.instances.iter().filter(|i| i.is_healthy()).cloned().collect()
    }

    /// The healthy instance with the fewest requests in flight (upstream's least-connections).
    pub fn least_loaded(&self) -> Option<Arc<Instance>> {
        self.healthy().into_iter().min_by_key(|i| i.in_flight())
    }

    /// The next healthy instance in turn (upstream's round-robin for PoC `generate`).
    pub fn next_for_generate(&self) -> Option<Arc<Instance>> {
        let healthy = self.healthy();
        (!healthy.is_empty())
            .then(|| healthy[self.next_generate.fetch_add(1, Ordering::SeqCst) % healthy.len()].clone())
    }

    pub fn instance_on(&self, port: u16) -> Option<Arc<Instance>> {
        self.instances.iter().find(|i| i.port() == port).cloned()
    }

    pub fn reports(&self) -> Vec<InstanceReport> {
        self.instances.iter().map(|i| i.report()).collect()
    }

    /// A new PoC round: the instances' nonce counts start from zero.
    pub fn reset_poc_counts(&self) {
        for i in &self.instances {
            i.update(|r| r.poc_processed = 0);
        }
    }

    /// Nonces the plugin computed in the current round, over the instances.
    pub fn poc_processed(&self) -> u64 {
        self.reports().iter().map(|r| r.poc_processed).sum()
    }

    /// The instances' health in one value, for the operator's status: how many serve, how
    /// often they restarted, and the error of one that is down (a failed one first).
    pub fn summary(&self) -> crate::node_state::InferenceState {
        let reports = self.reports();
        let error_of = |wanted: &dyn Fn(Phase) -> bool| {
            reports.iter().filter(|r| wanted(r.phase)).find_map(|r| r.last_error.clone())
        };
        crate::node_state::InferenceState {
            model: self.model.clone(),
            engine: "vllm".into(),
            instances: reports.len() as u32,
            instances_healthy: reports.iter().filter(|r| r.phase == Phase::Healthy).count() as u32,
            restarts: reports.iter().map(|r| r.restarts).sum(),
            last_error: error_of(&|p| p == Phase::Failed).or_else(|| error_of(&|p| p != Phase::Healthy)),
        }
    }

    /// The instances as the metrics show them.
    pub fn samples(&self) -> Vec<crate::metrics::VllmInstanceSample> {
        self.reports()
            .into_iter()
            .map(|r| crate::metrics::VllmInstanceSample {
                index: r.index,
                phase: r.phase.as_str(),
                restarts: r.restarts,
                requests_waiting: r.requests_waiting,
                requests_running: r.requests_running,
            })
            .collect()
    }

    /// Stops every instance (SIGTERM to each group, SIGKILL after the termination timeout)
    /// and waits until they are gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks"));
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        // Supervisors stop their processes when cancelled, even if nobody awaits them.
        self.stop.cancel();
    }
}

/// How one run of an instance's process ended.
enum Ended {
    Stopped,
    /// Exited, hung or never came up; cleaned up. The message names why.
    Failed(String),
}

async fn supervise(
    instance: Arc<Instance>,
    supervision: Supervision,
    http: reqwest::Client,
    stop: CancellationToken,
    started: oneshot::Sender<Result<(), String>>,
) {
    let mut started = Some(started);
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut backoff = supervision.restart_backoff;
    if !pause(instance.plan.delay, &stop).await {
        instance.set_phase(Phase::Stopped);
        return;
    }
    loop {
        let run_began = Instant::now();
        let reason = match run_once(&instance, &supervision, &http, &stop, &mut started).await {
            Ended::Stopped => {
                instance.set_phase(Phase::Stopped);
                return;
            }
            Ended::Failed(reason) => reason,
        };
        tracing::error!(instance = instance.plan.index, port = instance.port(), error = %reason, "vLLM instance ended");
        instance.update(|r| {
            r.last_error = Some(reason.clone());
            r.pid = None;
        });
        if let Some(started) = started.take() {
            // Upstream's start-up: a failure fails the start, no restart.
            instance.set_phase(Phase::Failed);
            let _ = started.send(Err(reason));
            return;
        }
        let now = Instant::now();
        if now.duration_since(run_began) > supervision.crash_loop_window {
            backoff = supervision.restart_backoff;
        }
        restarts.retain(|t| now.duration_since(*t) < supervision.crash_loop_window);
        if restarts.len() >= supervision.crash_loop_restarts {
            tracing::error!(
                instance = instance.plan.index,
                restarts = restarts.len(),
                "vLLM instance is crash-looping; given up (inference/down and up start it again)"
            );
            instance.set_phase(Phase::Failed);
            instance.update(|r| {
                r.last_error = Some(format!(
                    "crash loop: {} restarts within {:?}; last: {reason}",
                    restarts.len(),
                    supervision.crash_loop_window
                ));
            });
            return;
        }
        restarts.push_back(now);
        instance.set_phase(Phase::Restarting);
        instance.update(|r| r.restarts += 1);
        if !pause(backoff, &stop).await {
            instance.set_phase(Phase::Stopped);
            return;
        }
        backoff = (backoff * 2).min(supervision.restart_backoff_max);
    }
}

/// Sleeps `d` unless stopped first; false when stopped.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

async fn run_once(
    instance: &Arc<Instance>,
    supervision: &Supervision,
    http: &reqwest::Client,
    stop: &CancellationToken,
    started: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> Ended {
    let plan = &instance.plan;
    let mut command = tokio::process::Command::new(&plan.program);
    command
        .args(&plan.args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        // The wrapper's check that its parent is still this daemon.
        .env("GONKA_NODE_DAEMON_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: the engine processes vLLM starts are signalled with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Ended::Failed(format!("starting {}: {e}", plan.program.display())),
    };
    let pid = child.id();
    instance.set_phase(Phase::Starting);
    instance.update(|r| r.pid = pid);
    tracing::info!(instance = plan.index, port = plan.port, pid, gpus = ?plan.gpus, "vLLM instance started");
    let stdout = child.stdout.take().map(|s| Box::new(s) as OutputStream);
    let stderr = child.stderr.take().map(|s| Box::new(s) as OutputStream);
    for stream in [stdout, stderr].into_iter().flatten() {
        tokio::spawn(forward_lines(instance.clone(), stream));
    }
    let group = pid.and_then(|p| Pid::from_raw(p as i32));
    let base = instance.base_url();
    let spawned = Instant::now();
    let mut watch = Watch::new(supervision.hang_grace);
    let mut tick = tokio::time::interval(supervision.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            status = child.wait() => {
                instance.set_phase(Phase::Unhealthy);
                // Its engine processes may outlive it: the group goes too.
                terminate_group(group, &mut child, Duration::from_secs(2)).await;
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Ended::Failed(format!("vLLM process exited prematurely ({status}): {}", instance.last_lines()));
            }
            _ = stop.cancelled() => {
                instance.set_phase(Phase::Stopped);
                terminate_group(group, &mut child, supervision.termination_timeout).await;
                return Ended::Stopped;
            }
            _ = tick.tick() => {}
        }
        let healthy = get(http, &format!("{base}/health"), HEALTH_TIMEOUT).await.is_some_and(|(s, _)| s == 200);
        let beat = match get(http, &format!("{base}/metrics"), METRICS_TIMEOUT).await {
            Some((200, text)) => Beat::parse(&text),
            _ => Beat::default(),
        };
        let hung = watch.check(beat, Instant::now());
        instance.update(|r| {
            r.requests_waiting = beat.waiting;
            r.requests_running = beat.running;
        });
        if hung {
            instance.set_phase(Phase::Unhealthy);
            tracing::error!(instance = plan.index, port = plan.port, "vLLM instance hung: killing its process group");
            kill_group(group, Signal::KILL);
            let _ = child.wait().await;
            terminate_group(group, &mut child, Duration::from_secs(2)).await;
            return Ended::Failed(format!(
                "hung: no scheduler step for over {:?} with {} running and {} waiting requests",
                supervision.hang_grace,
                beat.running.map_or("?".into(), |n| n.to_string()),
                beat.waiting.map_or("?".into(), |n| n.to_string()),
            ));
        }
        let serving = healthy && watch.seen();
        if !watch.seen() && spawned.elapsed() > supervision.startup_timeout {
            instance.set_phase(Phase::Unhealthy);
            terminate_group(group, &mut child, supervision.termination_timeout).await;
            return Ended::Failed(format!(
                "vLLM failed to start within {:?}: {}",
                supervision.startup_timeout,
                instance.last_lines()
            ));
        }
        instance.set_phase(if serving {
            Phase::Healthy
        } else if watch.seen() {
            Phase::Unhealthy
        } else {
            Phase::Starting
        });
        if serving {
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            poll_poc_status(instance, http).await;
        }
    }
}

/// The PoC plugin's `/api/v1/pow/status` (upstream's proxy polls it with `/health`): its state
/// and the round's nonces (kept once the round ends).
pub async fn poll_poc_status(instance: &Instance, http: &reqwest::Client) {
    let answer = get(http, &format!("{}/api/v1/pow/status", instance.base_url()), HEALTH_TIMEOUT).await;
    let parsed =
        answer.filter(|(s, _)| *s == 200).and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
    instance.update(|r| match &parsed {
        Some(v) => {
            r.poc_status = v.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();
            r.poc_processed =
                v.pointer("/stats/total_processed").and_then(serde_json::Value::as_u64).unwrap_or(r.poc_processed);
        }
        None => r.poc_status.clear(),
    });
}

/// `GET url`: status and body, `None` when it failed or took longer than `timeout`.
async fn get(http: &reqwest::Client, url: &str, timeout: Duration) -> Option<(u16, String)> {
    let response = http.get(url).timeout(timeout).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

fn kill_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        // ESRCH: already gone.
        let _ = rustix::process::kill_process_group(group, signal);
    }
}

/// SIGTERM to the group (SIGCONT too, so a stopped group can act on it), then SIGKILL to
/// whatever of it is left after `timeout`; the process itself is reaped.
async fn terminate_group(group: Option<Pid>, child: &mut tokio::process::Child, timeout: Duration) {
    kill_group(group, Signal::TERM);
    kill_group(group, Signal::CONT);
    let deadline = tokio::time::Instant::now() + timeout;
    let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    // The group empties as its members exit (orphans are reaped by init).
    while let Some(g) = group
        && rustix::process::test_kill_process_group(g).is_ok()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill_group(group, Signal::KILL);
    let _ = child.kill().await;
}

/// Either output stream of the child, as one reader type.
type OutputStream = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// The instance's output into the daemon's log, named, and into its tail.
async fn forward_lines(instance: Arc<Instance>, stream: OutputStream) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "vllm", instance = instance.plan.index, port = instance.plan.port, "{line}");
        instance.remember(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(index: usize, phase: Phase, restarts: u64, error: Option<&str>) -> Arc<Instance> {
        let plan = InstancePlan {
            index,
            host: "127.0.0.1".into(),
            port: 5001 + index as u16,
            gpus: vec![index as u32],
            delay: Duration::ZERO,
            program: "python3".into(),
            args: Vec::new(),
            env: Vec::new(),
        };
        let instance = Instance::new(plan);
        instance.set_phase(phase);
        instance.update(|r| {
            r.restarts = restarts;
            r.last_error = error.map(str::to_string);
        });
        Arc::new(instance)
    }

    fn server(instances: Vec<Arc<Instance>>) -> VllmServer {
        VllmServer {
            model: "MiniMaxAI/MiniMax-M2.7".into(),
            served_name: "MiniMaxAI/MiniMax-M2.7".into(),
            instances,
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            next_generate: AtomicUsize::new(0),
        }
    }

    #[test]
    fn the_summary_counts_serving_instances_and_names_a_failed_ones_error_first() {
        let s = server(vec![
            instance(0, Phase::Healthy, 1, Some("exited prematurely (signal: 9)")),
            instance(1, Phase::Restarting, 2, Some("hung: no scheduler step")),
            instance(2, Phase::Failed, 5, Some("crash loop: 5 restarts")),
            instance(3, Phase::Healthy, 0, None),
        ]);
        let summary = s.summary();
        assert_eq!((summary.instances, summary.instances_healthy, summary.restarts), (4, 2, 8));
        assert_eq!(summary.last_error.as_deref(), Some("crash loop: 5 restarts"));
        assert_eq!(summary.engine, "vllm");
        // Nothing failed: the error of one that is down; all serving: the healthy ones' old
        // errors say nothing now.
        let s = server(vec![instance(0, Phase::Restarting, 1, Some("hung")), instance(1, Phase::Healthy, 0, None)]);
        assert_eq!(s.summary().last_error.as_deref(), Some("hung"));
        let s = server(vec![instance(0, Phase::Healthy, 1, Some("old")), instance(1, Phase::Healthy, 0, None)]);
        assert_eq!(s.summary().last_error, None);
        // Least-loaded and round-robin pick only healthy instances.
        let s = server(vec![
            instance(0, Phase::Failed, 0, None),
            instance(1, Phase::Healthy, 0, None),
            instance(2, Phase::Healthy, 0, None),
        ]);
        let _lease = s.instances[1].lease();
        assert_eq!(s.least_loaded().unwrap().port(), 5003);
        let turns: Vec<u16> = (0..4).map(|_| s.next_for_generate().unwrap().port()).collect();
        assert_eq!(turns, [5002, 5003, 5002, 5003]);
    }
}
