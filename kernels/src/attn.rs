//! Rotary embeddings and causal attention over a left-padded KV cache, on the CPU in f32.
//!
//! Each query attends to exactly its row's real keys, in slot order, and every sum runs in
//! the same order whatever the padding or the batch: a prompt's attention output is
//! bit-identical alone or left-padded in a batch. (Through a masked GEMM + softmax it is
//! not: padding shifts which SIMD lane each key lands in, and the 8-bit activation rounding
//! of the quantized matmuls then amplifies those 1e-7 differences through the layers.)

use rayon::prelude::*;

/// How query/key pairs are laid out for rotary embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    /// Pairs `(x[i], x[i + d/2])` (HF checkpoints, GGUF Qwen2).
    Half,
    /// Pairs `(x[2i], x[2i+1])` (GGUF Llama).
    Interleaved,
}

/// Rotate `x` (`[tokens, heads, head_dim]`) in place; token `n` is at position `pos[n]`;
/// `cos`/`sin` are `[positions, head_dim / 2]` tables.
pub fn rope(
    x: &mut [f32],
    heads: usize,
    hd: usize,
    pos: &[u32],
    cos: &[f32],
    sin: &[f32],
    layout: Rope,
) {
    let half = hd / 2;
    assert_eq!(x.len(), pos.len() * heads * hd, "rope: shape");
    for (tok, &p) in x.chunks_exact_mut(heads * hd).zip(pos) {
        let c = &cos[p as usize * half..(p as usize + 1) * half];
        let s = &sin[p as usize * half..(p as usize + 1) * half];
        for h in tok.chunks_exact_mut(hd) {
            match layout {
                Rope::Half => {
                    let (a, b) = h.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * c[i] - x1 * s[i];
                        b[i] = x0 * s[i] + x1 * c[i];
                    }
                }
                Rope::Interleaved => {
                    for i in 0..half {
                        let (x0, x1) = (h[2 * i], h[2 * i + 1]);
                        h[2 * i] = x0 * c[i] - x1 * s[i];
                        h[2 * i + 1] = x0 * s[i] + x1 * c[i];
                    }
                }
            }
        }
    }
}

/// Shapes for [`attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    /// Query tokens per row.
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Slots per row in the cache.
    pub cap: usize,
}

/// Causal attention: `q` is `[batch, t, heads, hd]`; the caches `k`, `v` are
/// `[rows >= batch, kv_heads, cap, hd]` (the first `batch` rows are used) with slots
/// `0..start[b] + t` of row `b` filled; row `b` starts with `pad[b]` padding slots. Query `i`
/// of row `b` sits at slot `start[b] + i` and attends to slots `pad[b]..=start[b] + i`: rows
/// may sit at different positions (a ragged cache, for continuous batching), and a row's
/// result depends on its own slots only. `out` is `[batch, t, heads, hd]`; padding queries get
/// zeros.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    start: &[usize],
    pad: &[usize],
    scale: f32,
    out: &mut [f32],
) {
    let AttnShape {
        batch,
        t,
        heads,
        kv_heads,
        head_dim: hd,
        cap,
    } = s;
    assert_eq!(q.len(), batch * t * heads * hd, "attention: q shape");
    assert_eq!(out.len(), q.len(), "attention: out shape");
    assert!(
        k.len() >= batch * kv_heads * cap * hd && k.len().is_multiple_of(kv_heads * cap * hd),
        "attention: k cache shape"
    );
    assert_eq!(v.len(), k.len(), "attention: v cache shape");
    assert!(start.len() == batch && pad.len() == batch && heads % kv_heads == 0);
    assert!(
        start.iter().all(|&s| s + t <= cap),
        "attention: past the cache capacity"
    );
    let rep = heads / kv_heads;
    let avx2 = crate::has_avx2_fma();
    // Head `h` of query `n` (row `n / t`, token `n % t`) into `oh`; `scores` is scratch.
    let one = |n: usize, h: usize, oh: &mut [f32], scores: &mut Vec<f32>| {
        let (b, i) = (n / t, n % t);
        let slot = start[b] + i;
        if slot < pad[b] {
            oh.fill(0.0);
            return;
        }
        scores.clear();
        scores.resize(slot + 1 - pad[b], 0.0);
        let kvh = h / rep;
        let base = (b * kv_heads + kvh) * cap;
        let qh = &q[(n * heads + h) * hd..(n * heads + h + 1) * hd];
        let keys = &k[(base + pad[b]) * hd..(base + slot + 1) * hd];
        let vals = &v[(base + pad[b]) * hd..(base + slot + 1) * hd];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { head_avx2(qh, keys, vals, scale, scores, oh) };
            return;
        }
        let _ = avx2;
        head(qh, keys, vals, scale, scores, oh);
    };
    // One task per (row, query token): its heads' outputs are contiguous in `out`.
    let work = |(n, o): (usize, &mut [f32])| {
        let mut scores = Vec::new();
        for (h, oh) in o.chunks_mut(hd).enumerate() {
            one(n, h, oh, &mut scores);
        }
    };
    let longest = start.iter().max().copied().unwrap_or(0) + t;
    let work_size = batch * t * heads * longest * hd;
    if work_size < 1 << 16 {
        out.chunks_mut(heads * hd).enumerate().for_each(work);
    } else if batch * t == 1 {
        // Decoding one sequence: its heads across the team. Each head's output is computed
        // the same way whichever task runs it.
        let dst = crate::SendPtr(out.as_mut_ptr());
        crate::team::run(heads, &|h| {
            // SAFETY: head `h`'s `hd` outputs are written by this task only.
            let oh = unsafe { std::slice::from_raw_parts_mut(dst.get().add(h * hd), hd) };
            one(0, h, oh, &mut Vec::new());
        });
    } else {
        out.par_chunks_mut(heads * hd).enumerate().for_each(work);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    scale: f32,
    sc: &mut [f32],
    o: &mut [f32],
) {
    head(q, keys, vals, scale, sc, o)
}

/// One head: softmax(q·Kᵀ·scale)·V over the given keys, every sum in key order.
#[inline(always)]
fn head(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, sc: &mut [f32], o: &mut [f32]) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (sj, kj) in sc.iter_mut().zip(keys.chunks_exact(hd)) {
        *sj = dot(q, kj) * scale;
        max = max.max(*sj);
    }
    let mut sum = 0f32;
    for sj in sc.iter_mut() {
        *sj = (*sj - max).exp();
        sum += *sj;
    }
    o.fill(0.0);
    for (&p, vj) in sc.iter().zip(vals.chunks_exact(hd)) {
        for (oo, &vv) in o.iter_mut().zip(vj) {
            *oo += p * vv;
        }
    }
    let inv = 1.0 / sum;
    for oo in o.iter_mut() {
        *oo *= inv;
    }
}

/// Dot product in 16 fixed lanes (vectorizes), then a fixed reduction.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::lcg;

    /// Against a direct f64 computation, with GQA and padding.
    #[test]
    fn attention_matches_the_definition() {
        let s = AttnShape {
            batch: 2,
            t: 3,
            heads: 4,
            kv_heads: 2,
            head_dim: 20,
            cap: 8,
        };
        let (start, pad) = (2, [0usize, 3]);
        let q = lcg(1, s.batch * s.t * s.heads * s.head_dim);
        let k = lcg(2, s.batch * s.kv_heads * s.cap * s.head_dim);
        let v = lcg(3, k.len());
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, &k, &v, s, &[start; 2], &pad, 0.3, &mut out);
        let hd = s.head_dim;
        for b in 0..2 {
            for i in 0..s.t {
                for h in 0..s.heads {
                    let o = &out[((b * s.t + i) * s.heads + h) * hd..][..hd];
                    let slot = start + i;
                    if slot < pad[b] {
                        assert!(o.iter().all(|x| *x == 0.0));
                        continue;
                    }
                    let qh = &q[((b * s.t + i) * s.heads + h) * hd..][..hd];
                    let base = (b * s.kv_heads + h / 2) * s.cap;
                    let sc: Vec<f64> = (pad[b]..=slot)
                        .map(|j| {
                            (0..hd)
                                .map(|d| qh[d] as f64 * k[(base + j) * hd + d] as f64)
                                .sum::<f64>()
                                * 0.3
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (pad[b]..=slot)
                            .zip(&e)
                            .map(|(j, p)| p * v[(base + j) * hd + d] as f64)
                            .sum::<f64>()
                            / z;
                        assert!((o[d] as f64 - want).abs() < 1e-5, "b{b} i{i} h{h} d{d}");
                    }
                }
            }
        }
    }

    /// A row's output is bit-identical with and without left padding before it.
    #[test]
    fn padding_does_not_change_a_row() {
        let (heads, hd, n) = (2, 16, 5);
        let s1 = AttnShape {
            batch: 1,
            t: n,
            heads,
            kv_heads: heads,
            head_dim: hd,
            cap: n,
        };
        let q = lcg(4, n * heads * hd);
        let k = lcg(5, heads * n * hd);
        let v = lcg(6, heads * n * hd);
        let mut alone = vec![0f32; q.len()];
        attention(&q, &k, &v, s1, &[0], &[0], 0.25, &mut alone);
        // The same row after 3 padding slots (filled with junk).
        let p = 3;
        let s2 = AttnShape {
            cap: n + p,
            t: n + p,
            ..s1
        };
        let mut q2 = lcg(7, p * heads * hd);
        q2.extend(&q);
        let (mut k2, mut v2) = (Vec::new(), Vec::new());
        for h in 0..heads {
            k2.extend(lcg(8, p * hd));
            k2.extend(&k[h * n * hd..(h + 1) * n * hd]);
            v2.extend(lcg(9, p * hd));
            v2.extend(&v[h * n * hd..(h + 1) * n * hd]);
        }
        let mut padded = vec![0f32; q2.len()];
        attention(&q2, &k2, &v2, s2, &[0], &[p], 0.25, &mut padded);
        assert_eq!(&padded[p * heads * hd..], &alone[..]);
    }

    /// Rows at different positions (a ragged cache with spare rows): each row's output is
    /// bit-identical to the row alone in a cache of its own.
    #[test]
    fn ragged_rows_match_each_row_alone() {
        let (heads, kv_heads, hd, cap) = (4, 2, 16, 12);
        let starts = [7usize, 2, 10];
        let rows = 4; // one spare row past the batch
        let per_row = kv_heads * cap * hd;
        let k = lcg(11, rows * per_row);
        let v = lcg(12, rows * per_row);
        let q = lcg(13, starts.len() * heads * hd);
        let s = AttnShape {
            batch: starts.len(),
            t: 1,
            heads,
            kv_heads,
            head_dim: hd,
            cap,
        };
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, &k, &v, s, &starts, &[0; 3], 0.25, &mut out);
        for (b, &st) in starts.iter().enumerate() {
            let one = AttnShape { batch: 1, ..s };
            let mut alone = vec![0f32; heads * hd];
            attention(
                &q[b * heads * hd..][..heads * hd],
                &k[b * per_row..][..per_row],
                &v[b * per_row..][..per_row],
                one,
                &[st],
                &[0],
                0.25,
                &mut alone,
            );
            assert_eq!(&out[b * heads * hd..][..heads * hd], &alone[..], "row {b}");
        }
    }

    #[test]
    fn rope_layouts_rotate_their_pairs() {
        let hd = 4;
        let cos = vec![1.0, 1.0, 0.0, 0.5];
        let sin = vec![0.0, 0.0, 1.0, 0.5];
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope(&mut x, 1, hd, &[0, 1], &cos, &sin, Rope::Half);
        // Position 0 is the identity; position 1 rotates pair (x0, x2) by 90° and (x1, x3)
        // by cos = sin = 0.5.
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            &x[4..],
            &[-3.0, 2.0 * 0.5 - 4.0 * 0.5, 1.0, 2.0 * 0.5 + 4.0 * 0.5]
        );
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut y, 1, hd, &[1], &cos, &sin, Rope::Interleaved);
        assert_eq!(
            y,
            vec![-2.0, 1.0, 3.0 * 0.5 - 4.0 * 0.5, 3.0 * 0.5 + 4.0 * 0.5]
        );
    }
}
