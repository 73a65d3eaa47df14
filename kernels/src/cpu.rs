//! The one place that detects what this CPU can run, and which kernel path each kernel
//! family takes. Detection runs once per process; every kernel asks [`paths`], so one
//! process never mixes paths, and a `bench` record can name the paths its figures came from.
//!
//! Families and their paths, best first:
//! - **quantized products** (GGML blocks × int8 activations): AMX tile INT8, AVX-512 VNNI,
//!   AVX2, scalar. All compute the same integers; VNNI and AVX2 give the same bits, scalar
//!   and AMX (another f32 order) agree with them within rounding.
//! - **f32** (attention, low-rank adapter products, `exp`): AVX-512F, AVX2 + FMA, scalar.
//! - **bf16 products** (the frozen base in `--bf16-base` training): AMX tile BF16, AVX-512
//!   BF16, or none (the caller stays in f32).
//!
//! `EMLAB_KERNELS` caps the level every family may use: `scalar`, `avx2`, `avx512` or `amx`
//! (the default `auto` is the best the CPU has). A cap above what the CPU has falls back to
//! what it has; [`requested`] reports the difference so a caller can refuse it.
//! Linux keeps AMX tile state off until a process asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
//! [`features`] asks once, and AMX counts as present only when the kernel grants it.

use std::sync::OnceLock;

/// Instruction-set extensions the kernels use, as this CPU (and OS) reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512vl: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    /// AMX tiles with BF16 products, and the OS granted this process the tile state.
    pub amx_bf16: bool,
    /// AMX tiles with INT8 products (granted as above).
    pub amx_int8: bool,
}

impl Features {
    /// The extensions present, by their `/proc/cpuinfo` names, for records and messages.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512vl, "avx512vl"),
            (self.avx512vnni, "avx512_vnni"),
            (self.avx512bf16, "avx512_bf16"),
            (self.amx_bf16, "amx_bf16"),
            (self.amx_int8, "amx_int8"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }

    /// The highest [`Level`] every family's path of which this CPU can run.
    pub fn best(&self) -> Level {
        let amx_int8 = self.amx_int8 && self.avx512vnni && self.avx2 && self.fma && self.f16c;
        if (self.amx_bf16 && self.avx512bf16 || amx_int8) && self.avx512f && self.avx512vl {
            Level::Amx
        } else if self.avx512f && self.fma {
            Level::Avx512
        } else if self.avx2 && self.fma {
            Level::Avx2
        } else {
            Level::Scalar
        }
    }

    /// Whether this CPU runs `level` (every path at or below it).
    pub fn has(&self, level: Level) -> bool {
        level <= self.best()
    }
}

/// A cap on the instruction sets the kernels use (`EMLAB_KERNELS`), lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
    Amx,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// Quantized-block products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantPath {
    Scalar,
    Avx2,
    Vnni,
    /// AMX tile INT8 for every quantized product (its own f32 order: a row gives the same
    /// bits alone and in a batch only if every product takes it).
    Amx,
}

impl QuantPath {
    pub fn name(self) -> &'static str {
        match self {
            QuantPath::Scalar => "scalar",
            QuantPath::Avx2 => "avx2",
            QuantPath::Vnni => "avx512_vnni",
            QuantPath::Amx => "amx_int8",
        }
    }
}

/// f32 kernels: attention, low-rank products, `exp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Path {
    Scalar,
    Avx2,
    Avx512,
}

/// bf16 products with f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Path {
    Avx512,
    Amx,
}

/// The path each family takes in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paths {
    pub level: Level,
    pub quant: QuantPath,
    pub f32: F32Path,
    /// `None`: no bf16 products on this CPU (callers compute in f32).
    pub bf16: Option<Bf16Path>,
}

impl Paths {
    /// The paths `f` allows under the cap `level`.
    pub fn choose(f: &Features, level: Level) -> Paths {
        let level = level.min(f.best());
        let avx2 = f.avx2 && f.fma && f.f16c;
        let vnni = avx2 && f.avx512vnni && f.avx512vl;
        let quant = if level >= Level::Amx && vnni && f.amx_int8 && f.avx512f {
            QuantPath::Amx
        } else if level >= Level::Avx512 && vnni {
            QuantPath::Vnni
        } else if level >= Level::Avx2 && avx2 {
            QuantPath::Avx2
        } else {
            QuantPath::Scalar
        };
        let f32 = if level >= Level::Avx512 && f.avx512f && f.fma {
            F32Path::Avx512
        } else if level >= Level::Avx2 && f.avx2 && f.fma {
            F32Path::Avx2
        } else {
            F32Path::Scalar
        };
        let avx512bf16 = f.avx512f && f.avx512bf16 && f.avx512vl;
        // AMX's tails (a `k` that is not whole tiles) and activation conversion run on
        // AVX-512 BF16, which every AMX CPU has.
        let bf16 = if level >= Level::Amx && f.amx_bf16 && avx512bf16 {
            Some(Bf16Path::Amx)
        } else if level >= Level::Avx512 && avx512bf16 {
            Some(Bf16Path::Avx512)
        } else {
            None
        };
        Paths {
            level,
            quant,
            f32,
            bf16,
        }
    }

    /// `(family, path)` names, as recorded with every `bench` result.
    pub fn names(&self) -> [(&'static str, &'static str); 4] {
        [
            ("level", self.level.name()),
            ("quant", self.quant.name()),
            (
                "f32",
                match self.f32 {
                    F32Path::Scalar => "scalar",
                    F32Path::Avx2 => "avx2_fma",
                    F32Path::Avx512 => "avx512f",
                },
            ),
            (
                "bf16",
                match self.bf16 {
                    None => "none",
                    Some(Bf16Path::Avx512) => "avx512_bf16",
                    Some(Bf16Path::Amx) => "amx_bf16",
                },
            ),
        ]
    }
}

/// This CPU's features, detected once (AMX: after asking Linux for the tile state).
pub fn features() -> &'static Features {
    static F: OnceLock<Features> = OnceLock::new();
    F.get_or_init(detect)
}

/// The `EMLAB_KERNELS` request: `Ok(None)` for unset or `auto`, `Err` naming a bad value.
pub fn requested() -> Result<Option<Level>, String> {
    match std::env::var("EMLAB_KERNELS") {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() || v == "auto" => Ok(None),
        Ok(v) => Level::parse(&v).map(Some).ok_or_else(|| {
            format!("EMLAB_KERNELS={v:?} is not one of auto, scalar, avx2, avx512, amx")
        }),
    }
}

/// The paths this process uses: the best the CPU has, capped by `EMLAB_KERNELS` (an
/// unreadable value caps nothing; [`requested`] names it).
pub fn paths() -> &'static Paths {
    static P: OnceLock<Paths> = OnceLock::new();
    P.get_or_init(|| {
        let cap = requested().ok().flatten().unwrap_or(Level::Amx);
        Paths::choose(features(), cap)
    })
}

/// The CPU's model name (`/proc/cpuinfo`), or empty where it cannot be read.
pub fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let amx = amx_granted();
    Features {
        avx2: is_x86_feature_detected!("avx2"),
        fma: is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512vl: is_x86_feature_detected!("avx512vl"),
        avx512vnni: is_x86_feature_detected!("avx512vnni"),
        avx512bf16: is_x86_feature_detected!("avx512bf16"),
        amx_bf16: amx.0,
        amx_int8: amx.1,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// `(bf16, int8)`: the CPU has AMX tiles with these products (CPUID leaf 7, EDX bits 22, 24,
/// 25) and Linux granted the tile data state to this process.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid_count` is safe from Rust 1.87 on, unsafe before
fn amx_granted() -> (bool, bool) {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is valid where leaf 0 reports it.
    let max_leaf = unsafe { __cpuid_count(0, 0) }.eax;
    if max_leaf < 7 {
        return (false, false);
    }
    let edx = unsafe { __cpuid_count(7, 0) }.edx;
    let (tile, bf16, int8) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1, edx >> 25 & 1 == 1);
    if !tile || !(bf16 || int8) {
        return (false, false);
    }
    if !request_tile_state() {
        return (false, false);
    }
    (bf16, int8)
}

/// Ask Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// without it the first tile instruction kills the process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_never_raises_a_path() {
        let all = Features {
            avx2: true,
            fma: true,
            f16c: true,
            avx512f: true,
            avx512vl: true,
            avx512vnni: true,
            avx512bf16: true,
            amx_bf16: true,
            amx_int8: true,
        };
        let p = Paths::choose(&all, Level::Amx);
        assert_eq!(
            (p.quant, p.f32, p.bf16),
            (QuantPath::Amx, F32Path::Avx512, Some(Bf16Path::Amx))
        );
        let p = Paths::choose(&all, Level::Avx512);
        assert_eq!((p.quant, p.bf16), (QuantPath::Vnni, Some(Bf16Path::Avx512)));
        // AMX INT8 without AMX BF16 still takes the tiles for quantized products.
        let int8 = Features {
            amx_bf16: false,
            ..all
        };
        let p = Paths::choose(&int8, Level::Amx);
        assert_eq!(
            (p.level, p.quant, p.bf16),
            (Level::Amx, QuantPath::Amx, Some(Bf16Path::Avx512))
        );
        let p = Paths::choose(&all, Level::Avx2);
        assert_eq!(
            (p.quant, p.f32, p.bf16),
            (QuantPath::Avx2, F32Path::Avx2, None)
        );
        let p = Paths::choose(&all, Level::Scalar);
        assert_eq!(
            (p.quant, p.f32, p.bf16),
            (QuantPath::Scalar, F32Path::Scalar, None)
        );
        // An AVX2-only CPU asked for AMX gets AVX2.
        let avx2 = Features {
            avx2: true,
            fma: true,
            f16c: true,
            ..Features::default()
        };
        let p = Paths::choose(&avx2, Level::Amx);
        assert_eq!(
            (p.level, p.quant, p.bf16),
            (Level::Avx2, QuantPath::Avx2, None)
        );
        assert_eq!(Level::parse("avx512"), Some(Level::Avx512));
        assert_eq!(Level::parse("sse"), None);
    }
}
