//! `gonka-operator`: reconciles `GonkaNode`s into ML-node DaemonSets.
//!
//! Module map (the reconcile pipeline, in order): [`validate`] → [`build`] (pure) →
//! [`apply`] (the only writer) → [`status`] (pure); [`controller`] wires them to the watch
//! streams; [`leader`] keeps a second replica idle until the first goes; [`http`] and
//! [`metrics`] serve health and Prometheus.

pub mod apply;
pub mod build;
pub mod controller;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod network_node;
pub mod registration;
pub mod rollout;
pub mod status;
pub mod telemetry;
pub mod validate;

#[cfg(test)]
mod mock_api_tests;
#[cfg(test)]
pub(crate) mod test_fixtures;

pub use controller::{Context, ControllerConfig, FINALIZER};
pub use leader::{LeaseOptions, Options, RunError, run};
