//! Matrix products with bf16 inputs and f32 accumulation on CPUs with AVX-512 BF16
//! (`vdpbf16ps`: two bf16 products per f32 lane per instruction, twice the multiply-adds of
//! an f32 FMA). Training uses them for the frozen base weights, packed once per run: the
//! LoRA adapters, the attention and everything with a gradient stay in f32.
//!
//! `C[m×n] = A[m×k] · B[k×n]`: `A` is f32 (converted to bf16, round to nearest even, per
//! call); `B` is packed beforehand into panels of 32 columns with pairs of `k` side by side,
//! the layout `vdpbf16ps` reads. `k` is cut into chunks of [`KC`] so a panel's chunk stays in
//! L1 while every row block of `A` streams past it.

use rayon::prelude::*;

use crate::SendPtr;

/// Columns per panel (two registers of 16 f32 lanes).
const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 12;
/// `k` per chunk (a multiple of 2): a panel chunk is `NR · KC · 2` bytes = 16 KiB.
pub const KC: usize = 256;

/// Whether this CPU has the instructions (and `EMLAB_SCALAR_KERNELS` is unset).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(|| {
            crate::simd_allowed()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `B` (`k × n`) in panels: panel `p` holds columns `32p..32p+32` (zero past `n`); within
/// it, pair `q` of rows (`2q`, `2q+1`; zero past `k`) is 64 values `[col][row of pair]`.
pub struct PackedB {
    k: usize,
    n: usize,
    /// `k` rounded up to even.
    kp: usize,
    data: Vec<u16>,
}

impl PackedB {
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let kp = k.next_multiple_of(2);
        let panels = n.div_ceil(NR);
        let per_panel = kp / 2 * 2 * NR;
        let mut data = vec![0u16; panels * per_panel];
        data.par_chunks_mut(per_panel)
            .enumerate()
            .for_each(|(p, panel)| {
                for q in 0..kp / 2 {
                    for c in 0..NR {
                        let col = p * NR + c;
                        if col >= n {
                            continue;
                        }
                        for j in 0..2 {
                            let row = 2 * q + j;
                            if row < k {
                                panel[(q * NR + c) * 2 + j] = to_bf16(at(row, col));
                            }
                        }
                    }
                }
            });
        PackedB { k, n, kp, data }
    }

    /// `B = Wᵀ` for `w` row-major `[n, k]`: `x · Wᵀ`, a projection's forward.
    pub fn from_transposed(w: &[f32], n: usize, k: usize) -> PackedB {
        assert_eq!(w.len(), n * k, "weight shape");
        PackedB::pack(k, n, |r, c| w[c * k + r])
    }

    /// `B = W` for `w` row-major `[k, n]`: `dy · W`, a projection's input gradient.
    pub fn from_rows(w: &[f32], k: usize, n: usize) -> PackedB {
        assert_eq!(w.len(), k * n, "weight shape");
        PackedB::pack(k, n, |r, c| w[r * n + c])
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// `a` (f32 `[m, k]`) to bf16 rows of `kp` values (zero-padded).
fn convert_rows(a: &[f32], k: usize, kp: usize) -> Vec<u16> {
    let m = a.len() / k.max(1);
    let mut out = vec![0u16; m * kp];
    out.par_chunks_mut(kp * 64)
        .zip(a.par_chunks(k * 64))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
                #[cfg(target_arch = "x86_64")]
                if available() {
                    // SAFETY: AVX-512 BF16 was detected at run time.
                    unsafe { x86::convert(xrow, &mut orow[..k]) };
                    continue;
                }
                for (ov, xv) in orow.iter_mut().zip(xrow) {
                    *ov = to_bf16(*xv);
                }
            }
        });
    out
}

/// `c = a · B` (`c` is `[m, n]`, overwritten). Panics unless [`available`].
pub fn gemm(a: &[f32], b: &PackedB, c: &mut [f32]) {
    assert!(available(), "bf16 products need AVX-512 BF16");
    let (k, n, kp) = (b.k, b.n, b.kp);
    assert!(k > 0 && a.len().is_multiple_of(k), "A shape");
    let m = a.len() / k;
    assert_eq!(c.len(), m * n, "C shape");
    let a16 = convert_rows(a, k, kp);
    let panels = n.div_ceil(NR);
    let per_panel = kp / 2 * 2 * NR;
    let dst = SendPtr(c.as_mut_ptr());
    let mut k0 = 0;
    while k0 < kp {
        let k1 = (k0 + KC).min(kp);
        let first = k0 == 0;
        let work = |p: usize| {
            let cols = (n - p * NR).min(NR);
            let bpanel = &b.data[p * per_panel + k0 * NR..p * per_panel + k1 * NR];
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(MR);
                let ap = a16[r0 * kp + k0..].as_ptr();
                // SAFETY: tile (r0.., p·NR..) of C is written by this task only; the
                // features were checked above.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let cp = dst.get().add(r0 * n + p * NR);
                    x86::tile(
                        rows,
                        ap,
                        kp,
                        bpanel.as_ptr(),
                        (k1 - k0) / 2,
                        cp,
                        n,
                        cols,
                        first,
                    );
                }
                r0 += rows;
            }
        };
        if m * n * (k1 - k0) < 1 << 18 {
            (0..panels).for_each(work);
        } else {
            (0..panels).into_par_iter().for_each(work);
        }
        k0 = k1;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub unsafe fn convert(x: &[f32], out: &mut [u16]) {
        let n = x.len();
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            let h: __m256bh = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
            i += 16;
        }
        for j in i..n {
            out[j] = super::to_bf16(x[j]);
        }
    }

    /// One tile of up to 12 rows × 32 columns over `pairs` pairs of `k`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(
        rows: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        macro_rules! go {
            ($($r:literal),*) => {
                match rows {
                    $($r => kernel::<$r>(a, lda, b, pairs, c, ldc, cols, first),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kernel<const R: usize>(
        a: *const u16,
        lda: usize,
        b: *const u16,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        let lo: __mmask16 = if cols >= 16 {
            0xFFFF
        } else {
            (1u32 << cols) as u16 - 1
        };
        let hi: __mmask16 = if cols >= 32 {
            0xFFFF
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !first {
            for (r, ar) in acc.iter_mut().enumerate() {
                ar[0] = _mm512_maskz_loadu_ps(lo, c.add(r * ldc));
                ar[1] = _mm512_maskz_loadu_ps(hi, c.add(r * ldc + 16));
            }
        }
        for q in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * 64) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(q * 64 + 32) as *const _));
            for (r, ar) in acc.iter_mut().enumerate() {
                let pair = (a.add(r * lda + 2 * q) as *const i32).read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                ar[0] = _mm512_dpbf16_ps(ar[0], av, b0);
                ar[1] = _mm512_dpbf16_ps(ar[1], av, b1);
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * ldc), lo, ar[0]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), hi, ar[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::lcg;

    fn bf(x: f32) -> f64 {
        half::bf16::from_bits(to_bf16(x)).to_f64()
    }

    /// Against the f64 product of the bf16-rounded inputs, for odd sizes (row, column and
    /// `k` tails, several `k` chunks) in both packings.
    #[test]
    fn products_match_the_rounded_inputs() {
        if !available() {
            return crate::testing::skip(
                "kernels::bf16::products_match_the_rounded_inputs",
                "no AVX-512 BF16 on this CPU",
            );
        }
        for &(m, k, n) in &[(1, 2, 1), (13, 37, 45), (25, 600, 70), (12, 513, 32)] {
            let a = lcg(1, m * k);
            let w = lcg(2, n * k); // [n, k]
            let mut c = vec![f32::NAN; m * n];
            gemm(&a, &PackedB::from_transposed(&w, n, k), &mut c);
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
            let mut c2 = vec![f32::NAN; m * n];
            gemm(&a, &PackedB::from_rows(&wt, k, n), &mut c2);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| bf(a[i * k + l]) * bf(w[j * k + l])).sum();
                    let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
                    assert!(
                        (c[i * n + j] as f64 - want).abs() < tol,
                        "{m}x{k}x{n} [{i},{j}]"
                    );
                    assert_eq!(c[i * n + j], c2[i * n + j], "packings differ");
                }
            }
        }
    }
}
