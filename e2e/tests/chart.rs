//! The Helm chart (`charts/gonka-operator`) with helm built from its Go module, on a real
//! control plane: it lints; a misspelt value fails; it installs into a namespace of the user's
//! choosing; the operator, running with exactly the chart's RBAC, rolls out a GonkaNode and
//! registers its ML node on the devnet; `helm upgrade` to a chart whose CRD gained a field makes
//! the field usable (Helm never upgrades `crds/`, so the chart renders the CRD as a template);
//! uninstalling deletes the GonkaNodes first (the pre-delete hook's code, with the hook's RBAC),
//! so the operator deregisters their ML nodes, and then leaves none of the chart's objects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, eventually, free_port, gonka_node_manifest, start_devnet};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::serde::Deserialize;
use kube::api::{Api, PostParams};
use serde_json::json;

/// The release's namespace: anything but gonka-system.
const NS: &str = "gonka-fleet";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

/// The Kubernetes version the chart is rendered for (the test control plane's).
const KUBE_VERSION: &str = "1.35.4";

/// `helm template` of the chart as release `gonka-operator` in [`NS`], with `extra` arguments;
/// returns the text and its objects.
fn render(cp: &ControlPlane, extra: &[&str]) -> anyhow::Result<(String, Vec<serde_yaml::Value>)> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template", "gonka-operator", &chart, "-n", NS, "--kube-version", KUBE_VERSION];
    args.extend_from_slice(extra);
    let text = cp.helm(&args)?;
    let objects =
        serde_yaml::Deserializer::from_str(&text).map(serde_yaml::Value::deserialize).collect::<Result<Vec<_>, _>>()?;
    Ok((text, objects))
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gonka-operator")
}

/// The chart's version is the crates' (so are the images' tags); its CRD copy is checked with
/// the others by `crds/`'s tests.
#[test]
fn the_chart_follows_the_crate_version() {
    let chart_yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart_yaml["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(chart_yaml["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));
}

/// One install story: `manifests/` is the chart rendered (cluster and namespaced scope).
#[test]
fn manifests_are_the_chart_rendered() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/render-manifests.sh");
    let out = std::process::Command::new("bash").arg(&script).arg("--check").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls_the_operator() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::WithControllers).await?;
    let chart = chart_dir().display().to_string();
    cp.helm(&["lint", &chart])?;

    // values.schema.json: a typo fails, naming the key.
    let typo = render(&cp, &["--set", "replicas=3"]).unwrap_err();
    assert!(typo.to_string().contains("'replicas' not allowed"), "{typo}");
    let wrong = render(&cp, &["--set", "scope=everywhere"]).unwrap_err();
    assert!(wrong.to_string().contains("scope"), "{wrong}");
    // Namespaced scope: no cluster-wide rights on GonkaNodes, and the operator watches its namespace.
    let (namespaced, objects) = render(&cp, &["--set", "scope=namespace"])?;
    assert!(namespaced.contains("name: WATCH_NAMESPACE"), "{namespaced}");
    let operator_cluster_roles: Vec<&serde_yaml::Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole")
        .filter(|o| !o["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"].is_string())
        .filter(|o| !o["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"].is_string())
        .collect();
    assert_eq!(operator_cluster_roles.len(), 1, "only the cluster-scoped rules (nodes, TokenReviews)");
    assert!(
        !serde_yaml::to_string(operator_cluster_roles[0])?.contains("gonkanodes"),
        "namespaced scope holds no cluster-wide GonkaNode rights"
    );

    // Install with no values, into a namespace of our choosing.
    cp.namespace(NS).await?;
    cp.namespace("gpu").await?;
    cp.helm(&["install", "gonka-operator", &chart, "-n", NS])?;
    cp.crd_served().await?;
    let admin = cp.client().await?;
    let deployment = Api::<Deployment>::namespaced(admin.clone(), NS).get("gonka-operator").await?;
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    let env: Vec<(String, String)> =
        container.env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect();
    assert!(
        env.contains(&("GONKA_REPORT_URL".into(), "https://gonka-operator.$(POD_NAMESPACE).svc:8082".into())),
        "{env:?}"
    );
    let service = Api::<Service>::namespaced(admin.clone(), NS).get("gonka-operator").await?;
    assert_eq!(service.spec.unwrap().selector, None, "the leader writes the report Service's endpoint");

    // The operator with exactly the chart's rights: rolls out a GonkaNode, registers its ML node.
    cp.gpu_node("gpu-a", 8, "NVIDIA-H100-80GB-HBM3").await?;
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let rights = cp.client_as(NS, "gonka-operator").await?;
    let operator = cp.start_operator_with(rights, "op-a", NS, Some(free_port()?)).await?;
    let mut manifest = gonka_node_manifest("h100", "gpu");
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!(url);
    cp.roll_out(manifest, PODS, 1, WAIT).await?;
    assert_eq!(devnet.lock().unwrap().nodes().len(), 1, "one ML node registered");

    // Upgrade to a chart whose CRD gained a field: the field is kept on GonkaNodes afterwards
    // (an unknown field would be pruned by the apiserver).
    let next = tempfile::tempdir()?;
    copy_dir(&chart_dir(), next.path())?;
    let crd_path = next.path().join("files/gonkanode.yaml");
    let mut crd: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&crd_path)?)?;
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["futureField"] =
        serde_yaml::to_value(json!({"type": "string", "description": "a field of the next release"}))?;
    std::fs::write(&crd_path, serde_yaml::to_string(&crd)?)?;
    let gonka_nodes: Api<GonkaNode> = Api::namespaced(admin.clone(), "gpu");
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(admin.clone(), "gpu", &kube::api::ApiResource::erase::<GonkaNode>(&()));
    let mut probe = gonka_node_manifest("probe", "gpu");
    probe["spec"]["futureField"] = json!("set");
    let probe: kube::api::DynamicObject = serde_json::from_value(probe)?;
    // A dry-run create answers with the object as it would be stored (pruned to the schema).
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    assert!(raw.create(&dry_run, &probe).await?.data["spec"].get("futureField").is_none(), "pruned before the upgrade");
    cp.helm(&["upgrade", "gonka-operator", &next.path().display().to_string(), "-n", NS])?;
    eventually("the upgraded CRD keeps the new field", WAIT, || async {
        Ok(raw.create(&dry_run, &probe).await?.data["spec"]["futureField"] == "set")
    })
    .await?;

    // Uninstall. The chart's pre-delete hook runs `gonka-operator uninstall` with its own
    // ServiceAccount; no kubelet runs images here, so the test runs the same code with that
    // ServiceAccount's rights (rendered from the chart), then `helm uninstall --no-hooks`.
    let (_, hook_objects) = render(&cp, &["--show-only", "templates/uninstall-hook.yaml"])?;
    let job = hook_objects.iter().find(|o| o["kind"] == "Job").expect("the hook Job");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"][0], "uninstall");
    let rbac: Vec<String> =
        hook_objects.iter().filter(|o| o["kind"] != "Job").map(serde_yaml::to_string).collect::<Result<_, _>>()?;
    let rbac_file = next.path().join("uninstall-rbac.yaml");
    std::fs::write(&rbac_file, rbac.join("---\n"))?;
    cp.kubectl(&["apply", "-f", &rbac_file.display().to_string()])?;
    let hook_rights = cp.client_as(NS, "gonka-operator-uninstall").await?;
    let lease = "gonka-operator-leader";
    let holder = gonka_operator::uninstall::ensure_operator_leads(hook_rights.clone(), NS, lease).await?;
    assert_eq!(holder, "op-a");
    let poll = Duration::from_millis(200);
    let deleted = gonka_operator::uninstall::delete_gonka_nodes(hook_rights.clone(), None, WAIT, poll).await?;
    assert_eq!(deleted, 1);
    assert!(devnet.lock().unwrap().nodes().is_empty(), "the operator deregistered before the GonkaNode went");

    // Without a running operator the hook does not pretend: it names what is left and fails.
    gonka_nodes.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("stuck", "gpu"))?).await?;
    eventually("the operator adds its finalizer", WAIT, || async {
        Ok(!gonka_nodes.get("stuck").await?.metadata.finalizers.unwrap_or_default().is_empty())
    })
    .await?;
    operator.stop().await?;
    // The hook checks the Lease first: with no operator leading it deletes nothing (deleting
    // would leave the GonkaNode Terminating) and says what to do.
    eventually("the hook sees no operator", WAIT, || async {
        Ok(gonka_operator::uninstall::ensure_operator_leads(hook_rights.clone(), NS, lease).await.is_err())
    })
    .await?;
    let refused = gonka_operator::uninstall::ensure_operator_leads(hook_rights.clone(), NS, lease).await.unwrap_err();
    assert!(refused.to_string().contains("nothing was deleted"), "{refused}");
    assert!(gonka_nodes.get("stuck").await?.metadata.deletion_timestamp.is_none());
    // Past the Lease check, a GonkaNode that does not go is named and the hook fails.
    let left = gonka_operator::uninstall::delete_gonka_nodes(hook_rights, None, Duration::from_secs(2), poll)
        .await
        .unwrap_err();
    assert!(left.to_string().contains("gpu/stuck") && left.to_string().contains("is it running"), "{left}");
    gonka_nodes
        .patch(
            "stuck",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;

    // `helm upgrade --set crds.install=false` drops the CRD from the release, but the CRD (and
    // every GonkaNode with it) stays: crds.keep is on by default.
    gonka_nodes.create(&PostParams::default(), &serde_json::from_value(gonka_node_manifest("kept", "gpu"))?).await?;
    cp.helm(&["upgrade", "gonka-operator", &chart, "-n", NS, "--set", "crds.install=false"])?;
    assert!(gonka_nodes.get_opt("kept").await?.is_some_and(|g| g.metadata.deletion_timestamp.is_none()));

    cp.helm(&["uninstall", "gonka-operator", "-n", NS, "--no-hooks", "--wait"])?;
    assert!(Api::<Deployment>::namespaced(admin.clone(), NS).get_opt("gonka-operator").await?.is_none());
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), NS).get_opt("gonka-operator").await?.is_none());
    assert!(Api::<Role>::namespaced(admin.clone(), NS).list(&Default::default()).await?.items.is_empty());
    assert!(Api::<ClusterRole>::all(admin.clone()).get_opt("gonka-operator").await?.is_none());
    // The CRD stays after `--no-hooks` too (nothing left Terminating); the admin deletes it.
    let crds: Api<CustomResourceDefinition> = Api::all(admin);
    assert!(crds.get_opt("gonkanodes.gonka.ai").await?.is_some_and(|c| c.metadata.deletion_timestamp.is_none()));
    assert!(gonka_nodes.get_opt("kept").await?.is_some_and(|g| g.metadata.deletion_timestamp.is_none()));
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// What the cluster admin allows GonkaNode authors reaches the operator as its flags' variables,
/// and by default nothing is allowed (no hostPath, no tenant's Secret) and nothing restricted
/// (any image); the chart's schema refuses a relative host path before anything is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admins_policy_reaches_the_operator() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    let env_of = |objects: &[serde_yaml::Value]| -> Vec<(String, String)> {
        let deployment = objects.iter().find(|o| o["kind"] == "Deployment").expect("the Deployment");
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("GONKA_ALLOWED_")))
            .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    let (_, objects) = render(&cp, &[])?;
    assert_eq!(env_of(&objects), vec![], "defaults: no host path allowed, any image");
    let (_, objects) = render(
        &cp,
        &[
            "--set",
            "modelStorage.allowedHostPaths={/srv/gonka-models,/data/hf}",
            "--set",
            "daemonImage.allowedPrefixes={ghcr.io/gonka-operator}",
        ],
    )?;
    assert_eq!(
        env_of(&objects),
        vec![
            ("GONKA_ALLOWED_IMAGE_PREFIXES".to_string(), "ghcr.io/gonka-operator".to_string()),
            ("GONKA_ALLOWED_HOST_PATHS".to_string(), "/srv/gonka-models,/data/hf".to_string()),
        ]
    );
    let refused = render(&cp, &["--set", "modelStorage.allowedHostPaths={srv/models}"]).unwrap_err();
    assert!(refused.to_string().contains("allowedHostPaths"), "{refused}");

    // Secrets: none by default (RBAC, not only the opt-in label, keeps tenants' Secrets out of
    // reach), a Role in each namespace the admin lists, every namespace only when asked for.
    let reads_secrets = |rules: &serde_yaml::Value| {
        rules.as_sequence().unwrap().iter().any(|r| {
            r["resources"].as_sequence().unwrap().iter().any(|x| x == "secrets")
                && r["verbs"].as_sequence().unwrap().iter().any(|v| v == "get")
                && r["resourceNames"].is_null()
        })
    };
    let roles = |objects: &[serde_yaml::Value]| -> Vec<(String, String, bool)> {
        objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .filter(|o| reads_secrets(&o["rules"]))
            .map(|o| {
                let ns = o["metadata"]["namespace"].as_str().unwrap_or("").to_string();
                (o["kind"].as_str().unwrap().to_string(), ns, o["metadata"]["name"] == "gonka-operator-secrets")
            })
            .collect()
    };
    let (_, objects) = render(&cp, &[])?;
    assert_eq!(roles(&objects), vec![], "no Secret of any tenant by default");
    let (_, objects) = render(&cp, &["--set", "secretNamespaces={gpu,ml}"])?;
    assert_eq!(roles(&objects), vec![("Role".into(), "gpu".into(), true), ("Role".into(), "ml".into(), true)]);
    let bindings: Vec<&serde_yaml::Value> = objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" && o["metadata"]["name"] == "gonka-operator-secrets")
        .collect();
    assert_eq!(bindings.len(), 2);
    assert!(
        bindings.iter().all(|b| b["subjects"][0]["name"] == "gonka-operator" && b["subjects"][0]["namespace"] == NS)
    );
    let (_, objects) = render(&cp, &["--set", "secretNamespaces={*}"])?;
    assert_eq!(roles(&objects), vec![("ClusterRole".into(), String::new(), false)]);
    // Namespaced scope reads its own namespace's Secrets, as before.
    let (_, objects) = render(&cp, &["--set", "scope=namespace"])?;
    assert_eq!(roles(&objects), vec![("Role".into(), NS.into(), false)]);
    let refused = render(&cp, &["--set", "secretNamespaces={Not_A_Namespace}"]).unwrap_err();
    assert!(refused.to_string().contains("secretNamespaces"), "{refused}");
    Ok(())
}

/// The optional monitoring and NetworkPolicy objects: the apiserver accepts the NetworkPolicy,
/// the metrics Service and the dashboard's ConfigMap, the ServiceMonitor selects that Service,
/// and every metric the alerts and the dashboard read is one the operator really exports (a
/// renamed metric would silence an alert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_and_network_policy_fit_the_operator() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.namespace(NS).await?;
    let (_, objects) = render(
        &cp,
        &[
            "--show-only",
            "templates/monitoring.yaml",
            "--show-only",
            "templates/dashboard.yaml",
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,networkPolicy.enabled=true",
            "--set",
            "metrics.podMonitor.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
        ],
    )?;
    let of = |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone();

    // Core objects: the apiserver validates them (a server-side dry run).
    let core: Vec<String> = ["Service", "NetworkPolicy", "ConfigMap"]
        .iter()
        .map(|k| serde_yaml::to_string(&of(k)))
        .collect::<Result<_, _>>()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("core.yaml");
    std::fs::write(&file, core.join("---\n"))?;
    cp.kubectl(&["apply", "--dry-run=server", "-n", NS, "-f", &file.display().to_string()])?;

    // The operator's egress reaches everything but link-local and metadata addresses.
    let policy = of("NetworkPolicy");
    let egress = serde_yaml::to_string(&policy["spec"]["egress"])?;
    assert!(egress.contains("169.254.0.0/16") && egress.contains("fd00:ec2::254/128"), "{egress}");
    assert_eq!(policy["spec"]["policyTypes"][1], "Egress");

    // The ServiceMonitor selects the metrics Service and scrapes its port.
    let (service, monitor) = (of("Service"), of("ServiceMonitor"));
    let wanted = monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    let labels = service["metadata"]["labels"].as_mapping().unwrap();
    assert!(wanted.iter().all(|(k, v)| labels.get(k) == Some(v)), "{wanted:?} vs {labels:?}");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);

    // The PodMonitor selects the ML-node pods the operator builds and scrapes their monitoring
    // port by name.
    let pod_monitor = of("PodMonitor");
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["metadata"]["uid"] = serde_json::json!("uid-h100");
    let gn: GonkaNode = serde_json::from_value(manifest)?;
    let validated = gonka_operator::validate::validate(&gn, "img", &Default::default()).unwrap();
    let desired = gonka_operator::build::desired_objects(&gn, &validated, None)?;
    let template = desired.daemon_set.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let selector = pod_monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k.as_str().unwrap()).map(String::as_str), v.as_str(), "{k:?}");
    }
    let endpoint = &pod_monitor["spec"]["podMetricsEndpoints"][0];
    let ports = template.spec.unwrap().containers[0].ports.clone().unwrap();
    assert!(ports.iter().any(|p| p.name.as_deref() == endpoint["port"].as_str() && p.container_port == 9090));
    assert_eq!(pod_monitor["spec"]["namespaceSelector"]["any"], true);

    // Every metric an alert reads is exported by the operator.
    let metrics = gonka_operator::metrics::Metrics::default();
    metrics.reconcile_failed("apply");
    metrics.gpu_xid("fatal");
    let fleet = gonka_operator::metrics::FleetLabels { gonka_node_namespace: "gpu".into(), gonka_node: "h100".into() };
    metrics.fleet.observe(&fleet, &Default::default(), 8, false);
    let exported = metrics.encode();
    let dashboard: serde_json::Value =
        serde_json::from_str(of("ConfigMap")["data"]["gonka-operator.json"].as_str().unwrap())?;
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 5 && panels.iter().all(|p| !p["targets"][0]["expr"].as_str().unwrap_or("").is_empty()));
    let rules = serde_yaml::to_string(&of("PrometheusRule")["spec"])? + &dashboard.to_string();
    let used: std::collections::BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gonka_operator_"))
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        assert!(exported.lines().any(|l| l.starts_with(name)), "alert metric {name} is not exported:\n{exported}");
    }
    Ok(())
}
