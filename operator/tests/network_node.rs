//! The operator's admin-API client against the devnet stand-in of the network node, playing
//! both generations: registrations and updates, refusals with the network node's words (read
//! from upstream's `{"error": ...}` bodies, a 2025 500 included), outages told apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use gonka_devnet::{Devnet, Generation, admin_router};
use gonka_operator::network_node::{NetworkNode, NetworkNodeError, ml_node_id};
use gonka_protocol::admin::{Hardware, InferenceNodeConfig, ModelArgs};

async fn devnet() -> (Arc<Mutex<Devnet>>, String) {
    devnet_of(Generation::Mainline2026).await
}

/// A 2026 devnet's admin API over https, its certificate issued by a test CA; returns the
/// devnet, its URL and the CA's PEM.
async fn https_devnet() -> (Arc<Mutex<Devnet>>, String, String) {
    let devnet = Arc::new(Mutex::new(Devnet::new(["Qwen/QwQ-32B".to_string()])));
    let (url, ca) = gonka_devnet::tls::serve_https(admin_router(devnet.clone())).await.unwrap();
    (devnet, url, ca)
}

async fn devnet_of(generation: Generation) -> (Arc<Mutex<Devnet>>, String) {
    let devnet = Arc::new(Mutex::new(Devnet::of(generation, ["Qwen/QwQ-32B".to_string()])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = admin_router(devnet.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (devnet, url)
}

fn config(node: &str, model: &str, gpus: u32) -> InferenceNodeConfig {
    InferenceNodeConfig {
        // One pod IP per Kubernetes node (2026 refuses two ML nodes on one address).
        host: format!("10.244.0.{}", node.bytes().last().unwrap()),
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
async fn a_2026_network_node_updates_in_place() {
    let (devnet, url) = devnet().await;
    let client = NetworkNode::new(&url, None, None).unwrap();
    let c = config("gpu-a", "Qwen/QwQ-32B", 8);
    client.register(&c).await.unwrap();
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node.config, c);
    assert!(nodes[0].state.admin_state.enabled);

    client.update(&config("gpu-a", "Qwen/QwQ-32B", 4)).await.unwrap();
    client.update(&config("gpu-a", "Qwen/QwQ-32B", 4)).await.unwrap(); // a retry after a lost answer
    let nodes = client.nodes().await.unwrap();
    assert_eq!((nodes.len(), nodes[0].node.config.hardware[0].count), (1, 4));
    assert_eq!(nodes[0].node.node_num, 1, "an update keeps the broker's node number");
    assert_eq!(devnet.lock().unwrap().config_entries(&c.id), 1);

    client.register(&config("gpu-b", "Qwen/QwQ-32B", 8)).await.unwrap();
    let nums: Vec<u64> = client.nodes().await.unwrap().iter().map(|n| n.node.node_num).collect();
    assert_eq!(nums, [1, 2]);
}

#[tokio::test]
async fn a_2025_network_node_has_no_update_and_says_so() {
    let (devnet, url) = devnet_of(Generation::Launch2025).await;
    let client = NetworkNode::new(&url, None, None).unwrap();
    let c = config("gpu-a", "Qwen/QwQ-32B", 8);
    client.register(&c).await.unwrap();
    let err = client.update(&config("gpu-a", "Qwen/QwQ-32B", 4)).await.unwrap_err();
    assert!(err.is_method_not_allowed() && !err.is_outage(), "{err}");
    let nodes = client.nodes().await.unwrap();
    assert_eq!((nodes[0].node.node_num, nodes[0].node.config.hardware[0].count), (1, 8), "nothing changed");
    assert_eq!(devnet.lock().unwrap().config_entries(&c.id), 1);
}

#[tokio::test]
async fn drain_is_disable_then_delete() {
    for generation in [Generation::Launch2025, Generation::Mainline2026] {
        let (devnet, url) = devnet_of(generation).await;
        let client = NetworkNode::new(&url, None, None).unwrap();
        let c = config("gpu-a", "Qwen/QwQ-32B", 8);
        client.register(&c).await.unwrap();
        client.set_enabled(&c.id, false).await.unwrap();
        assert!(!client.nodes().await.unwrap()[0].state.admin_state.enabled);
        client.set_enabled(&c.id, true).await.unwrap();
        assert!(client.nodes().await.unwrap()[0].state.admin_state.enabled);
        client.delete(&c.id).await.unwrap();
        client.delete(&c.id).await.unwrap(); // already gone: still fine
        assert!(client.nodes().await.unwrap().is_empty());
        assert!(devnet.lock().unwrap().nodes().is_empty());

        let err = client.set_enabled("nobody.gpu@nowhere", true).await.unwrap_err();
        match err {
            NetworkNodeError::Rejected { status: 404, message, .. } => {
                assert_eq!(message, "node not found: nobody.gpu@nowhere")
            }
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn a_model_governance_did_not_approve_is_refused_with_the_reason() {
    // 2026: 400 on create, 500 on update, each with its reason.
    let (_, url) = devnet().await;
    let client = NetworkNode::new(&url, None, None).unwrap();
    let err = client.register(&config("gpu-a", "someone/unapproved-model", 8)).await.unwrap_err();
    match &err {
        NetworkNodeError::Rejected { status: 400, message, .. } => {
            assert!(message.contains("has no governance-valid models"), "{message}")
        }
        other => panic!("{other}"),
    }
    assert!(!err.is_outage());
    assert!(client.nodes().await.unwrap().is_empty());
    client.register(&config("gpu-a", "Qwen/QwQ-32B", 8)).await.unwrap();
    let err = client.update(&config("gpu-a", "someone/unapproved-model", 8)).await.unwrap_err();
    match &err {
        NetworkNodeError::Rejected { status: 500, message, .. } => {
            assert_eq!(message, "failed to update node: model someone/unapproved-model is not a valid governance model")
        }
        other => panic!("{other}"),
    }
    assert!(!err.is_outage(), "the network node answered for itself");

    // 2025: a bare 500, still a refusal and not an outage.
    let (_, url) = devnet_of(Generation::Launch2025).await;
    let client = NetworkNode::new(&url, None, None).unwrap();
    let err = client.register(&config("gpu-a", "someone/unapproved-model", 8)).await.unwrap_err();
    match &err {
        NetworkNodeError::Rejected { status: 500, message, .. } => assert_eq!(message, "error creating new node"),
        other => panic!("{other}"),
    }
    assert!(!err.is_outage());
}

#[tokio::test]
async fn an_https_network_node_is_reached_with_its_ca_bundle() {
    let (devnet, url, ca) = https_devnet().await;
    // Its certificate is not one the system trusts: no request goes through.
    let err = NetworkNode::new(&url, Some("s3cret".into()), None).unwrap().nodes().await.unwrap_err();
    assert!(matches!(err, NetworkNodeError::Unreachable { .. }), "{err}");
    assert_eq!(devnet.lock().unwrap().admin_requests, 0);

    let client = NetworkNode::new(&url, Some("s3cret".into()), Some(&ca)).unwrap();
    client.register(&config("gpu-a", "Qwen/QwQ-32B", 8)).await.unwrap();
    assert_eq!(client.nodes().await.unwrap().len(), 1);
    assert_eq!(devnet.lock().unwrap().admin_authorization.as_deref(), Some("Bearer s3cret"));
}

#[tokio::test]
async fn an_unreachable_network_node_is_an_outage() {
    // Below the kernel's ephemeral range: no outgoing connection takes it meanwhile.
    let port = gonka_e2e::free_port().unwrap();
    let client = NetworkNode::new(&format!("http://127.0.0.1:{port}"), None, None).unwrap();
    let err = client.register(&config("gpu-a", "Qwen/QwQ-32B", 8)).await.unwrap_err();
    assert!(matches!(err, NetworkNodeError::Unreachable { .. }) && err.is_outage(), "{err}");
}

/// A server that answers every request with `app`'s answer; returns its URL.
async fn hostile(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Whoever answers at the admin URL can't grow the operator's memory without bound: an answer
/// of a gigabyte (streamed, no length given) is refused once it passes the bound, and so is one
/// that announces its length; the refusal says why.
#[tokio::test]
async fn an_endless_answer_is_cut_at_the_bound() {
    use futures::StreamExt;
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let endless = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            let chunk = bytes_of_json_array();
            let stream = futures::stream::iter(0..16_384).map(move |_| {
                counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                Ok::<_, std::io::Error>(chunk.clone())
            });
            axum::body::Body::from_stream(stream)
        }
    });
    let client = NetworkNode::new(&hostile(endless).await, None, None).unwrap();
    let err = client.nodes().await.unwrap_err().to_string();
    assert!(err.contains("an answer over 4194304 bytes"), "{err}");
    let read = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read < 64 << 20, "stopped reading near the bound, not at 1 GiB ({read} bytes produced)");

    let announced = axum::Router::new().fallback(|| async { "[".to_string() + &" ".repeat(5 << 20) + "]" });
    let client = NetworkNode::new(&hostile(announced).await, None, None).unwrap();
    let err = client.nodes().await.unwrap_err().to_string();
    assert!(err.contains("an answer over 4194304 bytes"), "{err}");

    // Just under the bound is read: the bound is not a lower one.
    let fits = axum::Router::new().fallback(|| async { "[".to_string() + &" ".repeat((4 << 20) - 2) + "]" });
    let client = NetworkNode::new(&hostile(fits).await, None, None).unwrap();
    assert_eq!(client.nodes().await.unwrap().len(), 0);
}

fn bytes_of_json_array() -> axum::body::Bytes {
    axum::body::Bytes::from(" ".repeat(64 << 10))
}

/// A redirect is not followed: the request (its verb, body and token) never reaches where it
/// points, and the refusal says so.
#[tokio::test]
async fn redirects_are_not_followed() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let target = hostile(axum::Router::new().fallback(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async { "[]" }
    }))
    .await;
    let location = format!("{target}/latest/meta-data");
    let redirecting = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, location)]) }
    });
    let client = NetworkNode::new(&hostile(redirecting).await, Some("secret".into()), None).unwrap();
    let err = client.nodes().await.unwrap_err();
    assert!(matches!(err, NetworkNodeError::Rejected { status: 307, .. }), "{err}");
    assert!(err.to_string().contains("redirects are not followed"), "{err}");
    client.register(&config("gpu-a", "Qwen/QwQ-32B", 8)).await.unwrap_err();
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing reached the redirect's target");
}

/// URLs a GonkaNode stored before the schema refused them are refused by the client too.
#[tokio::test]
async fn metadata_and_query_urls_are_refused_before_any_request() {
    for url in ["http://169.254.169.254/latest/meta-data?", "http://127.0.0.1:9/?x=", "http://u:p@127.0.0.1:9"] {
        assert!(matches!(NetworkNode::new(url, None, None), Err(NetworkNodeError::UnsupportedUrl { .. })), "{url}");
    }
}
