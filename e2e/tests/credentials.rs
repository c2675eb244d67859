//! Network-node credentials are no way around RBAC: a GonkaNode may name a Secret, but the
//! operator uses it only when the Secret's owner opted in (its label), and sends its token only
//! where it can't be read on the way (or where the spec explicitly allows plain http). Until
//! then registration is refused with the reason and **no request leaves** for the network node.

use std::time::Duration;

use gonka_crds::{CREDENTIALS_LABEL, GonkaNode};
use gonka_e2e::{ControlPlane, eventually, gonka_node_manifest, start_devnet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "gpu";
const WAIT: Duration = Duration::from_secs(90);
const PODS: &str = "app.kubernetes.io/instance=h100,app.kubernetes.io/name=gonka-ml-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_only_when_their_owner_opted_in_and_never_cross_plain_http_by_default()
-> anyhow::Result<()> {
    let cp = ControlPlane::start_h100_fleet(NS, &["gpu-a"]).await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let (devnet, url) = start_devnet(&["Qwen/Qwen2.5-7B-Instruct"]).await?;
    let operator = cp.start_operator("op-a").await?;

    // Someone else's Secret (no opt-in label), named by a GonkaNode.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "proxy-token", "namespace": NS},
        "stringData": {"token": "s3cret"},
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let mut manifest = gonka_node_manifest("h100", NS);
    manifest["spec"]["networkNode"]["adminUrl"] = json!(url);
    manifest["spec"]["networkNode"]["credentialsSecretRef"] = json!({"name": "proxy-token"});
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?).await?;

    let registered = || async {
        let s = api.get("h100").await?.status.unwrap_or_default();
        Ok::<_, anyhow::Error>(s.conditions.into_iter().find(|c| c.type_ == "Registered"))
    };
    // Plain http and no opt-in: the plain-http rule speaks first, nothing is read or sent.
    eventually("refused: plain http", WAIT, || async {
        cp.simulate_kubelet(NS, PODS).await?;
        Ok(registered().await?.is_some_and(|c| c.reason == "CredentialsRefused" && c.message.contains("plain http")))
    })
    .await?;
    api.patch(
        "h100",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"networkNode": {"allowPlaintextCredentials": true}}})),
    )
    .await?;
    eventually("refused: the Secret did not opt in", WAIT, || async {
        Ok(registered()
            .await?
            .is_some_and(|c| c.reason == "CredentialsRefused" && c.message.contains(CREDENTIALS_LABEL)))
    })
    .await?;
    assert_eq!(devnet.lock().unwrap().admin_requests, 0, "no request left for the network node");

    // The Secret's owner opts in: the token goes along, the ML node is registered.
    secrets
        .patch(
            "proxy-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {CREDENTIALS_LABEL: "true"}}})),
        )
        .await?;
    eventually("registered with the credentials", WAIT, || async {
        Ok(registered().await?.is_some_and(|c| c.reason == "MlNodesRegistered"))
    })
    .await?;
    let (nodes, authorization) = {
        let d = devnet.lock().unwrap();
        (d.nodes().len(), d.admin_authorization.clone())
    };
    assert_eq!((nodes, authorization.as_deref()), (1, Some("Bearer s3cret")));
    operator.stop().await?;
    Ok(())
}
