//! A PoC v2 round, driven the way the 2026 network node drives one (mainline `8a35022b`:
//! `broker/node_worker_commands.go` `InferenceUpNodeCommand`, `StartPoCNodeCommandV2`,
//! `TransitionPoCToValidatingCommandV2`, and `poc/validator.go`):
//!
//! 1. every registered, enabled ML node serves the round's model: unless `GET /state` says
//!    `INFERENCE` with it loaded, `/inference/up` (`dtype: "auto"`, the registration's args);
//! 2. `GET /inference/pow/status`; unless `GENERATING`, `/inference/pow/init/generate` with its
//!    broker number as `node_id`, the node count, `params {model, seq_len}` (no `k_dim`, no
//!    `batch_size`) and `url = {callback}/v2/poc-batches/{model escaped twice}`;
//! 3. generation runs; artifacts arrive at the callback server; then `/inference/pow/stop`;
//! 4. each ML node's artifacts are sampled and sent to another ML node as
//!    `/inference/pow/generate` with `validation.artifacts` and the chain's `stat_test`
//!    (queued; the verdict comes to `/validated`);
//! 5. weight: a node's unique artifacts, if its verdict says no fraud.
//!
//! Simplified from upstream: the sample is the first artifacts, not MMR-proven leaves at seeded
//! positions, and the validator is the next ML node in the list.

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_protocol::ml_node::ServiceState;
use gonka_protocol::pow_v2::{Artifact, ValidatedResult};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde_json::json;

use crate::Shared;
pub use crate::round::RoundError;
use crate::round::enabled_targets;

/// What Go's `url.PathEscape` escapes in a path segment (the bytes a model id can hold).
const PATH_SEGMENT: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'/').add(b';').add(b',').add(b'?').add(b'<').add(b'>');

/// `url.PathEscape(url.PathEscape(model))`, the callback path's model segment.
pub fn callback_segment(model: &str) -> String {
    let once = utf8_percent_encode(model, PATH_SEGMENT).to_string();
    utf8_percent_encode(&once, PATH_SEGMENT).to_string()
}

#[derive(Clone, Debug)]
pub struct RoundConfig {
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    /// The PoC model (governance's), served by every ML node.
    pub model: String,
    pub seq_len: i64,
    pub stronger_rng: bool,
    pub generate_for: Duration,
    /// How long to wait for the last artifacts and the verdicts.
    pub settle_for: Duration,
    /// Artifacts per ML node sent for validation (upstream samples 200).
    pub validation_sample: usize,
    /// The callback server's base (`http://host:port`, upstream's `POC_CALLBACK_URL`).
    pub callback_base: String,
    /// The chain's `stat_test`, as the network node forwards it.
    pub stat_test: serde_json::Value,
}

/// How one ML node did.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeResult {
    pub id: String,
    pub node_num: u64,
    /// Unique artifacts it delivered.
    pub artifacts: usize,
    pub validated_by: Option<String>,
    pub n_mismatch: Option<i64>,
    pub fraud_detected: Option<bool>,
    /// Its artifacts if validation passed, else 0.
    pub weight: usize,
}

/// Runs one PoC v2 round against the devnet's registered ML nodes.
pub async fn run_round(
    devnet: &Shared,
    cfg: &RoundConfig,
    progress: impl Fn(&str),
) -> Result<Vec<NodeResult>, RoundError> {
    let targets = enabled_targets(devnet)?;
    let callback =
        format!("{}/v2/poc-batches/{}", cfg.callback_base.trim_end_matches('/'), callback_segment(&cfg.model));

    // 1. The model up everywhere (InferenceUpNodeCommand skips nodes already serving it).
    for t in &targets {
        let state = t.client.state().await.map_err(t.fail("/api/v1/state"))?;
        let serving = state.state == ServiceState::Inference && state.loaded_model.as_deref() == Some(&cfg.model);
        if !serving {
            t.client.stop().await.map_err(t.fail("/api/v1/stop"))?;
            let args = t.config.models.get(&cfg.model).map(|a| a.args.clone()).unwrap_or_default();
            let answer = t.client.inference_up_auto(&cfg.model, &args).await.map_err(t.fail("/api/v1/inference/up"))?;
            t.refused(answer, "/api/v1/inference/up")?;
        }
    }
    progress(&format!("{} ML nodes serve {}", targets.len(), cfg.model));

    // 2. Generation (StartPoCNodeCommandV2: skipped where already generating).
    for t in &targets {
        let status = t.client.pow_status_v2().await.ok();
        if status.is_some_and(|s| s.status == "GENERATING") {
            continue;
        }
        let init = json!({
            "block_hash": cfg.block_hash, "block_height": cfg.block_height, "public_key": cfg.public_key,
            "node_id": t.node_num, "node_count": targets.len(),
            "params": {"model": cfg.model, "seq_len": cfg.seq_len},
            "url": callback, "poc_stronger_rng": cfg.stronger_rng,
        });
        let answer = t.client.init_generate_v2(&init).await.map_err(t.fail("/api/v1/inference/pow/init/generate"))?;
        t.refused(answer, "/api/v1/inference/pow/init/generate")?;
    }
    progress(&format!("PoC v2 generation started for {:?}", cfg.generate_for));
    tokio::time::sleep(cfg.generate_for).await;

    // 3. The transition to validation stops generation once (what is pending is delivered).
    for t in &targets {
        let answer = t.client.stop_pow_v2().await.map_err(t.fail("/api/v1/inference/pow/stop"))?;
        t.refused(answer, "/api/v1/inference/pow/stop")?;
    }
    // The last deliveries land within the window's wind-down, as on the chain.
    tokio::time::sleep(cfg.settle_for).await;
    let artifacts = collect_artifacts(devnet, cfg);
    progress(&format!(
        "generation over: {} artifacts from {} ML nodes; validating samples",
        artifacts.values().map(BTreeMap::len).sum::<usize>(),
        artifacts.len()
    ));

    // 4. Each node's sample to the next node, queued; verdicts by callback.
    let mut samples: BTreeMap<u64, (String, Vec<i64>)> = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let Some(own) = artifacts.get(&t.node_num) else { continue };
        let validator = &targets[(i + 1) % targets.len()];
        let sample: Vec<Artifact> = own
            .iter()
            .take(cfg.validation_sample)
            .map(|(n, v)| Artifact { nonce: *n, vector_b64: v.clone() })
            .collect();
        let request = json!({
            "block_hash": cfg.block_hash, "block_height": cfg.block_height, "public_key": cfg.public_key,
            "node_id": validator.node_num, "node_count": targets.len(),
            "nonces": sample.iter().map(|a| a.nonce).collect::<Vec<_>>(),
            "params": {"model": cfg.model, "seq_len": cfg.seq_len},
            "url": callback, "validation": {"artifacts": sample},
            "stat_test": cfg.stat_test, "poc_stronger_rng": cfg.stronger_rng,
        });
        let answer =
            validator.client.generate_v2(&request).await.map_err(validator.fail("/api/v1/inference/pow/generate"))?;
        validator.refused(answer, "/api/v1/inference/pow/generate")?;
        samples.insert(t.node_num, (validator.id.clone(), sample.iter().map(|a| a.nonce).collect()));
    }
    let deadline = tokio::time::Instant::now() + cfg.settle_for * 10;
    loop {
        let done = {
            let d = devnet.lock().expect("devnet");
            d.validated_v2.iter().filter(|(_, v)| v.block_height == cfg.block_height).count() >= samples.len()
        };
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 5. Weights. A verdict names its validator (`node_id`, as the network node sets it), and
    // each validator judged one node's sample.
    let d = devnet.lock().expect("devnet");
    let by_validator: BTreeMap<&str, ValidatedResult> = d
        .validated_v2
        .iter()
        .filter(|(_, v)| v.block_height == cfg.block_height)
        .filter_map(|(_, v)| {
            let validator = targets.iter().find(|t| t.node_num as i64 == v.node_id)?;
            Some((validator.id.as_str(), v.clone()))
        })
        .collect();
    Ok(targets
        .iter()
        .map(|t| {
            let count = artifacts.get(&t.node_num).map_or(0, BTreeMap::len);
            let sample = samples.get(&t.node_num);
            let verdict = sample.and_then(|(by, _)| by_validator.get(by.as_str()).cloned());
            let passed = verdict.as_ref().is_some_and(|v| !v.fraud_detected);
            NodeResult {
                id: t.id.clone(),
                node_num: t.node_num,
                artifacts: count,
                validated_by: sample.map(|(by, _)| by.clone()),
                n_mismatch: verdict.as_ref().map(|v| v.n_mismatch),
                fraud_detected: verdict.as_ref().map(|v| v.fraud_detected),
                weight: if passed { count } else { 0 },
            }
        })
        .collect())
}

/// Each ML node's unique artifacts of this round, nonce → vector.
fn collect_artifacts(devnet: &Shared, cfg: &RoundConfig) -> BTreeMap<u64, BTreeMap<i64, String>> {
    let d = devnet.lock().expect("devnet");
    let mut by_node: BTreeMap<u64, BTreeMap<i64, String>> = BTreeMap::new();
    for (model, batch) in &d.generated_v2 {
        if model != &cfg.model || batch.block_height != cfg.block_height {
            continue;
        }
        let node = by_node.entry(batch.node_id as u64).or_default();
        for a in &batch.artifacts {
            node.entry(a.nonce).or_insert_with(|| a.vector_b64.clone());
        }
    }
    by_node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_escaped_twice_as_the_network_node_escapes_them() {
        assert_eq!(callback_segment("Qwen/Qwen3-0.6B"), "Qwen%252FQwen3-0.6B");
        assert_eq!(callback_segment("moonshotai/Kimi-K2.6"), "moonshotai%252FKimi-K2.6");
        assert_eq!(crate::callback_model("Qwen%2FQwen3-0.6B"), "Qwen/Qwen3-0.6B");
    }
}
