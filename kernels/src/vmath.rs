//! `exp` over f32 slices in SIMD registers, for the elementwise parts of training (SiLU,
//! softmax, cross-entropy): about 270 million exponentials per SmolLM2 step at 4 × 256
//! tokens, which as libm calls one element at a time cost a visible share of it.
//!
//! `exp(x) = 2ⁿ · exp(r)` with `n = round(x / ln 2)` and `r = x − n ln 2` (ln 2 in two parts),
//! `exp(r)` by Cephes' degree-7 polynomial for `expf`: within 2 ulp of the true value
//! (tested against f64). Inputs are clamped to `[-87.3, 88.3]`, so the result is never
//! infinite or subnormal (`exp(-1000)` gives about 1e-38, not 0); NaN stays NaN.

/// `x[i] = exp(x[i])`.
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx512f_fma() {
            // SAFETY: the CPU has AVX-512F and FMA (checked).
            return unsafe { x86::avx512(x) };
        }
        if crate::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            return unsafe { x86::avx2(x) };
        }
    }
    for v in x {
        *v = exp_one::<false>(*v);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn avx512(x: &mut [f32]) {
        for v in x {
            *v = super::exp_one::<true>(*v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(x: &mut [f32]) {
        for v in x {
            *v = super::exp_one::<true>(*v);
        }
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: adding it rounds to an integer, which lands in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

#[inline(always)]
pub(crate) fn exp_one<const FMA: bool>(x: f32) -> f32 {
    use crate::madd;
    let x = x.clamp(-87.3, 88.3);
    let t = madd::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let e = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = madd::<FMA>(n, -LN2_HI, x);
    let r = madd::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p, r * r, r) + 1.0;
    p * f32::from_bits((e.wrapping_add(127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        ((a as f64 - b) / (b as f32).abs().max(f32::MIN_POSITIVE) as f64).abs()
            / f32::EPSILON as f64
    }

    #[test]
    fn close_to_f64_exp() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * (175.3 / 200_000.0))
            .collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1.0, 88.0, -87.0]);
        let mut got = xs.clone();
        exp_inplace(&mut got);
        let mut scalar = xs.clone();
        for v in &mut scalar {
            *v = exp_one::<false>(*v);
        }
        for ((&x, &g), &s) in xs.iter().zip(&got).zip(&scalar) {
            let want = (x as f64).exp();
            assert!(ulps(g, want) <= 2.0, "exp({x}) = {g}, want {want}");
            assert!(ulps(s, want) <= 2.0, "scalar exp({x}) = {s}, want {want}");
        }
    }

    #[test]
    fn edges() {
        let mut v = [f32::NAN, f32::NEG_INFINITY, -1000.0, 1000.0, f32::INFINITY];
        exp_inplace(&mut v);
        assert!(v[0].is_nan());
        assert!(v[1] >= 0.0 && v[1] < 1e-37, "{}", v[1]);
        assert!(v[2] >= 0.0 && v[2] < 1e-37, "{}", v[2]);
        assert!(v[3].is_finite() && v[3] > 1e38, "{}", v[3]);
        assert!(v[4].is_finite() && v[4] > 1e38, "{}", v[4]);
    }
}
