//! The operator's admin-API client against the devnet stand-in of the network node: upserts
//! are idempotent, refusals carry the network node's words, outages are retryable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use gonka_devnet::{Devnet, admin_router};
use gonka_operator::network_node::{NetworkNode, NetworkNodeError, ml_node_id};
use gonka_protocol::admin::{Hardware, InferenceNodeConfig, ModelArgs};

async fn devnet() -> (Arc<Mutex<Devnet>>, String) {
    let devnet = Arc::new(Mutex::new(Devnet::new(["Qwen/QwQ-32B".to_string()])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = admin_router(devnet.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (devnet, url)
}

fn config(node: &str, model: &str, gpus: u32) -> InferenceNodeConfig {
    InferenceNodeConfig {
        host: "10.244.0.12".into(),
        inference_segment: String::new(),
        inference_port: 5000,
        poc_segment: String::new(),
        poc_port: 8080,
        models: BTreeMap::from([(
            model.to_string(),
            ModelArgs { args: vec!["--tensor-parallel-size".into(), "4".into()] },
        )]),
        id: ml_node_id("gpu", "h100", node),
        max_concurrent: 500,
        hardware: vec![Hardware { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: gpus }],
    }
}

#[tokio::test]
async fn registration_is_idempotent_and_updates_in_place() {
    let (_, url) = devnet().await;
    let client = NetworkNode::new(&url, None).unwrap();
    let c = config("gpu-a", "Qwen/QwQ-32B", 8);
    client.upsert(&c).await.unwrap();
    client.upsert(&c).await.unwrap(); // a retry after a lost answer
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "never a duplicate registration");
    assert_eq!(nodes[0].node.config, c);
    assert!(nodes[0].state.admin_state.enabled);

    client.upsert(&config("gpu-a", "Qwen/QwQ-32B", 4)).await.unwrap();
    let nodes = client.nodes().await.unwrap();
    assert_eq!((nodes.len(), nodes[0].node.config.hardware[0].count), (1, 4));
    assert_eq!(nodes[0].node.node_num, 0, "an update keeps the broker's node number");

    client.upsert(&config("gpu-b", "Qwen/QwQ-32B", 8)).await.unwrap();
    let nums: Vec<u64> = client.nodes().await.unwrap().iter().map(|n| n.node.node_num).collect();
    assert_eq!(nums, [0, 1]);
}

#[tokio::test]
async fn drain_is_disable_then_delete() {
    let (devnet, url) = devnet().await;
    let client = NetworkNode::new(&url, None).unwrap();
    let c = config("gpu-a", "Qwen/QwQ-32B", 8);
    client.upsert(&c).await.unwrap();
    client.set_enabled(&c.id, false).await.unwrap();
    assert!(!client.nodes().await.unwrap()[0].state.admin_state.enabled);
    client.set_enabled(&c.id, true).await.unwrap();
    assert!(client.nodes().await.unwrap()[0].state.admin_state.enabled);
    client.delete(&c.id).await.unwrap();
    client.delete(&c.id).await.unwrap(); // already gone: still fine
    assert!(client.nodes().await.unwrap().is_empty());
    assert!(devnet.lock().unwrap().nodes().is_empty());

    let err = client.set_enabled("nobody.gpu@nowhere", true).await.unwrap_err();
    assert!(matches!(err, NetworkNodeError::Rejected { status: 404, .. }), "{err}");
}

#[tokio::test]
async fn a_model_governance_did_not_approve_is_refused_with_the_reason() {
    let (_, url) = devnet().await;
    let client = NetworkNode::new(&url, None).unwrap();
    let err = client.upsert(&config("gpu-a", "someone/unapproved-model", 8)).await.unwrap_err();
    match &err {
        NetworkNodeError::Rejected { status: 400, message, .. } => {
            assert!(message.contains("not valid governance models"), "{message}")
        }
        other => panic!("{other}"),
    }
    assert!(!err.is_retryable());
    assert!(client.nodes().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_network_node_is_a_retryable_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = NetworkNode::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let err = client.upsert(&config("gpu-a", "Qwen/QwQ-32B", 8)).await.unwrap_err();
    assert!(matches!(err, NetworkNodeError::Unreachable { .. }) && err.is_retryable(), "{err}");
}
