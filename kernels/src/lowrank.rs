//! `C += U · W` in f32 for a thin `U` (`[m, r]`, `r` a LoRA rank): an adapter's share of a
//! projection (`u · (s B)ᵀ` forward, `du · A` backward) added straight into the base
//! product's output. Through Candle that is a GEMM into a fresh `[m, n]` tensor and a second
//! pass adding it (and a third scaling it), for a product of only `2·m·r·n` FLOPs.
//!
//! Each element is `c + u₀w₀ + u₁w₁ + …` in `k` order, whatever the tiling or the thread
//! split.

use rayon::prelude::*;

use crate::madd;

/// Rows per parallel task.
const ROWS: usize = 32;

/// `c[m×n] += u[m×r] · w[r×n]`, all row-major, `m = c.len() / n`.
pub fn add_product(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize) {
    assert!(
        n > 0 && c.len().is_multiple_of(n),
        "add_product: c is not rows of {n}"
    );
    let m = c.len() / n;
    assert_eq!(u.len(), m * r, "add_product: u is not [{m}, {r}]");
    assert_eq!(w.len(), r * n, "add_product: w is not [{r}, {n}]");
    if r == 0 {
        return;
    }
    let work = |(cb, ub): (&mut [f32], &[f32])| run(cb, ub, w, r, n);
    if m <= ROWS {
        work((c, u));
    } else {
        c.par_chunks_mut(ROWS * n)
            .zip(u.par_chunks(ROWS * r))
            .for_each(work);
    }
}

fn run(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize) {
    product(c, u, false, w, r, n, Mask::Full)
}

/// `u[m×r] = x[m×k] · aᵀ` for `a` of `r` rows of `k` (an adapter's `A`): one dot product
/// per element, each summed in the same fixed order whatever `m` and the thread split, so a
/// row's result does not depend on the other rows. Rows in parallel past 32.
pub fn dot_rows(u: &mut [f32], x: &[f32], a: &[f32], k: usize) {
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "dot_rows: x is not rows of {k}"
    );
    assert!(a.len().is_multiple_of(k), "dot_rows: a is not rows of {k}");
    let (m, r) = (x.len() / k, a.len() / k);
    assert_eq!(u.len(), m * r, "dot_rows: u is not [{m}, {r}]");
    if r == 0 {
        return;
    }
    let work = |(ub, xb): (&mut [f32], &[f32])| {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { dots_avx2(ub, xb, a, k) };
        }
        dots(ub, xb, a, k)
    };
    if m <= ROWS {
        work((u, x));
    } else {
        u.par_chunks_mut(ROWS * r)
            .zip(x.par_chunks(ROWS * k))
            .for_each(work);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(u: &mut [f32], x: &[f32], a: &[f32], k: usize) {
    dots(u, x, a, k)
}

#[inline(always)]
fn dots(u: &mut [f32], x: &[f32], a: &[f32], k: usize) {
    let r = a.len() / k;
    for (ui, xi) in u.chunks_exact_mut(r).zip(x.chunks_exact(k)) {
        for (o, aj) in ui.iter_mut().zip(a.chunks_exact(k)) {
            *o = crate::attn::dot(xi, aj);
        }
    }
}

/// Which part of `c += u·w` matters, for causal attention products over `t × t` matrices
/// whose row `i` is position `i`. The kernel computes at least that part (whole register
/// tiles); whatever else it computes is exact for zero inputs and otherwise to be ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mask {
    Full,
    /// Columns `j <= i` (scores of the keys a query sees).
    ColsUpTo,
    /// Terms `k <= i` (`u` is zero after the diagonal: probabilities times values).
    KUpTo,
    /// Terms `k >= i` (`u` is a transposed causal matrix: zero before the diagonal).
    KFrom,
}

/// `(k0, k1, n1)`: the terms and columns rows `i0..i1` need.
#[inline(always)]
fn bounds(mask: Mask, i0: usize, i1: usize, r: usize, n: usize) -> (usize, usize, usize) {
    match mask {
        Mask::Full => (0, r, n),
        Mask::ColsUpTo => (0, r, i1.min(n)),
        Mask::KUpTo => (0, i1.min(r), n),
        Mask::KFrom => (i0.min(r), r, n),
    }
}

/// `c[m×n] += u·w` on one thread: `u` is `[m, r]`, or `[r, m]` when `ut`; `w` is `[r, n]`.
pub(crate) fn product(
    c: &mut [f32],
    u: &[f32],
    ut: bool,
    w: &[f32],
    r: usize,
    n: usize,
    mask: Mask,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx512f_fma() {
            // SAFETY: the CPU has AVX-512F and FMA (checked).
            return unsafe {
                match ut {
                    false => x86::avx512::<false>(c, u, w, r, n, mask),
                    true => x86::avx512::<true>(c, u, w, r, n, mask),
                }
            };
        }
        if crate::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            return unsafe {
                match ut {
                    false => x86::avx2::<false>(c, u, w, r, n, mask),
                    true => x86::avx2::<true>(c, u, w, r, n, mask),
                }
            };
        }
    }
    match ut {
        false => scalar::<false>(c, u, w, r, n, mask),
        true => scalar::<true>(c, u, w, r, n, mask),
    }
}

fn scalar<const UT: bool>(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize, mask: Mask) {
    body::<4, 16, false, UT>(c, u, w, r, n, mask, |c, i, m, j, k0, k1| {
        tile::<4, 16, false, UT>(c, u, w, r, n, i, m, j, k0, k1)
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Mask;
    use std::arch::x86_64::*;

    /// 6 × 64 tiles in explicit registers: 24 accumulators, each `k` loads the four `w`
    /// vectors once and broadcasts six `u` values (left to itself, the compiler reloads `w`
    /// from memory for every row).
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn avx512<const UT: bool>(
        c: &mut [f32],
        u: &[f32],
        w: &[f32],
        r: usize,
        n: usize,
        mask: Mask,
    ) {
        let rows = c.len() / n;
        super::body::<6, 64, true, UT>(c, u, w, r, n, mask, |c, i, m, j, k0, k1| {
            assert!(i + m <= rows && j + 64 <= n && k1 <= r && u.len() == rows * r);
            let (c, u, w) = (c.as_mut_ptr(), u.as_ptr(), w.as_ptr());
            // SAFETY: the CPU has AVX-512F and FMA (this function's caller checked);
            // rows i..i+m, columns j..j+64 of c and w, terms k0..k1 of u are in bounds.
            unsafe {
                match m {
                    6 => tile512::<UT, 6>(c, u, w, rows, r, n, i, j, k0, k1),
                    5 => tile512::<UT, 5>(c, u, w, rows, r, n, i, j, k0, k1),
                    4 => tile512::<UT, 4>(c, u, w, rows, r, n, i, j, k0, k1),
                    3 => tile512::<UT, 3>(c, u, w, rows, r, n, i, j, k0, k1),
                    2 => tile512::<UT, 2>(c, u, w, rows, r, n, i, j, k0, k1),
                    _ => tile512::<UT, 1>(c, u, w, rows, r, n, i, j, k0, k1),
                }
            }
        })
    }

    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const UT: bool, const R: usize>(
        c: *mut f32,
        u: *const f32,
        w: *const f32,
        rows: usize,
        r: usize,
        n: usize,
        i: usize,
        j: usize,
        k0: usize,
        k1: usize,
    ) {
        let cp = c.add(i * n + j);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (ii, a) in acc.iter_mut().enumerate() {
            for (q, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(cp.add(ii * n + q * 16));
            }
        }
        for k in k0..k1 {
            let wp = w.add(k * n + j);
            let wv = [
                _mm512_loadu_ps(wp),
                _mm512_loadu_ps(wp.add(16)),
                _mm512_loadu_ps(wp.add(32)),
                _mm512_loadu_ps(wp.add(48)),
            ];
            for (ii, a) in acc.iter_mut().enumerate() {
                let x = if UT {
                    *u.add(k * rows + i + ii)
                } else {
                    *u.add((i + ii) * r + k)
                };
                let x = _mm512_set1_ps(x);
                for (v, &y) in a.iter_mut().zip(&wv) {
                    *v = _mm512_fmadd_ps(x, y, *v);
                }
            }
        }
        for (ii, a) in acc.iter().enumerate() {
            for (q, v) in a.iter().enumerate() {
                _mm512_storeu_ps(cp.add(ii * n + q * 16), *v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const UT: bool>(
        c: &mut [f32],
        u: &[f32],
        w: &[f32],
        r: usize,
        n: usize,
        mask: Mask,
    ) {
        super::body::<4, 32, true, UT>(c, u, w, r, n, mask, |c, i, m, j, k0, k1| {
            super::tile::<4, 32, true, UT>(c, u, w, r, n, i, m, j, k0, k1)
        })
    }
}

/// One register tile of `m <= TR` rows at rows `i..`, `TC` columns at `j..`, over terms
/// `k0..k1`, as arrays the compiler keeps in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const TR: usize, const TC: usize, const FMA: bool, const UT: bool>(
    c: &mut [f32],
    u: &[f32],
    w: &[f32],
    r: usize,
    n: usize,
    i: usize,
    m: usize,
    j: usize,
    k0: usize,
    k1: usize,
) {
    let rows = c.len() / n;
    let mut acc = [[0f32; TC]; TR];
    let acc = &mut acc[..m];
    for (ii, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&c[(i + ii) * n + j..][..TC]);
    }
    for k in k0..k1 {
        let wk: &[f32; TC] = w[k * n + j..][..TC].try_into().unwrap();
        for (ii, a) in acc.iter_mut().enumerate() {
            let x = if UT {
                u[k * rows + i + ii]
            } else {
                u[(i + ii) * r + k]
            };
            for (o, &y) in a.iter_mut().zip(wk) {
                *o = madd::<FMA>(x, y, *o);
            }
        }
    }
    for (ii, a) in acc.iter().enumerate() {
        c[(i + ii) * n + j..][..TC].copy_from_slice(a);
    }
}

/// Tiles of up to `TR` rows by `TC` columns through `tile(c, i, rows, j, k0, k1)`; column
/// tails one element at a time, in the same `k` order.
#[inline(always)]
fn body<const TR: usize, const TC: usize, const FMA: bool, const UT: bool>(
    c: &mut [f32],
    u: &[f32],
    w: &[f32],
    r: usize,
    n: usize,
    mask: Mask,
    tile: impl Fn(&mut [f32], usize, usize, usize, usize, usize),
) {
    let rows = c.len() / n;
    let at = |i: usize, k: usize| if UT { u[k * rows + i] } else { u[i * r + k] };
    let one = |c: &mut [f32], i: usize, j: usize, k0: usize, k1: usize| {
        let mut s = c[i * n + j];
        for k in k0..k1 {
            s = madd::<FMA>(at(i, k), w[k * n + j], s);
        }
        c[i * n + j] = s;
    };
    let mut i = 0;
    while i < rows {
        let m = TR.min(rows - i);
        let (k0, k1, n1) = bounds(mask, i, i + m, r, n);
        // Whole tiles while any of their columns is needed (the rest is to be ignored).
        let mut j = 0;
        while j < n1 && j + TC <= n {
            tile(c, i, m, j, k0, k1);
            j += TC;
        }
        for ii in i..i + m {
            for jj in j..n1 {
                one(c, ii, jj, k0, k1);
            }
        }
        i += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::lcg;

    /// Against the f64 product, for shapes with row and column tails and more rows than
    /// one parallel task; and the SIMD path against the scalar one.
    #[test]
    fn adds_the_product() {
        for &(m, r, n) in &[
            (1, 1, 1),
            (5, 3, 70),
            (37, 32, 576),
            (70, 8, 130),
            (4, 32, 64),
        ] {
            let c0 = lcg(1, m * n);
            let u = lcg(2, m * r);
            let w = lcg(3, r * n);
            let mut c = c0.clone();
            add_product(&mut c, &u, &w, r, n);
            let mut scalar = c0.clone();
            for (cb, ub) in scalar.chunks_mut(n).zip(u.chunks(r)) {
                super::scalar::<false>(cb, ub, &w, r, n, Mask::Full);
            }
            for i in 0..m {
                for j in 0..n {
                    let want = c0[i * n + j] as f64
                        + (0..r)
                            .map(|k| u[i * r + k] as f64 * w[k * n + j] as f64)
                            .sum::<f64>();
                    for (got, what) in [(c[i * n + j], "simd"), (scalar[i * n + j], "scalar")] {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + r as f64),
                            "{what} [{m}x{r}x{n}] at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Against the f64 dot products; each row the same alone as among 40 (the parallel path).
    #[test]
    fn dot_rows_match_the_definition_and_each_row_alone() {
        let (m, k, r) = (40, 70, 5);
        let x = lcg(4, m * k);
        let a = lcg(5, r * k);
        let mut u = vec![f32::NAN; m * r];
        dot_rows(&mut u, &x, &a, k);
        for i in 0..m {
            let mut one = vec![0f32; r];
            dot_rows(&mut one, &x[i * k..(i + 1) * k], &a, k);
            assert_eq!(&one[..], &u[i * r..(i + 1) * r], "row {i}");
            for j in 0..r {
                let want: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * a[j * k + t] as f64)
                    .sum();
                assert!((u[i * r + j] as f64 - want).abs() < 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "add_product: w is not [2, 3]")]
    fn bad_shapes_are_named() {
        add_product(&mut [0.0; 6], &[0.0; 4], &[0.0; 5], 2, 3);
    }
}
