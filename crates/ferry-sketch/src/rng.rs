//! Seeded streams from which every sketch matrix is regenerated.
//!
//! The generator is part of the sketch format: two processes that share a seed must build the
//! same matrices, today and after any dependency upgrade. So the stream is ChaCha8 (a fixed,
//! specified cipher) keyed by SplitMix64 of `(seed, tag, a, b)`, and the few conversions from
//! raw 64-bit words (uniform, normal, bounded integer) are written here rather than borrowed
//! from a distribution crate whose value stability is not promised across versions.
//!
//! The normals behind the embeddings go one step further ([`Sampler::Portable`]): their `ln`,
//! `sin` and `cos` are polynomials evaluated with `+ − × ÷ √` only, which IEEE 754 rounds
//! exactly, and Rust never fuses into FMAs on its own. So every platform, libm, and SIMD width
//! draws the same bits, and a column is evaluated 2 or 4 lanes at a time instead of through
//! three libm calls per pair, which made generating a job's embeddings a visible part of it.

use multiversion::multiversion;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// How a stream turns its words into the normals of an embedding; part of the sketch format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// Box–Muller through ferry's own `ln` and `sincos` (basic IEEE operations only), the same
    /// bits on every platform.
    #[default]
    Portable,
    /// Box–Muller through the platform's `ln`, `sin` and `cos`: the sets of sketch profile
    /// format 1, read and extended as they were made.
    Libm,
}

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

    /// Fills `out` with standard normals drawn as `sampler` says.
    pub(crate) fn normals(&mut self, sampler: Sampler, out: &mut [f64]) {
        match sampler {
            Sampler::Libm => out.iter_mut().for_each(|z| *z = self.normal()),
            Sampler::Portable => {
                // Two words per pair: the radius's uniform, then the angle's.
                let words: Vec<u64> = (0..out.len().div_ceil(2) * 2).map(|_| self.next_u64()).collect();
                box_muller(&words, out);
            }
        }
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

/// `2 - (1 + w·2⁻⁵²)` for the top 52 bits `w` of a word: uniform in (0, 1], exactly.
#[inline(always)]
fn uniform_open0(word: u64) -> f64 {
    2.0 - f64::from_bits(0x3ff0_0000_0000_0000 | (word >> 12))
}

/// `ln x` for `x` in (0, 1]: `x = 2^e m` with `m` in [√½, √2), and
/// `ln m = 2 atanh s = 2(s + s³/3 + …)` with `s = (m − 1)/(m + 1)`, `|s| ≤ 0.172`; eleven terms
/// leave an error below 10⁻¹⁸.
#[inline(always)]
fn ln_unit(x: f64) -> f64 {
    // ln 2 split so that the high part has 32 significant bits: `e · LN2_HI` is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1/21, 1/19, …, 1/3: the odd reciprocals of the atanh series, innermost first.
    const ODD: [f64; 10] = [
        1.0 / 21.0,
        1.0 / 19.0,
        1.0 / 17.0,
        1.0 / 15.0,
        1.0 / 13.0,
        1.0 / 11.0,
        1.0 / 9.0,
        1.0 / 7.0,
        1.0 / 5.0,
        1.0 / 3.0,
    ];
    let bits = x.to_bits();
    let e = f64::from_bits(0x4330_0000_0000_0000 | (bits >> 52)) - (4_503_599_627_370_496.0 + 1023.0);
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m > std::f64::consts::SQRT_2;
    let (m, e) = if big { (m * 0.5, e + 1.0) } else { (m, e) };
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut p = ODD[0];
    for k in &ODD[1..] {
        p = p * z + k;
    }
    p = p * z + 1.0;
    e * LN2_HI + (e * LN2_LO + 2.0 * s * p)
}

/// `(cos φ, sin φ)` for `|φ| ≤ π/4` by their Taylor series to `φ¹⁶` and `φ¹⁷`, which leave an
/// error below 10⁻¹⁷.
#[inline(always)]
fn sincos_quarter(phi: f64) -> (f64, f64) {
    // cos φ = 1 − z/(1·2)(1 − z/(3·4)(1 − …)) and sin φ = φ(1 − z/(2·3)(1 − z/(4·5)(1 − …))),
    // innermost factor first: 1/(k(k+1)) for k = 15, 13, …, 1 and k = 16, 14, …, 2.
    const fn factors(innermost: f64) -> [f64; 8] {
        let mut out = [0.0; 8];
        let mut i = 0;
        while i < 8 {
            let k = innermost - 2.0 * i as f64;
            out[i] = 1.0 / (k * (k + 1.0));
            i += 1;
        }
        out
    }
    const COS: [f64; 8] = factors(15.0);
    const SIN: [f64; 8] = factors(16.0);
    let z = phi * phi;
    let (mut c, mut s) = (1.0, 1.0);
    for (kc, ks) in COS.iter().zip(&SIN) {
        c = 1.0 - z * kc * c;
        s = 1.0 - z * ks * s;
    }
    (c, phi * s)
}

/// Box–Muller over word pairs `(a, b)`: radius `√(−2 ln u)` with `u` from `a`; angle
/// `q·π/2 + (t − ½)·π/2` with the quadrant `q` the top two bits of `b` and `t` the next 52, so
/// the polynomials only ever see `|φ| ≤ π/4`. Pair `i` gives `out[2i]` (cosine) and
/// `out[2i + 1]` (sine).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn box_muller(words: &[u64], out: &mut [f64]) {
    let pairs = out.len() / 2;
    let words = &words[..out.len().div_ceil(2) * 2];
    for i in 0..pairs {
        (out[2 * i], out[2 * i + 1]) = box_muller_pair(words[2 * i], words[2 * i + 1]);
    }
    if out.len() % 2 == 1 {
        out[2 * pairs] = box_muller_pair(words[2 * pairs], words[2 * pairs + 1]).0;
    }
}

/// One pair of [`box_muller`].
#[inline(always)]
fn box_muller_pair(a: u64, b: u64) -> (f64, f64) {
    let r = (-2.0 * ln_unit(uniform_open0(a))).sqrt();
    let t = f64::from_bits(0x3ff0_0000_0000_0000 | ((b << 2) >> 12)) - 1.0;
    let (c, s) = sincos_quarter((t - 0.5) * std::f64::consts::FRAC_PI_2);
    let q = b >> 62;
    let (x, y) = if q & 1 == 0 { (c, s) } else { (-s, c) };
    let flip = if q & 2 == 0 { 1.0 } else { -1.0 };
    (r * x * flip, r * y * flip)
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

    #[test]
    fn portable_ln_and_sincos_agree_with_libm_at_the_ends_of_their_ranges() {
        let edge = std::f64::consts::FRAC_1_SQRT_2.to_bits();
        let xs = [1.0, 0.5, 0.25, f64::EPSILON, 2.0f64.powi(-52), 0.999_999]
            .into_iter()
            .chain([edge - 1, edge, edge + 1].map(f64::from_bits));
        for x in xs.chain((1..1000).map(|i| i as f64 / 1000.0)) {
            let (got, want) = (ln_unit(x), x.ln());
            assert!((got - want).abs() <= 1e-15 * want.abs().max(1e-300), "ln {x}: {got} vs {want}");
        }
        assert_eq!(ln_unit(1.0), 0.0);
        for i in -100..=100 {
            let phi = i as f64 / 100.0 * std::f64::consts::FRAC_PI_4;
            let (c, s) = sincos_quarter(phi);
            assert!((c - phi.cos()).abs() <= 2e-16 && (s - phi.sin()).abs() <= 2e-16, "sincos {phi}");
        }
    }

    #[test]
    fn portable_normals_are_box_muller_and_the_same_bits_at_every_lane_width() {
        let mut s = Stream::from_seed(11);
        let words: Vec<u64> = (0..20_002).map(|_| s.next_u64()).collect();
        // Odd, so the lone last normal is covered too.
        let mut out = vec![0.0; 20_001];
        box_muller(&words, &mut out);
        for (i, w) in words.chunks_exact(2).enumerate() {
            let r = (-2.0 * uniform_open0(w[0]).ln()).sqrt();
            let t = f64::from_bits(0x3ff0_0000_0000_0000 | ((w[1] << 2) >> 12)) - 1.0;
            let theta = ((w[1] >> 62) as f64 + t - 0.5) * std::f64::consts::FRAC_PI_2;
            // The dispatched kernel runs 4 or 8 lanes wide; this call is one pair at a time.
            let (a, b) = box_muller_pair(w[0], w[1]);
            assert!((a - r * theta.cos()).abs() <= 1e-14 * r.max(1.0), "pair {i}: {a} vs {}", r * theta.cos());
            assert!((b - r * theta.sin()).abs() <= 1e-14 * r.max(1.0), "pair {i}: {b} vs {}", r * theta.sin());
            assert_eq!(out[2 * i].to_bits(), a.to_bits(), "pair {i}");
            if let Some(o) = out.get(2 * i + 1) {
                assert_eq!(o.to_bits(), b.to_bits(), "pair {i}");
            }
        }
    }

    #[test]
    fn portable_normals_have_the_normal_distribution() {
        let mut out = vec![0.0; 400_000];
        Stream::from_seed(5).normals(Sampler::Portable, &mut out);
        let n = out.len() as f64;
        let mean = out.iter().sum::<f64>() / n;
        let var = out.iter().map(|z| z * z).sum::<f64>() / n - mean * mean;
        assert!(mean.abs() < 0.008 && (var - 1.0).abs() < 0.015, "mean {mean}, variance {var}");
        // Φ at a few points, each within 5 binomial standard deviations.
        for (z, phi) in
            [(-3.0, 0.001_349_9), (-1.959_964, 0.025), (-1.0, 0.158_655), (0.0, 0.5), (1.0, 0.841_345), (2.5, 0.993_79)]
        {
            let got = out.iter().filter(|&&x| x < z).count() as f64 / n;
            assert!((got - phi).abs() < 5.0 * (phi * (1.0 - phi) / n).sqrt(), "P(Z < {z}) = {got}, want {phi}");
        }
        // Cosine and sine of one pair are uncorrelated.
        let cross = out.chunks_exact(2).map(|p| p[0] * p[1]).sum::<f64>() / (n / 2.0);
        assert!(cross.abs() < 0.01, "{cross}");
    }

    /// Format 2's matrices are these draws: a change here silently breaks every sketch set.
    #[test]
    fn the_portable_stream_of_a_seed_does_not_change() {
        let mut out = [0.0; 5];
        Stream::new(42, Tag::Embedding, 3, 1).normals(Sampler::Portable, &mut out);
        let bits = out.map(f64::to_bits);
        // -0.817782457709232, -0.33824308706785877, 0.6661527164375296, 0.28523390739787746, -1.612692575503467
        let want = [0xbfea2b461de35123, 0xbfd5a5c655437d7c, 0x3fe5511f8067b43c, 0x3fd24145b7fefcbe, 0xbff9cd96bae4a163];
        assert_eq!(bits, want, "{out:?}");
    }
}
