//! GonkaNodes for unit tests.

use gonka_crds::{GonkaNode, GonkaNodeSpec};

/// A GonkaNode `name` in namespace `gpu`, as read from the apiserver (uid, generation), with
/// a minimal valid spec edited by `edit`.
pub fn gonka_node(name: &str, edit: impl FnOnce(&mut GonkaNodeSpec)) -> GonkaNode {
    let mut spec: GonkaNodeSpec = serde_json::from_value(serde_json::json!({
        "networkNode": {
            // Nothing listens on port 9: the network node is "unreachable" without any lookup.
            "adminUrl": "http://127.0.0.1:9",
            "mlCallbackUrl": "http://gonka-api.gonka.svc:9100"
        },
        "gpusPerMlNode": 8,
        "models": [{"id": "Qwen/Qwen2.5-7B-Instruct", "args": ["--quantization", "fp8"]}]
    }))
    .expect("fixture spec parses");
    edit(&mut spec);
    let mut gn = GonkaNode::new(name, spec);
    gn.metadata.namespace = Some("gpu".into());
    gn.metadata.uid = Some(format!("uid-{name}"));
    gn.metadata.generation = Some(1);
    gn.metadata.resource_version = Some("1".into());
    gn
}

/// A cluster policy that allows host paths under `/srv` (the fixtures' model directories) and
/// any image.
pub fn lenient_policy() -> crate::validate::ClusterPolicy {
    crate::validate::ClusterPolicy::new(vec!["/srv".into()], vec![]).expect("a valid policy")
}
