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
    let mut out = matmul_many(&[w], x)?;
    Ok(out.remove(0))
}

/// `x @ W_m^T` for several matrices reading the same f32 `x` (`[..., cols]`): the
/// activations are quantized once and one parallel loop covers every matrix's rows.
pub fn matmul_many(ws: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
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
