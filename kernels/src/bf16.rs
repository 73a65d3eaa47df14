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

use crate::cpu::Bf16Path;
use crate::SendPtr;

/// Columns per panel (two registers of 16 f32 lanes).
const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 12;
/// `k` per chunk (a multiple of 2): a panel chunk is `NR · KC · 2` bytes = 16 KiB.
pub const KC: usize = 256;

/// Whether this process has a bf16 path ([`crate::cpu`]: AMX tiles or AVX-512 BF16).
pub fn available() -> bool {
    crate::cpu::paths().bf16.is_some()
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

/// `a` (f32 `[m, k]`) to bf16 rows of `kp` values (zero-padded), `rows >= m` rows (zero
/// past `m`).
fn convert_rows(a: &[f32], k: usize, kp: usize, rows: usize) -> Vec<u16> {
    let mut out = vec![0u16; rows * kp];
    out.par_chunks_mut(kp * 64)
        .zip(a.par_chunks(k * 64))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
                #[cfg(target_arch = "x86_64")]
                if available() {
                    // SAFETY: every bf16 path implies AVX-512 BF16 and VL ([`crate::cpu`]).
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
    let path = path().expect("bf16 products need AVX-512 BF16 or AMX");
    gemm_on(path, a, b, c)
}

/// [`gemm`] on a given path (the tests compare them). AMX takes `k` in tiles of 32; a `k`
/// that is not a whole number of tiles runs on AVX-512 BF16 (every AMX CPU has it).
pub(crate) fn gemm_on(path: Bf16Path, a: &[f32], b: &PackedB, c: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    assert!(k > 0 && a.len().is_multiple_of(k), "A shape");
    let m = a.len() / k;
    assert_eq!(c.len(), m * n, "C shape");
    #[cfg(target_arch = "x86_64")]
    if path == Bf16Path::Amx && b.kp.is_multiple_of(amx::KT) {
        return amx::gemm(a, b, c);
    }
    let _ = path;
    gemm_avx512(a, b, c)
}

/// The path [`gemm`] takes: the CPU's ([`crate::cpu`]), except that AMX must first pass a
/// check against the AVX-512 BF16 path on a small product (run once);
/// where it does not, this process uses AVX-512 BF16 and says so on stderr.
pub fn path() -> Option<Bf16Path> {
    match crate::cpu::paths().bf16 {
        #[cfg(target_arch = "x86_64")]
        Some(Bf16Path::Amx) if !amx::trusted() => Some(Bf16Path::Avx512),
        p => p,
    }
}

fn gemm_avx512(a: &[f32], b: &PackedB, c: &mut [f32]) {
    let (k, n, kp) = (b.k, b.n, b.kp);
    let m = a.len() / k;
    let a16 = convert_rows(a, k, kp, m);
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

/// AMX tile BF16 (`tdpbf16ps`): a 16 × 32 block of `A` times a 32 × 16 block of `B` into a
/// 16 × 16 f32 tile per instruction. Written in inline assembly: Rust's AMX intrinsics are
/// not stable. `B`'s panels are already in the layout a B tile reads (pair rows of 16
/// columns × 2 values, 128 bytes apart); `A` is converted to bf16 rows padded to whole tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx {
    use std::arch::asm;
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use super::{convert_rows, PackedB, NR};
    use crate::SendPtr;

    /// `k` per tile product (16 pairs).
    pub(crate) const KT: usize = 32;
    /// Rows per A tile.
    const MT: usize = 16;

    /// Palette 1; tiles 0-3 hold C (16 rows × 16 f32), 4-5 A (16 rows × 32 bf16), 6-7 B
    /// (16 pair rows × 16 columns × 2): every tile is 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }

    /// Whether AMX gives, on a small product with row, column and `k` blocks, what the
    /// f64 product of the same bf16 values gives within the bound the tests use (and the
    /// AVX-512 path meets). Run once per process; a failure is reported on stderr and the
    /// process uses AVX-512 BF16 instead.
    pub(crate) fn trusted() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            let (m, k, n) = (37, 96, 45);
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0)
                .collect();
            let mut c = vec![f32::NAN; m * n];
            gemm(&a, &PackedB::from_transposed(&w, n, k), &mut c);
            let bf = |x: f32| half::bf16::from_bits(super::to_bf16(x)).to_f64();
            let worst = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    let want: f64 = (0..k).map(|l| bf(a[i * k + l]) * bf(w[j * k + l])).sum();
                    (c[e] as f64 - want).abs()
                })
                .fold(
                    0f64,
                    |x, y| if y.is_nan() { f64::INFINITY } else { x.max(y) },
                );
            let bound = super::error_bound(k);
            if worst > bound {
                eprintln!(
                    "warning: AMX bf16 products differ from the exact product by {worst:e} (bound \
                     {bound:e}); using AVX-512 BF16 instead"
                );
            }
            worst <= bound
        })
    }

    /// `c = a · B` on AMX tiles; `b.kp` is a multiple of [`KT`].
    pub(crate) fn gemm(a: &[f32], b: &PackedB, c: &mut [f32]) {
        let (k, n, kp) = (b.k, b.n, b.kp);
        let m = a.len() / k;
        // Whole 32-row blocks: padding rows are zero and their results are dropped.
        let mb = m.div_ceil(2 * MT);
        let a16 = convert_rows(a, k, kp, mb * 2 * MT);
        let panels = n.div_ceil(NR);
        let per_panel = kp / 2 * 2 * NR;
        let dst = SendPtr(c.as_mut_ptr());
        let work = |(p, blk): (usize, usize)| {
            let cfg = config();
            let mut out = [0f32; 4 * MT * 16];
            let r0 = blk * 2 * MT;
            let ap = a16[r0 * kp..].as_ptr();
            let bp = b.data[p * per_panel..].as_ptr();
            // SAFETY: the CPU has AMX BF16 and Linux granted the tile state (`cpu`); the tile
            // loads read 32 rows × 64 bytes of `a16` from row `r0` (within its padded rows)
            // and 16 pair rows × 128 bytes of the panel per step (within `per_panel`); the
            // stores write `out`.
            unsafe { block(&cfg, ap, kp * 2, bp, kp / KT, out.as_mut_ptr()) };
            let cols = (n - p * NR).min(NR);
            for r in 0..(2 * MT).min(m - r0) {
                for j in 0..cols {
                    // Tiles 0 | 1 over rows 0..16, 2 | 3 over rows 16..32; 16 columns each.
                    let t = (r / MT) * 2 + j / 16;
                    let v = out[t * MT * 16 + (r % MT) * 16 + j % 16];
                    // SAFETY: element (r0 + r, p·NR + j) is written by this task only.
                    unsafe { *dst.get().add((r0 + r) * n + p * NR + j) = v };
                }
            }
        };
        let items: Vec<(usize, usize)> = (0..panels)
            .flat_map(|p| (0..mb).map(move |r| (p, r)))
            .collect();
        if m * n * k < 1 << 18 {
            items.into_iter().for_each(work);
        } else {
            items.into_par_iter().for_each(work);
        }
    }

    /// One 32 × 32 block of C over `steps` tiles of `k`: A rows `lda` bytes apart, B pair
    /// rows 128 bytes apart; the four C tiles go to `out` (tile `t` at `t · 256` floats,
    /// rows 64 bytes apart).
    unsafe fn block(
        cfg: &TileConfig,
        a: *const u16,
        lda: usize,
        b: *const u16,
        steps: usize,
        out: *mut f32,
    ) {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let bstride: usize = 128;
        for s in 0..steps {
            let a0 = (a as *const u8).add(s * KT * 2);
            let a1 = a0.add(MT * lda);
            let b0 = (b as *const u8).add(s * (KT / 2) * bstride);
            let b1 = b0.add(64);
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {bs}*1]",
                "tileloadd tmm7, [{b1} + {bs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                lda = in(reg) lda,
                bs = in(reg) bstride,
                options(nostack, readonly),
            );
        }
        let o = out as *mut u8;
        asm!(
            "tilestored [{o0} + {s}*1], tmm0",
            "tilestored [{o1} + {s}*1], tmm1",
            "tilestored [{o2} + {s}*1], tmm2",
            "tilestored [{o3} + {s}*1], tmm3",
            "tilerelease",
            o0 = in(reg) o,
            o1 = in(reg) o.add(1024),
            o2 = in(reg) o.add(2048),
            o3 = in(reg) o.add(3072),
            s = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// The bound on the distance between a bf16 path's result and the f64 product of the same
/// bf16 values, for `k` terms of inputs in [-2, 2]: f32 accumulation, any order.
pub(crate) fn error_bound(k: usize) -> f64 {
    1e-5 * (k as f64).sqrt() + 1e-6
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

    /// The bf16 paths this CPU has (whatever `EMLAB_KERNELS` caps), and a skip report for
    /// each it lacks.
    fn paths(test: &str) -> Vec<Bf16Path> {
        let f = crate::cpu::features();
        let mut out = Vec::new();
        if f.avx512f && f.avx512bf16 && f.avx512vl {
            out.push(Bf16Path::Avx512);
        } else {
            crate::testing::skip_path(test, "avx512_bf16", "no AVX-512 BF16 on this CPU");
        }
        if f.amx_bf16 && f.avx512bf16 {
            out.push(Bf16Path::Amx);
        } else {
            crate::testing::skip_path(
                test,
                "amx_bf16",
                "no AMX BF16 on this CPU (or Linux refused the tile state)",
            );
        }
        out
    }

    /// Against the f64 product of the bf16-rounded inputs, for odd sizes (row, column and
    /// `k` tails, several `k` chunks, whole AMX tiles of `k` and not) in both packings, on
    /// every path this CPU has.
    #[test]
    fn products_match_the_rounded_inputs() {
        for path in paths("kernels::bf16::products_match_the_rounded_inputs") {
            for &(m, k, n) in &[
                (1, 2, 1),
                (13, 37, 45),
                (25, 600, 70),
                (12, 513, 32),
                (37, 96, 45),
                (33, 576, 64),
            ] {
                let a = lcg(1, m * k);
                let w = lcg(2, n * k); // [n, k]
                let mut c = vec![f32::NAN; m * n];
                gemm_on(path, &a, &PackedB::from_transposed(&w, n, k), &mut c);
                let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
                let mut c2 = vec![f32::NAN; m * n];
                gemm_on(path, &a, &PackedB::from_rows(&wt, k, n), &mut c2);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|l| bf(a[i * k + l]) * bf(w[j * k + l])).sum();
                        assert!(
                            (c[i * n + j] as f64 - want).abs() < error_bound(k),
                            "{path:?} {m}x{k}x{n} [{i},{j}]"
                        );
                        assert_eq!(c[i * n + j], c2[i * n + j], "{path:?}: packings differ");
                    }
                }
            }
        }
    }

    /// The path `gemm` takes is the one `cpu` chose, unless AMX failed its check.
    #[test]
    fn the_process_path_is_the_chosen_one() {
        let chosen = crate::cpu::paths().bf16;
        match (chosen, path()) {
            (Some(Bf16Path::Amx), Some(Bf16Path::Avx512)) => panic!("AMX failed its check here"),
            (c, p) => assert_eq!(c, p),
        }
    }
}
