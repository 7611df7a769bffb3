//! The few dense kernels the sketch spends its time in. Each is written so the compiler
//! vectorises it (independent accumulators, no reductions it would have to reassociate) and is
//! compiled twice, for the baseline target and for AVX2+FMA, picked at run time: the baseline
//! x86-64 target has only 4-wide SSE2.

use multiversion::multiversion;

#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Four dot products sharing one operand: `[⟨a,b0⟩, ⟨a,b1⟩, ⟨a,b2⟩, ⟨a,b3⟩]`, reading `a` once.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let (mut s0, mut s1, mut s2, mut s3) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    let chunks = a
        .chunks_exact(8)
        .zip(b[0].chunks_exact(8))
        .zip(b[1].chunks_exact(8))
        .zip(b[2].chunks_exact(8))
        .zip(b[3].chunks_exact(8));
    for ((((x, y0), y1), y2), y3) in chunks {
        for l in 0..8 {
            s0[l] += x[l] * y0[l];
            s1[l] += x[l] * y1[l];
            s2[l] += x[l] * y2[l];
            s3[l] += x[l] * y3[l];
        }
    }
    let n = a.len() / 8 * 8;
    let tail = |y: &[f32]| a[n..].iter().zip(&y[n..]).map(|(x, y)| x * y).sum::<f32>();
    [
        s0.iter().sum::<f32>() + tail(b[0]),
        s1.iter().sum::<f32>() + tail(b[1]),
        s2.iter().sum::<f32>() + tail(b[2]),
        s3.iter().sum::<f32>() + tail(b[3]),
    ]
}

/// `y += a * x`
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `y += Σ_j a_j · x_j`, in blocks small enough that `y` stays in L1 across the columns.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn combine<C: AsRef<[f32]>>(y: &mut [f32], cols: &[C], coef: &[f32]) {
    const BLOCK: usize = 512;
    let mut start = 0;
    while start < y.len() {
        let end = (start + BLOCK).min(y.len());
        let yb = &mut y[start..end];
        for (col, &a) in cols.iter().zip(coef) {
            if a != 0.0 {
                for (y, x) in yb.iter_mut().zip(&col.as_ref()[start..end]) {
                    *y += a * x;
                }
            }
        }
        start = end;
    }
}

/// `y[i] += a · sign[i] · x[idx[i]]`: a signed permutation applied by gathering.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn gather_add(y: &mut [f32], a: f32, x: &[f32], idx: &[u32], sign: &[f32]) {
    debug_assert_eq!(y.len(), idx.len());
    for ((y, &i), &s) in y.iter_mut().zip(idx).zip(sign) {
        *y += a * s * x[i as usize];
    }
}

pub(crate) fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}
