//! `spec.networkNode.mtlsSecretRef` on a real apiserver, with the operator holding exactly the
//! manifests' RBAC: it reads no Secret in a namespace the cluster admin did not list (the chart's
//! `secretNamespaces`: RBAC, not only the operator's code), and the ML nodes mount upstream's
//! mutual-TLS files only from a Secret whose owner opted in (until then nothing is built and
//! the GonkaNode says why), under upstream's ML-node variables; a new pair rolls them.

use std::time::Duration;

use gonka_crds::{CREDENTIALS_LABEL, GonkaNode};
use gonka_e2e::{Components, ControlPlane, eventually, gonka_node_manifest};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = "gonka-system";
const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(120);

fn config_hash(ds: &DaemonSet) -> Option<String> {
    ds.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("gonka.ai/config-hash").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_pair_is_mounted_only_once_its_owner_opted_in_and_a_new_pair_rolls_the_ml_nodes() -> anyhow::Result<()>
{
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.apply_manifests().await?;
    cp.namespace(NS).await?;
    let operator = cp.start_operator_as(cp.client_as(SYSTEM, "gonka-operator").await?, "op-a", SYSTEM).await?;
    let admin = cp.client().await?;
    let gonka_nodes: Api<GonkaNode> = Api::namespaced(admin.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(admin.clone(), NS);

    // What `kubectl create secret generic gonka-mtls --from-file=mtls-certs/` holds: the
    // network node's key too, which the ML nodes never mount.
    let files = |mlnode: &str| json!({"mlnode.crt": mlnode, "mlnode.key": "ML NODE KEY", "dapi.crt": "DAPI CERT", "dapi.key": "DAPI KEY"});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "gonka-mtls", "namespace": NS},
        "stringData": files("ML NODE CERT 1"),
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["mlCallbackUrl"] = json!("https://gonka-api.gonka.svc:9100");
    manifest["spec"]["networkNode"]["mtlsSecretRef"] = json!({"name": "gonka-mtls"});
    gonka_nodes.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;

    let degraded_with = |words: &'static str| {
        let gonka_nodes = gonka_nodes.clone();
        move || {
            let gonka_nodes = gonka_nodes.clone();
            async move {
                let status = gonka_nodes.get("h100").await?.status.unwrap_or_default();
                Ok::<_, anyhow::Error>(
                    status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Degraded" && c.reason == "InvalidSpec" && c.message.contains(words)),
                )
            }
        }
    };
    // The default install reads no tenant's Secrets: RBAC refuses, and the GonkaNode says what
    // the admin can do.
    eventually("refused: the namespace is not granted", WAIT, degraded_with("secretNamespaces")).await?;
    // The admin lists the namespace: the chart's Role and RoleBinding there.
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gonka-operator");
    let rendered = cp.helm(&[
        "template",
        "gonka-operator",
        &chart.display().to_string(),
        "-n",
        SYSTEM,
        "--kube-version",
        "1.35.4",
        "--show-only",
        "templates/rbac.yaml",
        "--set",
        &format!("secretNamespaces={{{NS}}}"),
    ])?;
    let grant: Vec<String> = rendered
        .split("\n---")
        .filter(|doc| doc.contains(&format!("namespace: {NS}")) && doc.contains("gonka-operator-secrets"))
        .map(str::to_string)
        .collect();
    assert_eq!(grant.len(), 2, "a Role and its RoleBinding in {NS}: {rendered}");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("grant.yaml");
    std::fs::write(&file, grant.join("\n---\n"))?;
    cp.kubectl(&["apply", "-f", &file.display().to_string()])?;

    // Not opted in: nothing is built, and the GonkaNode says why.
    eventually("refused: the Secret did not opt in", WAIT, || async {
        let status = gonka_nodes.get("h100").await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "InvalidSpec" && c.message.contains(CREDENTIALS_LABEL)))
    })
    .await?;
    assert!(daemon_sets.get_opt("h100-ml-node").await?.is_none(), "no ML node mounts a Secret that did not opt in");

    // Its owner opts in: the operator notices without an edit of the GonkaNode.
    let label = json!({"metadata": {"labels": {CREDENTIALS_LABEL: "true"}}});
    secrets.patch("gonka-mtls", &PatchParams::default(), &Patch::Merge(label)).await?;
    eventually("the ML nodes mount the pair", WAIT, || async {
        Ok(daemon_sets.get_opt("h100-ml-node").await?.is_some())
    })
    .await?;
    let ds = daemon_sets.get("h100-ml-node").await?;
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "mtls").expect("the mtls volume");
    let items: Vec<String> = volume.secret.unwrap().items.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(items, ["mlnode.crt", "mlnode.key", "dapi.crt"]);
    let env: Vec<(String, String)> = pod.containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .filter(|e| e.name.starts_with("MLNODE_MTLS_"))
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(
        env,
        [
            ("MLNODE_MTLS_CLIENT_CERT", "/etc/gonka-mtls/mlnode.crt"),
            ("MLNODE_MTLS_CLIENT_KEY", "/etc/gonka-mtls/mlnode.key"),
            ("MLNODE_MTLS_SERVER_CA", "/etc/gonka-mtls/dapi.crt"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()))
    );

    // A new pair rolls the ML nodes (the daemon reads it at start).
    let before = config_hash(&ds);
    let rotate = json!({"stringData": files("ML NODE CERT 2")});
    secrets.patch("gonka-mtls", &PatchParams::default(), &Patch::Merge(rotate)).await?;
    // The operator looks again at its resync; an edit of the GonkaNode that leaves daemon.json
    // as it was makes it look now (so only the pair can change the hash).
    let nudge = json!({"spec": {"updateStrategy": {"maxUnavailable": 2}}});
    gonka_nodes.patch("h100", &PatchParams::default(), &Patch::Merge(nudge)).await?;
    eventually("the new pair changes the config hash", WAIT, || async {
        let ds = daemon_sets.get("h100-ml-node").await?;
        Ok(config_hash(&ds).is_some() && config_hash(&ds) != before)
    })
    .await?;
    operator.stop().await?;
    Ok(())
}
