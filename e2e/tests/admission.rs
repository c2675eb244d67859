//! The apiserver itself rejects malformed GonkaNodes, with a message that names the field.
//! Runs against a real kube-apiserver + etcd with the checked-in CRD schema.

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, gonka_node_manifest};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

fn valid(name: &str) -> Value {
    gonka_node_manifest(name, "gpu")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_rejects_malformed_gonka_nodes_naming_the_field() -> anyhow::Result<()> {
    let cp = ControlPlane::start(Components::ApiServer).await?;
    cp.install_crd().await?;
    cp.namespace("gpu").await?;
    let client = cp.client().await?;
    let api: Api<GonkaNode> = Api::namespaced(client.clone(), "gpu");
    let resource = ApiResource::erase::<GonkaNode>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client, "gpu", &resource);

    // The baseline is accepted, and the apiserver fills the schema defaults.
    let created = api.create(&PostParams::default(), &serde_json::from_value(valid("ok"))?).await?;
    assert_eq!(created.spec.poc.batch_size, 32);
    assert_eq!(created.spec.placement.node_selector["nvidia.com/gpu.present"], "true");

    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "admin URL is not a URL",
            |v| v["spec"]["networkNode"]["adminUrl"] = json!("gonka-api:9200"),
            &["spec.networkNode.adminUrl", "adminUrl must be an absolute http:// or https:// URL"],
        ),
        (
            "callback URL has the wrong scheme",
            |v| v["spec"]["networkNode"]["mlCallbackUrl"] = json!("ftp://api:9100"),
            &["spec.networkNode.mlCallbackUrl", "mlCallbackUrl must be an absolute http:// or https:// URL"],
        ),
        (
            "network node missing",
            |v| {
                v["spec"].as_object_mut().unwrap().remove("networkNode");
            },
            &["spec.networkNode: Required value"],
        ),
        ("no models", |v| v["spec"]["models"] = json!([]), &["spec.models", "should have at least 1 items"]),
        (
            "the same model twice",
            |v| v["spec"]["models"] = json!([{"id": "a/b"}, {"id": "a/b"}]),
            &["spec.models[1]", "Duplicate value"],
        ),
        (
            "model id is not a repository",
            |v| v["spec"]["models"][0]["id"] = json!("qwen 7b"),
            &["spec.models[0].id", "should match"],
        ),
        (
            "empty engine argument",
            |v| v["spec"]["models"][0]["args"] = json!(["--quantization", ""]),
            &["spec.models[0].args", "args entries must be non-empty"],
        ),
        (
            "model storage on two volumes",
            |v| v["spec"]["modelStorage"] = json!({"persistentVolumeClaim": "weights", "hostPath": "/srv/models"}),
            &["spec.modelStorage", "modelStorage needs exactly one of persistentVolumeClaim and hostPath"],
        ),
        (
            "model storage on no volume",
            |v| v["spec"]["modelStorage"] = json!({"subPath": "hub"}),
            &["spec.modelStorage", "modelStorage needs exactly one of persistentVolumeClaim and hostPath"],
        ),
        (
            "model storage host path is relative",
            |v| v["spec"]["modelStorage"] = json!({"hostPath": "srv/models"}),
            &["spec.modelStorage.hostPath", "hostPath must be an absolute path"],
        ),
        (
            "model storage sub path climbs out",
            |v| v["spec"]["modelStorage"] = json!({"persistentVolumeClaim": "weights", "subPath": "hub/../../etc"}),
            &["spec.modelStorage.subPath", "subPath must be a relative path without '..'"],
        ),
        (
            "model storage claim is not a name",
            |v| v["spec"]["modelStorage"] = json!({"persistentVolumeClaim": "Qwen Weights"}),
            &["spec.modelStorage.persistentVolumeClaim", "should match"],
        ),
        (
            "preloaded model is not one of the models",
            |v| v["spec"]["modelStorage"] = json!({"persistentVolumeClaim": "weights", "preload": "Qwen/QwQ-32B"}),
            &["spec", "modelStorage.preload must be one of models[].id"],
        ),
        (
            "zero GPUs per ML node",
            |v| v["spec"]["gpusPerMlNode"] = json!(0),
            &["spec.gpusPerMlNode", "should be greater than or equal to 1"],
        ),
        (
            "too many GPUs per ML node",
            |v| v["spec"]["gpusPerMlNode"] = json!(65),
            &["spec.gpusPerMlNode", "should be less than or equal to 64"],
        ),
        (
            "zero batch size",
            |v| v["spec"]["poc"] = json!({"batchSize": 0}),
            &["spec.poc.batchSize", "should be greater than or equal to 1"],
        ),
        (
            "unknown pull policy",
            |v| v["spec"]["imagePullPolicy"] = json!("Sometimes"),
            &["spec.imagePullPolicy", "Unsupported value: \"Sometimes\""],
        ),
        (
            "maxUnavailable zero",
            |v| v["spec"]["updateStrategy"] = json!({"maxUnavailable": 0}),
            &["spec.updateStrategy.maxUnavailable", "maxUnavailable must be a count >= 1 or a percentage"],
        ),
        (
            "maxUnavailable over 100%",
            |v| v["spec"]["updateStrategy"] = json!({"maxUnavailable": "150%"}),
            &["spec.updateStrategy.maxUnavailable", "maxUnavailable must be a count >= 1 or a percentage"],
        ),
        (
            "paused is not a boolean",
            |v| v["spec"]["paused"] = json!("yes"),
            &["spec.paused", "must be of type boolean"],
        ),
        (
            "priority class is not a DNS name",
            |v| v["spec"]["priorityClassName"] = json!("Gonka_Critical"),
            &["spec.priorityClassName", "should match"],
        ),
        (
            "credentials secret without a name",
            |v| v["spec"]["networkNode"]["credentialsSecretRef"] = json!({"name": ""}),
            &["spec.networkNode.credentialsSecretRef.name"],
        ),
        (
            "name too long for owned objects",
            |v| v["metadata"]["name"] = json!("a".repeat(41)),
            &["metadata.name must be at most 40 characters"],
        ),
        (
            "no GPU count (it can't be guessed)",
            |v| {
                v["spec"].as_object_mut().unwrap().remove("gpusPerMlNode");
            },
            &["spec.gpusPerMlNode: Required value"],
        ),
        (
            "GPU count is not a number",
            |v| v["spec"]["gpusPerMlNode"] = json!("eight"),
            &["spec.gpusPerMlNode", "must be of type integer"],
        ),
        (
            "public URL without a host",
            |v| v["spec"]["networkNode"]["publicUrl"] = json!("http://"),
            &["spec.networkNode.publicUrl", "publicUrl must be an absolute http:// or https:// URL"],
        ),
        (
            "plain-http credentials switch is not a boolean",
            |v| v["spec"]["networkNode"]["allowPlaintextCredentials"] = json!("please"),
            &["spec.networkNode.allowPlaintextCredentials", "must be of type boolean"],
        ),
        (
            "credentials secret name is not a DNS name",
            |v| v["spec"]["networkNode"]["credentialsSecretRef"] = json!({"name": "Proxy_Token"}),
            &["spec.networkNode.credentialsSecretRef.name", "should match"],
        ),
        (
            "batch size above the largest",
            |v| v["spec"]["poc"] = json!({"batchSize": 4097}),
            &["spec.poc.batchSize", "should be less than or equal to 4096"],
        ),
        (
            "send interval zero",
            |v| v["spec"]["poc"] = json!({"sendIntervalSeconds": 0}),
            &["spec.poc.sendIntervalSeconds", "should be greater than or equal to 1"],
        ),
        (
            "send interval above five minutes",
            |v| v["spec"]["poc"] = json!({"sendIntervalSeconds": 301}),
            &["spec.poc.sendIntervalSeconds", "should be less than or equal to 300"],
        ),
        (
            "no pending batches kept",
            |v| v["spec"]["poc"] = json!({"maxPendingBatches": 0}),
            &["spec.poc.maxPendingBatches", "should be greater than or equal to 1"],
        ),
        ("empty image", |v| v["spec"]["image"] = json!(""), &["spec.image", "should be at least 1 chars long"]),
        (
            "runtime class is not a DNS name",
            |v| v["spec"]["runtimeClassName"] = json!("NVIDIA"),
            &["spec.runtimeClassName", "should match"],
        ),
        (
            "more than 16 models",
            |v| {
                v["spec"]["models"] =
                    json!((0..17).map(|i| json!({"id": format!("org/model-{i}")})).collect::<Vec<_>>())
            },
            &["spec.models", "must have at most 16 items"],
        ),
        (
            "more than 64 engine arguments",
            |v| v["spec"]["models"][0]["args"] = json!(vec!["--x"; 65]),
            &["spec.models[0].args", "must have at most 64 items"],
        ),
        (
            "model id too long",
            |v| v["spec"]["models"][0]["id"] = json!(format!("org/{}", "m".repeat(300))),
            &["spec.models[0].id", "may not be more than 256 bytes"],
        ),
        (
            "hold during PoC is not a boolean",
            |v| v["spec"]["updateStrategy"] = json!({"holdDuringPoc": "yes"}),
            &["spec.updateStrategy.holdDuringPoc", "must be of type boolean"],
        ),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());

    let mut failures = Vec::new();
    for (i, (what, edit, needles)) in cases.iter().enumerate() {
        let mut body = valid(&format!("bad-{i}"));
        edit(&mut body);
        // Raw JSON, as `kubectl create` sends it: bodies our Rust types could not even hold
        // (a string where a boolean belongs) reach the apiserver unchanged.
        let object: DynamicObject = serde_json::from_value(body)?;
        let result = raw.create(&PostParams::default(), &object).await;
        if let Ok(created) = &result {
            failures.push(format!("{what}: accepted as {:?}", created.metadata.name));
            continue;
        }
        let Err(kube::Error::Api(status)) = result else {
            failures.push(format!("{what}: unexpected result {result:?}"));
            continue;
        };
        if status.code != 422 || !needles.iter().all(|n| status.message.contains(n)) {
            failures.push(format!("{what}: code {} message {:?}, wanted {needles:?}", status.code, status.message));
        }
    }

    // A misspelt field is pruned silently by default; kubectl asks for strict field validation
    // (its default since 1.27), and then it is an error that names the field.
    let mut body = valid("typo");
    body["spec"]["gpuPerMlNode"] = json!(4);
    let manifest = std::env::temp_dir().join(format!("gonka-typo-{}.json", std::process::id()));
    std::fs::write(&manifest, body.to_string())?;
    let result = cp.kubectl(&["create", "-f", manifest.to_str().unwrap()]);
    std::fs::remove_file(&manifest)?;
    match result {
        Err(e) if e.to_string().contains("unknown field \"spec.gpuPerMlNode\"") => {}
        other => failures.push(format!("misspelt field: {other:?}")),
    }

    // `kubectl explain` teaches from the schema's descriptions.
    let explained = cp.kubectl(&["explain", "gonkanode.spec.gpusPerMlNode"])?;
    assert!(explained.contains("GPUs each ML node owns"), "{explained}");
    let explained = cp.kubectl(&["explain", "gonkanode.status.conditions"])?;
    assert!(explained.contains("Ready"), "{explained}");

    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}
