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

/// Lanes of each inner product in [`dots`]: one AVX vector.
const DOT_LANES: usize = 8;
/// Coordinates [`dots`] takes at a time: a block's rows of `a` (8 KiB) stay in L1 while every
/// row of `b` passes, and `b`'s 2 KiB of each row stay in L2 for the next rows of `a`.
const DOT_SPAN: usize = 512;
/// Rows of `a` and of `b` in one block of [`dots`]: 12 sums of 8 lanes in registers, each load
/// of `a` feeding three multiply-adds and each of `b` four. The compiler vectorises 4 × 3 and
/// 4 × 2 blocks of 8 lanes; it left 3 × 4 blocks, and any of 16 lanes, scalar (7× slower).
const DOT_ROWS: usize = 4;
/// See [`DOT_ROWS`].
const DOT_COLS: usize = 3;
/// Rows of `a` whose sums [`dots`] holds at once: 256 × 1,001 modules is 8 MiB of lanes.
const DOT_CHUNK: usize = 256;

/// `out[i·b.len() + j] = ⟨a[i], b[j]⟩` for every pair: all inner products of two sets of
/// vectors of one length, without copying either into a packed layout (a GEMM's packing took as
/// long as its multiply-adds when one side is new for every call). Pairs go a block of
/// [`DOT_ROWS`] × [`DOT_COLS`] at a time, and [`DOT_SPAN`] coordinates at a time. Every pair sums
/// its products into 8 lanes by coordinate and adds the lanes in order, so a product does not
/// depend on the other vectors.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn dots(a: &[&[f32]], b: &[&[f32]], out: &mut [f32]) {
    let (na, nb) = (a.len(), b.len());
    assert_eq!(out.len(), na * nb, "one product per pair");
    let d = a.first().or(b.first()).map_or(0, |v| v.len());
    assert!(a.iter().chain(b).all(|v| v.len() == d), "vectors of one length");
    let fused = multiversion::target::target_cfg_f!(target_feature = "fma");
    let full = d - d % DOT_LANES;
    // Kept between calls: a fresh allocation of this size costs its page faults every time.
    let mut acc = DOT_ACC.take();
    // Rows of `a` a chunk at a time, which bounds the lanes held.
    for (a, out) in a.chunks(DOT_CHUNK).zip(out.chunks_mut(DOT_CHUNK * nb)) {
        let na = a.len();
        acc.clear();
        acc.resize(na * nb, [0.0; DOT_LANES]);
        for start in (0..full).step_by(DOT_SPAN) {
            let end = (start + DOT_SPAN).min(full);
            for i in (0..na).step_by(DOT_ROWS) {
                for j in (0..nb).step_by(DOT_COLS) {
                    let (rows, cols) = (&a[i..(i + DOT_ROWS).min(na)], &b[j..(j + DOT_COLS).min(nb)]);
                    if rows.len() == DOT_ROWS && cols.len() == DOT_COLS {
                        dot_block::<DOT_ROWS, DOT_COLS>(rows, cols, &mut acc, nb, i, j, start..end, fused);
                        continue;
                    }
                    // The edges pair by pair: the same sums, as every pair sums alike.
                    for r in 0..rows.len() {
                        for c in 0..cols.len() {
                            dot_block::<1, 1>(&rows[r..], &cols[c..], &mut acc, nb, i + r, j + c, start..end, fused);
                        }
                    }
                }
            }
        }
        for (p, (o, lanes)) in out.iter_mut().zip(&acc).enumerate() {
            let (x, y) = (&a[p / nb][full..], &b[p % nb][full..]);
            *o = lanes.iter().sum::<f32>() + x.iter().zip(y).map(|(x, y)| x * y).sum::<f32>();
        }
    }
    DOT_ACC.set(acc);
}

thread_local! {
    /// [`dots`]'s lanes.
    static DOT_ACC: std::cell::Cell<Vec<[f32; DOT_LANES]>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Coordinates `span` of the products of `I` rows of `a` (from row `i`) with `J` of `b` (from
/// row `j`), added into their lanes in `acc` (`nb` per row of `a`). Inlined so that it takes
/// the instruction set of its caller.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dot_block<const I: usize, const J: usize>(
    rows: &[&[f32]],
    cols: &[&[f32]],
    acc: &mut [[f32; DOT_LANES]],
    nb: usize,
    i: usize,
    j: usize,
    span: std::ops::Range<usize>,
    fused: bool,
) {
    let x: [&[f32]; I] = std::array::from_fn(|r| &rows[r][span.clone()]);
    let y: [&[f32]; J] = std::array::from_fn(|c| &cols[c][span.clone()]);
    let mut sums: [[[f32; DOT_LANES]; J]; I] =
        std::array::from_fn(|r| std::array::from_fn(|c| acc[(i + r) * nb + j + c]));
    for k in (0..span.len()).step_by(DOT_LANES) {
        let xv: [&[f32; DOT_LANES]; I] =
            std::array::from_fn(|r| x[r][k..k + DOT_LANES].try_into().expect("a lane's worth"));
        let yv: [&[f32; DOT_LANES]; J] =
            std::array::from_fn(|c| y[c][k..k + DOT_LANES].try_into().expect("a lane's worth"));
        for r in 0..I {
            for c in 0..J {
                for l in 0..DOT_LANES {
                    let s = &mut sums[r][c][l];
                    *s = if fused { xv[r][l].mul_add(yv[c][l], *s) } else { *s + xv[r][l] * yv[c][l] };
                }
            }
        }
    }
    for (r, row) in sums.iter().enumerate() {
        for (c, lanes) in row.iter().enumerate() {
            acc[(i + r) * nb + j + c] = *lanes;
        }
    }
}

/// `y += a * x`
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `y += Σ_j a_j · x_j`. Rows are taken 128 at a time and kept in an accumulator across all the
/// columns, so `y` is loaded and stored once rather than once per column (128 measured faster
/// than 32 or 64); each element still sees the columns in order, so the result does not depend
/// on the blocking.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn combine<C: AsRef<[f32]>>(y: &mut [f32], cols: &[C], coef: &[f32]) {
    const R: usize = 128;
    let n = y.len();
    let cols: Vec<(&[f32], f32)> =
        cols.iter().zip(coef).filter(|(_, &a)| a != 0.0).map(|(c, &a)| (&c.as_ref()[..n], a)).collect();
    let mut start = 0;
    while start + R <= n {
        let mut acc = [0.0f32; R];
        acc.copy_from_slice(&y[start..start + R]);
        for &(col, a) in &cols {
            let x: &[f32; R] = col[start..start + R].try_into().expect("R floats");
            for l in 0..R {
                acc[l] += a * x[l];
            }
        }
        y[start..start + R].copy_from_slice(&acc);
        start += R;
    }
    for (i, y) in y.iter_mut().enumerate().skip(start) {
        for &(col, a) in &cols {
            *y += a * col[i];
        }
    }
}

/// For each `i`, `out[slots[i]·stride ..][..d] = Σ_j coef[i·n + j] · cols[j]` (`n = cols.len()`,
/// `d` the columns' length):
/// [`combine`] into zeroed vectors, for many vectors over the same columns. Rows go 64 at a time,
/// and each block of rows of the columns is used for every output before the next block is
/// loaded, so the columns are read from memory once for all outputs rather than once each.
/// Each output sums the columns in order, whatever the blocking. Where the CPU has FMA the
/// multiply-adds are fused (12–15% faster here), so sketches built on machines with and without
/// it can differ in the last bit; one machine always gives the same bits. With `stream`, outputs
/// are written with non-temporal stores where the CPU has them (see [`store`]).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn combine_into(
    out: &mut [f32],
    stride: usize,
    slots: &[usize],
    cols: &[&[f32]],
    coef: &[f32],
    stream: bool,
) {
    const R: usize = 2 * H;
    let n = cols.len();
    assert_eq!(coef.len(), slots.len() * n, "one coefficient per column per output");
    let d = cols.first().map_or(0, |c| c.len());
    assert!(cols.iter().all(|c| c.len() == d) && d <= stride, "columns of one length, at most the stride");
    let fused = multiversion::target::target_cfg_f!(target_feature = "fma");
    let avx = multiversion::target::target_cfg_f!(target_feature = "avx2");
    let outputs: Vec<(usize, &[f32])> = slots.iter().copied().zip(coef.chunks_exact(n)).collect();
    let stream = stream && streamable(out, stride);
    let mut start = 0;
    while start < d {
        let len = R.min(d - start);
        let rest = match (len == R, stream) {
            (false, _) => &outputs[..],
            (true, false) => pairs::<false>(out, stride, cols, &outputs, start, fused, avx),
            (true, true) => pairs::<true>(out, stride, cols, &outputs, start, fused, avx),
        };
        for &(slot, coef) in rest {
            let y = &mut out[slot * stride + start..][..len];
            if let Ok(y) = <&mut [f32; R]>::try_from(&mut *y) {
                [*y] = block::<1, R>(cols, [coef], start, fused);
            } else {
                let tail: Vec<&[f32]> = cols.iter().map(|c| &c[start..]).collect();
                y.fill(0.0);
                combine(y, &tail, coef);
            }
        }
        start += len;
    }
}

/// Whether [`store`] may stream into `out`: every block it writes starts 32-byte aligned.
fn streamable(out: &[f32], stride: usize) -> bool {
    cfg!(target_arch = "x86_64") && (out.as_ptr() as usize).is_multiple_of(32) && stride.is_multiple_of(8)
}

/// Rows in half of one of [`combine_into`]'s blocks: it computes a block half at a time for two
/// outputs at once, whose accumulators then fit in 16 vector registers.
const H: usize = 32;

/// Rows `start..start + 2·H` of the outputs, two at a time: two outputs share each load of a
/// column (with one, there is a load per multiply-add, and the loads rather than the arithmetic
/// set the pace). Returns the output left over, if any. `STREAM` is a parameter, not a runtime
/// flag, so that the stores without it take the blocks straight from registers.
#[inline(always)]
fn pairs<'a, const STREAM: bool>(
    out: &mut [f32],
    stride: usize,
    cols: &[&[f32]],
    outputs: &'a [(usize, &'a [f32])],
    start: usize,
    fused: bool,
    avx: bool,
) -> &'a [(usize, &'a [f32])] {
    let mut rest = outputs;
    while let [(s0, c0), (s1, c1), ..] = rest {
        for half in [0, H] {
            let [a0, a1] = block::<2, H>(cols, [c0, c1], start + half, fused);
            store::<STREAM>(&mut out[s0 * stride + start + half..][..H], &a0, avx);
            store::<STREAM>(&mut out[s1 * stride + start + half..][..H], &a1, avx);
        }
        rest = &rest[2..];
    }
    rest
}

/// Copies `src` into `dst`; with `STREAM`, by non-temporal stores (`dst` is then 32-byte
/// aligned), 8 lanes wide where `avx` says the CPU has AVX. These write whole cache lines to
/// memory without reading them first and do not evict what is in the cache, which suits vectors
/// read again only after many more were written.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn store<const STREAM: bool>(dst: &mut [f32], src: &[f32; H], avx: bool) {
    #[cfg(target_arch = "x86_64")]
    if STREAM {
        use std::arch::x86_64::{__m128, __m256, _mm256_stream_ps, _mm_stream_ps};
        use std::mem::transmute;
        let dst = &mut dst[..H];
        if avx {
            for (i, v) in src.chunks_exact(8).enumerate() {
                let v: [f32; 8] = v.try_into().expect("8 floats");
                // SAFETY: `avx` is set only in code compiled for CPUs with AVX2, and so AVX;
                // `[f32; 8]` has `__m256`'s size; `dst[8i..8i + 8]` is in bounds and, by
                // `streamable`, 32-byte aligned.
                unsafe { _mm256_stream_ps(dst.as_mut_ptr().add(8 * i), transmute::<[f32; 8], __m256>(v)) };
            }
        } else {
            for (i, v) in src.chunks_exact(4).enumerate() {
                let v: [f32; 4] = v.try_into().expect("4 floats");
                // SAFETY: SSE is part of x86-64; as above, 16 bytes at a time.
                unsafe { _mm_stream_ps(dst.as_mut_ptr().add(4 * i), transmute::<[f32; 4], __m128>(v)) };
            }
        }
        return;
    }
    dst[..H].copy_from_slice(src);
}

/// Orders earlier [`store`]s that streamed before later loads and stores of other threads.
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Rows `start..start + L` of `Σ_j coefs[o][j] · cols[j]` for `O` outputs, each summing the
/// columns in order from +0. Inlined so that it takes the instruction set of its caller.
#[inline(always)]
fn block<const O: usize, const L: usize>(
    cols: &[&[f32]],
    coefs: [&[f32]; O],
    start: usize,
    fused: bool,
) -> [[f32; L]; O] {
    let mut acc = [[0.0f32; L]; O];
    for (j, col) in cols.iter().enumerate() {
        let a: [f32; O] = std::array::from_fn(|o| coefs[o][j]);
        // A zero coefficient adds exactly nothing to a sum that starts at +0.
        if a.iter().all(|&a| a == 0.0) {
            continue;
        }
        let x: &[f32; L] = col[start..start + L].try_into().expect("L floats");
        for l in 0..L {
            for o in 0..O {
                acc[o][l] = if fused { a[o].mul_add(x[l], acc[o][l]) } else { acc[o][l] + a[o] * x[l] };
            }
        }
    }
    acc
}

/// The top bit of a signed index: the gathered value is negated.
pub(crate) const NEGATE: u32 = 1 << 31;

/// `y[i] += a · ±x[idx[i] & !NEGATE]`, negated where `idx[i]` has [`NEGATE`] set: a signed
/// permutation applied by gathering, without bounds checks so that the loop vectorises. The
/// sign is flipped on the value's bits, which is exact, so this equals multiplying by ±1.
///
/// # Safety
/// Every index, without its top bit, must be less than `x.len()`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) unsafe fn gather_add(y: &mut [f32], a: f32, x: &[f32], idx: &[u32]) {
    assert!(y.len() == idx.len(), "gather of mismatched lengths");
    debug_assert!(idx.iter().all(|&i| ((i & !NEGATE) as usize) < x.len()), "gather index out of range");
    for (y, &i) in y.iter_mut().zip(idx) {
        // SAFETY: the caller guarantees every index is in range.
        let v = unsafe { *x.get_unchecked((i & !NEGATE) as usize) };
        *y += a * f32::from_bits(v.to_bits() ^ (i & NEGATE));
    }
}

/// `out[i] = ±x[idx[i] & !NEGATE]`: [`gather_add`] into `out`, replacing what it held, without
/// first zeroing it and reading the zeros back. `out` keeps its allocation: a fresh one is
/// fresh pages, whose faults cost as much as the gather.
///
/// # Safety
/// Every index, without its top bit, must be less than `x.len()`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) unsafe fn gather_into(out: &mut Vec<f32>, x: &[f32], idx: &[u32]) {
    debug_assert!(idx.iter().all(|&i| ((i & !NEGATE) as usize) < x.len()), "gather index out of range");
    out.clear();
    out.extend(idx.iter().map(|&i| {
        // SAFETY: the caller guarantees every index is in range.
        let v = unsafe { *x.get_unchecked((i & !NEGATE) as usize) };
        f32::from_bits(v.to_bits() ^ (i & NEGATE))
    }));
}

/// Rows per block of the f64 kernels below: 17 columns of 128 rows stay in a 32 KiB L1.
const F64_ROWS: usize = 128;
/// Independent accumulators per sum: four 4-lane additions in flight hide their latency.
const F64_LANES: usize = 16;

/// `AᵀA` (`n × n`, symmetric) for `A` column-major `d × n`. Rows are taken a block at a time,
/// so every column pair reads its block from L1, and each entry sums its products into 16 lanes
/// by row index, then adds the lanes in a fixed order: the same bits on every CPU.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn gram(a: &[f64], d: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), d * n, "a d × n matrix");
    let mut acc = vec![[0.0f64; F64_LANES]; n * (n + 1) / 2];
    for start in (0..d).step_by(F64_ROWS) {
        let end = (start + F64_ROWS).min(d);
        let mut p = 0;
        for i in 0..n {
            let x = &a[i * d + start..i * d + end];
            for j in i..n {
                let y = &a[j * d + start..j * d + end];
                let mut lanes = acc[p];
                let (cx, cy) = (x.chunks_exact(F64_LANES), y.chunks_exact(F64_LANES));
                let (rx, ry) = (cx.remainder(), cy.remainder());
                for (x, y) in cx.zip(cy) {
                    for (l, (x, y)) in lanes.iter_mut().zip(x.iter().zip(y)) {
                        *l += x * y;
                    }
                }
                if !rx.is_empty() {
                    tail(&mut lanes, rx, ry);
                }
                acc[p] = lanes;
                p += 1;
            }
        }
    }
    let sum = |l: &[f64; F64_LANES]| l.chunks_exact(4).map(|q| (q[0] + q[1]) + (q[2] + q[3])).fold(0.0, |s, q| s + q);
    let mut out = vec![0.0; n * n];
    let mut p = 0;
    for i in 0..n {
        for j in i..n {
            let s = sum(&acc[p]);
            (out[i * n + j], out[j * n + i]) = (s, s);
            p += 1;
        }
    }
    out
}

/// The rows of a block that do not fill a whole set of lanes, each into the lane of its row.
#[inline(never)]
fn tail(lanes: &mut [f64; F64_LANES], x: &[f64], y: &[f64]) {
    for (l, (x, y)) in lanes.iter_mut().zip(x.iter().zip(y)) {
        *l += x * y;
    }
}

/// `A ← A R⁻¹` for `A` column-major `d × n` and `R` upper triangular (`r[i·n + j]`, `i ≤ j`):
/// column `j` becomes `(a_j − Σ_{i<j} r_ij q_i) / r_jj`, 16 rows at a time kept in registers
/// across all `i`. Each element sees the same operations in the same order on every CPU.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn solve_upper(a: &mut [f64], d: usize, n: usize, r: &[f64]) {
    assert_eq!((a.len(), r.len()), (d * n, n * n), "a d × n matrix and an n × n one");
    for j in 0..n {
        let (done, rest) = a.split_at_mut(j * d);
        let col = &mut rest[..d];
        let diag = r[j * n + j];
        let mut start = 0;
        while start + F64_LANES <= d {
            let mut acc: [f64; F64_LANES] = col[start..start + F64_LANES].try_into().expect("a full block");
            for i in 0..j {
                let f = r[i * n + j];
                let x: &[f64; F64_LANES] = done[i * d + start..][..F64_LANES].try_into().expect("a full block");
                for l in 0..F64_LANES {
                    acc[l] -= f * x[l];
                }
            }
            for (y, v) in col[start..start + F64_LANES].iter_mut().zip(&acc) {
                *y = v / diag;
            }
            start += F64_LANES;
        }
        for (row, y) in col.iter_mut().enumerate().skip(start) {
            let mut v = *y;
            for i in 0..j {
                v -= r[i * n + j] * done[i * d + row];
            }
            *y = v / diag;
        }
    }
}

pub(crate) fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair's product is its inner product, and the same bits whichever other vectors
    /// share the call and wherever the pair falls in the blocking: full blocks, edge rows and
    /// columns, either side of a chunk's end, a length that is not a whole number of lanes or
    /// spans.
    #[test]
    fn products_of_many_vectors_do_not_depend_on_the_others() {
        let d = 2 * DOT_SPAN + DOT_LANES + 3;
        let vector =
            |s: usize| -> Vec<f32> { (0..d).map(|i| ((i * 37 + s * 101) % 113) as f32 / 113.0 - 0.5).collect() };
        let a: Vec<Vec<f32>> = (0..DOT_CHUNK + 11).map(vector).collect();
        let b: Vec<Vec<f32>> = (100..107).map(vector).collect();
        let a: Vec<&[f32]> = a.iter().map(Vec::as_slice).collect();
        let b: Vec<&[f32]> = b.iter().map(Vec::as_slice).collect();
        let mut all = vec![0.0; a.len() * b.len()];
        dots(&a, &b, &mut all);
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                let exact: f64 = x.iter().zip(*y).map(|(x, y)| *x as f64 * *y as f64).sum();
                let got = all[i * b.len() + j];
                assert!((got as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()), "{i},{j}: {got} against {exact}");
                let mut alone = [0.0];
                dots(&a[i..=i], &b[j..=j], &mut alone);
                assert_eq!(alone[0].to_bits(), got.to_bits(), "{i},{j} alone");
            }
        }
        let from = DOT_CHUNK - 2;
        let mut part = vec![0.0; 5 * 2];
        dots(&a[from..from + 5], &b[1..3], &mut part);
        for (p, v) in part.iter().enumerate() {
            assert_eq!(v.to_bits(), all[(from + p / 2) * b.len() + 1 + p % 2].to_bits(), "pair {p} of a part");
        }
    }

    /// Every way of storing a block writes the same bits: plain stores, and streaming 4 and
    /// (where the CPU has AVX2) 8 lanes at a time, which the dispatched kernel picks by CPU.
    #[test]
    fn streamed_blocks_equal_stored_blocks() {
        let (d, n) = (4 * H, 5);
        let cols: Vec<Vec<f32>> =
            (0..n).map(|j| (0..d).map(|i| ((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5).collect()).collect();
        let cols: Vec<&[f32]> = cols.iter().map(Vec::as_slice).collect();
        let coef: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let outputs: Vec<(usize, &[f32])> = [2, 0, 1].into_iter().zip(coef.chunks_exact(n)).collect();
        let stride = d + 8;
        let run = |stream: bool, avx: bool| {
            // 32-byte aligned, as the arena is.
            let mut buf = vec![0.0f32; 3 * stride + 8];
            let at = buf.as_ptr().align_offset(32).min(8);
            let out = &mut buf[at..][..3 * stride];
            assert!(!stream || streamable(out, stride));
            for start in (0..d).step_by(2 * H) {
                let rest = if stream {
                    pairs::<true>(out, stride, &cols, &outputs, start, false, avx)
                } else {
                    pairs::<false>(out, stride, &cols, &outputs, start, false, avx)
                };
                assert_eq!(rest.len(), 1, "two outputs in a pair, one left over");
            }
            stream_fence();
            out.to_vec()
        };
        let stored = run(false, false);
        assert!(stored.iter().any(|&v| v != 0.0));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&run(true, false)), bits(&stored));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            assert_eq!(bits(&run(true, true)), bits(&stored));
        }
    }
}
