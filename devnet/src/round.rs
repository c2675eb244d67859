//! A PoC v1 round, driven the way the network node drives one: every registered, enabled ML
//! node gets `init/generate` with its broker number, generates for a while and posts proofs to
//! the callback server; then each node's proofs are sampled and handed to the next node for
//! validation; the verdicts decide whose weight counts.

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_protocol::pow::{Params, ProofBatch};
use serde_json::json;

use crate::Shared;

/// One round's settings.
#[derive(Clone, Debug)]
pub struct RoundConfig {
    pub block_hash: String,
    pub block_height: i64,
    /// The participant's key: every ML node of a host proves under it.
    pub public_key: String,
    pub params: Params,
    pub r_target: f64,
    pub fraud_threshold: f64,
    pub batch_size: usize,
    /// How long the ML nodes generate.
    pub generate_for: Duration,
    /// How long to wait for the last batches and the verdicts.
    pub settle_for: Duration,
    /// Nonces per ML node sent for validation (upstream samples 200).
    pub validation_sample: usize,
    /// Base of the callback server the ML nodes post to (`<devnet>/v1/poc-batches`).
    pub callback_url: String,
}

/// How one ML node did.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeResult {
    pub id: String,
    pub node_num: u64,
    /// Unique proofs it delivered.
    pub valid_nonces: usize,
    /// Which ML node validated its sample.
    pub validated_by: Option<String>,
    pub n_invalid: Option<i64>,
    pub fraud_detected: Option<bool>,
    /// Its proofs if validation passed, else 0.
    pub weight: usize,
}

#[derive(Debug)]
pub enum RoundError {
    NoNodes,
    Http { node: String, what: String, reason: String },
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoNodes => f.write_str("no enabled ML node is registered"),
            Self::Http { node, what, reason } => write!(f, "{what} on {node}: {reason}"),
        }
    }
}

impl std::error::Error for RoundError {}

struct Target {
    id: String,
    node_num: u64,
    base: String,
}

async fn post(http: &reqwest::Client, t: &Target, path: &str, body: serde_json::Value) -> Result<(), RoundError> {
    let fail = |reason: String| RoundError::Http { node: t.id.clone(), what: path.to_string(), reason };
    let response = http.post(format!("{}{path}", t.base)).json(&body).send().await.map_err(|e| fail(e.to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        return Err(fail(format!("HTTP {status}: {}", response.text().await.unwrap_or_default())));
    }
    Ok(())
}

/// Runs one round against the devnet's registered ML nodes; `progress` hears what happens.
pub async fn run_round(
    devnet: &Shared,
    http: &reqwest::Client,
    cfg: &RoundConfig,
    progress: impl Fn(&str),
) -> Result<Vec<NodeResult>, RoundError> {
    let targets: Vec<Target> = devnet
        .lock()
        .expect("devnet")
        .nodes()
        .into_iter()
        .filter(|n| n.state.admin_state.enabled)
        .map(|n| {
            let c = n.node.config;
            Target {
                base: format!("http://{}:{}{}", c.host, c.poc_port, c.poc_segment),
                id: c.id,
                node_num: n.node.node_num,
            }
        })
        .collect();
    if targets.is_empty() {
        return Err(RoundError::NoNodes);
    }
    let init = |t: &Target| {
        json!({
            "node_id": t.node_num, "node_count": targets.len(), "block_hash": cfg.block_hash,
            "block_height": cfg.block_height, "public_key": cfg.public_key, "batch_size": cfg.batch_size,
            "r_target": cfg.r_target, "fraud_threshold": cfg.fraud_threshold, "params": cfg.params,
            "url": cfg.callback_url,
        })
    };

    for t in &targets {
        post(http, t, "/api/v1/pow/init/generate", init(t)).await?;
    }
    progress(&format!("PoC generation started on {} ML nodes for {:?}", targets.len(), cfg.generate_for));
    tokio::time::sleep(cfg.generate_for).await;

    // Generation ends: every node moves to validation (and stops generating).
    for t in &targets {
        post(http, t, "/api/v1/pow/phase/validate", json!(null)).await?;
    }
    tokio::time::sleep(cfg.settle_for).await;
    let proofs: BTreeMap<u64, ProofBatch> = {
        let d = devnet.lock().expect("devnet");
        let mut by_node: BTreeMap<u64, ProofBatch> = BTreeMap::new();
        for b in d.generated.iter().filter(|b| b.block_height == cfg.block_height) {
            let merged = by_node.entry(b.node_id as u64).or_insert_with(|| ProofBatch {
                nonces: vec![],
                dist: vec![],
                ..b.clone()
            });
            for (n, dist) in b.nonces.iter().zip(&b.dist) {
                if !merged.nonces.contains(n) {
                    merged.nonces.push(*n);
                    merged.dist.push(*dist);
                }
            }
        }
        by_node
    };
    progress(&format!(
        "generation over: {} proofs from {} ML nodes; validating samples",
        proofs.values().map(|b| b.nonces.len()).sum::<usize>(),
        proofs.len()
    ));

    // Each node's sample goes to the next node.
    let mut validators = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let Some(batch) = proofs.get(&t.node_num) else { continue };
        let validator = &targets[(i + 1) % targets.len()];
        let sample = ProofBatch {
            nonces: batch.nonces.iter().take(cfg.validation_sample).copied().collect(),
            dist: batch.dist.iter().take(cfg.validation_sample).copied().collect(),
            ..batch.clone()
        };
        post(http, validator, "/api/v1/pow/validate", serde_json::to_value(&sample).expect("serializes")).await?;
        validators.insert(t.node_num, validator.id.clone());
    }
    let deadline = tokio::time::Instant::now() + cfg.settle_for * 4;
    loop {
        let done = {
            let d = devnet.lock().expect("devnet");
            validators
                .keys()
                .all(|n| d.validated.iter().any(|v| v.block_height == cfg.block_height && v.node_id as u64 == *n))
        };
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in &targets {
        post(http, t, "/api/v1/pow/stop", json!(null)).await?;
    }

    let d = devnet.lock().expect("devnet");
    let weights = d.weights(cfg.block_height);
    Ok(targets
        .iter()
        .map(|t| {
            let verdict =
                d.validated.iter().rev().find(|v| v.block_height == cfg.block_height && v.node_id as u64 == t.node_num);
            let valid_nonces = weights.get(&(t.node_num as i64)).copied().unwrap_or(0);
            let passed = verdict.is_some_and(|v| !v.fraud_detected);
            NodeResult {
                id: t.id.clone(),
                node_num: t.node_num,
                valid_nonces,
                validated_by: validators.get(&t.node_num).cloned(),
                n_invalid: verdict.map(|v| v.n_invalid),
                fraud_detected: verdict.map(|v| v.fraud_detected),
                weight: if passed { valid_nonces } else { 0 },
            }
        })
        .collect())
}
