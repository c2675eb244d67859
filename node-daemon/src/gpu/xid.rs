//! XID errors, classified by NVIDIA's XID catalog ("Xid Errors", resolution column).
//!
//! Policy (documented in the README): a *transient* XID is counted and reported, the GPU stays
//! in service (the application restarts its work); a *needs-reset* XID takes the GPU out of
//! `/gpu/devices` availability until a GPU reset (a daemon restart re-probes it); a *fatal*
//! XID takes it out until the node is rebooted or serviced. Unknown codes are treated as
//! needs-reset: better to idle a GPU than to prove with a broken one and lose the weight.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XidClass {
    /// Application-level; the GPU itself is fine (catalog: RESTART_APP / IGNORE).
    Transient,
    /// The GPU needs a reset before it can be trusted (catalog: RESET_GPU).
    NeedsReset,
    /// The GPU or its bus is gone; reboot or service the node (catalog: RESTART_BM / WORKFLOW_XID_*
    /// for fallen-off-the-bus and GSP failures).
    Fatal,
}

impl XidClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::NeedsReset => "needs_reset",
            Self::Fatal => "fatal",
        }
    }
}

impl fmt::Display for XidClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An XID code's class and catalog title.
pub fn classify(code: u64) -> (XidClass, &'static str) {
    use XidClass::*;
    match code {
        13 => (Transient, "graphics engine exception"),
        31 => (Transient, "GPU memory page fault"),
        43 => (Transient, "GPU stopped processing"),
        45 => (Transient, "preemptive cleanup, due to previous errors"),
        63 => (Transient, "ECC page retirement or row remapping recorded"),
        68 => (Transient, "video processor exception"),
        69 => (Transient, "graphics engine class error"),
        92 => (Transient, "high single-bit ECC error rate"),
        94 => (Transient, "contained ECC error"),
        109 => (Transient, "context switch timeout"),
        8 | 32 => (NeedsReset, "GPU stopped responding / invalid push buffer stream"),
        48 => (NeedsReset, "double-bit ECC error"),
        61 | 62 => (NeedsReset, "internal micro-controller error"),
        64 => (NeedsReset, "ECC page retirement or row remapper recording failure"),
        74 => (NeedsReset, "NVLink error"),
        95 => (NeedsReset, "uncontained ECC error"),
        119 | 120 => (NeedsReset, "GSP error"),
        140 => (NeedsReset, "unrecovered ECC error"),
        79 => (Fatal, "GPU has fallen off the bus"),
        154 => (Fatal, "GPU recovery action changed: node reboot required"),
        _ => (NeedsReset, "unknown XID (treated as needs-reset)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_classes() {
        let cases = [
            (13, XidClass::Transient),
            (31, XidClass::Transient),
            (43, XidClass::Transient),
            (94, XidClass::Transient),
            (48, XidClass::NeedsReset),
            (74, XidClass::NeedsReset),
            (95, XidClass::NeedsReset),
            (79, XidClass::Fatal),
            (4242, XidClass::NeedsReset),
        ];
        for (code, class) in cases {
            assert_eq!(classify(code).0, class, "XID {code}");
        }
        assert!(XidClass::Fatal > XidClass::NeedsReset && XidClass::NeedsReset > XidClass::Transient);
    }
}
