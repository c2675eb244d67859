//! The apiserver itself rejects malformed GonkaNodes, with a message that names the field: the
//! corpus in `admission-corpus/gonka-nodes.yaml`, by category, and the valid values beside it.
//! Runs against a real kube-apiserver + etcd with the checked-in CRD schema.

use gonka_crds::GonkaNode;
use gonka_e2e::{Components, ControlPlane, gonka_node_manifest};
use std::collections::BTreeMap;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

fn valid(name: &str) -> Value {
    gonka_node_manifest(name, "gpu")
}

/// `tests/admission-corpus/gonka-nodes.yaml`.
#[derive(Deserialize)]
struct Corpus {
    refused: BTreeMap<String, Vec<Case>>,
    accepted: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    what: String,
    patch: Value,
    #[serde(default)]
    expect: Vec<String>,
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The baseline GonkaNode with `patch` applied, created with `--dry-run=server` (admission runs
/// in full, nothing is stored). Raw JSON, as `kubectl create` sends it: bodies our Rust types
/// could not even hold (a string where a boolean belongs) reach the apiserver unchanged.
async fn try_create(raw: &Api<DynamicObject>, patch: &Value, n: usize) -> kube::Result<DynamicObject> {
    let mut body = valid(&format!("case-{n}"));
    merge_patch(&mut body, patch);
    let object: DynamicObject = serde_json::from_value(body).expect("a Kubernetes object");
    raw.create(&PostParams { dry_run: true, ..PostParams::default() }, &object).await
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

    let corpus: Corpus = serde_yaml::from_str(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/admission-corpus/gonka-nodes.yaml"),
    )?)?;
    // Every category keeps its cases; the corpus only grows.
    let sizes: Vec<(&str, usize)> = corpus.refused.iter().map(|(c, cases)| (c.as_str(), cases.len())).collect();
    assert!(sizes.len() >= 9 && sizes.iter().all(|(_, n)| *n >= 4), "{sizes:?}");
    assert!(sizes.iter().map(|(_, n)| n).sum::<usize>() >= 75, "{sizes:?}");

    let mut failures = Vec::new();
    let mut tried = 0;
    for (category, cases) in &corpus.refused {
        for case in cases {
            tried += 1;
            let result = try_create(&raw, &case.patch, tried).await;
            if let Ok(created) = &result {
                failures.push(format!("{category}: {}: accepted as {:?}", case.what, created.metadata.name));
                continue;
            }
            let Err(kube::Error::Api(status)) = result else {
                failures.push(format!("{category}: {}: unexpected result {result:?}", case.what));
                continue;
            };
            if status.code != 422 || !case.expect.iter().all(|n| status.message.contains(n.as_str())) {
                failures.push(format!(
                    "{category}: {}: code {} message {:?}, wanted {:?}",
                    case.what, status.code, status.message, case.expect
                ));
            }
        }
    }
    // The nearest valid values: a rule that refuses these is too strict.
    assert!(corpus.accepted.len() >= 10);
    for case in &corpus.accepted {
        tried += 1;
        if let Err(e) = try_create(&raw, &case.patch, tried).await {
            failures.push(format!("accepted: {}: refused: {e}", case.what));
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
