//! GGML-quantized matrices on the CPU, multiplied by emlab's own kernels (`emlab-kernels`):
//! batch-invariant (a row's logits do not depend on what else is in the batch) and fast at
//! batch 1. See the kernel crate's docs for why Candle's `QMatMul` is not used on the CPU.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, Tensor};
pub use emlab_kernels::{QMatrix, QType};

type Result<T> = candle_core::Result<T>;

/// The kernel type for a GGML type, if emlab has a kernel for it.
pub fn qtype(t: GgmlDType) -> Option<QType> {
    match t {
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4_1 => Some(QType::Q4_1),
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        _ => None,
    }
}

/// The blocks of a 2-D CPU `QTensor` whose type has a kernel here, or `None`.
pub fn from_qtensor(q: &QTensor) -> Result<Option<QMatrix>> {
    let (Some(ty), false) = (
        qtype(q.dtype()),
        q.device().is_cuda() || q.device().is_metal(),
    ) else {
        return Ok(None);
    };
    let (rows, cols) = q.shape().dims2()?;
    QMatrix::new(ty, rows, cols, q.data()?.into_owned())
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// `x @ W^T` for f32 `x` of shape `[..., cols]`.
pub fn matmul(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let mut out = matmul_many(&[w], &[None], x)?;
    Ok(out.remove(0))
}

/// An unmerged LoRA adapter as plain f32 buffers: `A` (`[r, in]`) and `scale * B^T`
/// (`[r, out]`), so its share `(x A^T)(s B^T)` is added into a product's output.
pub struct LowRank {
    a: Vec<f32>,
    sb_t: Vec<f32>,
    r: usize,
}

impl LowRank {
    /// From PEFT's `A` (`[r, in]`) and `B` (`[out, r]`) and the adapter's scale.
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<LowRank> {
        let r = a.dim(0)?;
        let sb_t = (b.to_dtype(candle_core::DType::F32)? * scale)?
            .t()?
            .contiguous()?;
        Ok(LowRank {
            a: a.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            sb_t: sb_t.flatten_all()?.to_vec1()?,
            r,
        })
    }

    /// `out[m x n] += (x[m x in] A^T) (s B^T)`; each element summed in a fixed order, so a
    /// row's result does not depend on the other rows.
    fn add_into(&self, x: &[f32], out: &mut [f32]) {
        let inp = self.a.len() / self.r.max(1);
        let n = self.sb_t.len() / self.r.max(1);
        let m = x.len() / inp;
        let mut u = vec![0f32; m * self.r];
        emlab_kernels::lowrank::dot_rows(&mut u, x, &self.a, inp);
        emlab_kernels::lowrank::add_product(out, &u, &self.sb_t, self.r, n);
    }
}

/// `x @ W_m^T` for several matrices reading the same f32 `x` (`[..., cols]`): the
/// activations are quantized once and one parallel loop covers every matrix's rows. Where
/// `low[m]` is an adapter, its share is added into that product's output.
pub fn matmul_many(ws: &[&QMatrix], low: &[Option<&LowRank>], x: &Tensor) -> Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    if ws.iter().any(|w| w.cols() != cols) {
        candle_core::bail!("quantized matmul: activations {dims:?} do not match the weights")
    }
    let mut outs: Vec<Vec<f32>> = {
        let (st, l) = x.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*st, l.contiguous_offsets())
        else {
            candle_core::bail!("quantized matmul takes contiguous f32 CPU activations")
        };
        let acts = emlab_kernels::Acts::quantize(&v[a..b], cols);
        let mut outs: Vec<Vec<f32>> = ws
            .iter()
            .map(|w| vec![0f32; acts.rows() * w.rows()])
            .collect();
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        emlab_kernels::matmul_many(ws, &acts, &mut refs);
        for (o, l) in outs.iter_mut().zip(low) {
            if let Some(l) = l {
                l.add_into(&v[a..b], o);
            }
        }
        outs
    };
    ws.iter()
        .zip(outs.drain(..))
        .map(|(w, o)| {
            let mut d = dims.clone();
            *d.last_mut().unwrap() = w.rows();
            Tensor::from_vec(o, d, x.device())
        })
        .collect()
}

/// `W` in f32 as a `[rows, cols]` tensor.
pub fn dequantize(w: &QMatrix, dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), dev)
}

/// Embedding rows for `ids` (`u32`), `[ids.len(), cols]` in f32.
pub fn embedding(w: &Arc<QMatrix>, ids: &[u32], dev: &candle_core::Device) -> Result<Tensor> {
    let cols = w.cols();
    let mut out = vec![0f32; ids.len() * cols];
    for (o, &id) in out.chunks_exact_mut(cols).zip(ids) {
        if id as usize >= w.rows() {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", w.rows())
        }
        w.dequantize_row(id as usize, o);
    }
    Tensor::from_vec(out, (ids.len(), cols), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The adapter's share added into a buffer equals Candle's `(x A^T) B^T * s`, and a
    /// row's result is the same alone and in a batch.
    #[test]
    fn low_rank_share_matches_candle_and_is_row_invariant() {
        let (m, inp, r, out) = (5usize, 40usize, 3usize, 24usize);
        let mut rng = crate::util::rng::Rng::new(3, 0);
        let mut rnd =
            |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect() };
        let dev = Device::Cpu;
        let x = Tensor::from_vec(rnd(m * inp), (m, inp), &dev).unwrap();
        let a = Tensor::from_vec(rnd(r * inp), (r, inp), &dev).unwrap();
        let b = Tensor::from_vec(rnd(out * r), (out, r), &dev).unwrap();
        let want = (x
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let low = LowRank::new(&a, &b, 0.5).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut got = vec![0f32; m * out];
        low.add_into(&xs, &mut got);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "differs from Candle by {worst}");
        for row in 0..m {
            let mut one = vec![0f32; out];
            low.add_into(&xs[row * inp..(row + 1) * inp], &mut one);
            assert_eq!(&one[..], &got[row * out..(row + 1) * out], "row {row}");
        }
    }
}
