//! CPU kernels for emlab: matrix products on GGML-quantized weights (the blocks of a GGUF
//! file) and causal attention over a KV cache for sampling ([`attn`]); for training, causal
//! attention forward and backward ([`attn_train`]), bf16 products with f32 accumulation
//! ([`bf16`]), the low-rank adapter share ([`lowrank`]) and SIMD `exp` ([`vmath`]).
//! [`cpu`] detects what the CPU has and picks each family's kernel path, once;
//! [`testing`] lets tests of paths this CPU lacks report themselves skipped.
//!
//! Why emlab owns the quantized products instead of using Candle's `QMatMul`:
//! - **Batch invariance.** Every output element is computed by the same instruction sequence
//!   whatever the number of rows in the batch and whatever the thread split, so a prompt's
//!   logits are bit-identical alone or padded into a batch of 16. Candle 0.11's quantized CPU
//!   matmul is not (a padded row drifted by 0.39 logits), which broke "batched sampling gives
//!   the same tokens as unbatched".
//! - **Speed at batch 1.** Decoding one sequence reads every weight once per token, so it is
//!   bound by memory traffic: 4-bit blocks move 6× fewer bytes than f32. Candle has no SIMD
//!   path for Q4_1.
//!
//! The scheme is llama.cpp's: each activation row is quantized per block of 32 to int8 with
//! one f32 scale (and the scaled sum of its values, for the blocks' offsets), and each weight
//! block contributes `d_w·d_x·Σ q_w q_x (+ m_w·s_x)`. Integer dot products run on AVX2 (or
//! AVX-512 VNNI where the CPU has it; both give the same integers and the same bits), with a
//! scalar path for other CPUs, or on AMX tiles ([`amx_int8`]), which then take every
//! quantized product in the process: their f32 order differs from the row kernels', and
//! batch invariance needs one order for a row alone and in a batch.

pub mod amx_int8;
pub mod attn;
pub mod attn_train;
pub mod bf16;
pub mod cpu;
pub mod lowrank;
pub mod team;
pub mod testing;
pub mod vmath;

use half::f16;
use rayon::prelude::*;

/// GGML block types with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    /// `d: f16, qs: [u8; 16]`, `w = d·(q − 8)`.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`, `w = d·q + m`.
    Q4_1,
    /// `d: f16, qs: [i8; 32]`, `w = d·q`.
    Q8_0,
}

/// Elements per block, for every type here.
pub const BLOCK: usize = 32;

impl QType {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// The column count is not a whole number of blocks.
    Cols(usize),
    /// The byte count does not match `rows × cols / 32 × block_bytes`.
    Bytes { expected: usize, got: usize },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Cols(c) => write!(f, "{c} columns is not a multiple of the block size {BLOCK}"),
            Error::Bytes { expected, got } => {
                write!(
                    f,
                    "quantized matrix has {got} bytes, its shape needs {expected}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// A `rows × cols` matrix of GGML blocks, row-major (each row is `cols / 32` blocks), as
/// stored in GGUF files.
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, Error> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(Error::Cols(cols));
        }
        let expected = rows * (cols / BLOCK) * ty.block_bytes();
        if data.len() != expected {
            return Err(Error::Bytes {
                expected,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.ty.block_bytes()
    }

    /// Row `r` in f32, exactly as GGML (and Candle) dequantize it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols);
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        let bb = self.ty.block_bytes();
        for (blk, ys) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            let d = f16_at(blk, 0);
            match self.ty {
                QType::Q4_0 => {
                    for j in 0..16 {
                        let q = blk[2 + j];
                        ys[j] = ((q & 0x0F) as i16 - 8) as f32 * d;
                        ys[j + 16] = ((q >> 4) as i16 - 8) as f32 * d;
                    }
                }
                QType::Q4_1 => {
                    let m = f16_at(blk, 2);
                    for j in 0..16 {
                        let q = blk[4 + j];
                        ys[j] = (q & 0x0F) as f32 * d + m;
                        ys[j + 16] = (q >> 4) as f32 * d + m;
                    }
                }
                QType::Q8_0 => {
                    for j in 0..32 {
                        ys[j] = blk[2 + j] as i8 as f32 * d;
                    }
                }
            }
        }
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `out[i, r] = Σ_c x[i, c] · W[r, c]` for the `n = x.len() / cols` rows of `x`;
    /// `out` is `n × rows`, row-major. The activations are quantized to 8 bits per block
    /// first. Each element's value depends only on its own row of `x` and of `W`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let acts = Acts::quantize(x, self.cols);
        self.matmul_acts(&acts, out);
    }

    /// [`QMatrix::matmul`] on activations already quantized.
    pub fn matmul_acts(&self, acts: &Acts, out: &mut [f32]) {
        matmul_many(&[self], acts, &mut [out]);
    }
}

/// Several products of the same activations (q/k/v, gate/up): one quantization of `x`, one
/// parallel loop over all the matrices' rows. `outs[m]` is `n × ms[m].rows()`.
pub fn matmul_many(ms: &[&QMatrix], acts: &Acts, outs: &mut [&mut [f32]]) {
    assert_eq!(ms.len(), outs.len(), "one output per matrix");
    let n = acts.n;
    for (m, o) in ms.iter().zip(outs.iter()) {
        assert_eq!(acts.cols, m.cols, "activation width");
        assert_eq!(o.len(), n * m.rows, "output size");
    }
    let kern = quant_path();
    if kern == Kernel::Amx {
        return amx_int8::matmul_many(ms, acts, outs, amx_int8::Engine::Tiles);
    }
    matmul_rows(kern, ms, acts, outs)
}

/// The path quantized products take in this process: [`cpu::paths`]'s, except that AMX
/// tiles must first give their model's bits ([`amx_int8`]) on a small product of each block
/// type (run once; where they do not, VNNI, and a warning on stderr).
pub fn quant_path() -> cpu::QuantPath {
    match cpu::paths().quant {
        Kernel::Amx if !amx_int8::trusted() => Kernel::Vnni,
        k => k,
    }
}

/// [`matmul_many`] on the row kernels of path `kern`: each weight row against up to 4
/// activation rows at a time.
pub(crate) fn matmul_rows(kern: Kernel, ms: &[&QMatrix], acts: &Acts, outs: &mut [&mut [f32]]) {
    let n = acts.n;
    let threads = rayon::current_num_threads().max(1);
    let total_rows: usize = ms.iter().map(|m| m.rows).sum();
    // Row chunks: enough for load balance, large enough to amortize a task.
    let chunk = (total_rows / (threads * 4)).clamp(8, 256);
    // Work items: (matrix, first row, end row).
    let mut items = Vec::new();
    for (mi, m) in ms.iter().enumerate() {
        let mut r = 0;
        while r < m.rows {
            items.push((mi, r, (r + chunk).min(m.rows)));
            r += chunk;
        }
    }
    let dst: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let work = |&(mi, r0, r1): &(usize, usize, usize)| {
        let m = ms[mi];
        let rb = m.row_bytes();
        for r in r0..r1 {
            let w = &m.data[r * rb..(r + 1) * rb];
            let mut i = 0;
            while i < n {
                let take = (n - i).min(4);
                let mut res = [0f32; 4];
                kern.dot(m.ty, w, acts, i, take, &mut res);
                for (k, v) in res[..take].iter().enumerate() {
                    // SAFETY: element (i + k, r) of output `mi` is written by this item only.
                    unsafe { *dst[mi].get().add((i + k) * m.rows + r) = *v };
                }
                i += take;
            }
        }
    };
    // One weight row is a few hundred ns of work: for tiny products the fork/join costs
    // more than it saves.
    if items.len() == 1 || total_rows * n * acts.cols < 64 * 1024 {
        items.iter().for_each(work);
    } else if n <= 4 {
        // Decoding: many short loops, on the spinning team.
        team::run(items.len(), &|i| work(&items[i]));
    } else {
        items.par_iter().for_each(work);
    }
}

/// The f32 kernels' 256-bit path (attention, low-rank products, `exp`): AVX2 and FMA.
pub(crate) fn has_avx2_fma() -> bool {
    cpu::paths().f32 != cpu::F32Path::Scalar
}

/// The f32 kernels' 512-bit path: AVX-512F and FMA.
pub(crate) fn has_avx512f_fma() -> bool {
    cpu::paths().f32 == cpu::F32Path::Avx512
}

/// `a·b + c`: fused (one rounding) where the caller runs with FMA enabled, else plain (a
/// libm `fmaf` call per element would be far slower than either).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        c + a * b
    }
}

/// An output pointer shared by parallel tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Activation rows quantized per block of 32: `x ≈ d·q` with `q` in `[-127, 127]`, and
/// `s = d·Σq` per block.
pub struct Acts {
    n: usize,
    cols: usize,
    q: Vec<i8>,
    /// `[d, s]` per block, side by side: the kernels load both with one instruction.
    ds: Vec<f32>,
}

impl Acts {
    pub fn quantize(x: &[f32], cols: usize) -> Acts {
        assert!(
            cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols),
            "activation shape"
        );
        let n = x.len() / cols;
        let nb = x.len() / BLOCK;
        let mut q = vec![0i8; x.len()];
        let mut ds = vec![0f32; 2 * nb];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            unsafe { quantize_avx2(x, &mut q, &mut ds) };
            return Acts { n, cols, q, ds };
        }
        quantize_blocks(x, &mut q, &mut ds);
        Acts { n, cols, q, ds }
    }

    pub fn rows(&self) -> usize {
        self.n
    }
}

/// [`quantize_blocks`] compiled for AVX2 (`round` inline instead of a libm call; the same
/// values: no operation here can be fused).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], q: &mut [i8], ds: &mut [f32]) {
    quantize_blocks(x, q, ds)
}

#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut [i8], ds: &mut [f32]) {
    {
        for ((xb, qb), dsb) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(ds.chunks_exact_mut(2))
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (qv, xv) in qb.iter_mut().zip(xb) {
                let v = (xv * inv).round() as i8;
                *qv = v;
                sum += v as i32;
            }
            // Scales rounded through f16 as llama.cpp stores them (its q8_0/q8_1 blocks):
            // logits then match llama.cpp's more closely, at no cost in speed.
            dsb[0] = f16::from_f32(scale).to_f32();
            dsb[1] = f16::from_f32(scale * sum as f32).to_f32();
        }
    }
}

use cpu::QuantPath as Kernel;

impl Kernel {
    /// Dot products of weight row `w` with activation rows `i0..i0 + take` (take ≤ 4).
    #[inline]
    fn dot(self, ty: QType, w: &[u8], a: &Acts, i0: usize, take: usize, out: &mut [f32; 4]) {
        match self {
            Kernel::Scalar => {
                for (k, o) in out[..take].iter_mut().enumerate() {
                    *o = scalar::dot(ty, w, a, i0 + k);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Vnni | Kernel::Amx => {
                unreachable!("x86 paths are never chosen elsewhere")
            }
            #[cfg(target_arch = "x86_64")]
            // (AMX products never come here: [`matmul_many`] sends them to the tiles.)
            Kernel::Avx2 | Kernel::Vnni | Kernel::Amx => {
                let vnni = self != Kernel::Avx2;
                // SAFETY: `cpu` chose this path from the features detected at run time.
                unsafe {
                    match take {
                        1 => x86::dot::<1>(vnni, ty, w, a, i0, out),
                        2 => x86::dot::<2>(vnni, ty, w, a, i0, out),
                        3 => x86::dot::<3>(vnni, ty, w, a, i0, out),
                        _ => x86::dot::<4>(vnni, ty, w, a, i0, out),
                    }
                }
            }
        }
    }
}

mod scalar {
    use super::*;

    pub fn dot(ty: QType, w: &[u8], a: &Acts, i: usize) -> f32 {
        let nb = a.cols / BLOCK;
        let bb = ty.block_bytes();
        let mut acc = 0f32;
        let mut mins = 0f32;
        for b in 0..nb {
            let blk = &w[b * bb..(b + 1) * bb];
            let xq = &a.q[(i * nb + b) * BLOCK..(i * nb + b + 1) * BLOCK];
            let dx = a.ds[2 * (i * nb + b)];
            let sx = a.ds[2 * (i * nb + b) + 1];
            let dw = f16_at(blk, 0);
            let (sum, m) = match ty {
                QType::Q4_0 | QType::Q4_1 => {
                    let (qs, m) = if ty == QType::Q4_1 {
                        (&blk[4..20], f16_at(blk, 2))
                    } else {
                        (&blk[2..18], -8.0 * dw)
                    };
                    let mut s = 0i32;
                    for j in 0..16 {
                        s += (qs[j] & 0x0F) as i32 * xq[j] as i32;
                        s += (qs[j] >> 4) as i32 * xq[j + 16] as i32;
                    }
                    (s, m)
                }
                QType::Q8_0 => {
                    let mut s = 0i32;
                    for j in 0..32 {
                        s += blk[2 + j] as i8 as i32 * xq[j] as i32;
                    }
                    (s, 0.0)
                }
            };
            acc += dw * dx * sum as f32;
            mins += m * sx;
        }
        acc + mins
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    pub unsafe fn dot<const R: usize>(
        vnni: bool,
        ty: QType,
        w: &[u8],
        a: &Acts,
        i0: usize,
        out: &mut [f32; 4],
    ) {
        let res = match (vnni, ty) {
            (false, QType::Q8_0) => q8_avx2::<R>(w, a, i0),
            (true, QType::Q8_0) => q8_vnni::<R>(w, a, i0),
            (false, t) => q4_avx2::<R>(t == QType::Q4_1, w, a, i0),
            (true, t) => q4_vnni::<R>(t == QType::Q4_1, w, a, i0),
        };
        out[..R].copy_from_slice(&res);
    }

    /// Sum of the 8 lanes, in a fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `[d, m, 0, 0]` of a Q4_1 block, or `[d, -8d, 0, 0]` of a Q4_0 block.
    #[inline(always)]
    unsafe fn q4_scales(blk: *const u8, with_min: bool) -> __m128 {
        if with_min {
            _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
        } else {
            let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                (blk as *const u16).read_unaligned() as i32
            ));
            _mm_mul_ps(_mm_moveldup_ps(d), _mm_setr_ps(1.0, -8.0, 0.0, 0.0))
        }
    }

    /// `[d_x, s_x, 0, 0]` of activation block `ib`.
    #[inline(always)]
    unsafe fn act_scales(a: &Acts, ib: usize) -> __m128 {
        _mm_castpd_ps(_mm_load_sd(a.ds.as_ptr().add(2 * ib) as *const f64))
    }

    /// The 32 weights of a 4-bit block as unsigned bytes in element order: the 16 bytes in
    /// both halves, the upper half shifted down a nibble, then masked.
    #[inline(always)]
    unsafe fn q4_unpack(qs: *const u8) -> __m256i {
        let q = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs as *const __m128i));
        let q = _mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4));
        _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
    }

    macro_rules! q4_kernel {
        ($name:ident, $feat:literal, $idot:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize>(
                with_min: bool,
                w: &[u8],
                a: &Acts,
                i0: usize,
            ) -> [f32; R] {
                let nb = a.cols / BLOCK;
                let bb = if with_min { 20 } else { 18 };
                let qoff = if with_min { 4 } else { 2 };
                let mut acc = [_mm256_setzero_ps(); R];
                // Lane 1 sums m_w·s_x; lane 0 holds junk.
                let mut mins = [_mm_setzero_ps(); R];
                let wp = w.as_ptr();
                for b in 0..nb {
                    let blk = wp.add(b * bb);
                    let wdm = q4_scales(blk, with_min);
                    let qw = q4_unpack(blk.add(qoff));
                    for r in 0..R {
                        let ib = (i0 + r) * nb + b;
                        // [d_w·d_x, m_w·s_x]
                        let prod = _mm_mul_ps(wdm, act_scales(a, ib));
                        mins[r] = _mm_add_ps(mins[r], prod);
                        let qx = _mm256_loadu_si256(a.q.as_ptr().add(ib * BLOCK) as *const __m256i);
                        let p = $idot(qw, qx);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_broadcastss_ps(prod),
                            _mm256_cvtepi32_ps(p),
                            acc[r],
                        );
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = hsum(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r]));
                }
                out
            }
        };
    }

    macro_rules! q8_kernel {
        ($name:ident, $feat:literal, $idot:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize>(w: &[u8], a: &Acts, i0: usize) -> [f32; R] {
                let nb = a.cols / BLOCK;
                let mut acc = [_mm256_setzero_ps(); R];
                let wp = w.as_ptr();
                for b in 0..nb {
                    let blk = wp.add(b * 34);
                    let wd = _mm_cvtph_ps(_mm_cvtsi32_si128(
                        (blk as *const u16).read_unaligned() as i32
                    ));
                    let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    // u8 × i8 products: |w| times x with w's sign.
                    let aw = _mm256_sign_epi8(qw, qw);
                    for r in 0..R {
                        let ib = (i0 + r) * nb + b;
                        let dd = _mm256_broadcastss_ps(_mm_mul_ps(wd, act_scales(a, ib)));
                        let qx = _mm256_loadu_si256(a.q.as_ptr().add(ib * BLOCK) as *const __m256i);
                        let p = $idot(aw, _mm256_sign_epi8(qx, qw));
                        acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = hsum(acc[r]);
                }
                out
            }
        };
    }

    /// Σ of 4 adjacent u8×i8 products into 8 i32 lanes. The AVX2 form adds pairs in i16
    /// with saturation first; that never saturates here: a pair is at most 2·15·127 for
    /// 4-bit weights and 2·128·127 < 32767 for |8-bit weights|. So both forms give the same
    /// integers.
    #[inline(always)]
    unsafe fn idot_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn idot_vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    q4_kernel!(q4_avx2, "avx2,fma,f16c", idot_avx2);
    q4_kernel!(q4_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", idot_vnni);
    q8_kernel!(q8_avx2, "avx2,fma,f16c", idot_avx2);
    q8_kernel!(q8_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", idot_vnni);
}

#[cfg(test)]
mod tests;
