//! `C += U · W` in f32 for a thin `U` (`[m, r]`, `r` a LoRA rank): an adapter's share of a
//! projection (`u · (s B)ᵀ` forward, `du · A` backward) added straight into the base
//! product's output. Through Candle that is a GEMM into a fresh `[m, n]` tensor and a second
//! pass adding it (and a third scaling it), for a product of only `2·m·r·n` FLOPs.
//!
//! Each element is `c + u₀w₀ + u₁w₁ + …` in `k` order, whatever the tiling or the thread
//! split.

use rayon::prelude::*;

use crate::madd;

/// Rows per register tile.
const TR: usize = 4;
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
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512F and FMA (checked).
            return unsafe { x86::avx512(c, u, w, r, n) };
        }
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            return unsafe { x86::avx2(c, u, w, r, n) };
        }
    }
    body::<16, false>(c, u, w, r, n)
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    use std::sync::OnceLock;
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        crate::simd_allowed()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    use std::sync::OnceLock;
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        crate::simd_allowed() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn avx512(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize) {
        super::body::<64, true>(c, u, w, r, n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize) {
        super::body::<32, true>(c, u, w, r, n)
    }
}

/// Register tiles of `TR × TC` outputs; column and row tails one element at a time, in the
/// same `k` order.
#[inline(always)]
fn body<const TC: usize, const FMA: bool>(c: &mut [f32], u: &[f32], w: &[f32], r: usize, n: usize) {
    let rows = c.len() / n;
    let one = |c: &mut [f32], i: usize, j: usize| {
        let mut s = c[i * n + j];
        for k in 0..r {
            s = madd::<FMA>(u[i * r + k], w[k * n + j], s);
        }
        c[i * n + j] = s;
    };
    let mut i = 0;
    while i + TR <= rows {
        let mut j = 0;
        while j + TC <= n {
            let mut acc = [[0f32; TC]; TR];
            for (ii, a) in acc.iter_mut().enumerate() {
                a.copy_from_slice(&c[(i + ii) * n + j..][..TC]);
            }
            for k in 0..r {
                let wk: &[f32; TC] = w[k * n + j..][..TC].try_into().unwrap();
                for (ii, a) in acc.iter_mut().enumerate() {
                    let x = u[(i + ii) * r + k];
                    for (o, &y) in a.iter_mut().zip(wk) {
                        *o = madd::<FMA>(x, y, *o);
                    }
                }
            }
            for (ii, a) in acc.iter().enumerate() {
                c[(i + ii) * n + j..][..TC].copy_from_slice(a);
            }
            j += TC;
        }
        for ii in i..i + TR {
            for jj in j..n {
                one(c, ii, jj);
            }
        }
        i += TR;
    }
    for ii in i..rows {
        for jj in 0..n {
            one(c, ii, jj);
        }
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
                body::<16, false>(cb, ub, &w, r, n);
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

    #[test]
    #[should_panic(expected = "add_product: w is not [2, 3]")]
    fn bad_shapes_are_named() {
        add_product(&mut [0.0; 6], &[0.0; 4], &[0.0; 5], 2, 3);
    }
}
