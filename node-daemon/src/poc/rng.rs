//! numpy's random numbers, bit for bit, for PoC v1.
//!
//! Upstream derives the proof model's weights, each nonce's input and the target vector from
//! `numpy.random.default_rng(SeedSequence(entropy))`. A proof only validates on another ML node
//! if both draw the same numbers, so this module follows numpy's definitions exactly:
//! `SeedSequence` (entropy pool and `generate_state`), `PCG64` (128-bit LCG, XSL-RR output,
//! buffered 32-bit halves), `standard_normal` (256-layer ziggurat), `normal`, and
//! `permutation` (Fisher-Yates with masked rejection sampling). The test suite compares every
//! draw against numpy itself.

use sha2::{Digest, Sha256};

use super::ziggurat_tables;

const POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's `SeedSequence` for a run-entropy array of 32-bit words (no spawn key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSequence {
    pool: [u32; POOL_SIZE],
}

impl SeedSequence {
    pub fn new(entropy: &[u32]) -> Self {
        let mut hash_const = INIT_A;
        let mut hashmix = |value: u32| {
            let mut value = value ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        };
        let mix = |x: u32, y: u32| {
            let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
            r ^ (r >> XSHIFT)
        };
        let mut pool = [0u32; POOL_SIZE];
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(entropy.get(i).copied().unwrap_or(0));
        }
        for src in 0..POOL_SIZE {
            for dst in 0..POOL_SIZE {
                if src != dst {
                    let h = hashmix(pool[src]);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &word in entropy.iter().skip(POOL_SIZE) {
            for slot in &mut pool {
                *slot = mix(*slot, hashmix(word));
            }
        }
        Self { pool }
    }

    /// `generate_state(n_words, np.uint64)`: 32-bit words paired little-endian.
    pub fn generate_state_u64(&self, n_words: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let words: Vec<u32> = (0..n_words * 2)
            .map(|i| {
                let mut v = self.pool[i % POOL_SIZE] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect();
        words.chunks(2).map(|p| u64::from(p[0]) | (u64::from(p[1]) << 32)).collect()
    }
}

const PCG_MULTIPLIER: u128 = (0x2360_ed05_1fc6_5da4 << 64) | 0x4385_df64_9fcc_f645;

/// numpy's `PCG64` bit generator.
#[derive(Clone, Debug)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    /// numpy hands out a 64-bit draw as two 32-bit halves, low half first.
    buffered_u32: Option<u32>,
}

impl Pcg64 {
    /// Seeded as `PCG64(seed_sequence)` is.
    pub fn from_seed_sequence(seq: &SeedSequence) -> Self {
        let s = seq.generate_state_u64(4);
        let initstate = (u128::from(s[0]) << 64) | u128::from(s[1]);
        let initseq = (u128::from(s[2]) << 64) | u128::from(s[3]);
        let mut rng = Self { state: 0, inc: (initseq << 1) | 1, buffered_u32: None };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULTIPLIER).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let rot = (self.state >> 122) as u32;
        (((self.state >> 64) as u64) ^ (self.state as u64)).rotate_right(rot)
    }

    pub fn next_u32(&mut self) -> u32 {
        if let Some(half) = self.buffered_u32.take() {
            return half;
        }
        let next = self.next_u64();
        self.buffered_u32 = Some((next >> 32) as u32);
        next as u32
    }

    /// Uniform on [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// numpy's `Generator` over [`Pcg64`], the draws PoC v1 uses.
#[derive(Clone, Debug)]
pub struct Generator {
    bits: Pcg64,
}

/// numpy's constants for the tail: r, 1/r.
#[allow(clippy::excessive_precision)]
const ZIGGURAT_R: f64 = 3.6541528853610087963519472518;
#[allow(clippy::excessive_precision)]
const ZIGGURAT_INV_R: f64 = 0.27366123732975827203338247596;

fn wi(i: usize) -> f64 {
    f64::from_bits(ziggurat_tables::WI_BITS[i])
}

fn fi(i: usize) -> f64 {
    f64::from_bits(ziggurat_tables::FI_BITS[i])
}

impl Generator {
    pub fn new(seq: &SeedSequence) -> Self {
        Self { bits: Pcg64::from_seed_sequence(seq) }
    }

    /// `rng.standard_normal()`.
    pub fn standard_normal(&mut self) -> f64 {
        loop {
            let r = self.bits.next_u64();
            let idx = (r & 0xff) as usize;
            let r = r >> 8;
            let negative = r & 1 == 1;
            let rabs = (r >> 1) & 0x000f_ffff_ffff_ffff;
            let mut x = rabs as f64 * wi(idx);
            if negative {
                x = -x;
            }
            if rabs < ziggurat_tables::KI[idx] {
                return x;
            }
            if idx == 0 {
                // The tail beyond r, by Marsaglia's method.
                loop {
                    let xx = -ZIGGURAT_INV_R * (-self.bits.next_f64()).ln_1p();
                    let yy = -(-self.bits.next_f64()).ln_1p();
                    if yy + yy > xx * xx {
                        return if (rabs >> 8) & 1 == 1 { -(ZIGGURAT_R + xx) } else { ZIGGURAT_R + xx };
                    }
                }
            }
            if (fi(idx - 1) - fi(idx)) * self.bits.next_f64() + fi(idx) < (-0.5 * x * x).exp() {
                return x;
            }
        }
    }

    /// `rng.standard_normal(n)`.
    pub fn standard_normal_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.standard_normal()).collect()
    }

    /// `rng.normal(loc, scale, n)`.
    pub fn normal_vec(&mut self, loc: f64, scale: f64, n: usize) -> Vec<f64> {
        (0..n).map(|_| loc + scale * self.standard_normal()).collect()
    }

    /// A uniform integer in [0, max], by numpy's masked rejection (`random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value = if max <= u64::from(u32::MAX) {
                u64::from(self.bits.next_u32()) & mask
            } else {
                self.bits.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }

    /// `rng.permutation(n)`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut items: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
        items
    }
}

/// Upstream's `get_extended_entropy`: SHA-256 of `"{seed}_{i}"` for i in 0..num_hashes, each
/// digest read as little-endian 32-bit words.
pub fn extended_entropy(seed: &str, num_hashes: usize) -> Vec<u32> {
    (0..num_hashes)
        .flat_map(|i| {
            let digest = Sha256::digest(format!("{seed}_{i}").as_bytes());
            digest.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>()
        })
        .collect()
}

/// Upstream's `get_rng(seed, num_hashes)`.
pub fn seeded(seed: &str, num_hashes: usize) -> Generator {
    Generator::new(&SeedSequence::new(&extended_entropy(seed, num_hashes)))
}

/// Upstream's `get_uniform_vector_on_sphere(rng, dim)`: a normal vector divided by its norm,
/// the norm summed as `np.linalg.norm` sums (pairwise), so the result matches to the bit.
pub fn uniform_on_sphere(rng: &mut Generator, dim: usize) -> Vec<f64> {
    let mut v = rng.standard_normal_vec(dim);
    let squares: Vec<f64> = v.iter().map(|x| x * x).collect();
    let norm = pairwise_sum(&squares).sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// numpy's pairwise summation of a contiguous float array (`pairwise_sum` in its loops), in
/// the array's own precision: sequential below 8 items, eight interleaved partial sums up to a
/// block of 128, halves (cut at a multiple of 8) above.
pub fn pairwise_sum<T>(a: &[T]) -> T
where
    T: Copy + std::ops::Add<Output = T> + std::ops::AddAssign + std::ops::Neg<Output = T> + Default,
{
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = -T::default();
        for &x in a {
            res += x;
        }
        return res;
    }
    if n <= BLOCK {
        let mut r = [T::default(); 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for k in 0..8 {
                r[k] += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        return res;
    }
    let mut half = n / 2;
    half -= half % 8;
    pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ziggurat_tables_have_numpys_shape() {
        // Layer 0 is the base strip with the tail; the widest layer's edge is r.
        assert_eq!(wi(255) * 4_503_599_627_370_496.0, ZIGGURAT_R);
        assert_eq!(ziggurat_tables::KI[1], 0, "the top layer always takes the wedge test");
        assert_eq!(fi(0), 1.0);
    }

    #[test]
    fn entropy_is_sha256_words_little_endian() {
        let words = extended_entropy("abc", 1);
        // sha256("abc_0") starts 0x1a 0x4e ...; read as a little-endian u32.
        let digest = Sha256::digest(b"abc_0");
        assert_eq!(words.len(), 8);
        assert_eq!(words[0], u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut rng = seeded("block_target", 1);
        let mut p = rng.permutation(1000);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn sphere_vectors_have_unit_length() {
        let v = uniform_on_sphere(&mut seeded("x", 1), 4096);
        let len: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((len - 1.0).abs() < 1e-12);
    }
}
