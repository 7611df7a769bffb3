//! Seeded streams from which every sketch matrix is regenerated.
//!
//! The generator is part of the sketch format: two processes that share a seed must build the
//! same matrices, today and after any dependency upgrade. So the stream is ChaCha8 (a fixed,
//! specified cipher) keyed by SplitMix64 of `(seed, tag, a, b)`, and the few conversions from
//! raw 64-bit words (uniform, normal, bounded integer) are written here rather than borrowed
//! from a distribution crate whose value stability is not promised across versions.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// What a stream is for; part of its key, so different matrices never share a stream.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub(crate) enum Tag {
    /// Column `b` of module `a`'s embedding matrix.
    Embedding = 0x52,
    /// The rotation of module `a`, slot `b`.
    Rotation = 0x51,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic random stream.
pub(crate) struct Stream {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Stream {
    pub(crate) fn new(seed: u64, tag: Tag, a: u64, b: u64) -> Self {
        let mut h = splitmix(seed);
        h = splitmix(h ^ tag as u64);
        h = splitmix(h ^ a);
        h = splitmix(h ^ b);
        let mut key = [0u8; 32];
        for chunk in key.chunks_exact_mut(8) {
            h = splitmix(h);
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        Stream { rng: ChaCha8Rng::from_seed(key), spare: None }
    }

    /// A stream for callers that only need reproducible randomness (tests, learning).
    pub(crate) fn from_seed(seed: u64) -> Self {
        Stream::new(seed, Tag::Embedding, u64::MAX, u64::MAX)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Uniform in (0, 1].
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, by the Box–Muller transform.
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let t = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * t.sin());
        r * t.cos()
    }

    /// Uniform in `0..n`, without modulo bias.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX - n + 1) % n;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % n;
            }
        }
    }

    /// +1 or -1 with equal probability.
    pub(crate) fn sign(&mut self) -> f32 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(7, Tag::Rotation, 1, 2);
                move |_| s.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(7, Tag::Rotation, 1, 2);
                move |_| s.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(7, Tag::Rotation, 2, 1);
                move |_| s.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normals_have_unit_variance_and_bounded_draws_cover_the_range() {
        let mut s = Stream::from_seed(3);
        let n = 200_000;
        let (mut sum, mut sq) = (0.0, 0.0);
        for _ in 0..n {
            let z = s.normal();
            sum += z;
            sq += z * z;
        }
        assert!((sum / n as f64).abs() < 0.01);
        assert!((sq / n as f64 - 1.0).abs() < 0.02);
        let mut seen = [0u32; 7];
        for _ in 0..70_000 {
            seen[s.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (9_000..11_000).contains(&c)), "{seen:?}");
    }
}
