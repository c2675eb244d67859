//! Exact API call sequences of one reconcile, against a mocked apiserver (tower-test), as
//! kube-rs controller-rs does. The real-apiserver behaviour is covered in `e2e/`; these pin
//! down what is sent, in which order, and that nothing else is.

use std::sync::Arc;
use std::time::Duration;

use gonka_crds::{GonkaNode, GonkaNodeSpec};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

use crate::build::desired_objects;
use crate::controller::{Context, ControllerConfig, FINALIZER, reconcile};
use crate::metrics::Metrics;
use crate::status::{self, Observation};
use crate::test_fixtures::gonka_node;
use crate::validate::validate;

const GN_PATH: &str = "/apis/gonka.ai/v1alpha1/namespaces/gpu/gonkanodes/h100";
const NETPOL_PATH: &str = "/apis/networking.k8s.io/v1/namespaces/gpu/networkpolicies/h100-ml-nodes";
const PDB_PATH: &str = "/apis/policy/v1/namespaces/gpu/poddisruptionbudgets/h100-ml-nodes";

struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    /// Takes the next request, checks its method and path, returns its JSON body (or Null).
    async fn expect(&mut self, method: Method, path: &str) -> (Value, Request<()>, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("client gone before {method} {path}"));
        let (parts, body) = request.into_parts();
        assert_eq!(
            (&parts.method, parts.uri.path()),
            (&method, path),
            "unexpected call {} {}",
            parts.method,
            parts.uri
        );
        let bytes = body.collect_bytes().await.unwrap();
        let json = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (json, Request::from_parts(parts, ()), send)
    }

    /// Takes the next request, whatever its path; checks its method.
    async fn expect_any(&mut self, method: Method) -> (Value, Request<()>, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method}"))
            .unwrap_or_else(|| panic!("client gone before {method}"));
        let (parts, body) = request.into_parts();
        assert_eq!(parts.method, method, "unexpected call {} {}", parts.method, parts.uri);
        let bytes = body.collect_bytes().await.unwrap();
        let json = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (json, Request::from_parts(parts, ()), send)
    }

    async fn expect_not_found(&mut self, path: &str) {
        let (_, _, send) = self.expect(Method::GET, path).await;
        send.send_response(status_response(StatusCode::NOT_FOUND, "NotFound"));
    }

    async fn expect_get(&mut self, path: &str, object: &impl serde::Serialize) {
        let (_, _, send) = self.expect(Method::GET, path).await;
        send.send_response(json_response(&serde_json::to_value(object).unwrap()));
    }

    /// A server-side apply by the operator's field manager; answers with the applied body.
    async fn expect_apply(&mut self, path: &str) -> Value {
        let (body, request, send) = self.expect(Method::PATCH, path).await;
        let query = request.uri().query().unwrap_or_default();
        assert!(query.contains("fieldManager=gonka-operator") && query.contains("force=true"), "{query}");
        assert_eq!(request.headers()["content-type"], "application/apply-patch+yaml");
        send.send_response(json_response(&body));
        body
    }

    /// A server-side apply of the GonkaNode's status; answers with the object carrying it.
    async fn expect_status(&mut self, gn: &GonkaNode) -> Value {
        let (body, request, send) = self.expect(Method::PATCH, &format!("{GN_PATH}/status")).await;
        assert!(request.uri().query().unwrap_or_default().contains("fieldManager=gonka-operator"));
        let mut object = serde_json::to_value(gn).unwrap();
        object["status"] = body["status"].clone();
        send.send_response(json_response(&object));
        body
    }

    /// An Event about the GonkaNode; returns its reason.
    async fn expect_event(&mut self) -> String {
        let (body, _, send) = self.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/gpu/events").await;
        assert_eq!(body["regarding"]["name"], "h100");
        assert_eq!(body["reportingController"], "gonka-operator");
        send.send_response(json_response(&body));
        body["reason"].as_str().unwrap().to_string()
    }

    /// After the reconcile dropped every client: no request may be left.
    async fn expect_silence(mut self) {
        if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request()).await {
            panic!("unexpected extra call {} {}", request.method(), request.uri());
        }
    }
}

fn json_response(body: &Value) -> Response<Body> {
    Response::builder().status(200).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}

fn status_response(code: StatusCode, reason: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code.as_u16(), "message": reason});
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap()
}

/// Runs one reconcile of `gn`, the pod watch holding `pods`, while `script` plays the
/// apiserver; then checks that nothing else was called.
async fn run<F, Fut>(gn: GonkaNode, pods: Value, script: F) -> Result<Action, crate::controller::Error>
where
    F: FnOnce(ApiServer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ApiServer> + Send,
{
    run_on_nodes(gn, Vec::new(), pods, script).await
}

/// [`run`], the nodes' watch holding `nodes`.
async fn run_on_nodes<F, Fut>(
    gn: GonkaNode,
    nodes: Vec<k8s_openapi::api::core::v1::Node>,
    pods: Value,
    script: F,
) -> Result<Action, crate::controller::Error>
where
    F: FnOnce(ApiServer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ApiServer> + Send,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = ControllerConfig { daemon_image: "registry.test/daemon:1".into(), ..ControllerConfig::default() };
    let ctx = Arc::new(Context::new(client, config, Metrics::default()));
    ctx.nodes_listed(nodes);
    ctx.pods_listed(serde_json::from_value(pods).expect("pods"));
    let server = tokio::spawn(async move { script(ApiServer(handle)).await });
    // A call the script does not answer would hold the reconcile forever.
    let result = tokio::time::timeout(Duration::from_secs(60), reconcile(Arc::new(gn), ctx))
        .await
        .expect("the reconcile waited 60 s on a call the script never answered");
    let api = server.await.expect("scenario panicked");
    api.expect_silence().await;
    result
}

fn with_finalizer(edit: impl FnOnce(&mut GonkaNodeSpec)) -> GonkaNode {
    let mut gn = gonka_node("h100", edit);
    gn.metadata.finalizers = Some(vec![FINALIZER.into()]);
    gn
}

#[tokio::test]
async fn a_new_gonka_node_first_gets_the_finalizer_and_nothing_else() {
    let gn = gonka_node("h100", |_| {});
    let action = run(gn.clone(), json!([]), |mut api| async move {
        let (patch, request, send) = api.expect(Method::PATCH, GN_PATH).await;
        assert_eq!(request.headers()["content-type"], "application/json-patch+json");
        assert_eq!(patch[1], json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}));
        let mut updated = serde_json::to_value(&gn).unwrap();
        updated["metadata"]["finalizers"] = json!([FINALIZER]);
        send.send_response(json_response(&updated));
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn first_reconcile_applies_every_owned_object_then_announces_and_writes_status() {
    let gn = with_finalizer(|_| {});
    let action = run(gn.clone(), json!([]), |mut api| async move {
        for (path, kind) in [
            ("/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node", "ServiceAccount"),
            ("/api/v1/namespaces/gpu/configmaps/h100-daemon-config", "ConfigMap"),
            ("/api/v1/namespaces/gpu/services/h100-ml-nodes", "Service"),
            // Always, default-deny without mlNodeApiFrom.
            (NETPOL_PATH, "NetworkPolicy"),
            ("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node", "DaemonSet"),
        ] {
            api.expect_not_found(path).await;
            let applied = api.expect_apply(path).await;
            assert_eq!(applied["kind"], kind);
            assert_eq!(applied["metadata"]["ownerReferences"][0]["uid"], "uid-h100");
        }
        assert_eq!(api.expect_event().await, "Created");
        // The disruption budget, applied after the DaemonSet (it counts the DaemonSet's pods).
        api.expect_not_found(PDB_PATH).await;
        let pdb = api.expect_apply(PDB_PATH).await;
        assert_eq!(
            (pdb["kind"].as_str(), pdb["spec"]["minAvailable"].as_i64()),
            (Some("PodDisruptionBudget"), Some(0))
        );
        let status = api.expect_status(&gn).await;
        assert_eq!(status["status"]["observedGeneration"], 1);
        let reasons: Vec<&str> =
            status["status"]["conditions"].as_array().unwrap().iter().map(|c| c["reason"].as_str().unwrap()).collect();
        // The fixture's network node (127.0.0.1:9) does not answer.
        assert_eq!(reasons, ["AwaitingDaemonSetController", "RolloutPending", "AsExpected", "NetworkNodeUnreachable"]);
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(15)), "retried soon while the network node is down");
}

/// A devnet network node on loopback holding `nodes`; returns its admin URL.
async fn network_node(nodes: Vec<gonka_protocol::admin::InferenceNodeConfig>) -> String {
    let (devnet, url) = gonka_e2e::start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await.unwrap();
    for n in nodes {
        devnet.lock().unwrap().register(n).unwrap();
    }
    url
}

/// UID of the DaemonSet in these tests; its pods name it as their controller.
const DS_UID: &str = "5d0c6a4e-ds";

fn ready_pod(node: &str, ip: &str) -> Value {
    json!({"metadata": {"name": format!("h100-ml-node-{node}"), "namespace": "gpu",
                        "labels": {"app.kubernetes.io/name": "gonka-ml-node", "app.kubernetes.io/instance": "h100"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "h100-ml-node",
                                             "uid": DS_UID, "controller": true}]},
           "spec": {"nodeName": node, "containers": [{"name": "node-daemon"}]},
           "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

#[tokio::test]
async fn a_steady_fleet_is_read_but_never_written() {
    // The live objects are exactly what the operator would apply, the network node lists the
    // ready pod, and the status is current.
    let template = with_finalizer(|_| {});
    let admin_url =
        network_node(vec![crate::registration::node_config(&template, "gpu-a", "10.244.0.12", Vec::new())]).await;
    let mut gn = with_finalizer(|s| s.network_node.admin_url = admin_url);
    let desired = desired_objects(
        &gn,
        &validate(&gn, "registry.test/daemon:1", &crate::test_fixtures::lenient_policy()).unwrap(),
        None,
    )
    .unwrap();
    let mut ds: DaemonSet = desired.daemon_set.clone();
    ds.metadata.generation = Some(1);
    ds.metadata.uid = Some(DS_UID.into());
    ds.status = Some(DaemonSetStatus {
        observed_generation: Some(1),
        desired_number_scheduled: 2,
        current_number_scheduled: 2,
        updated_number_scheduled: Some(2),
        number_ready: 2,
        number_available: Some(2),
        ..Default::default()
    });
    let obs = Observation {
        generation: Some(1),
        daemon_set: Some(&ds),
        max_unavailable: Some(&gn.spec.update_strategy.max_unavailable),
        hold_unchecked: true,
        // No mlNodeApiFrom: Registered says the ML nodes' API admits no caller.
        ml_node_api_closed: true,
        registration: Some(status::Registration::Synced { registered: 1, ready: 1, paused: false, departing: vec![] }),
        selector: Some(crate::controller::pod_selector(&gn)),
        capacity: Some(None),
        ..Default::default()
    };
    gn.status = Some(status::compute(None, &obs, &Time(jiff::Timestamp::from_second(1_800_000_000).unwrap())));
    let pdb = crate::build::disruption_budget(&gn, 2, crate::build::DisruptionGuard::Tolerate).unwrap();

    let action = run(gn, json!([ready_pod("gpu-a", "10.244.0.12")]), move |mut api| async move {
        // Whether gpu-a is going comes from the nodes' watch, not a request.
        api.expect_get("/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node", &with_kind(&desired.service_account))
            .await;
        api.expect_get("/api/v1/namespaces/gpu/configmaps/h100-daemon-config", &with_kind(&desired.config_map)).await;
        api.expect_get("/api/v1/namespaces/gpu/services/h100-ml-nodes", &with_kind(&desired.service)).await;
        api.expect_get(NETPOL_PATH, &with_kind(&desired.network_policy)).await;
        api.expect_get("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node", &with_kind(&ds)).await;
        api.expect_get(PDB_PATH, &with_kind(&pdb)).await;
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn an_invalid_spec_is_announced_and_reported_without_touching_the_fleet() {
    let gn = with_finalizer(|s| {
        s.gpus_per_ml_node = 6;
        s.models[0].args = vec!["--tensor-parallel-size".into(), "4".into()];
    });
    let action = run(gn.clone(), json!([]), |mut api| async move {
        assert_eq!(api.expect_event().await, "InvalidSpec");
        api.expect_not_found("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node").await;
        let status = api.expect_status(&gn).await;
        let degraded = &status["status"]["conditions"][2];
        assert_eq!((degraded["type"].as_str(), degraded["status"].as_str()), (Some("Degraded"), Some("True")));
        assert!(degraded["message"].as_str().unwrap().starts_with("spec.models[0].args:"));
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change(), "only an edit can fix a spec");
}

#[tokio::test]
async fn paused_reads_the_fleet_and_announces_the_hold() {
    let gn = with_finalizer(|s| s.paused = true);
    let action = run(gn.clone(), json!([]), |mut api| async move {
        api.expect_not_found("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node").await;
        assert_eq!(api.expect_event().await, "Paused");
        let status = api.expect_status(&gn).await;
        assert_eq!(status["status"]["conditions"][1]["reason"], "Paused");
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn apiserver_refusal_is_reported_and_retried() {
    let gn = with_finalizer(|_| {});
    let result = run(gn.clone(), json!([]), |mut api| async move {
        api.expect_not_found("/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node").await;
        let (_, _, send) = api.expect(Method::PATCH, "/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node").await;
        send.send_response(status_response(StatusCode::FORBIDDEN, "Forbidden"));
        assert_eq!(api.expect_event().await, "ApplyFailed");
        let status = api.expect_status(&gn).await;
        assert_eq!(status["status"]["conditions"][2]["reason"], "ApplyFailed");
        api
    })
    .await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "apply");
}

/// A capped GonkaNode over a running ML node: the node it runs on (and the best eligible one)
/// is labelled before anything is applied, so the DaemonSet that starts selecting the label
/// never finds a running ML node's node without it.
#[tokio::test]
async fn a_cap_labels_the_joining_nodes_before_the_daemon_set_selects_them() {
    let gn =
        with_finalizer(|s| s.capacity = Some(gonka_crds::Capacity { max_ml_nodes: Some(2), ..Default::default() }));
    let node = |name: &str| -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}},
        }))
        .unwrap()
    };
    let nodes = vec![node("gpu-a"), node("gpu-b"), node("gpu-c")];
    let running: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "h100-ml-node", "namespace": "gpu", "uid": DS_UID},
        "spec": {"selector": {}, "template": {}},
    }))
    .unwrap();
    let result =
        run_on_nodes(gn.clone(), nodes, json!([ready_pod("gpu-c", "10.244.0.12")]), move |mut api| async move {
            // Which nodes its pods run on is decided by the DaemonSet it owns.
            api.expect_get("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node", &running).await;
            let mut labelled = Vec::new();
            for _ in 0..2 {
                let (body, request, send) = api.expect_any(Method::PATCH).await;
                let query = request.uri().query().unwrap_or_default().to_string();
                assert!(query.contains("fieldManager=gonka-operator%2Fcapacity%2Fuid-h100"), "{query}");
                assert!(!query.contains("force"), "another manager's label is never taken over: {query}");
                assert_eq!(body["metadata"]["labels"], json!({"joined.gonka.ai/uid-h100": "true"}));
                labelled.push(request.uri().path().to_string());
                send.send_response(json_response(&body));
            }
            // gpu-c runs an ML node; gpu-a is the first of the others by name; gpu-b is held back.
            assert_eq!(labelled, ["/api/v1/nodes/gpu-a", "/api/v1/nodes/gpu-c"]);
            assert_eq!(api.expect_event().await, "Joined");
            // Only now the owned objects; the first refused ends the pass.
            api.expect_not_found("/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node").await;
            let (_, _, send) = api.expect(Method::PATCH, "/api/v1/namespaces/gpu/serviceaccounts/h100-ml-node").await;
            send.send_response(status_response(StatusCode::FORBIDDEN, "Forbidden"));
            assert_eq!(api.expect_event().await, "ApplyFailed");
            let status = api.expect_status(&gn).await;
            assert_eq!(
                status["status"]["capacity"],
                json!({"eligible": 3, "joined": 2, "heldBack": 1, "leaving": 0, "limit": 2,
                   "message": "1 eligible nodes held back by the cap of 2 ML nodes"})
            );
            api
        })
        .await;
    assert_eq!(result.unwrap_err().metric_label(), "apply");
}

/// A capped GonkaNode whose node label can't be written applies nothing: a selector ahead of
/// its labels would delete running pods unannounced.
#[tokio::test]
async fn a_refused_label_stops_the_pass_before_the_daemon_set() {
    let gn =
        with_finalizer(|s| s.capacity = Some(gonka_crds::Capacity { max_ml_nodes: Some(1), ..Default::default() }));
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "gpu-a", "labels": {"nvidia.com/gpu.present": "true"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }))
    .unwrap();
    let result = run_on_nodes(gn.clone(), vec![node], json!([]), |mut api| async move {
        api.expect_not_found("/apis/apps/v1/namespaces/gpu/daemonsets/h100-ml-node").await;
        let (_, _, send) = api.expect(Method::PATCH, "/api/v1/nodes/gpu-a").await;
        send.send_response(status_response(StatusCode::FORBIDDEN, "Forbidden"));
        assert_eq!(api.expect_event().await, "ApplyFailed");
        let status = api.expect_status(&gn).await;
        assert_eq!(status["status"]["conditions"][2]["reason"], "ApplyFailed");
        assert_eq!(status["status"]["capacity"]["joined"], 1, "the plan is still told");
        api
    })
    .await;
    assert_eq!(result.unwrap_err().metric_label(), "apply");
}

#[tokio::test]
async fn deletion_deregisters_then_releases_the_finalizer() {
    let template = with_finalizer(|_| {});
    let admin_url =
        network_node(vec![crate::registration::node_config(&template, "gpu-a", "10.244.0.12", Vec::new())]).await;
    let mut gn = with_finalizer(|s| s.network_node.admin_url = admin_url.clone());
    gn.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(1_800_000_000).unwrap()));
    let body = serde_json::to_value(&gn).unwrap();
    let action = run(gn, json!([]), move |mut api| async move {
        assert_eq!(api.expect_event().await, "Deregistered");
        assert_eq!(api.expect_event().await, "Deleting");
        let (patch, request, send) = api.expect(Method::PATCH, GN_PATH).await;
        assert_eq!(request.headers()["content-type"], "application/json-patch+json");
        assert_eq!(patch[1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
        send.send_response(json_response(&body));
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    let client = crate::network_node::NetworkNode::new(&admin_url, None, None).unwrap();
    assert!(client.nodes().await.unwrap().is_empty(), "no registration left behind");
}

#[tokio::test]
async fn deletion_waits_while_the_network_node_is_unreachable() {
    let mut gn = with_finalizer(|_| {});
    gn.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(1_800_000_000).unwrap()));
    let result = run(gn, json!([]), |mut api| async move {
        assert_eq!(api.expect_event().await, "DeregistrationFailed");
        api
    })
    .await;
    assert_eq!(result.unwrap_err().metric_label(), "deregistration", "the finalizer stays");

    let mut gn = with_finalizer(|_| {});
    gn.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(1_800_000_000).unwrap()));
    gn.metadata.annotations = Some([("gonka.ai/skip-deregistration".to_string(), "true".to_string())].into());
    let body = serde_json::to_value(&gn).unwrap();
    let action = run(gn, json!([]), move |mut api| async move {
        assert_eq!(api.expect_event().await, "Deleting");
        let (_, _, send) = api.expect(Method::PATCH, GN_PATH).await;
        send.send_response(json_response(&body));
        api
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change(), "the escape hatch lets it go");
}

fn with_kind<K: Resource<DynamicType = ()> + serde::Serialize>(object: &K) -> Value {
    let mut v = serde_json::to_value(object).unwrap();
    v["apiVersion"] = json!(K::api_version(&()));
    v["kind"] = json!(K::kind(&()));
    v
}
