//! The daemon → operator report stream: types and gRPC service generated from
//! `proto/gonka/report/v1/report.proto` (read it for the protocol), plus the names both ends
//! must agree on.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("gonka.report.v1");

/// Audience of the projected ServiceAccount token a daemon authenticates with.
pub const TOKEN_AUDIENCE: &str = "gonka-operator";
/// Where the DaemonSet mounts that token in the daemon's container.
pub const TOKEN_PATH: &str = "/var/run/secrets/gonka.ai/report/token";
/// Default heartbeat interval the operator asks for.
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 10;
