//! Validating another ML node's proofs (upstream `ValidatedBatch`): recompute each claimed
//! nonce, count those that are not proofs here, and ask whether that many misses is plausible
//! for honest hardware with a one-sided binomial test.

use gonka_protocol::pow::{ProofBatch, ValidatedBatch};

/// Chance that honest hardware recomputes a proof as a miss (upstream `PROBABILITY_MISMATCH`).
pub const PROBABILITY_MISMATCH: f64 = 5e-4;

/// P(X >= k) for X ~ Binomial(n, p): scipy's `binomtest(k, n, p, alternative='greater').pvalue`.
pub fn binomial_p_value_greater(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    // pmf(i + 1) = pmf(i) * (n - i) / (i + 1) * p / (1 - p), summed in log space from pmf(k).
    let ln_q = (1.0 - p).ln();
    let ln_ratio = p.ln() - ln_q;
    let mut ln_pmf = n as f64 * ln_q;
    for i in 0..k {
        ln_pmf += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + ln_ratio;
    }
    let mut total = 0.0;
    let mut term = ln_pmf;
    for i in k..=n {
        total += term.exp();
        if i < n {
            term += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + ln_ratio;
        }
    }
    total.min(1.0)
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("nonces and dist differ in length ({nonces} vs {dist})")]
    Lengths { nonces: usize, dist: usize },
}

/// Checks a received batch before any compute is spent on it. Claims are judged later, as
/// upstream does (it answers 200 to any batch that parses).
pub fn check_claims(batch: &ProofBatch) -> Result<(), ValidationError> {
    if batch.nonces.len() != batch.dist.len() {
        return Err(ValidationError::Lengths { nonces: batch.nonces.len(), dist: batch.dist.len() });
    }
    Ok(())
}

/// The verdict on `batch`, given the distances recomputed here (same order as its nonces). A
/// nonce is a miss when it is not a proof here, or was never claimed as one (a claimed
/// distance at or above `r_target`; upstream's validator asserts on such a claim and stops).
pub fn verdict(batch: &ProofBatch, recomputed: Vec<f64>, r_target: f64, fraud_threshold: f64) -> ValidatedBatch {
    let n_invalid =
        recomputed.iter().zip(&batch.dist).filter(|(ours, claimed)| **ours > r_target || **claimed >= r_target).count()
            as u64;
    let probability_honest = if batch.nonces.is_empty() {
        1.0
    } else {
        binomial_p_value_greater(n_invalid, batch.nonces.len() as u64, PROBABILITY_MISMATCH)
    };
    ValidatedBatch {
        public_key: batch.public_key.clone(),
        block_hash: batch.block_hash.clone(),
        block_height: batch.block_height,
        nonces: batch.nonces.clone(),
        dist: recomputed,
        node_id: batch.node_id,
        received_dist: batch.dist.clone(),
        r_target,
        fraud_threshold,
        n_invalid: n_invalid as i64,
        probability_honest,
        fraud_detected: !batch.nonces.is_empty() && probability_honest < fraud_threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact values: sum of C(n, i) p^i (1-p)^(n-i) for i >= k, computed with Python's
    /// `fractions` and rounded once.
    #[test]
    fn p_values_match_exact_sums() {
        let cases = [
            (0, 200, 1.0),
            (1, 200, 0.09518521015968395), // 1 - (1 - 5e-4)^200
            (2, 200, 0.004658467804474737),
            (5, 200, 7.306115882423377e-08), // five misses in 200: fraud at threshold 1e-7
            (3, 1000, 0.01435924230509385),
            (200, 200, 0.0), // underflows, as the exact value (about 1e-660) does in f64
        ];
        for (k, n, want) in cases {
            let got = binomial_p_value_greater(k, n, PROBABILITY_MISMATCH);
            let ok = if want == 0.0 { got < 1e-300 } else { ((got - want) / want).abs() < 1e-6 };
            assert!(ok, "P(X >= {k}; n={n}) = {got}, want {want}");
        }
    }

    fn batch(dist: Vec<f64>) -> ProofBatch {
        ProofBatch {
            public_key: "pk".into(),
            block_hash: "h".into(),
            block_height: 10,
            nonces: (0..dist.len() as i64).collect(),
            dist,
            node_id: 3,
        }
    }

    #[test]
    fn honest_batches_pass_and_fabricated_ones_are_caught() {
        let claimed = batch(vec![1.3; 200]);
        let honest = verdict(&claimed, vec![1.3; 200], 1.4, 1e-7);
        assert_eq!((honest.n_invalid, honest.fraud_detected), (0, false));
        let mut recomputed = vec![1.3; 200];
        recomputed[..5].fill(1.6);
        let fraud = verdict(&claimed, recomputed, 1.4, 1e-7);
        assert_eq!((fraud.n_invalid, fraud.fraud_detected), (5, true));
        assert_eq!(fraud.received_dist, claimed.dist);
    }

    #[test]
    fn claims_that_are_not_proofs_are_accepted_and_count_as_misses() {
        let claimed = batch(vec![1.3, 1.5]);
        assert_eq!(check_claims(&claimed), Ok(()));
        assert_eq!(verdict(&claimed, vec![1.3, 1.3], 1.4, 1e-7).n_invalid, 1);
        let mut b = batch(vec![1.3]);
        b.nonces.push(9);
        assert!(matches!(check_claims(&b), Err(ValidationError::Lengths { .. })));
    }
}
