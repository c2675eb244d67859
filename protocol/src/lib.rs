//! Wire shapes shared by the operator and the node-daemon, defined once.
//!
//! Today: the daemon's configuration file, which the operator renders into each GonkaNode's
//! ConfigMap and the daemon reads at start. The Gonka admin/ML-node JSON shapes and the report
//! `.proto` join this crate with network registration.

pub mod daemon_config;
