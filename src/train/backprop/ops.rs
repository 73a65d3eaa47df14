//! Fused CPU kernels for the elementwise parts of the training pass.
//!
//! Composed from Candle ops, the SiLU-gate backward is ten passes over `[tokens, intermediate]`,
//! the softmax backward four over the attention scores, and the cross-entropy eight over
//! `[targets, vocab]` logits; on a 2-core CPU those passes cost a visible share of a step.
//! Each function here does the same arithmetic in one pass (row-parallel with rayon) on
//! contiguous f32/f64 CPU tensors, and falls back to the composed ops elsewhere (CUDA, bf16),
//! so both paths compute the same values and the gradient checks cover both.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

pub type Result<T> = candle_core::Result<T>;

fn fused(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64))
        && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused kernel needs contiguous input"),
    }
}

/// Float arithmetic the kernels need, for f32 and f64.
trait F: Copy + Send + Sync + PartialOrd + std::fmt::Debug + 'static {
    /// `x[i] = exp(x[i])` (SIMD for f32).
    fn exp_slice(x: &mut [Self]);
    fn of(x: f64) -> Self;
    fn to64(self) -> f64;
    fn zero() -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

macro_rules! float {
    ($t:ty, $exp:expr) => {
        impl F for $t {
            fn exp_slice(x: &mut [Self]) {
                $exp(x)
            }
            fn of(x: f64) -> Self {
                x as $t
            }
            fn to64(self) -> f64 {
                self as f64
            }
            fn zero() -> Self {
                0.0
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
        }
    };
}
float!(f32, emlab_kernels::vmath::exp_inplace);
float!(f64, |x: &mut [f64]| x.iter_mut().for_each(|v| *v = v.exp()));

/// Σ in f64 (long rows: f32 sums drift), four running sums.
fn sum64<T: F>(x: &[T]) -> f64 {
    let mut acc = [0f64; 4];
    let mut c = x.chunks_exact(4);
    for q in &mut c {
        for (a, v) in acc.iter_mut().zip(q) {
            *a += v.to64();
        }
    }
    let tail: f64 = c.remainder().iter().map(|v| v.to64()).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `o[i] = exp(-g[i])` over a chunk: the sigmoid's denominator minus one.
fn exp_neg<T: F>(o: &mut [T], g: &[T]) {
    for (o, &g) in o.iter_mut().zip(g) {
        *o = T::zero().sub(g);
    }
    T::exp_slice(o);
}

/// Dispatch a kernel body over the float storages of one operand list.
macro_rules! on_float {
    ($s:expr, |$v:ident: $t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64($v) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("fused kernel: unsupported dtype"),
        }
    };
}

trait Wrap: Sized {
    fn wrap(v: Vec<Self>) -> CpuStorage;
}
impl Wrap for f32 {
    fn wrap(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}
impl Wrap for f64 {
    fn wrap(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

fn get<T: 'static>(s: &CpuStorage) -> Result<&[T]> {
    let any: &dyn std::any::Any = match s {
        CpuStorage::F32(v) => v,
        CpuStorage::F64(v) => v,
        _ => candle_core::bail!("fused kernel: unsupported dtype"),
    };
    any.downcast_ref::<Vec<T>>()
        .map(Vec::as_slice)
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: operands differ in dtype".into()))
}

/// `f(out, a, b, c)` over matching chunks of the output and three inputs, in parallel.
fn chunks3<T: F>(
    a: &[T],
    b: &[T],
    c: &[T],
    f: impl Fn(&mut [T], &[T], &[T], &[T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(4096)
        .zip(
            a.par_chunks(4096)
                .zip(b.par_chunks(4096).zip(c.par_chunks(4096))),
        )
        .for_each(|(o, (a, (b, c)))| f(o, a, b, c));
    out
}

/// `act = silu(g) * u`.
struct SiluMul;
impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "emlab-silu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_float!(s1, |g: T| {
            let g = slice(g, l1)?;
            let u = slice(get::<T>(s2)?, l2)?;
            let out = chunks3(g, u, u, |o, g, u, _| {
                exp_neg(o, g);
                for i in 0..o.len() {
                    o[i] = g[i].mul(u[i]).div(T::of(1.0).add(o[i]));
                }
            });
            Ok((T::wrap(out), l1.shape().clone()))
        })
    }
}

/// `dg = dact * u * silu'(g)`, `silu'(g) = s (1 + g (1 - s))` with `s = sigmoid(g)`.
struct SiluDg;
impl CustomOp3 for SiluDg {
    fn name(&self) -> &'static str {
        "emlab-silu-dg"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_float!(s1, |g: T| {
            let g = slice(g, l1)?;
            let u = slice(get::<T>(s2)?, l2)?;
            let d = slice(get::<T>(s3)?, l3)?;
            let out = chunks3(g, u, d, |o, g, u, d| {
                exp_neg(o, g);
                for i in 0..o.len() {
                    let s = T::of(1.0).div(T::of(1.0).add(o[i]));
                    let ds = s.mul(T::of(1.0).add(g[i].mul(T::of(1.0).sub(s))));
                    o[i] = d[i].mul(u[i]).mul(ds);
                }
            });
            Ok((T::wrap(out), l1.shape().clone()))
        })
    }
}

/// Softmax backward along the last dimension, times a scale: `ds = p * (dp - sum(dp * p)) * c`.
struct SoftmaxBack {
    scale: f64,
}
impl CustomOp2 for SoftmaxBack {
    fn name(&self) -> &'static str {
        "emlab-softmax-back"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = l1.dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale;
        on_float!(s1, |p: T| {
            let sc = T::of(scale);
            let p = slice(p, l1)?;
            let dp = slice(get::<T>(s2)?, l2)?;
            let mut out = vec![T::zero(); p.len()];
            out.par_chunks_mut(dim)
                .zip(p.par_chunks(dim).zip(dp.par_chunks(dim)))
                .for_each(|(o, (p, dp))| {
                    // Sums accumulate in f64: rows are long, and f32 sums drift.
                    for i in 0..dim {
                        o[i] = p[i].mul(dp[i]);
                    }
                    let dot = T::of(sum64(o));
                    for i in 0..dim {
                        o[i] = p[i].mul(dp[i].sub(dot)).mul(sc);
                    }
                });
            Ok((T::wrap(out), l1.shape().clone()))
        })
    }
}

/// Causal softmax of raw attention scores `[.., rep * t, t]` (rows grouped `rep` query heads
/// per key/value head): scale, hide keys after the query's position, normalise. Masked
/// entries are never exponentiated.
struct CausalSoftmax {
    scale: f64,
    t: usize,
}
impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "emlab-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = self.t;
        let scale = self.scale;
        on_float!(s, |x: T| {
            let x = slice(x, l)?;
            let mut out = vec![T::zero(); x.len()];
            let sc = T::of(scale);
            out.par_chunks_mut(t)
                .zip(x.par_chunks(t))
                .enumerate()
                .for_each(|(r, (o, row))| {
                    let q = r % t;
                    let mut m = row[0].mul(sc);
                    for &v in &row[..=q] {
                        let v = v.mul(sc);
                        if v > m {
                            m = v;
                        }
                    }
                    for j in 0..=q {
                        o[j] = row[j].mul(sc).sub(m);
                    }
                    T::exp_slice(&mut o[..=q]);
                    let sum = sum64(&o[..=q]);
                    let inv = T::of(1.0 / sum);
                    for v in &mut o[..=q] {
                        *v = v.mul(inv);
                    }
                });
            Ok((T::wrap(out), l.shape().clone()))
        })
    }
}

/// The additive causal mask `[t, t]`: 0 where a query may see a key, -inf after it.
pub fn causal_mask(t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = Vec::with_capacity(t * t);
    for i in 0..t {
        for j in 0..t {
            m.push(if j <= i { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(m, (t, t), dev)?.to_dtype(dtype)
}

/// Softmax over `scores * scale` with a causal mask; `scores` is `[b, kv, rep * t, t]` where
/// the query position of row `r` is `r % t`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let t = dims[dims.len() - 1];
    if fused(&[scores]) {
        return scores
            .contiguous()?
            .apply_op1_no_bwd(&CausalSoftmax { scale, t });
    }
    let mask = causal_mask(t, scores.dtype(), scores.device())?;
    let (b, kv, rt) = (dims[0], dims[1], dims[2]);
    let s = (scores * scale)?
        .reshape((b, kv, rt / t, t, t))?
        .broadcast_add(&mask)?;
    candle_nn::ops::softmax_last_dim(&s)?.reshape((b, kv, rt, t))
}

/// Log-sum-exp of each row: `[rows, n] -> [rows]`.
struct Lse;
impl CustomOp1 for Lse {
    fn name(&self) -> &'static str {
        "emlab-lse"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let n = dims.last().copied().unwrap_or(1).max(1);
        let rows = l.shape().elem_count() / n;
        on_float!(s, |x: T| {
            let x = slice(x, l)?;
            let mut out = vec![T::zero(); rows];
            out.par_iter_mut()
                .zip(x.par_chunks(n))
                .for_each_init(Vec::new, |buf, (o, row)| {
                    let mut m = row[0];
                    for &v in row {
                        if v > m {
                            m = v;
                        }
                    }
                    buf.clear();
                    buf.extend(row.iter().map(|v| v.sub(m)));
                    T::exp_slice(buf);
                    *o = m.add(T::of(sum64(buf).ln()));
                });
            Ok((T::wrap(out), Shape::from(rows)))
        })
    }
}

/// Cross-entropy gradient `(softmax(x) - onehot(label)) / denom` from logits, their row
/// log-sum-exp, and labels (u32).
struct CeGrad {
    denom: f64,
}
impl CustomOp3 for CeGrad {
    fn name(&self) -> &'static str {
        "emlab-ce-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let CpuStorage::U32(labels) = s3 else {
            candle_core::bail!("labels must be u32")
        };
        let labels = slice(labels, l3)?;
        let denom = self.denom;
        on_float!(s1, |x: T| {
            let x = slice(x, l1)?;
            let lse = slice(get::<T>(s2)?, l2)?;
            let mut out = vec![T::zero(); x.len()];
            let inv = T::of(1.0 / denom);
            out.par_chunks_mut(n)
                .zip(x.par_chunks(n))
                .enumerate()
                .for_each(|(r, (o, row))| {
                    for i in 0..n {
                        o[i] = row[i].sub(lse[r]);
                    }
                    T::exp_slice(o);
                    for v in o.iter_mut() {
                        *v = v.mul(inv);
                    }
                    let y = labels[r] as usize;
                    if y < n {
                        o[y] = o[y].sub(inv);
                    }
                });
            Ok((T::wrap(out), l1.shape().clone()))
        })
    }
}

/// `silu(g) * u`.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused(&[g, u]) {
        g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &SiluMul)
    } else {
        candle_nn::ops::silu(g)? * u
    }
}

/// Gradients of `silu(g) * u` given `dact`: `(dg, du)`.
pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dact: &Tensor) -> Result<(Tensor, Tensor)> {
    if fused(&[g, u, dact]) {
        let (g, u, d) = (g.contiguous()?, u.contiguous()?, dact.contiguous()?);
        // du = dact · silu(g): the forward kernel with dact in u's place.
        let du = g.apply_op2_no_bwd(&d, &SiluMul)?;
        let dg = g.apply_op3_no_bwd(&u, &d, &SiluDg)?;
        return Ok((dg, du));
    }
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let du = (dact * &silu)?;
    let dsilu = (&sig * ((g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = ((dact * u)? * dsilu)?;
    Ok((dg, du))
}

/// Softmax backward along the last dimension, times `scale` (attention's `1/√d`, folded in
/// here rather than spent as a pass over the query and key gradients).
pub fn softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(&[p, dp]) {
        return p
            .contiguous()?
            .apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBack { scale });
    }
    let rowdot = (dp * p)?.sum_keepdim(D::Minus1)?;
    (dp.broadcast_sub(&rowdot)? * p)? * scale
}

/// Row log-sum-exp, `[rows, n] -> [rows, 1]`.
pub fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        let rows = x.dim(0)?;
        return x.contiguous()?.apply_op1_no_bwd(&Lse)?.reshape((rows, 1));
    }
    let max = x.max_keepdim(D::Minus1)?;
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max
}

/// `(softmax(x) - onehot(labels)) / denom` for logits `x [rows, n]`, `lse [rows, 1]` and
/// labels `[rows, 1]` (u32).
pub fn cross_entropy_grad(x: &Tensor, lse: &Tensor, labels: &Tensor, denom: f64) -> Result<Tensor> {
    if fused(&[x, lse]) {
        return x.contiguous()?.apply_op3_no_bwd(
            &lse.contiguous()?,
            &labels.contiguous()?,
            &CeGrad { denom },
        );
    }
    let sm = x.broadcast_sub(lse)?.exp()?;
    let neg = Tensor::full(-1f32, labels.dims(), x.device())?.to_dtype(x.dtype())?;
    sm.scatter_add(labels, &neg, 1)? / denom
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let mut r = crate::util::rng::Rng::new(seed, 0);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (r.unit() * 6.0 - 3.0) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    // The composed ops are what runs on CUDA.
    #[test]
    fn fused_kernels_equal_the_composed_ops() {
        let (g, u, d) = (rand((7, 300), 1), rand((7, 300), 2), rand((7, 300), 3));
        let act = silu_mul(&g, &u).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        assert!(close(&act, &want) < 1e-5);
        let (dg, du) = silu_mul_backward(&g, &u, &d).unwrap();
        let sig = candle_nn::ops::sigmoid(&g).unwrap();
        let want_du = (&d * (&g * &sig).unwrap()).unwrap();
        let want_dg = ((&d * &u).unwrap()
            * (&sig * ((&g * (1.0 - &sig).unwrap()).unwrap() + 1.0).unwrap()).unwrap())
        .unwrap();
        assert!(close(&du, &want_du) < 1e-5);
        assert!(close(&dg, &want_dg) < 1e-4);

        let p = candle_nn::ops::softmax_last_dim(&g).unwrap();
        let ds = softmax_backward(&p, &d, 0.25).unwrap();
        let rowdot = (&d * &p).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = ((d.broadcast_sub(&rowdot).unwrap() * &p).unwrap() * 0.25).unwrap();
        assert!(close(&ds, &want) < 1e-5);

        // Causal softmax: [1, 1, 2 * 5, 5] scores (two query heads over one key head).
        let sc = rand((10, 5), 4).reshape((1, 1, 10, 5)).unwrap();
        let mut m = vec![0f32; 25];
        for i in 0..5 {
            for j in i + 1..5 {
                m[i * 5 + j] = f32::NEG_INFINITY;
            }
        }
        // The composed path (CUDA, bf16) builds the same mask.
        let built: Vec<f32> = causal_mask(5, DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(built, m);
        let mask = Tensor::from_vec(m, (5, 5), &Device::Cpu).unwrap();
        let fused_p = causal_softmax(&sc, 0.5).unwrap();
        let want = candle_nn::ops::softmax_last_dim(
            &(&sc * 0.5)
                .unwrap()
                .reshape((1, 1, 2, 5, 5))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
        )
        .unwrap()
        .reshape((1, 1, 10, 5))
        .unwrap();
        assert!(
            close(
                &fused_p.flatten_all().unwrap(),
                &want.flatten_all().unwrap()
            ) < 1e-6
        );

        let lse = log_sum_exp(&g).unwrap();
        let want = candle_nn::ops::log_softmax(&g, D::Minus1).unwrap();
        let mine = g.broadcast_sub(&lse).unwrap();
        assert!(close(&mine, &want) < 1e-5);
        let labels =
            Tensor::new(&[[3u32], [0], [299], [5], [7], [100], [42]], &Device::Cpu).unwrap();
        let grad = cross_entropy_grad(&g, &lse, &labels, 4.0).unwrap();
        let sm = candle_nn::ops::softmax_last_dim(&g).unwrap();
        let neg = Tensor::full(-1f32, (7, 1), &Device::Cpu).unwrap();
        let want = (sm.scatter_add(&labels, &neg, 1).unwrap() / 4.0).unwrap();
        assert!(close(&grad, &want) < 1e-6);
    }
}
