//! `gonka-operator`: reconciles `GonkaNode`s into ML-node DaemonSets.
//!
//! Module map (the reconcile pipeline, in order): [`validate`] → [`build`] (pure) →
//! [`apply`] (the only writer) → [`status`] (pure); [`controller`] wires them to the watch
//! streams; [`runtime`] runs a replica (leader election: a second replica idles until the
//! first goes; the admin and report servers); [`http`] and [`metrics`] serve health and
//! Prometheus. [`report_server`] takes the node-daemons' report
//! streams into [`report_store`], which reconciles read for status and registration hardware;
//! [`registration`] plans and [`network_node`] carries out the ML nodes' registration;
//! [`node_departure`], [`node_protection`] and [`capacity`] (pure) decide what the Kubernetes
//! nodes mean for a fleet: nodes going, nodes kept from autoscalers in a PoC window, nodes a
//! cap lets join; [`uninstall`] is what the Helm chart's pre-delete hook runs.

pub mod apply;
pub mod build;
pub mod capacity;
pub mod controller;
pub mod http;
pub mod metrics;
pub mod network_node;
pub mod node_departure;
pub mod node_protection;
pub mod registration;
pub mod report_endpoint;
pub mod report_server;
pub mod report_store;
pub mod report_tls;
pub mod rollout;
pub mod runtime;
pub mod status;
pub mod telemetry;
pub mod uninstall;
pub mod validate;

#[cfg(test)]
mod mock_api_tests;
#[cfg(test)]
pub(crate) mod test_fixtures;

pub use controller::{Context, ControllerConfig, FINALIZER};
pub use runtime::{LeaseOptions, Options, ReportOptions, RunError, run};
