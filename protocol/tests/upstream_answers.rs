//! Answers recorded from upstream's network node code (`tests/fixtures/admin/`, each file
//! naming its upstream file and commit in `tests/fixtures/README.md`) decode into our shapes,
//! and tell which generation answered.

use gonka_protocol::admin::{AdminError, Generation, NodeResponse, NodeToggleResponse, error_message};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/admin/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn nodes(name: &str) -> Vec<NodeResponse> {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn a_2025_node_list_with_nulls_decodes() {
    let list = nodes("nodes-2025.json");
    assert_eq!(list.len(), 2);
    let (plain, failed) = (&list[0], &list[1]);
    assert!(plain.node.config.hardware.is_empty(), "\"hardware\": null is no hardware");
    assert_eq!(plain.node.config.models["Qwen/Qwen2.5-7B-Instruct"].args[..2], ["--quantization", "fp8"]);
    assert_eq!((plain.node.node_num, plain.node.version.as_deref()), (1, Some("")));
    assert!(failed.node.config.models.is_empty(), "\"models\": null is no models");
    assert_eq!(failed.node.config.hardware[0].count, 8);
    assert!(!failed.state.admin_state.enabled);
    assert_eq!((failed.state.admin_state.epoch, failed.state.current_status.as_str()), (13, Some("FAILED")));
    assert_eq!(failed.state.failure_reason, "No epoch models available for this node");
    assert_eq!(Generation::of(&list), Some(Generation::Launch2025));
}

#[test]
fn the_2026_and_newest_node_lists_decode() {
    let list = nodes("nodes-2026.json");
    let n = &list[0];
    assert!(n.node.config.models["MiniMaxAI/MiniMax-M2.7"].args.is_empty(), "\"args\": null is no args");
    assert!(n.node.config.hardware.is_empty());
    assert_eq!((n.node.node_num, n.state.ml_node_version.as_deref()), (7, Some("3.0.14")));
    assert_eq!(Generation::of(&list), Some(Generation::Mainline2026));

    let list = nodes("nodes-main.json");
    assert_eq!(list[0].node.config.hardware[0].type_, "NVIDIA H200 | 140GB");
    assert!(!list[0].state.admin_state.enabled);
    assert_eq!(Generation::of(&list), Some(Generation::Mainline2026), "unknown fields are ignored");

    assert_eq!(Generation::of(&nodes("nodes-empty.json")), None, "an empty list tells nothing");
}

#[test]
fn error_bodies_give_the_network_nodes_words() {
    let cases = [
        ("error-2025-refused-model.json", "error creating new node"),
        (
            "error-2026-refused-model-create.json",
            "failed to create node: node h100.gpu@gpu-a has no governance-valid models",
        ),
        (
            "error-2026-refused-model-update.json",
            "failed to update node: model someone/unapproved is not a valid governance model",
        ),
        ("error-not-found.json", "node not found: h100.gpu@gpu-a"),
        ("error-method-not-allowed.json", "Method Not Allowed"),
    ];
    for (file, words) in cases {
        assert_eq!(error_message(&fixture(file)), words, "{file}");
        let typed: AdminError = serde_json::from_str(&fixture(file)).unwrap();
        assert_eq!(typed.error, words);
    }
    let batch = error_message(&fixture("error-2026-batch-all-failed.json"));
    assert!(batch.contains("all nodes failed validation") && batch.contains("node[0] (id: a)"), "{batch}");
    // echo's own default handler (a route outside upstream's error handler) and a proxy's page.
    assert_eq!(error_message(r#"{"message":"Unauthorized"}"#), "Unauthorized");
    assert_eq!(error_message("<html>502 Bad Gateway</html>\n"), "<html>502 Bad Gateway</html>");
}

#[test]
fn other_admin_answers_decode() {
    let toggled: NodeToggleResponse = serde_json::from_str(&fixture("toggle-enabled.json")).unwrap();
    assert_eq!(toggled.node_id, "h100.gpu@gpu-a");
    let removed: bool = serde_json::from_str(&fixture("delete-unknown.json")).unwrap();
    assert!(!removed);
}
