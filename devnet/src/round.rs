//! A PoC v1 round, driven the way a 2025 network node drives one (gonka-ai/gonka `312044d`,
//! `broker/node_worker_commands.go`), with its bytes ([`crate::ml_node_client`]): every
//! registered, enabled ML node is asked `GET /state` (and `GET /pow/status` when in POW), stopped
//! unless already stopped, and sent `/pow/init/generate` with its broker number; it generates for
//! a while and posts proofs to the callback server. Then each node gets `/pow/init/validate`
//! (the same init: no restart), a sample of another node's proofs arrives at `/pow/validate`
//! (with `node_id` 0, as upstream samples), and the verdicts decide whose weight counts. The
//! round ends as the epoch does: `/stop`, then `/inference/up` with the node's first model.
//!
//! Simplified from upstream: the sample is the first proofs, not a seeded permutation, and the
//! validator is the next ML node in the list.

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_protocol::ml_node::{InferenceUpResponse, ServiceState};
use gonka_protocol::pow::{InitRequest, Params, PowState, ProofBatch};

use gonka_protocol::admin::InferenceNodeConfig;

use crate::Shared;
use crate::ml_node_client::{Answer, ClientError, MlNodeClient};

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
    /// What it answered `/inference/up` at the end of the round: the answer's `status` (`OK`,
    /// `ERROR`), else `HTTP <code>` (the 2025 network node does not look at it).
    pub inference_up: Option<String>,
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

/// A registered, enabled ML node a round drives (both rounds: [`crate::round_v2`] too).
pub(crate) struct Target {
    pub id: String,
    pub node_num: u64,
    /// Its registration (models and their args).
    pub config: InferenceNodeConfig,
    pub client: MlNodeClient,
}

/// Every registered, enabled ML node, with a client for its management API.
pub(crate) fn enabled_targets(devnet: &Shared) -> Result<Vec<Target>, RoundError> {
    let targets: Vec<Target> = devnet
        .lock()
        .expect("devnet")
        .nodes()
        .into_iter()
        .filter(|n| n.state.admin_state.enabled)
        .map(|n| {
            let c = n.node.config;
            let base = format!("http://{}:{}{}", c.host, c.poc_port, c.poc_segment);
            let client = MlNodeClient::new(&base).map_err(|e| RoundError::Http {
                node: c.id.clone(),
                what: "its address".into(),
                reason: e.to_string(),
            })?;
            Ok(Target { id: c.id.clone(), node_num: n.node.node_num, config: c, client })
        })
        .collect::<Result<_, RoundError>>()?;
    if targets.is_empty() {
        return Err(RoundError::NoNodes);
    }
    Ok(targets)
}

impl Target {
    pub fn fail(&self, what: &str) -> impl Fn(ClientError) -> RoundError {
        let (node, what) = (self.id.clone(), what.to_string());
        move |e| RoundError::Http { node: node.clone(), what: what.clone(), reason: e.to_string() }
    }

    /// The answer, or the refusal as an error naming this node and the call.
    pub fn refused(&self, answer: Answer, what: &str) -> Result<Answer, RoundError> {
        if answer.is_success() {
            return Ok(answer);
        }
        Err(RoundError::Http {
            node: self.id.clone(),
            what: what.to_string(),
            reason: format!("HTTP {}: {}", answer.status, answer.text()),
        })
    }

    /// `StartPoCNodeCommand` / `InitValidateNodeCommand`: skip if already in that PoC phase,
    /// stop first unless stopped (or, for validation, already in POW), then init.
    async fn enter_poc(&self, dto: &InitRequest, phase: PowState) -> Result<(), RoundError> {
        let state = self.client.state().await.ok();
        if state.as_ref().is_some_and(|s| s.state == ServiceState::Pow) {
            let pow = self.client.pow_status().await.ok();
            if pow.is_some_and(|p| p.status == phase) {
                return Ok(());
            }
        }
        let keeps_running =
            |s: ServiceState| s == ServiceState::Stopped || (phase == PowState::Validating && s == ServiceState::Pow);
        if let Some(s) = state.filter(|s| !keeps_running(s.state)) {
            tracing::debug!(node = %self.id, state = ?s.state, "stopping the ML node for PoC");
            self.client.stop().await.map_err(self.fail("/api/v1/stop"))?;
        }
        let answer = match phase {
            PowState::Validating => self.client.init_validate(dto).await,
            _ => self.client.init_generate(dto).await,
        };
        // The network node reads no status here, only whether the request went out; the
        // devnet reports refusals, which upstream would not notice.
        self.refused(answer.map_err(self.fail("/api/v1/pow/init"))?, "/api/v1/pow/init").map(drop)
    }
}

/// Runs one round against the devnet's registered ML nodes; `progress` hears what happens.
pub async fn run_round(
    devnet: &Shared,
    cfg: &RoundConfig,
    progress: impl Fn(&str),
) -> Result<Vec<NodeResult>, RoundError> {
    let targets = enabled_targets(devnet)?;
    let init = |t: &Target| InitRequest {
        block_hash: cfg.block_hash.clone(),
        block_height: cfg.block_height,
        public_key: cfg.public_key.clone(),
        batch_size: cfg.batch_size,
        r_target: cfg.r_target,
        fraud_threshold: cfg.fraud_threshold,
        params: cfg.params.clone(),
        node_id: t.node_num as i64,
        node_count: targets.len() as i64,
        url: cfg.callback_url.clone(),
    };

    for t in &targets {
        t.enter_poc(&init(t), PowState::Generating).await?;
    }
    progress(&format!("PoC generation started on {} ML nodes for {:?}", targets.len(), cfg.generate_for));
    tokio::time::sleep(cfg.generate_for).await;

    // Generation ends: every node moves to validation (and stops generating).
    for t in &targets {
        t.enter_poc(&init(t), PowState::Validating).await?;
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

    // Each node's sample goes to the next node; the verdict comes back with `node_id` 0, so it
    // is told apart by its nonces (nonce ranges of ML nodes are disjoint).
    let mut samples: BTreeMap<u64, (String, Vec<i64>)> = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let Some(batch) = proofs.get(&t.node_num) else { continue };
        let validator = &targets[(i + 1) % targets.len()];
        let sample = ProofBatch {
            nonces: batch.nonces.iter().take(cfg.validation_sample).copied().collect(),
            dist: batch.dist.iter().take(cfg.validation_sample).copied().collect(),
            node_id: 0,
            ..batch.clone()
        };
        let answer = validator.client.validate_batch(&sample).await.map_err(validator.fail("/api/v1/pow/validate"))?;
        validator.refused(answer, "/api/v1/pow/validate")?;
        samples.insert(t.node_num, (validator.id.clone(), sample.nonces));
    }
    let verdict_of = |d: &crate::Devnet, nonces: &[i64]| {
        d.validated.iter().rev().find(|v| v.block_height == cfg.block_height && v.nonces == nonces).cloned()
    };
    let deadline = tokio::time::Instant::now() + cfg.settle_for * 4;
    loop {
        let done = {
            let d = devnet.lock().expect("devnet");
            samples.values().all(|(_, nonces)| verdict_of(&d, nonces).is_some())
        };
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The epoch moves on to inference: stop, then bring the model up.
    let mut inference_up = BTreeMap::new();
    for t in &targets {
        t.client.stop().await.map_err(t.fail("/api/v1/stop"))?;
        if let Some((model, args)) = t.config.models.iter().next() {
            let answer = t.client.inference_up(model, &args.args).await.map_err(t.fail("/api/v1/inference/up"))?;
            let status = answer.json::<InferenceUpResponse>().map(|r| r.status);
            inference_up.insert(t.node_num, status.unwrap_or_else(|_| format!("HTTP {}", answer.status)));
        }
    }

    let d = devnet.lock().expect("devnet");
    let weights = d.weights(cfg.block_height);
    Ok(targets
        .iter()
        .map(|t| {
            let sample = samples.get(&t.node_num);
            let verdict = sample.and_then(|(_, nonces)| verdict_of(&d, nonces));
            let valid_nonces = weights.get(&(t.node_num as i64)).copied().unwrap_or(0);
            let passed = verdict.as_ref().is_some_and(|v| !v.fraud_detected);
            NodeResult {
                id: t.id.clone(),
                node_num: t.node_num,
                valid_nonces,
                validated_by: sample.map(|(v, _)| v.clone()),
                n_invalid: verdict.as_ref().map(|v| v.n_invalid),
                fraud_detected: verdict.as_ref().map(|v| v.fraud_detected),
                weight: if passed { valid_nonces } else { 0 },
                inference_up: inference_up.get(&t.node_num).cloned(),
            }
        })
        .collect())
}
