//! Opportunistic mode: the ML node borrows GPUs whose owner may take them back. The daemon
//! samples its GPUs (NVML) and yields when someone else's work is on them — a compute process
//! that is not its own, or utilisation while it runs nothing — and rejoins once they have been
//! idle for the GonkaNode's `rejoinAfterIdleSeconds`.
//!
//! NVML lists processes by host PID, which a container cannot map to its own. So a process is
//! the ML node's own when it first appears on its GPUs while the daemon's own GPU work is
//! starting (a PoC session, a model or a vLLM server coming up or restarting) or within
//! [`ADOPT_WINDOW`] of that; it stays its own for as long as it lives. Any other process is
//! someone else's. A process of other work that starts in that window is taken for the ML
//! node's own: the utilisation rule catches that work once the ML node stops its own.
//!
//! [`Lending`] decides (pure, driven by samples); [`run`] samples and carries the decisions
//! out: the yield is published first (the report stream takes it to the operator, which
//! disables the ML node on the network node), then the daemon hands back what it holds.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use gonka_protocol::ml_node::ServiceState;

use crate::gpu::{GpuActivity, GpuProbe};
use crate::metrics::DaemonMetrics;
use crate::node_state::{DaemonState, Reporting, Yielded};

/// How long after the daemon's own GPU work (re)started a new process on its GPUs is taken
/// for its own: a vLLM server or a PoC session creates its CUDA contexts within it.
pub const ADOPT_WINDOW: Duration = Duration::from_secs(60);

/// How long after its own work stops the ML node does not read utilisation as someone else's:
/// NVML averages utilisation over the last sample period, so the tail of its own work still
/// shows for a moment.
pub const SETTLE: Duration = Duration::from_secs(10);

/// When to yield and when to rejoin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub rejoin_after_idle: Duration,
    /// Utilisation above which a GPU counts as busy while the ML node runs nothing on it.
    pub busy_utilization_percent: u32,
    pub adopt_window: Duration,
}

/// The daemon's own GPU work, as one sample sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnWork {
    /// A PoC session or a model (up or coming up).
    pub running: bool,
    /// Coming up: a model loading, a vLLM server not yet healthy.
    pub starting: bool,
    /// Changes whenever the work changes (a new session, model, server restart).
    pub key: u64,
}

impl OwnWork {
    /// From the daemon's published state.
    pub fn of(state: &DaemonState) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        state.service.as_str().hash(&mut hasher);
        if let Some(i) = &state.inference {
            (&i.model, &i.engine, i.instances, i.restarts).hash(&mut hasher);
        }
        state.poc.block_height.hash(&mut hasher);
        let starting = state.inference.as_ref().is_some_and(|i| i.instances_healthy < i.instances);
        Self { running: state.service != ServiceState::Stopped, starting, key: hasher.finish() }
    }
}

/// What a sample changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Other work is on the GPUs: hand them back.
    Yield { reason: String },
    /// Idle long enough: take work again.
    Rejoin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Working,
    Yielded { reason: String, since: SystemTime, idle_since: Option<(Instant, SystemTime)> },
}

/// The decision, sample by sample.
#[derive(Clone, Debug)]
pub struct Lending {
    policy: Policy,
    state: State,
    /// PIDs taken for the ML node's own, while they live.
    own: BTreeSet<u32>,
    work_key: Option<u64>,
    /// When the own work last changed while running.
    work_started: Option<Instant>,
    /// When the own work was last seen running.
    last_running: Option<Instant>,
}

impl Lending {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            state: State::Working,
            own: BTreeSet::new(),
            work_key: None,
            work_started: None,
            last_running: None,
        }
    }

    /// The yield to publish, `None` while working.
    pub fn yielded(&self) -> Option<Yielded> {
        match &self.state {
            State::Working => None,
            State::Yielded { reason, since, idle_since } => Some(Yielded {
                reason: reason.clone(),
                since: *since,
                idle_since: idle_since.map(|(_, wall)| wall),
                rejoin_after_idle: self.policy.rejoin_after_idle,
            }),
        }
    }

    /// Takes one sample of the GPUs and the own work at `now` (`wall`: the same moment on the
    /// clock status shows).
    pub fn observe(
        &mut self,
        now: Instant,
        wall: SystemTime,
        gpus: &[GpuActivity],
        work: OwnWork,
    ) -> Option<Transition> {
        if self.work_key != Some(work.key) {
            self.work_key = Some(work.key);
            if work.running {
                self.work_started = Some(now);
            }
        }
        let adopting = work.running
            && (work.starting || self.work_started.is_some_and(|t| now.duration_since(t) <= self.policy.adopt_window));
        if work.running {
            self.last_running = Some(now);
        }
        let settled = !work.running && self.last_running.is_none_or(|t| now.duration_since(t) >= SETTLE);
        let busy = self.busy(gpus, adopting, settled);
        match (&mut self.state, busy) {
            (State::Working, Some(reason)) => {
                self.state = State::Yielded { reason: reason.clone(), since: wall, idle_since: None };
                Some(Transition::Yield { reason })
            }
            (State::Working, None) => None,
            (State::Yielded { idle_since, .. }, Some(_)) => {
                *idle_since = None;
                None
            }
            (State::Yielded { idle_since, .. }, None) => {
                let (idle_from, _) = *idle_since.get_or_insert((now, wall));
                if now.duration_since(idle_from) >= self.policy.rejoin_after_idle {
                    self.state = State::Working;
                    Some(Transition::Rejoin)
                } else {
                    None
                }
            }
        }
    }

    /// Why the GPUs are someone else's now, if they are. Keeps the own PIDs current.
    /// `settled`: the ML node runs nothing and has not for [`SETTLE`], so utilisation is
    /// someone else's.
    fn busy(&mut self, gpus: &[GpuActivity], adopting: bool, settled: bool) -> Option<String> {
        let present: BTreeSet<u32> = gpus.iter().flat_map(|g| g.processes.iter().flatten().copied()).collect();
        self.own.retain(|pid| present.contains(pid));
        if adopting {
            self.own.extend(&present);
        }
        let mut reasons = gpus.iter().filter_map(|g| {
            if let Some(pid) = g.processes.iter().flatten().find(|pid| !self.own.contains(pid)) {
                return Some(format!("GPU {}: process {pid} is not this ML node's", g.index));
            }
            let utilization = g.utilization_percent.unwrap_or(0);
            (settled && utilization > self.policy.busy_utilization_percent)
                .then(|| format!("GPU {}: {utilization}% utilised while this ML node runs nothing on it", g.index))
        });
        reasons.next()
    }
}

/// What the daemon does to hand its GPUs back: stop PoC (sending what is pending) and unload
/// the model.
pub type HandBack = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Samples the GPUs every `interval` and carries the decisions out, until dropped.
pub async fn run(
    probe: GpuProbe,
    reporting: Reporting,
    metrics: DaemonMetrics,
    policy: Policy,
    interval: Duration,
    hand_back: HandBack,
) {
    let mut lending = Lending::new(policy);
    let state = reporting.state();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let gpus = {
            let probe = probe.clone();
            match tokio::task::spawn_blocking(move || probe.activity()).await {
                Ok(gpus) => gpus,
                Err(_) => continue,
            }
        };
        let work = OwnWork::of(&state.borrow());
        let transition = lending.observe(Instant::now(), SystemTime::now(), &gpus, work);
        // Published before anything is handed back: the operator disables the ML node on the
        // network node while the daemon still finishes what it can.
        let yielded = lending.yielded();
        reporting.update_state(|s| s.yielded = yielded);
        match transition {
            Some(Transition::Yield { reason }) => {
                tracing::warn!(%reason, "yielding the GPUs to other work");
                metrics.lending(true);
                hand_back().await;
            }
            Some(Transition::Rejoin) => {
                tracing::info!(idle = ?policy.rejoin_after_idle, "the GPUs are idle: taking work again");
                metrics.lending(false);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        rejoin_after_idle: Duration::from_secs(600),
        busy_utilization_percent: 10,
        adopt_window: Duration::from_secs(60),
    };

    fn gpu(index: u32, pids: &[u32], utilization: u32) -> GpuActivity {
        GpuActivity { index, processes: Some(pids.to_vec()), utilization_percent: Some(utilization) }
    }

    const IDLE: OwnWork = OwnWork { running: false, starting: false, key: 0 };
    const SERVING: OwnWork = OwnWork { running: true, starting: false, key: 1 };

    struct Clock {
        start: Instant,
        wall: SystemTime,
    }

    impl Clock {
        fn new() -> Self {
            Self { start: Instant::now(), wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) }
        }

        fn at(&self, secs: u64) -> (Instant, SystemTime) {
            (self.start + Duration::from_secs(secs), self.wall + Duration::from_secs(secs))
        }
    }

    fn observe(l: &mut Lending, clock: &Clock, secs: u64, gpus: &[GpuActivity], work: OwnWork) -> Option<Transition> {
        let (now, wall) = clock.at(secs);
        l.observe(now, wall, gpus, work)
    }

    #[test]
    fn processes_that_come_with_its_own_work_are_its_own_for_life() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        assert_eq!(observe(&mut l, &clock, 0, &[gpu(0, &[], 0), gpu(1, &[], 0)], IDLE), None);
        // A model comes up: its server's processes appear over the next minute.
        assert_eq!(observe(&mut l, &clock, 5, &[gpu(0, &[], 0), gpu(1, &[], 0)], SERVING), None);
        assert_eq!(observe(&mut l, &clock, 50, &[gpu(0, &[100], 90), gpu(1, &[101], 90)], SERVING), None);
        // Long after, still its own, busy as they are.
        assert_eq!(observe(&mut l, &clock, 4000, &[gpu(0, &[100], 95), gpu(1, &[101], 95)], SERVING), None);
        assert_eq!(l.yielded(), None);
    }

    #[test]
    fn a_process_that_is_not_its_own_makes_it_yield() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[], 0)], SERVING);
        observe(&mut l, &clock, 10, &[gpu(0, &[100], 90)], SERVING);
        // Past the window, a stranger on the GPU.
        let t = observe(&mut l, &clock, 61, &[gpu(0, &[100, 4242], 99)], SERVING);
        assert_eq!(t, Some(Transition::Yield { reason: "GPU 0: process 4242 is not this ML node's".into() }));
        let y = l.yielded().unwrap();
        assert_eq!((y.since, y.idle_since), (clock.at(61).1, None));
        // Already yielded: no second transition.
        assert_eq!(observe(&mut l, &clock, 62, &[gpu(0, &[100, 4242], 99)], SERVING), None);
    }

    #[test]
    fn the_window_is_measured_from_the_last_change_of_its_own_work() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[], 0)], SERVING);
        // 60 s after: still in the window (boundary included).
        assert_eq!(observe(&mut l, &clock, 60, &[gpu(0, &[100], 0)], SERVING), None);
        // A vLLM server restarts (the key changes) long after: its new process is adopted.
        let restarted = OwnWork { key: 2, ..SERVING };
        assert_eq!(observe(&mut l, &clock, 500, &[gpu(0, &[100], 0)], restarted), None);
        assert_eq!(observe(&mut l, &clock, 520, &[gpu(0, &[100, 101], 0)], restarted), None);
        // A model still coming up keeps the window open, however long it loads.
        let loading = OwnWork { key: 3, starting: true, ..SERVING };
        observe(&mut l, &clock, 1000, &[gpu(0, &[], 0)], loading);
        assert_eq!(observe(&mut l, &clock, 1900, &[gpu(0, &[102], 0)], loading), None);
        // Not running, nothing is adopted: the same PID seen first now is a stranger.
        let mut fresh = Lending::new(POLICY);
        assert!(matches!(observe(&mut fresh, &clock, 0, &[gpu(0, &[100], 0)], IDLE), Some(Transition::Yield { .. })));
    }

    #[test]
    fn a_pid_that_went_away_is_forgotten() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[100], 0)], SERVING);
        observe(&mut l, &clock, 100, &[gpu(0, &[], 0)], SERVING);
        // The PID is reused by someone else's process later: a stranger.
        assert!(matches!(observe(&mut l, &clock, 200, &[gpu(0, &[100], 0)], SERVING), Some(Transition::Yield { .. })));
    }

    #[test]
    fn utilisation_counts_only_while_it_runs_nothing() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        // Serving: its own work explains any utilisation.
        assert_eq!(observe(&mut l, &clock, 0, &[gpu(0, &[], 100)], SERVING), None);
        // Stopped: at the threshold is idle, above it is someone else's (a process NVML can't
        // show, e.g. in another container of a shared GPU).
        assert_eq!(observe(&mut l, &clock, 10, &[gpu(0, &[], 10)], IDLE), None);
        let t = observe(&mut l, &clock, 20, &[gpu(0, &[], 0), gpu(1, &[], 11)], IDLE);
        assert_eq!(
            t,
            Some(Transition::Yield { reason: "GPU 1: 11% utilised while this ML node runs nothing on it".into() })
        );
        // A driver that lists no processes still has utilisation.
        let mut old = Lending::new(POLICY);
        let blind = GpuActivity { index: 0, processes: None, utilization_percent: Some(50) };
        assert!(matches!(observe(&mut old, &clock, 0, &[blind], IDLE), Some(Transition::Yield { .. })));
    }

    #[test]
    fn the_tail_of_its_own_work_is_not_someone_elses_utilisation() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[], 95)], SERVING);
        // Its work stopped after 100 s; NVML still averages some of it in.
        observe(&mut l, &clock, 100, &[gpu(0, &[], 95)], SERVING);
        assert_eq!(observe(&mut l, &clock, 101, &[gpu(0, &[], 80)], IDLE), None);
        assert_eq!(observe(&mut l, &clock, 109, &[gpu(0, &[], 40)], IDLE), None);
        // Settled (10 s after it last ran): utilisation now is someone else's.
        assert!(matches!(observe(&mut l, &clock, 110, &[gpu(0, &[], 40)], IDLE), Some(Transition::Yield { .. })));
        // A process is someone else's at once, settled or not.
        let mut l = Lending::new(POLICY);
        observe(&mut l, &clock, 0, &[gpu(0, &[], 0)], SERVING);
        observe(&mut l, &clock, 100, &[gpu(0, &[], 0)], SERVING);
        assert!(matches!(observe(&mut l, &clock, 101, &[gpu(0, &[9], 0)], IDLE), Some(Transition::Yield { .. })));
    }

    #[test]
    fn it_rejoins_after_the_gpus_stayed_idle_for_the_whole_time() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[], 0)], IDLE);
        assert!(observe(&mut l, &clock, 1, &[gpu(0, &[4242], 80)], IDLE).is_some());
        // The other work ends at 100 s...
        assert_eq!(observe(&mut l, &clock, 100, &[gpu(0, &[], 0)], IDLE), None);
        assert_eq!(l.yielded().unwrap().idle_since, Some(clock.at(100).1));
        // ...and comes back at 400 s: the idle time starts over.
        assert_eq!(observe(&mut l, &clock, 400, &[gpu(0, &[4343], 70)], IDLE), None);
        assert_eq!(l.yielded().unwrap().idle_since, None);
        assert_eq!(observe(&mut l, &clock, 500, &[gpu(0, &[], 0)], IDLE), None);
        // One second short of 600 s idle: still yielded; at 600 s: rejoins.
        assert_eq!(observe(&mut l, &clock, 1099, &[gpu(0, &[], 0)], IDLE), None);
        assert_eq!(observe(&mut l, &clock, 1100, &[gpu(0, &[], 0)], IDLE), Some(Transition::Rejoin));
        assert_eq!(l.yielded(), None);
    }

    #[test]
    fn its_own_processes_winding_down_do_not_keep_it_yielded() {
        let (clock, mut l) = (Clock::new(), Lending::new(POLICY));
        observe(&mut l, &clock, 0, &[gpu(0, &[100], 90)], SERVING);
        assert!(observe(&mut l, &clock, 100, &[gpu(0, &[100, 4242], 99)], SERVING).is_some());
        // It handed back (stopped); the stranger left; its own process still exits.
        observe(&mut l, &clock, 110, &[gpu(0, &[100], 0)], IDLE);
        assert_eq!(l.yielded().unwrap().idle_since, Some(clock.at(110).1));
        assert_eq!(observe(&mut l, &clock, 710, &[gpu(0, &[], 0)], IDLE), Some(Transition::Rejoin));
    }
}
