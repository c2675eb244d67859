//! The report stream on a real control plane: node-daemons standing in for a GonkaNode's pods
//! report to the operator with their pods' bound ServiceAccount tokens; status and the
//! network-node registrations show their GPUs; the operator goes away and comes back, the
//! daemons reconnect, and what happened meanwhile (a GPU lost to an XID) arrives; a daemon
//! cannot speak for another pod; a follower replica sends daemons on to the leader.

use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{ControlPlane, eventually, free_port, gonka_node_manifest, start_devnet};
use gonka_protocol::report::{self as proto, fleet_reports_client::FleetReportsClient};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

const NS: &str = "gpu";
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";
const WAIT: Duration = Duration::from_secs(90);
const H100: &str = "NVIDIA H100 80GB HBM3 | 79GB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_report_through_an_operator_restart() -> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let report_port = free_port()?;
    let operator = cp.start_reporting_operator("op-a", report_port).await?;

    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    cp.roll_out(manifest, PODS, 2, WAIT).await?;
    // Registered before any daemon reported: no hardware yet.
    assert!(devnet.lock().unwrap().nodes().iter().all(|n| n.node.config.hardware.is_empty()));

    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let config = &cm.data.unwrap()["daemon.json"];
    assert!(config.contains(&format!("https://127.0.0.1:{report_port}")), "{config}");
    // The operator's own report CA, for the daemons to check its certificate with.
    let report_ca = gonka_protocol::daemon_config::DaemonConfig::from_json(config)?.report.unwrap().ca_bundle.unwrap();
    assert!(report_ca.starts_with("-----BEGIN CERTIFICATE-----"), "{report_ca}");
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let stand_ins = cp.stand_in_for_pods(NS, PODS, daemon, config, |_| fake_nvml::Scenario::hgx_h100()).await?;
    assert_eq!(stand_ins.len(), 2);

    // Reports reach status and the registrations.
    let hardware_of = |node: &str| {
        let nodes = devnet.lock().unwrap().nodes();
        let n = nodes.iter().find(|n| n.node.config.id == format!("h100.gpu@{node}")).cloned();
        n.map(|n| n.node.config.hardware.iter().map(|h| (h.type_.clone(), h.count)).collect::<Vec<_>>())
    };
    eventually("both ML nodes reporting 8 H100s, registered with their hardware", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        let reporting = s.ml_nodes.iter().filter(|n| n.reporting && n.gpus_available == 8).count();
        Ok(reporting == 2
            && s.total_gpus == 16
            && hardware_of("gpu-a") == Some(vec![(H100.into(), 8)])
            && hardware_of("gpu-b") == Some(vec![(H100.into(), 8)]))
    })
    .await?;
    let status = api.get("h100").await?.status.unwrap();
    assert_eq!(status.gpus.iter().map(|g| (g.type_.as_str(), g.count)).collect::<Vec<_>>(), [(H100, 16)]);
    let a = status.ml_nodes.iter().find(|n| n.node == "gpu-a").unwrap();
    assert_eq!((a.state.as_deref(), a.gpus, a.gpu_error.as_deref()), (Some("STOPPED"), 8, None));
    assert!(a.pod.starts_with("h100-ml-node-"), "{a:?}");
    eventually("two streams open", WAIT, || async { Ok(operator.metrics.report_streams.get() == 2) }).await?;

    // The operator goes away: the streams drop. Meanwhile GPU 6 on gpu-b falls off the bus.
    operator.stop().await?;
    let mut broken = fake_nvml::Scenario::hgx_h100();
    broken.xids = vec![(6, 79)];
    stand_ins.change_gpus("gpu-b", &broken)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A new operator on the same endpoint: the daemons reconnect and catch it up.
    let operator = cp.start_reporting_operator("op-b", report_port).await?;
    eventually("both reporting again, gpu-b with 7 usable GPUs, registered as 7", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        let b = s.ml_nodes.iter().find(|n| n.node == "gpu-b");
        Ok(s.ml_nodes.iter().all(|n| n.reporting)
            && b.is_some_and(|b| b.gpus == 8 && b.gpus_available == 7)
            && s.total_gpus == 15
            && hardware_of("gpu-b") == Some(vec![(H100.into(), 7)]))
    })
    .await?;
    eventually("two streams open", WAIT, || async { Ok(operator.metrics.report_streams.get() == 2) }).await?;
    // The XID happened while no operator listened; the daemon kept it and sent it on reconnect.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    eventually("a GpuXid warning on the GonkaNode", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.iter().any(|e| {
            e.reason.as_deref() == Some("GpuXid")
                && e.note.as_deref().is_some_and(|n| n.contains("XID 79 on GPU 6 of node gpu-b"))
        }))
    })
    .await?;

    // A daemon speaks only for its own pod: gpu-a's token cannot report as gpu-b's pod.
    let pods = Api::<Pod>::namespaced(client.clone(), NS).list(&ListParams::default().labels(PODS)).await?;
    let pod_on = |node: &str| {
        pods.items.iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)).unwrap()
    };
    let token_a = cp.pod_token(pod_on("gpu-a")).await?;
    let hello_b = proto::Hello {
        gonka_node: "gpu/h100".into(),
        pod_name: kube::ResourceExt::name_any(pod_on("gpu-b")),
        kubernetes_node: "gpu-b".into(),
        boot_id: "forged".into(),
        ..Default::default()
    };
    let refused = refused_stream(report_port, &report_ca, Some(&token_a), hello_b.clone()).await;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("bound to pod"), "{refused:?}");
    let refused = refused_stream(report_port, &report_ca, None, hello_b.clone()).await;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // TLS only, under the operator's CA: plain text, or trusting another CA, gets nowhere.
    assert!(reaches_the_report_service(tls_endpoint(report_port, &report_ca)).await);
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{report_port}"))?;
    assert!(!reaches_the_report_service(plain).await, "plain text reached the report service");
    let stranger = gonka_devnet::tls::TestCa::new("another CA")?.pem;
    assert!(!reaches_the_report_service(tls_endpoint(report_port, &stranger)).await, "another CA was trusted");
    // A follower replica takes no streams, even a rightful one: the daemon retries until it
    // reaches the leader (through the Service, in a cluster).
    let follower_port = free_port()?;
    let follower = cp.start_reporting_operator("op-c", follower_port).await?;
    let token_b = cp.pod_token(pod_on("gpu-b")).await?;
    let refused = refused_stream(follower_port, &report_ca, Some(&token_b), hello_b).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("not the leader"), "{refused:?}");
    drop(follower);

    api.delete("h100", &DeleteParams::default()).await?;
    eventually("GonkaNode gone", WAIT, || async { Ok(api.get_opt("h100").await?.is_none()) }).await?;
    assert!(devnet.lock().unwrap().nodes().is_empty(), "no registration left behind");
    drop(stand_ins);
    operator.stop().await?;
    Ok(())
}

/// Opens a report stream with `hello`; returns how the operator refused it (taking it fails the test).
async fn refused_stream(port: u16, ca: &str, token: Option<&str>, hello: proto::Hello) -> tonic::Status {
    let channel = tls_endpoint(port, ca).connect().await.expect("connects");
    let mut client = FleetReportsClient::new(channel);
    let first = proto::DaemonMessage { seq: 1, body: Some(proto::daemon_message::Body::Hello(hello)) };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![first]));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match client.report(request).await {
        Ok(_) => panic!("the operator took the stream"),
        Err(status) => status,
    }
}

fn tls_endpoint(port: u16, ca: &str) -> tonic::transport::Endpoint {
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap()
}

/// Whether a report call over `endpoint` gets any answer of the report service (even a refusal).
async fn reaches_the_report_service(endpoint: tonic::transport::Endpoint) -> bool {
    let Ok(channel) = endpoint.connect().await else { return false };
    let hello = proto::DaemonMessage { seq: 1, body: Some(proto::daemon_message::Body::Hello(Default::default())) };
    match FleetReportsClient::new(channel).report(tonic::Request::new(tokio_stream::iter(vec![hello]))).await {
        Ok(_) => true,
        // Refusals of the service itself, as opposed to a transport that never got through.
        Err(status) => matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied),
    }
}

/// Opportunistic mode on a real control plane: a GonkaNode lends its GPUs at a low
/// PriorityClass; someone else's process on gpu-a's GPUs makes that daemon yield, the report
/// reaches the operator, which disables only gpu-a's ML node on the network node and shows why
/// in status; once the GPUs have been idle for the set time the ML node takes work again and is
/// enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lent_ml_node_yields_to_someone_elses_process_and_rejoins_when_idle() -> anyhow::Result<()> {
    use k8s_openapi::api::scheduling::v1::PriorityClass;

    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a", "gpu-b"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    // The set-up the README asks for: below every in-house class, never preempting.
    let class: PriorityClass = serde_json::from_value(json!({
        "metadata": {"name": "gonka-lent"}, "value": -100, "preemptionPolicy": "Never",
        "description": "Gonka ML nodes on lent GPUs"
    }))?;
    Api::<PriorityClass>::all(client.clone()).create(&Default::default(), &class).await?;
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_reporting_operator("op-a", free_port()?).await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    manifest["spec"]["priorityClassName"] = json!("gonka-lent");
    manifest["spec"]["opportunistic"] = json!({"rejoinAfterIdleSeconds": 30});
    cp.roll_out(manifest, PODS, 2, WAIT).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), NS).list(&ListParams::default().labels(PODS)).await?;
    assert!(pods.items.iter().all(|p| p.spec.as_ref().unwrap().priority == Some(-100)), "pods at the lent priority");

    // The operator hands the daemons the GonkaNode's policy (its defaults filled in); the test's
    // daemons rejoin after 2 s rather than 30.
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get("h100-daemon-config").await?;
    let mut config: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["daemon.json"])?;
    assert_eq!(config["opportunistic"], json!({"rejoinAfterIdleSeconds": 30, "busyUtilizationPercent": 10}));
    config["opportunistic"]["rejoinAfterIdleSeconds"] = json!(2);
    let idle = || {
        let mut s = fake_nvml::Scenario::hgx_h100();
        s.gpus.iter_mut().for_each(|g| g.utilization = 0);
        s
    };
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
    let stand_ins = cp
        .stand_in_for_pods_with_env(
            NS,
            PODS,
            daemon,
            &config.to_string(),
            |_| idle(),
            &[("GONKA_LENDING_SAMPLE_SECONDS", "1")],
        )
        .await?;
    let enabled = || {
        let mut nodes: Vec<(String, bool)> = devnet
            .lock()
            .unwrap()
            .nodes()
            .iter()
            .map(|n| (n.node.config.id.clone(), n.state.admin_state.enabled))
            .collect();
        nodes.sort();
        nodes
    };
    let both = |a: bool, b: bool| vec![("h100.gpu@gpu-a".to_string(), a), ("h100.gpu@gpu-b".to_string(), b)];
    let yielded_on = |s: &gonka_crds::GonkaNodeStatus, node: &str| {
        s.ml_nodes.iter().find(|n| n.node == node).and_then(|n| n.yielded.clone())
    };
    eventually("both reporting, neither yielded", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(s.ml_nodes.iter().filter(|n| n.reporting && n.yielded.is_none()).count() == 2)
    })
    .await?;
    assert_eq!(enabled(), both(true, true));

    // The team's job starts on gpu-a.
    let mut busy = idle();
    busy.processes.push(fake_nvml::FakeProcess { gpu: 2, pid: 31337, used_mb: 60_000 });
    stand_ins.change_gpus("gpu-a", &busy)?;
    eventually("gpu-a yielded and disabled, gpu-b untouched", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(yielded_on(&s, "gpu-a").is_some() && yielded_on(&s, "gpu-b").is_none() && enabled() == both(false, true))
    })
    .await?;
    // A platform team sees the lent GPUs in-house work holds (8: gpu-a's).
    let yielded_gpus = |n: u32| {
        let line =
            format!("gonka_operator_fleet_yielded_gpus{{gonka_node_namespace=\"{NS}\",gonka_node=\"h100\"}} {n}");
        let admin = operator.admin_addr;
        async move { Ok::<_, anyhow::Error>(gonka_e2e::admin_get(admin, "/metrics").await?.1.contains(&line)) }
    };
    eventually("8 GPUs yielded in the operator's /metrics", WAIT, || yielded_gpus(8)).await?;
    let y = yielded_on(&api.get("h100").await?.status.unwrap(), "gpu-a").unwrap();
    assert_eq!(y.reason, "GPU 2: process 31337 is not this ML node's");
    assert!(y.idle_since.is_none(), "{y:?}");
    // Still registered (it keeps its place), only disabled.
    assert_eq!(devnet.lock().unwrap().nodes().len(), 2);

    // The job ends: 2 s of idle GPUs later it rejoins and is enabled again.
    stand_ins.change_gpus("gpu-a", &idle())?;
    eventually("gpu-a rejoined and enabled", WAIT, || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok(yielded_on(&s, "gpu-a").is_none() && enabled() == both(true, true) && yielded_gpus(0).await?)
    })
    .await?;
    drop(stand_ins);
    operator.stop().await?;
    Ok(())
}
