//! What the ML node knows of itself, as values anything can subscribe to: the GPU inventory
//! and the daemon's state (current values, so a subscriber that connects or reconnects gets
//! the whole picture at once) and events (XIDs, as they happen). The report stream to the
//! operator ([`crate::report_client`]) is one subscriber; anything else that watches an ML node
//! can be another.

use gonka_protocol::ml_node::{DriverInfo, GpuDevice, ServiceState};
use tokio::sync::{broadcast, watch};

use crate::gpu::{self, GpuProbe, XidClass};

/// The node's GPUs, as `/gpu/devices` shows them, plus upstream's hardware strings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inventory {
    pub devices: Vec<GpuDevice>,
    /// `("<NVML name> | <N>GB", count)` of the available GPUs.
    pub hardware: Vec<(String, u32)>,
    pub driver: Option<DriverInfo>,
    /// Why there are no GPUs, when NVML is unavailable.
    pub nvml_error: Option<String>,
}

impl Inventory {
    /// Probes now (blocking).
    pub fn probe(probe: &GpuProbe) -> Self {
        let gpus = probe.snapshot();
        Self {
            devices: gpus.iter().map(gpu::GpuStatus::to_device).collect(),
            hardware: gpu::hardware(&gpus),
            driver: probe.driver().ok(),
            nvml_error: probe.unavailable_reason().map(str::to_string),
        }
    }
}

/// PoC progress of the current (or last) round; a new round starts from zero. In PoC v1 the
/// valid nonces are proofs (`dist < r_target`); in PoC v2 every computed nonce is an
/// artifact, so valid counts the artifacts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PocCounters {
    /// Block height of the PoC round the session is for.
    pub block_height: Option<i64>,
    pub nonces_computed: u64,
    pub nonces_valid: u64,
    pub batches_sent: u64,
    pub send_failures: u64,
    pub pending_batches: u64,
}

/// The served model's engine and health (the operator's status shows it per ML node).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceState {
    pub model: String,
    /// `native` or `vllm`.
    pub engine: String,
    /// vLLM servers (one for the native engine), and the ones serving.
    pub instances: u32,
    pub instances_healthy: u32,
    /// vLLM restarts since the model came up.
    pub restarts: u64,
    /// Why the start-up or the last vLLM server failed.
    pub last_error: Option<String>,
}

/// An opportunistic ML node that has handed its GPUs back to other work
/// ([`crate::lending`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Yielded {
    /// What the daemon saw, e.g. `GPU 1: process 4242 is not this ML node's`.
    pub reason: String,
    pub since: std::time::SystemTime,
    /// Since when the GPUs are idle; `None` while other work holds them.
    pub idle_since: Option<std::time::SystemTime>,
    /// How long they must stay idle before the ML node rejoins.
    pub rejoin_after_idle: std::time::Duration,
}

/// The daemon's state: which manager runs, PoC progress, what serves the model.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonState {
    pub service: ServiceState,
    pub poc: PocCounters,
    /// `None` while no model is up or coming up (and none failed to).
    pub inference: Option<InferenceState>,
    /// Set while the GPUs are handed back (opportunistic mode): the ML node takes no work.
    pub yielded: Option<Yielded>,
}

impl Default for DaemonState {
    fn default() -> Self {
        Self { service: ServiceState::Stopped, poc: PocCounters::default(), inference: None, yielded: None }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Xid { gpu: u32, code: u64, class: XidClass },
}

/// The hook. Cheap to clone; every clone publishes to the same subscribers.
#[derive(Clone)]
pub struct Reporting {
    inventory: watch::Sender<Inventory>,
    state: watch::Sender<DaemonState>,
    events: broadcast::Sender<Event>,
}

impl Default for Reporting {
    fn default() -> Self {
        Self {
            inventory: watch::Sender::new(Inventory::default()),
            state: watch::Sender::new(DaemonState::default()),
            events: broadcast::Sender::new(256),
        }
    }
}

impl Reporting {
    pub fn inventory(&self) -> watch::Receiver<Inventory> {
        self.inventory.subscribe()
    }

    pub fn state(&self) -> watch::Receiver<DaemonState> {
        self.state.subscribe()
    }

    /// Events from now on; a subscriber that falls behind by more than 256 is told how many
    /// it missed (`RecvError::Lagged`), never blocks the daemon.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Publishes a new inventory, waking subscribers only when it changed.
    pub fn set_inventory(&self, inventory: Inventory) {
        self.inventory.send_if_modified(|current| {
            let changed = *current != inventory;
            *current = inventory;
            changed
        });
    }

    pub fn update_state(&self, update: impl FnOnce(&mut DaemonState)) {
        self.state.send_if_modified(|current| {
            let before = current.clone();
            update(current);
            *current != before
        });
    }

    pub fn event(&self, event: Event) {
        // No subscriber is fine: nobody is listening yet.
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_see_current_values_and_only_real_changes() {
        let r = Reporting::default();
        let mut state = r.state();
        r.update_state(|s| s.service = ServiceState::Pow);
        assert!(state.has_changed().unwrap());
        assert_eq!(state.borrow_and_update().service, ServiceState::Pow);
        r.update_state(|s| s.service = ServiceState::Pow);
        assert!(!state.has_changed().unwrap(), "no change, no wake-up");

        // A late subscriber gets the current inventory at once.
        r.set_inventory(Inventory { hardware: vec![("NVIDIA H100 80GB HBM3 | 79GB".into(), 8)], ..Default::default() });
        assert_eq!(r.inventory().borrow().hardware[0].1, 8);

        let mut events = r.events();
        r.event(Event::Xid { gpu: 3, code: 48, class: XidClass::NeedsReset });
        assert_eq!(events.try_recv().unwrap(), Event::Xid { gpu: 3, code: 48, class: XidClass::NeedsReset });
    }
}
