//! Causal attention for training on the CPU in f32: the forward keeps the probabilities, the
//! backward takes them. Every product skips what lies above the diagonal (masked scores,
//! zero probabilities), which a dense batched GEMM computes and throws away: half the
//! attention FLOPs of a step. Softmax sums run in f64.

use rayon::prelude::*;

use crate::lowrank::{product, Mask};
use crate::vmath::exp_inplace;

/// `q`, `out`, `dq`: `[batch, heads, t, hd]`; `k`, `v`, `dk`, `dv`: `[batch, kv_heads, t,
/// hd]`; probabilities `[batch, heads, t, t]`. Query head `h` reads key/value head
/// `h / (heads / kv_heads)`; position `i` sees keys `0..=i`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Shape {
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) -> (usize, usize, usize) {
        let Shape {
            batch,
            t,
            heads,
            kv_heads,
            head_dim: hd,
        } = *self;
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "attention: {heads} heads over {kv_heads} key/value heads"
        );
        assert_eq!(q.len(), batch * heads * t * hd, "attention: q shape");
        assert_eq!(k.len(), batch * kv_heads * t * hd, "attention: k shape");
        assert_eq!(v.len(), k.len(), "attention: v shape");
        (t, hd, heads / kv_heads)
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// `(probabilities, out)`: `softmax(scale · q kᵀ)` over the visible keys (zero elsewhere),
/// and its product with `v`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let (t, hd, rep) = s.check(q, k, v);
    let mut probs = vec![0f32; s.batch * s.heads * t * t];
    let mut out = vec![0f32; q.len()];
    if t == 0 || hd == 0 {
        return (probs, out);
    }
    // One task per key/value head: its `rep` query heads are adjacent.
    probs
        .par_chunks_mut(rep * t * t)
        .zip(out.par_chunks_mut(rep * t * hd))
        .enumerate()
        .for_each(|(g, (pg, og))| {
            let kt = transpose(&k[g * t * hd..][..t * hd], t, hd);
            let vh = &v[g * t * hd..][..t * hd];
            for r in 0..rep {
                let qh = &q[(g * rep + r) * t * hd..][..t * hd];
                let p = &mut pg[r * t * t..][..t * t];
                product(p, qh, false, &kt, hd, t, Mask::ColsUpTo);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let m = row[..=i]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                    for x in &mut row[..=i] {
                        *x = *x * scale - m;
                    }
                    exp_inplace(&mut row[..=i]);
                    let inv = (1.0 / row[..=i].iter().map(|&x| x as f64).sum::<f64>()) as f32;
                    for x in &mut row[..=i] {
                        *x *= inv;
                    }
                    row[i + 1..].fill(0.0);
                }
                product(
                    &mut og[r * t * hd..][..t * hd],
                    p,
                    false,
                    vh,
                    t,
                    hd,
                    Mask::KUpTo,
                );
            }
        });
    (probs, out)
}

/// `(dq, dk, dv)` from the output gradient `dout`, with `scale` applied to `dq` and `dk`.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    s: Shape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd, rep) = s.check(q, k, v);
    assert_eq!(
        probs.len(),
        s.batch * s.heads * t * t,
        "attention: probs shape"
    );
    assert_eq!(dout.len(), q.len(), "attention: dout shape");
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    if t == 0 || hd == 0 {
        return (dq, dk, dv);
    }
    dq.par_chunks_mut(rep * t * hd)
        .zip(dk.par_chunks_mut(t * hd).zip(dv.par_chunks_mut(t * hd)))
        .enumerate()
        .for_each(|(g, (dqg, (dkg, dvg)))| {
            let kh = &k[g * t * hd..][..t * hd];
            let vt = transpose(&v[g * t * hd..][..t * hd], t, hd);
            let mut ds = vec![0f32; t * t];
            for r in 0..rep {
                let h = g * rep + r;
                let (qh, doh) = (&q[h * t * hd..][..t * hd], &dout[h * t * hd..][..t * hd]);
                let p = &probs[h * t * t..][..t * t];
                // dv += pᵀ dout (p read transposed: zero before the diagonal).
                product(dvg, p, true, doh, t, hd, Mask::KFrom);
                // dp = dout vᵀ, then the softmax backward in place: ds = p (dp - p·dp) scale.
                ds.fill(0.0);
                product(&mut ds, doh, false, &vt, hd, t, Mask::ColsUpTo);
                for (i, (row, prow)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                    let dot = row[..=i]
                        .iter()
                        .zip(&prow[..=i])
                        .map(|(&d, &p)| d as f64 * p as f64)
                        .sum::<f64>() as f32;
                    for (d, &p) in row[..=i].iter_mut().zip(&prow[..=i]) {
                        *d = p * (*d - dot) * scale;
                    }
                    row[i + 1..].fill(0.0);
                }
                product(
                    &mut dqg[r * t * hd..][..t * hd],
                    &ds,
                    false,
                    kh,
                    t,
                    hd,
                    Mask::KUpTo,
                );
                product(dkg, &ds, true, qh, t, hd, Mask::KFrom);
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::lcg;

    /// The f64 definition: scores, causal softmax, products; and the gradients by the chain
    /// rule written out per element.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        s: Shape,
        scale: f64,
    ) -> [Vec<f64>; 5] {
        let (t, hd, rep) = (s.t, s.head_dim, s.heads / s.kv_heads);
        let mut probs = vec![0f64; s.batch * s.heads * t * t];
        let mut out = vec![0f64; q.len()];
        let mut dq = vec![0f64; q.len()];
        let mut dk = vec![0f64; k.len()];
        let mut dv = vec![0f64; v.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let g = b * s.kv_heads + h / rep;
                let qa = |i: usize, d: usize| q[((b * s.heads + h) * t + i) * hd + d] as f64;
                let ka = |j: usize, d: usize| k[(g * t + j) * hd + d] as f64;
                let va = |j: usize, d: usize| v[(g * t + j) * hd + d] as f64;
                let da = |i: usize, d: usize| dout[((b * s.heads + h) * t + i) * hd + d] as f64;
                for i in 0..t {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| scale * (0..hd).map(|d| qa(i, d) * ka(j, d)).sum::<f64>())
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                    let prow = ((b * s.heads + h) * t + i) * t;
                    probs[prow..prow + i + 1].copy_from_slice(&p);
                    let orow = ((b * s.heads + h) * t + i) * hd;
                    for d in 0..hd {
                        out[orow + d] = (0..=i).map(|j| p[j] * va(j, d)).sum();
                    }
                    let dp: Vec<f64> = (0..=i)
                        .map(|j| (0..hd).map(|d| da(i, d) * va(j, d)).sum())
                        .collect();
                    let dot: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                    for j in 0..=i {
                        let dsc = p[j] * (dp[j] - dot) * scale;
                        for d in 0..hd {
                            dq[orow + d] += dsc * ka(j, d);
                            dk[(g * t + j) * hd + d] += dsc * qa(i, d);
                            dv[(g * t + j) * hd + d] += p[j] * da(i, d);
                        }
                    }
                }
            }
        }
        [probs, out, dq, dk, dv]
    }

    #[test]
    fn matches_the_f64_definition() {
        // GQA, a t that is not a multiple of any tile, a head size with a column tail.
        for s in [
            Shape {
                batch: 2,
                t: 13,
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
            },
            Shape {
                batch: 1,
                t: 70,
                heads: 3,
                kv_heads: 1,
                head_dim: 67,
            },
            Shape {
                batch: 1,
                t: 1,
                heads: 2,
                kv_heads: 2,
                head_dim: 4,
            },
        ] {
            let nq = s.batch * s.heads * s.t * s.head_dim;
            let nk = s.batch * s.kv_heads * s.t * s.head_dim;
            let (q, k, v, dout) = (lcg(1, nq), lcg(2, nk), lcg(3, nk), lcg(4, nq));
            let scale = 1.0 / (s.head_dim as f64).sqrt();
            let (p, o) = forward(&q, &k, &v, s, scale as f32);
            let (dq, dk, dv) = backward(&q, &k, &v, &p, &dout, s, scale as f32);
            let [wp, wo, wdq, wdk, wdv] = reference(&q, &k, &v, &dout, s, scale);
            for (name, got, want) in [
                ("probs", &p, &wp),
                ("out", &o, &wo),
                ("dq", &dq, &wdq),
                ("dk", &dk, &wdk),
                ("dv", &dv, &wdv),
            ] {
                for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                        "{s:?} {name}[{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
