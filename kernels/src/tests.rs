use super::*;

/// A small deterministic generator (tests only).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// `n` values in [-1, 1) from `seed` (the other modules' tests use it too).
pub(crate) fn lcg(seed: u64, n: usize) -> Vec<f32> {
    Lcg(seed).vec(n)
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// GGML's reference quantizers, to build test matrices.
fn quantize(ty: QType, w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in w.chunks_exact(BLOCK) {
        match ty {
            QType::Q4_0 => {
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(&mut out, d);
                for j in 0..16 {
                    let q0 = ((b[j] * id + 8.5) as u8).min(15);
                    let q1 = ((b[j + 16] * id + 8.5) as u8).min(15);
                    out.push(q0 | (q1 << 4));
                }
            }
            QType::Q4_1 => {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(&mut out, d);
                put_f16(&mut out, min);
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as u8).min(15);
                    let q1 = (((b[j + 16] - min) * id + 0.5) as u8).min(15);
                    out.push(q0 | (q1 << 4));
                }
            }
            QType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(&mut out, d);
                for &v in b {
                    out.push((v * id).round() as i8 as u8);
                }
            }
        }
    }
    out
}

const TYPES: [QType; 3] = [QType::Q4_0, QType::Q4_1, QType::Q8_0];

fn matrix(ty: QType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let w = Lcg(seed).vec(rows * cols);
    QMatrix::new(ty, rows, cols, quantize(ty, &w)).unwrap()
}

#[test]
fn dequantized_values_are_close_to_the_originals() {
    for ty in TYPES {
        let w = Lcg(7).vec(4 * 64);
        let m = QMatrix::new(ty, 4, 64, quantize(ty, &w)).unwrap();
        let d = m.dequantize();
        // Half a step, and for Q4_0 a whole step at the end opposite its largest value.
        let tol = match ty {
            QType::Q4_0 => 0.13,
            QType::Q4_1 => 0.07,
            QType::Q8_0 => 0.005,
        };
        for (a, b) in d.iter().zip(&w) {
            assert!((a - b).abs() < tol, "{ty:?}: {a} vs {b}");
        }
    }
}

/// The product equals the f64 product of the dequantized weights with the activations,
/// up to the 8-bit rounding of the activations.
#[test]
fn matmul_matches_the_dense_product() {
    let (rows, cols, n) = (37, 96, 5);
    for ty in TYPES {
        let m = matrix(ty, rows, cols, 1);
        let w = m.dequantize();
        let x = Lcg(2).vec(n * cols);
        let mut out = vec![0f32; n * rows];
        m.matmul(&x, &mut out);
        for i in 0..n {
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64)
                    .sum();
                let got = out[i * rows + r] as f64;
                // |x| ≤ 1, so each activation moves by at most 1/254 of its block's max.
                let bound: f64 =
                    (0..cols).map(|c| w[r * cols + c].abs() as f64).sum::<f64>() / 254.0;
                assert!(
                    (got - exact).abs() <= bound + 1e-4,
                    "{ty:?} [{i},{r}]: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }
}

/// A row's result is bit-identical whether it is alone or in a batch, at any position, with
/// any thread split.
#[test]
fn results_do_not_depend_on_the_batch() {
    let (rows, cols) = (600, 128);
    for ty in TYPES {
        let m = matrix(ty, rows, cols, 3);
        let x = Lcg(4).vec(9 * cols);
        let mut batch = vec![0f32; 9 * rows];
        m.matmul(&x, &mut batch);
        for i in 0..9 {
            let mut one = vec![0f32; rows];
            m.matmul(&x[i * cols..(i + 1) * cols], &mut one);
            assert!(
                one.iter()
                    .zip(&batch[i * rows..(i + 1) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty:?}: row {i} differs alone and in a batch of 9"
            );
        }
        // Two rows together give the bits they give in the batch of nine.
        let mut two = vec![0f32; 2 * rows];
        m.matmul(&x[3 * cols..5 * cols], &mut two);
        assert_eq!(
            two[..],
            batch[3 * rows..5 * rows],
            "{ty:?}: rows 3, 4 as a batch of 2"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut three = vec![0f32; 9 * rows];
        pool.install(|| m.matmul(&x, &mut three));
        assert_eq!(three, batch, "{ty:?}: thread count changed the result");
    }
}

/// The quantized-product paths this CPU has (whatever `EMLAB_KERNELS` caps), and a skip
/// report for each it lacks.
fn quant_paths(test: &str) -> Vec<Kernel> {
    let f = crate::cpu::features();
    let mut out = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if f.avx2 && f.fma && f.f16c {
            out.push(Kernel::Avx2);
        } else {
            crate::testing::skip_path(test, "avx2", "no AVX2 on this CPU");
        }
        if f.avx2 && f.fma && f.f16c && f.avx512vnni && f.avx512vl {
            out.push(Kernel::Vnni);
        } else {
            crate::testing::skip_path(test, "avx512_vnni", "no AVX-512 VNNI on this CPU");
        }
    }
    let _ = f;
    out
}

/// Every path computes the same integers as the scalar one; only the f32 summation order
/// differs (bound: 1e-4 relative).
#[test]
fn every_path_agrees_with_scalar() {
    let (rows, cols, n) = (16, 256, 3);
    for kern in quant_paths("kernels::every_path_agrees_with_scalar") {
        for ty in TYPES {
            let m = matrix(ty, rows, cols, 5);
            let a = Acts::quantize(&Lcg(6).vec(n * cols), cols);
            let w = &m.bytes()[..m.row_bytes()];
            let mut simd = [0f32; 4];
            kern.dot(ty, w, &a, 0, n, &mut simd);
            for (i, v) in simd[..n].iter().enumerate() {
                let s = scalar::dot(ty, w, &a, i);
                assert!(
                    (s - v).abs() <= 1e-4 * s.abs().max(1.0),
                    "{kern:?} {ty:?}: {s} vs {v}"
                );
            }
        }
    }
}

/// VNNI and AVX2 run the same f32 sequence over the same integers: the same bits.
#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_and_avx2_give_the_same_bits() {
    let paths = quant_paths("kernels::vnni_and_avx2_give_the_same_bits");
    if !paths.contains(&Kernel::Vnni) || !paths.contains(&Kernel::Avx2) {
        return;
    }
    let cols = 192;
    for ty in TYPES {
        let m = matrix(ty, 4, cols, 8);
        let a = Acts::quantize(&Lcg(9).vec(3 * cols), cols);
        for r in 0..4 {
            let w = &m.bytes()[r * m.row_bytes()..(r + 1) * m.row_bytes()];
            for take in 1..=3 {
                let (mut v, mut x) = ([0f32; 4], [0f32; 4]);
                Kernel::Vnni.dot(ty, w, &a, 0, take, &mut v);
                Kernel::Avx2.dot(ty, w, &a, 0, take, &mut x);
                assert_eq!(v, x, "{ty:?} row {r} take {take}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    assert_eq!(
        QMatrix::new(QType::Q4_1, 2, 40, vec![]).err(),
        Some(Error::Cols(40))
    );
    assert_eq!(
        QMatrix::new(QType::Q4_1, 2, 64, vec![0; 79]).err(),
        Some(Error::Bytes {
            expected: 80,
            got: 79
        })
    );
}

#[test]
fn zero_activations_give_zero() {
    for ty in TYPES {
        let m = matrix(ty, 8, 64, 10);
        let mut out = vec![1f32; 8];
        m.matmul(&[0f32; 64], &mut out);
        // Q4_1's offsets multiply the activation sum, which is 0 too.
        assert!(out.iter().all(|v| *v == 0.0), "{ty:?}: {out:?}");
    }
}

/// Products sharing an input give, bit for bit, what separate products give.
#[test]
fn grouped_products_equal_separate_ones() {
    let cols = 64;
    let ms = [
        matrix(QType::Q4_1, 40, cols, 11),
        matrix(QType::Q8_0, 9, cols, 12),
        matrix(QType::Q4_0, 300, cols, 13),
    ];
    let x = Lcg(14).vec(3 * cols);
    let acts = Acts::quantize(&x, cols);
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; 3 * m.rows()]).collect();
    {
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        matmul_many(&[&ms[0], &ms[1], &ms[2]], &acts, &mut refs);
    }
    for (m, got) in ms.iter().zip(&outs) {
        let mut one = vec![0f32; 3 * m.rows()];
        m.matmul(&x, &mut one);
        assert_eq!(&one, got, "{:?}", m.qtype());
    }
}

/// A block's `d_w`, `m_w` (Q4_0: `-8·d_w`; Q8_0: 0) and integer dot product with `xq`, from
/// the block layouts (tests' own reading of them).
fn block_parts(ty: QType, blk: &[u8], xq: &[i8]) -> (f32, f32, i32) {
    let dw = f16_at(blk, 0);
    let (m, q): (f32, Vec<i32>) = match ty {
        QType::Q4_0 | QType::Q4_1 => {
            let qs = if ty == QType::Q4_1 {
                &blk[4..20]
            } else {
                &blk[2..18]
            };
            let m = if ty == QType::Q4_1 {
                f16_at(blk, 2)
            } else {
                -8.0 * dw
            };
            let lo = qs.iter().map(|q| (q & 0x0F) as i32);
            (m, lo.chain(qs.iter().map(|q| (q >> 4) as i32)).collect())
        }
        QType::Q8_0 => (0.0, blk[2..34].iter().map(|q| *q as i8 as i32).collect()),
    };
    (dw, m, q.iter().zip(xq).map(|(w, x)| w * *x as i32).sum())
}

/// The tile path's order, element by element: blocks in order, `acc = fma(d_w·d_x, Σ, acc)`,
/// `mins += m_w·s_x`, then `acc + mins` (Q8_0: `acc`).
fn tile_order(m: &QMatrix, a: &Acts, i: usize, r: usize) -> f32 {
    let nb = a.cols / BLOCK;
    let bb = m.qtype().block_bytes();
    let row = &m.bytes()[r * m.row_bytes()..(r + 1) * m.row_bytes()];
    let (mut acc, mut mins) = (0f32, 0f32);
    for b in 0..nb {
        let xq = &a.q[(i * nb + b) * BLOCK..(i * nb + b + 1) * BLOCK];
        let (dw, mw, sum) = block_parts(m.qtype(), &row[b * bb..(b + 1) * bb], xq);
        let (dx, sx) = (a.ds[2 * (i * nb + b)], a.ds[2 * (i * nb + b) + 1]);
        acc = (dw * dx).mul_add(sum as f32, acc);
        mins += mw * sx;
    }
    if m.qtype() == QType::Q8_0 {
        acc
    } else {
        acc + mins
    }
}

/// The tile products (AMX INT8), through the scalar model of the tile instructions (every
/// CPU) and the AMX unit (where this CPU has it): the bits of the tile order for every block
/// type, with partial tiles of weights (37, 33 rows) and activations (1 to 40 rows), the
/// same bits for a row alone and in a batch, and within 1e-4 (relative) of the row kernels.
#[test]
fn tile_products_keep_their_order_and_the_batch_invariance() {
    use crate::amx_int8::Engine;
    let test = "kernels::tile_products_keep_their_order_and_the_batch_invariance";
    let mut engines = vec![Engine::Model];
    let f = crate::cpu::features();
    if f.amx_int8 && crate::quant_path() == Kernel::Amx {
        engines.push(Engine::Tiles);
    } else if f.amx_int8 {
        crate::testing::skip_path(test, "amx_int8", "EMLAB_KERNELS caps the kernels below AMX");
    } else {
        crate::testing::skip_path(test, "amx_int8", "no AMX INT8 on this CPU");
    }
    for (ty, cols) in TYPES.into_iter().flat_map(|t| [(t, 96), (t, 352)]) {
        for (rows, n) in [(37, 1), (37, 3), (37, 5), (64, 16), (37, 21), (33, 40)] {
            let m = matrix(ty, rows, cols, 20 + n as u64);
            let x = Lcg(21).vec(n * cols);
            let acts = Acts::quantize(&x, cols);
            let mut rows_out = vec![0f32; n * rows];
            matmul_rows(Kernel::Scalar, &[&m], &acts, &mut [&mut rows_out]);
            for engine in &engines {
                let mut got = vec![f32::NAN; n * rows];
                crate::amx_int8::matmul_many(&[&m], &acts, &mut [&mut got], *engine);
                for (e, (g, v)) in got.iter().zip(&rows_out).enumerate() {
                    let (i, r) = (e / rows, e % rows);
                    let want = tile_order(&m, &acts, i, r);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{engine:?} {ty:?} {rows} x {n} x {cols}: ({i}, {r}) {g} vs {want}"
                    );
                    assert!((g - v).abs() <= 1e-4 * v.abs().max(1.0), "{g} vs rows {v}");
                }
                // The last row alone gives its bits in the batch.
                let alone = Acts::quantize(&x[(n - 1) * cols..], cols);
                let mut one = vec![f32::NAN; rows];
                crate::amx_int8::matmul_many(&[&m], &alone, &mut [&mut one], *engine);
                assert_eq!(one[..], got[(n - 1) * rows..], "{engine:?} {ty:?} alone");
            }
        }
    }
    // Several matrices in one call (q/k/v) give what each gives alone.
    let cols = 96;
    let ms = [
        matrix(QType::Q4_1, 40, cols, 31),
        matrix(QType::Q8_0, 9, cols, 32),
    ];
    let acts = Acts::quantize(&Lcg(33).vec(7 * cols), cols);
    for engine in &engines {
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; 7 * m.rows()]).collect();
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        crate::amx_int8::matmul_many(&[&ms[0], &ms[1]], &acts, &mut refs, *engine);
        for (m, got) in ms.iter().zip(&outs) {
            let mut one = vec![0f32; 7 * m.rows()];
            crate::amx_int8::matmul_many(&[m], &acts, &mut [&mut one], *engine);
            assert_eq!(&one, got, "{engine:?} {:?}", m.qtype());
        }
    }
}
