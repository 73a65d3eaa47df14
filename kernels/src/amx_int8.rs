//! Quantized products on AMX tiles (`tdpbusd` for 4-bit blocks, unsigned × signed;
//! `tdpbssd` for Q8_0, signed × signed): a 16 × 32 tile of weights times a 32 × 16 tile of
//! activations into a 16 × 16 tile of int32 per instruction, one block of 32 at a time so
//! that each block's integer sum stays apart for its scales.
//!
//! The f32 side: per output element, blocks in order, `acc = fma(d_w·d_x, Σ, acc)` and
//! `mins = mins + m_w·s_x`, then `acc + mins` (Q8_0: `acc`). That is not the row kernels'
//! order (they keep 8 partial sums per block), so the results agree with theirs within
//! rounding, not bit for bit; and so that a row gives the same bits alone and in a batch,
//! a process on the tiles takes them for every quantized product, one decoded token included.
//!
//! Layouts: a work item takes 32 weight rows, unpacked once to one byte per weight (rows
//! `cols` bytes apart; an A tile reads one block, 32 bytes, of 16 rows), and walks the
//! activations 32 rows at a time. Activations are repacked once per product into the B tile
//! layout: for each group of 16 rows and each block, 8 rows of 64 bytes holding, for every
//! activation row, 4 consecutive values.
//!
//! `Engine::Model` runs the same layouts through a scalar model of the tile instructions
//! (the instruction set reference's pseudocode), so the tests check everything but the
//! instructions themselves on CPUs without AMX.

use rayon::prelude::*;

use crate::{f16_at, team, Acts, QMatrix, QType, SendPtr, BLOCK};

/// Weight rows per A tile; activation rows per B tile.
const T: usize = 16;
/// Weight rows per work item (two A tiles).
const WR: usize = 2 * T;
/// Activation rows per step (two B tiles).
const AR: usize = 2 * T;
/// Bytes of one (group, block) of packed activations: 8 rows × 64.
const BT: usize = 8 * 64;

/// What runs the tile products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    /// The CPU's AMX unit (only where [`crate::cpu`] found AMX INT8 and Linux granted it).
    Tiles,
    /// A scalar model of the same instructions over the same memory (tests, and the AMX
    /// unit's start-up check).
    Model,
}

/// Activations in the B tile layout, in pairs of 16-row groups (zero past the last row).
struct TileActs {
    /// Groups of 16 rows (even).
    groups: usize,
    nb: usize,
    /// `[group][block][4-value group k/4][row][k % 4]`.
    q: Vec<i8>,
    /// `d_x` and `s_x`, `[group][block][row]`.
    d: Vec<f32>,
    s: Vec<f32>,
}

impl TileActs {
    fn pack(a: &Acts) -> TileActs {
        let nb = a.cols / BLOCK;
        let groups = 2 * a.n.div_ceil(AR);
        let mut q = vec![0i8; groups * nb * BT];
        let mut d = vec![0f32; groups * nb * T];
        let mut s = vec![0f32; groups * nb * T];
        for i in 0..a.n {
            let (g, row) = (i / T, i % T);
            for b in 0..nb {
                let ib = i * nb + b;
                let src = &a.q[ib * BLOCK..(ib + 1) * BLOCK];
                let dst = &mut q[(g * nb + b) * BT..(g * nb + b + 1) * BT];
                for (k4, four) in src.chunks_exact(4).enumerate() {
                    dst[k4 * 64 + row * 4..k4 * 64 + row * 4 + 4].copy_from_slice(four);
                }
                d[(g * nb + b) * T + row] = a.ds[2 * ib];
                s[(g * nb + b) * T + row] = a.ds[2 * ib + 1];
            }
        }
        TileActs {
            groups,
            nb,
            q,
            d,
            s,
        }
    }

    fn tile(&self, g: usize, b: usize) -> *const i8 {
        self.q[(g * self.nb + b) * BT..].as_ptr()
    }
}

/// [`crate::matmul_many`] on tiles: `outs[m]` is `n × ms[m].rows()`.
pub(crate) fn matmul_many(ms: &[&QMatrix], acts: &Acts, outs: &mut [&mut [f32]], engine: Engine) {
    products(ms, acts, outs, engine, true)
}

/// [`matmul_many`], in parallel or (the start-up check, which runs inside a `OnceLock`
/// initialisation that a stolen task must not re-enter) on this thread.
fn products(ms: &[&QMatrix], acts: &Acts, outs: &mut [&mut [f32]], engine: Engine, parallel: bool) {
    let ta = TileActs::pack(acts);
    let dst: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let items: Vec<(usize, usize)> = ms
        .iter()
        .enumerate()
        .flat_map(|(mi, m)| (0..m.rows.div_ceil(WR)).map(move |g| (mi, g * WR)))
        .collect();
    let work = |&(mi, r0): &(usize, usize)| {
        let fast = engine == Engine::Tiles;
        // SAFETY: `Tiles` is only asked for where `cpu` found AMX INT8 granted, with
        // AVX-512F and FMA; the item writes only its own rows of output `mi`.
        unsafe {
            if fast {
                #[cfg(target_arch = "x86_64")]
                return item_fast(ms[mi], r0, &ta, acts.n, dst[mi], engine);
            }
            item(ms[mi], r0, &ta, acts.n, dst[mi], engine)
        }
    };
    let work_size: usize = ms.iter().map(|m| m.rows).sum::<usize>() * acts.n * acts.cols;
    if !parallel || items.len() == 1 || work_size < 64 * 1024 {
        items.iter().for_each(work);
    } else if acts.n <= 4 {
        // Decoding: many short products, on the spinning team (as the row kernels).
        team::run(items.len(), &|i| work(&items[i]));
    } else {
        items.par_iter().for_each(work);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn item_fast(m: &QMatrix, r0: usize, ta: &TileActs, n: usize, out: SendPtr, e: Engine) {
    item_body(m, r0, ta, n, out, e)
}

unsafe fn item(m: &QMatrix, r0: usize, ta: &TileActs, n: usize, out: SendPtr, e: Engine) {
    item_body(m, r0, ta, n, out, e)
}

/// Weight rows `r0..r0 + 32` of `m` (fewer at the end) times every activation row, into
/// `out` (`n × m.rows`, row-major).
#[inline(always)]
unsafe fn item_body(m: &QMatrix, r0: usize, ta: &TileActs, n: usize, out: SendPtr, engine: Engine) {
    let (cols, nb) = (m.cols, ta.nb);
    let rows = (m.rows - r0).min(WR);
    let signed = m.ty == QType::Q8_0;
    let with_mins = !signed;
    // One byte per weight, rows `cols` apart (zero past `rows`); scales `[block][row]`.
    let mut wq = vec![0u8; WR * cols];
    let mut dw = vec![0f32; nb * WR];
    let mut mw = vec![0f32; nb * WR];
    let rb = m.row_bytes();
    let bb = m.ty.block_bytes();
    for r in 0..rows {
        let row = &m.data[(r0 + r) * rb..(r0 + r + 1) * rb];
        let unpacked = &mut wq[r * cols..(r + 1) * cols];
        for (b, (blk, u)) in row
            .chunks_exact(bb)
            .zip(unpacked.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let d = f16_at(blk, 0);
            dw[b * WR + r] = d;
            match m.ty {
                QType::Q4_0 | QType::Q4_1 => {
                    let (qs, mn) = if m.ty == QType::Q4_1 {
                        (&blk[4..20], f16_at(blk, 2))
                    } else {
                        (&blk[2..18], -8.0 * d)
                    };
                    mw[b * WR + r] = mn;
                    for j in 0..16 {
                        u[j] = qs[j] & 0x0F;
                        u[j + 16] = qs[j] >> 4;
                    }
                }
                QType::Q8_0 => u.copy_from_slice(&blk[2..34]),
            }
        }
    }
    // `[weight row][activation row]`.
    let mut acc = vec![0f32; WR * AR];
    let mut mins = vec![0f32; WR * AR];
    let mut c = [0i32; 4 * T * T];
    engine.begin();
    for pair in 0..ta.groups / 2 {
        acc.fill(0.0);
        mins.fill(0.0);
        for b in 0..nb {
            let a0 = wq.as_ptr().add(b * BLOCK);
            engine.step(&Step {
                signed,
                a: [a0, a0.add(T * cols)],
                lda: cols,
                b: [ta.tile(2 * pair, b), ta.tile(2 * pair + 1, b)],
                c: c.as_mut_ptr(),
            });
            // C tile t: weight rows 16·(t / 2).., activation rows 16·(t % 2)..
            for (t, ct) in c.chunks_exact(T * T).enumerate() {
                let (rg, ag) = (t / 2, t % 2);
                let at = ((2 * pair + ag) * nb + b) * T;
                let (dx, sx) = (&ta.d[at..at + T], &ta.s[at..at + T]);
                for (rr, crow) in ct.chunks_exact(T).enumerate() {
                    let r = rg * T + rr;
                    let (d, mn) = (dw[b * WR + r], mw[b * WR + r]);
                    let o = r * AR + ag * T;
                    let accs = &mut acc[o..o + T];
                    for i in 0..T {
                        accs[i] = (d * dx[i]).mul_add(crow[i] as f32, accs[i]);
                    }
                    if with_mins {
                        let ms = &mut mins[o..o + T];
                        for i in 0..T {
                            ms[i] += mn * sx[i];
                        }
                    }
                }
            }
        }
        for ii in 0..AR.min(n.saturating_sub(pair * AR)) {
            let i = pair * AR + ii;
            for r in 0..rows {
                let v = if with_mins {
                    acc[r * AR + ii] + mins[r * AR + ii]
                } else {
                    acc[r * AR + ii]
                };
                // SAFETY: element (i, r0 + r) belongs to this item only; i < n, r0 + r < rows.
                *out.get().add(i * m.rows + r0 + r) = v;
            }
        }
    }
    engine.end();
}

impl Engine {
    /// Load the tile configuration (per work item: another thread's item may have run here).
    unsafe fn begin(self) {
        #[cfg(target_arch = "x86_64")]
        if self == Engine::Tiles {
            hw::configure();
        }
    }

    unsafe fn end(self) {
        #[cfg(target_arch = "x86_64")]
        if self == Engine::Tiles {
            hw::release();
        }
    }

    #[inline(always)]
    unsafe fn step(self, st: &Step) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Engine::Tiles => hw::step(st),
            #[cfg(not(target_arch = "x86_64"))]
            Engine::Tiles => unreachable!("AMX exists on x86_64 only"),
            Engine::Model => model_step(st),
        }
    }
}

/// The four products of one block: `C[2i + j] = A_i · B_j` for the A tiles at `a` (16 rows
/// of 32 bytes, `lda` apart; unsigned, or signed when `signed`) and the B tiles at `b` (8
/// rows of 64 bytes); `c` gets four 16 × 16 int32 tiles, row-major.
struct Step {
    signed: bool,
    a: [*const u8; 2],
    lda: usize,
    b: [*const i8; 2],
    c: *mut i32,
}

/// `tdpbusd` / `tdpbssd` on zeroed accumulators, as the instruction set reference defines
/// them: `C[m][n] = Σ_k A[m][k] · B[k / 4][4n + k % 4]`.
unsafe fn model_step(st: &Step) {
    let (signed, lda, c) = (st.signed, st.lda, st.c);
    for t in 0..4 {
        let (a, b) = (st.a[t / 2], st.b[t % 2]);
        for m in 0..T {
            for n in 0..T {
                let mut s = 0i32;
                for k in 0..BLOCK {
                    let av = *a.add(m * lda + k);
                    let av = if signed { av as i8 as i32 } else { av as i32 };
                    s += av * *b.add(k / 4 * 64 + 4 * n + k % 4) as i32;
                }
                *c.add(t * T * T + m * T + n) = s;
            }
        }
    }
}

/// The AMX instructions, in inline assembly (Rust's AMX intrinsics are not stable).
#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::asm;

    /// Palette 1: tiles 0-3 C (16 rows × 64 bytes of int32), 4-5 A (16 rows × 32 bytes),
    /// 6-7 B (8 rows × 64 bytes).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            let (colsb, rows) = match t {
                0..=3 => (64u16, 16u8),
                4 | 5 => (32, 16),
                _ => (64, 8),
            };
            c[16 + 2 * t] = colsb as u8;
            c[17 + 2 * t] = (colsb >> 8) as u8;
            c[48 + t] = rows;
            t += 1;
        }
        TileConfig(c)
    };

    pub(super) unsafe fn configure() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    pub(super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    #[inline(always)]
    pub(super) unsafe fn step(st: &super::Step) {
        // One block per instruction sequence: tile contents never live across `asm!`
        // blocks (only the configuration does, which no compiled code touches).
        let ([a0, a1], [b0, b1], lda) = (st.a, st.b, st.lda);
        let o = st.c as *mut u8;
        macro_rules! step {
            ($dp:literal) => {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    concat!($dp, " tmm0, tmm4, tmm6"),
                    concat!($dp, " tmm1, tmm4, tmm7"),
                    concat!($dp, " tmm2, tmm5, tmm6"),
                    concat!($dp, " tmm3, tmm5, tmm7"),
                    "tilestored [{o0} + {s}*1], tmm0",
                    "tilestored [{o1} + {s}*1], tmm1",
                    "tilestored [{o2} + {s}*1], tmm2",
                    "tilestored [{o3} + {s}*1], tmm3",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    lda = in(reg) lda,
                    o0 = in(reg) o,
                    o1 = in(reg) o.add(1024),
                    o2 = in(reg) o.add(2048),
                    o3 = in(reg) o.add(3072),
                    s = in(reg) 64usize,
                    options(nostack),
                )
            };
        }
        if st.signed {
            step!("tdpbssd");
        } else {
            step!("tdpbusd");
        }
    }
}

/// Whether the AMX unit gives its model's bits ([`Engine::Model`]) on small products of
/// each block type with partial tiles. Run once per process; a failure is reported on stderr
/// and the process keeps to the row kernels (VNNI).
pub(crate) fn trusted() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let (rows, cols, n) = (37, 96, 21);
            let bytes: Vec<u8> = (0..rows * cols / BLOCK * ty.block_bytes())
                .map(|i| match i % ty.block_bytes() {
                    // Small positive f16 scales (and Q4_1's mins); every other byte varies.
                    1 => 0x2c,
                    3 if ty == QType::Q4_1 => 0x2c,
                    _ => (i * 37 % 251) as u8,
                })
                .collect();
            let m = QMatrix::new(ty, rows, cols, bytes).expect("self-check shape");
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0)
                .collect();
            let acts = Acts::quantize(&x, cols);
            let (mut tiles, mut model) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            products(&[&m], &acts, &mut [&mut tiles], Engine::Tiles, false);
            products(&[&m], &acts, &mut [&mut model], Engine::Model, false);
            let same = tiles
                .iter()
                .zip(&model)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                eprintln!(
                    "warning: AMX INT8 products differ from their model ({ty:?}); using \
                     AVX-512 VNNI instead"
                );
                return false;
            }
        }
        true
    })
}
