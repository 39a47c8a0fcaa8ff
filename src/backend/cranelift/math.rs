//! Inline f32x4 transcendentals for Cranelift: no libcalls, no branches, four lanes at a time.
//!
//! Each function takes and returns `f32x4` values and emits straight-line code at the builder's
//! current position. The free functions ([`exp`], [`log`], ...) use [`Math::host`], which fuses
//! multiply-adds when the host has FMA; a code generator for another ISA calls the same methods
//! on [`Math::for_isa`].
//!
//! Errors are in ulp of the f32 result against the exact (f64) result; below the normal range
//! an ulp is 2^-149. "Max" is the worst case over every 7th of the 2^32 inputs
//! (`LOSSC_MATH_STRIDE=7`, about 600 million; an exhaustive run, `LOSSC_MATH_STRIDE=1`, takes
//! about three minutes per function); pow's is over the samples its tests draw. The tests
//! assert the bounds on every 97th bit pattern and on the special values. Times are one Zen 3
//! thread on a cache-resident buffer (`tests::throughput`).
//!
//! | function | method | max (FMA / none) | bound (FMA / none) | ns/value |
//! |---|---|---|---|---|
//! | `exp` | Cody-Waite reduction by ln 2, degree-6 polynomial, 2^n by integer adds | 0.92 / 1.20 | 1 / 1.25 | 1.2 |
//! | `log` | split at sqrt(1/2), e ln 2 + f as two floats, f^2 Q(f) with degree-8 Q | 0.93 / 0.93 | 1 / 1 | 1.5 |
//! | `log1p` | `log` of u = 1 + x plus c/u, c = 1 + x - u exactly | 0.92 / 1.00 | 1 / 1.25 | 2.15 |
//! | `sigmoid` | z = e^-abs(x), then 1/(1+z) or z/(1+z) | 2.33 / 2.33 | 2.5 / 2.5 | 1.5 |
//! | `softplus` | max(x, 0) + log1p(z), z = e^-abs(x); with FMA log1p(z) = 2 atanh(z/(2+z)), the quotient's rounding recovered | 1.51 / 1.72 | 2 / 2 | 2.2 |
//! | `tanh` | odd polynomial below 1.1, else 1 - 2z/(1+z), z = e^(-2 abs(x)) | 1.09 / 1.43 | 1.25 / 1.5 | 2.6 |
//! | `pow` | log and exp in f64x2 on promoted halves, C99 special cases | 0.50 / 0.50 | 0.51 / 0.51 | 9.6 |
//!
//! Where the argument of an exp is known to be at most 0 (e^-abs(x) inside sigmoid, softplus
//! and tanh; x - max in a softmax), `Math::exp_nonpositive` scales by 2^n in one integer
//! step instead of two, with the same results (tested over every 89th non-positive float).
//!
//! The polynomials are evaluated by Estrin's scheme but for their lowest one or two terms
//! (Horner's rule there, where rounding matters most): in a fused loss kernel the chain of
//! dependent multiply-adds, not their number, bounds the speed.
//!
//! sigmoid's error is mostly exp's relative error, which the quotient passes on and adds to;
//! making it exact would cost a Newton step, and sigmoid's speed bounds fused CPU losses such
//! as Dice.
//!
//! The polynomial coefficients were derived for this module, not copied: a discrete Remez
//! exchange in mpmath (50 digits, 3000 points) for the minimax relative error of the whole
//! approximation on the stated interval, then rounded to f32 one coefficient at a time (lowest
//! degree first) with the rest refitted after each rounding. The f64 series in `pow` are Taylor
//! series (atanh and exp), whose coefficients are exact reciprocals.

use std::sync::OnceLock;

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32X4, F64X2, I32, I32X4, I64X2, I8X16};
use cranelift_codegen::ir::{ConstantData, Endianness, InstBuilder, MemFlagsData, Value};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings;
use cranelift_frontend::FunctionBuilder;

/// e^x. Within 1 ulp (1.25 without FMA); exactly 0 below -103.98, +inf above 88.73, gradual
/// underflow through the denormals in between; exp(NaN) = NaN.
pub fn exp(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().exp(b, x)
}

/// Natural logarithm. Within 1 ulp, denormal inputs included; log(±0) = -inf, log(inf) = inf,
/// log(x < 0) = log(NaN) = NaN.
pub fn log(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().log(b, x)
}

/// ln(1 + x), accurate for tiny x (log1p(x) = x below 2^-24). Within 1 ulp (1.25 without FMA);
/// log1p(±0) = ±0, log1p(-1) = -inf, log1p(x < -1) = NaN.
pub fn log1p(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().log1p(b, x)
}

/// 1 / (1 + e^-x) without overflow. Within 2.5 ulp; exactly 1 above 16.7, the tail e^x far
/// below 0 (denormals included) and exactly 0 below -103.98; NaN stays NaN.
pub fn sigmoid(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().sigmoid(b, x)
}

/// max(x, 0) + log1p(e^-abs(x)). Within 2 ulp; exactly x for large x, the tail e^x (denormals
/// included) for very negative x, 0 at -inf; NaN stays NaN.
pub fn softplus(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().softplus(b, x)
}

/// Hyperbolic tangent. Within 1.25 ulp (1.5 without FMA); exactly ±1 beyond ±9.02,
/// tanh(±0) = ±0; NaN stays NaN.
pub fn tanh(b: &mut FunctionBuilder, x: Value) -> Value {
    Math::host().tanh(b, x)
}

/// x^y, computed as e^(y ln|x|) in f64. Within 0.51 ulp. Zero, negative and special x follow
/// C99 `powf` (F.9.4.4): see [`Math::pow`].
pub fn pow(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    Math::host().pow(b, x, y)
}

/// How the maths is emitted for one target: fused or separate multiply-adds. Without FMA,
/// Cranelift would lower a vector `fma` to four libcalls, so this emits `fmul` + `fadd` instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Math {
    fused: bool,
}

// Reduction constants. LN2_HI has 15 significant bits, so n * LN2_HI is exact for |n| < 512.
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 1/ln 2 rounded
/// 1.5 * 2^23: x / ln 2 + EXP_SHIFT rounds to an integer n, kept in the low mantissa bits.
const EXP_SHIFT: f32 = 12_582_912.0;
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // ln 2 - LN2_HI, 1.4286068e-6
const SQRT_HALF_BITS: u32 = 0x3f35_04f3; // sqrt(1/2) rounded
const SIGN: u32 = 0x8000_0000;

/// e^r = 1 + r + ... on |r| <= ln2/2 + 2e-5, highest degree first (degree 6, constant 1).
/// Relative error 3.2e-9 (0.05 * 2^-24).
const EXP_POLY: [f32; 7] = [
    f32::from_bits(0x3ab5_63a7), // 1.3838903e-3
    f32::from_bits(0x3c09_1ef0), // 8.3691925e-3
    f32::from_bits(0x3d2a_ac2c), // 4.1668102e-2
    f32::from_bits(0x3e2a_aa46), // 0.16666517
    f32::from_bits(0x3eff_fffe), // 0.49999994
    1.0,
    1.0,
];

/// Q(f) in log1p(f) = f + f^2 Q(f) on [sqrt(1/2) - 1, sqrt 2 - 1], highest degree first (degree
/// 8, constant -1/2 kept exact). Relative error of f + f^2 Q(f): 8.8e-9 (0.15 * 2^-24).
const LOG_POLY: [f32; 9] = [
    f32::from_bits(0xbd9c_d198), // -7.6571643e-2
    f32::from_bits(0x3e02_b57d), // 0.12764545
    f32::from_bits(0xbe06_b935), // -0.13156588
    f32::from_bits(0x3e11_6bb0), // 0.14201236
    f32::from_bits(0xbe2a_3931), // -0.16623379
    f32::from_bits(0x3e4c_d018), // 0.20001256
    f32::from_bits(0xbe80_0114), // -0.25000823
    f32::from_bits(0x3eaa_aaaa), // 0.33333331
    -0.5,
];

/// Q(t) in log1p(z) = 2 atanh(s) = 2s + s^3 Q(s^2), s = z/(2+z) in [0, 1/3] (z in [0, 1]),
/// highest degree first (degree 3). Relative error of 2s + s^3 Q(s^2): 4.5e-9 (0.08 * 2^-24).
const ATANH_POLY: [f32; 4] = [
    f32::from_bits(0x3e8f_6483), // 0.28006372
    f32::from_bits(0x3e8f_6038), // 0.28003097
    f32::from_bits(0x3ecc_e8e5), // 0.40021434
    f32::from_bits(0x3f2a_aa81), // 0.66666418
];

/// 2/d ~ INV_LINE[0] d + INV_LINE[1] on d in [2, 3], within 2.05%.
const INV_LINE: [f32; 2] = [-0.326_25, 1.632];

/// Below this |x|, tanh uses the odd polynomial. Above it z = e^(-2|x|) <= 0.111, so in
/// 1 - 2z/(1+z) the rounded quotient is at most a quarter of the result.
const TANH_SMALL: f32 = 1.1;

/// P(x^2) in tanh(x) = x + x^3 P(x^2) on (0, 1.1], highest degree first (degree 7).
/// Relative error 1.6e-9 (0.03 * 2^-24).
const TANH_POLY: [f32; 8] = [
    f32::from_bits(0x38bf_264f), // 9.1147253e-5
    f32::from_bits(0xba3b_eae4), // -7.1684853e-4
    f32::from_bits(0x3b3c_3fa4), // 2.8724456e-3
    f32::from_bits(0xbc09_ec57), // -8.4181642e-3
    f32::from_bits(0x3cb1_c735), // 2.1701435e-2
    f32::from_bits(0xbd5c_e800), // -5.3932190e-2
    f32::from_bits(0x3e08_8789), // 0.13332953
    f32::from_bits(0xbeaa_aaa6), // -0.33333319
];

impl Math {
    /// Fused multiply-adds if and only if `isa` executes them natively.
    pub fn for_isa(isa: &dyn TargetIsa) -> Self {
        Self { fused: isa.has_native_fma() }
    }

    /// For the machine this process runs on, as `cranelift_native` detects it (cached).
    pub fn host() -> Self {
        static HOST: OnceLock<Math> = OnceLock::new();
        *HOST.get_or_init(|| {
            let fused = cranelift_native::builder()
                .ok()
                .and_then(|isa| isa.finish(settings::Flags::new(settings::builder())).ok())
                .is_some_and(|isa| isa.has_native_fma());
            Self { fused }
        })
    }

    /// Chooses fused (`true`) or separate multiply-adds explicitly.
    pub const fn with_fma(fused: bool) -> Self {
        Self { fused }
    }

    /// See [`exp`].
    pub fn exp(self, b: &mut FunctionBuilder, x: Value) -> Value {
        // Above 89 every result overflows; clamping keeps n <= 128 for the scaling below.
        let hi = splat(b, 89.0);
        let x = min(b, hi, x);
        let (t, p) = self.exp_reduced(b, x);
        // Scale by 2^n as 2^(n/2) * 2^(n - n/2): both factors stay normal for n in [-150, 128],
        // so p * 2^(n/2) is exact and the second product rounds once, into a denormal or inf.
        let shift = splat_int(b, EXP_SHIFT.to_bits());
        let n = b.ins().isub(t, shift);
        let n1 = b.ins().sshr_imm_u(n, 1);
        let n2 = b.ins().isub(n, n1);
        let s1 = pow2(b, n1);
        let s2 = pow2(b, n2);
        let p = b.ins().fmul(p, s1);
        b.ins().fmul(p, s2)
    }

    /// e^x for x <= 0 or NaN, as sigmoid's e^-|x| and a softmax's e^(x - max) are: [`Math::exp`]
    /// with one integer scaling instead of two (x up to 43 would do). Within 1 ulp, like `exp`,
    /// denormals included.
    pub fn exp_nonpositive(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let (t, p) = self.exp_reduced(b, x);
        // 2^(n + 64) is normal for n in [-150, 63], so p * 2^(n + 64) is exact and the product
        // with 2^-64 rounds once, into a denormal. The bias 127 + 64 folds into t's offset.
        let offset = splat_int(b, EXP_SHIFT.to_bits() - 191);
        let e = b.ins().isub(t, offset);
        let e = b.ins().ishl_imm_u(e, 23);
        let s = as_float(b, e);
        let p = b.ins().fmul(p, s);
        let down = splat(b, f32::from_bits((127 - 64) << 23)); // 2^-64
        b.ins().fmul(p, down)
    }

    /// The reduction both exps share, for x <= 89 or NaN: (t, p) with e^x = 2^n p, p the
    /// polynomial in [0.7, 1.5] and n in t's low bits as an i32x4 (t - EXP_SHIFT's bits = n).
    fn exp_reduced(self, b: &mut FunctionBuilder, x: Value) -> (Value, Value) {
        // Below -104 every result rounds to 0; clamping keeps n >= -150. `max` keeps a NaN x.
        let lo = splat(b, -104.0);
        let x = max(b, lo, x);
        // n = round(x / ln 2): adding 1.5 * 2^23 leaves n in the low mantissa bits, rounded to
        // nearest by the add itself (the vector float-to-int conversion is slow on x86).
        let shift = splat(b, EXP_SHIFT);
        let log2e = splat(b, LOG2E);
        let t = self.mul_add(b, x, log2e, shift);
        let n = b.ins().fsub(t, shift);
        // r = x - n ln 2 in two steps (Cody-Waite): n * LN2_HI and x - n * LN2_HI are exact.
        let r = self.mul_add_k(b, n, -LN2_HI, x);
        let r = self.mul_add_k(b, n, -LN2_LO, r);
        let p = self.poly(b, r, &EXP_POLY, 2);
        (as_int(b, t), p)
    }

    /// See [`log`].
    pub fn log(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let (e, f) = split(b, x, true);
        let r = self.log_reduced(b, e, f, None);
        log_specials(b, x, r)
    }

    /// log(x) for an x the caller knows is a positive normal finite number or NaN (a
    /// clamped probability, say): [`Math::log`] without the denormal and special-value
    /// paths, NaN still NaN. Within 1 ulp there.
    pub fn log_normal(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let (e, f) = split(b, x, false);
        let r = self.log_reduced(b, e, f, None);
        let nan = splat(b, f32::NAN);
        let is_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
        select(b, is_nan, nan, r)
    }

    /// See [`log1p`].
    pub fn log1p(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let one = splat(b, 1.0);
        let u = b.ins().fadd(x, one);
        // c = (1 + x) - u exactly (Fast2Sum, larger magnitude first).
        let um1 = b.ins().fsub(u, one);
        let c_small = b.ins().fsub(x, um1);
        let umx = b.ins().fsub(u, x);
        let c_big = b.ins().fsub(one, umx);
        let big = fcmp_k(b, FloatCC::GreaterThan, x, 1.0);
        let c = select(b, big, c_big, c_small);
        let huge = fcmp_k(b, FloatCC::GreaterThanOrEqual, x, 16_777_216.0);
        let r = self.log1p_split(b, u, c, Some(huge));
        let r = log_specials(b, u, r);
        // log1p(-0) = -0, and every other negative x has a negative (or NaN) result: or in the sign.
        or_sign(b, r, x)
    }

    /// ln(u + c) for u = 1 + x rounded (never denormal) and c its small rounding error. Where
    /// `drop` is set (x >= 2^24) c is ignored: it is below 2^-24 of the result there, and
    /// c 2^-e could be 0 * inf.
    fn log1p_split(self, b: &mut FunctionBuilder, u: Value, c: Value, drop: Option<Value>) -> Value {
        let (e, f) = split(b, u, false);
        // 1 + x = 2^e (1 + f + cs) with cs = c 2^-e, exact.
        let bias = splat_int(b, 127 << 23);
        let e23 = b.ins().ishl_imm_u(e, 23);
        let scale = b.ins().isub(bias, e23);
        let scale = as_float(b, scale);
        let cs = b.ins().fmul(c, scale);
        let cs = match drop {
            Some(drop) => {
                let ci = as_int(b, cs);
                let ci = b.ins().band_not(ci, drop);
                as_float(b, ci)
            }
            None => cs,
        };
        // ln(1 + f + cs) = ln(1 + f) + cs / (1 + f) to within cs^2, far below an ulp.
        let one = splat(b, 1.0);
        let m = b.ins().fadd(f, one);
        let extra = b.ins().fdiv(cs, m);
        self.log_reduced(b, e, f, Some(extra))
    }

    /// e ln 2 + log1p(f) (+ extra) for an i32x4 e and f in [sqrt(1/2) - 1, sqrt 2 - 1], as
    /// hi + small: hi = e LN2_HI + f exactly (two floats), small = f^2 Q(f) + the low parts.
    /// Only the final add rounds at the result's scale; for e != 0, |f| < |e ln 2|.
    fn log_reduced(self, b: &mut FunctionBuilder, e: Value, f: Value, extra: Option<Value>) -> Value {
        let e = b.ins().fcvt_from_sint(F32X4, e);
        let ln2_hi = splat(b, LN2_HI);
        let a = b.ins().fmul(e, ln2_hi); // exact: 15 + 8 significant bits
        let hi = b.ins().fadd(a, f);
        let z = b.ins().fsub(hi, a);
        let lo = b.ins().fsub(f, z); // Fast2Sum: |a| >= |f| or a = 0
        let small = self.mul_add_k(b, e, LN2_LO, lo);
        let small = match extra {
            Some(extra) => b.ins().fadd(small, extra),
            None => small,
        };
        let q = self.poly(b, f, &LOG_POLY, 1);
        let f2 = b.ins().fmul(f, f);
        let small = self.mul_add(b, f2, q, small);
        b.ins().fadd(hi, small)
    }

    /// See [`sigmoid`].
    pub fn sigmoid(self, b: &mut FunctionBuilder, x: Value) -> Value {
        // z = e^-|x| is in [0, 1]: no overflow. sigmoid(x) = 1/(1+z) for x >= 0 and z/(1+z)
        // below, so a large negative x yields the tail e^x rather than 0, and a NaN passes on.
        let nx = neg_abs(b, x);
        let z = self.exp_nonpositive(b, nx);
        let one = splat(b, 1.0);
        let neg = fcmp_k(b, FloatCC::LessThan, x, 0.0);
        let num = select(b, neg, z, one);
        let den = b.ins().fadd(z, one);
        b.ins().fdiv(num, den)
    }

    /// See [`softplus`].
    pub fn softplus(self, b: &mut FunctionBuilder, x: Value) -> Value {
        // Neither term overflows; for x = NaN, z and so the log are NaN.
        let nx = neg_abs(b, x);
        let z = self.exp_nonpositive(b, nx);
        let l = self.log1p_unit(b, z);
        self.positive_part_plus(b, x, l)
    }

    /// log1p(z) for z in [0, 1] (or NaN), such as e^-|x|: 2 atanh(s) = 2s + s^3 Q(s^2) with
    /// s = z/(2+z) in [0, 1/3]. No reduction: one division and a degree-3 polynomial, where
    /// the general [`Math::log1p`] splits exponent and mantissa and needs degree 8. The
    /// rounding errors of 2 + z and of the quotient are recovered exactly, and the
    /// quotient's error they make is added in (to first order) as a correction to 2s, so
    /// that only the last add rounds at the result's scale.
    ///
    /// That recovery takes an fma; without FMA this is `log1p`'s general path.
    pub fn log1p_unit(self, b: &mut FunctionBuilder, z: Value) -> Value {
        if !self.fused {
            let one = splat(b, 1.0);
            let u = b.ins().fadd(z, one);
            let um1 = b.ins().fsub(u, one);
            let c = b.ins().fsub(z, um1); // z <= 1, so Fast2Sum's order holds
            return self.log1p_split(b, u, c, None);
        }
        let two = splat(b, 2.0);
        let d = b.ins().fadd(z, two);
        let s = b.ins().fdiv(z, d);
        let t = b.ins().fmul(s, s);
        let q = self.poly(b, t, &ATANH_POLY, 1);
        let st = b.ins().fmul(s, t);
        let twice = b.ins().fadd(s, s);
        // The exact quotient is z/(d + c) = s + (res - s c)/(d + c), with c = 2 + z - d
        // (exact: Fast2Sum, 2 >= z) and res = z - s d (exact, one fma). The correction is
        // about an ulp of s, so 2/d to 2% (a line through [2, 3]) will do.
        let dm2 = b.ins().fsub(d, two);
        let c = b.ins().fsub(z, dm2);
        let ns = b.ins().fneg(s); // folds into the fmas (vfnmadd)
        let res = b.ins().fma(ns, d, z);
        let err = b.ins().fma(ns, c, res);
        let k = splat(b, INV_LINE[0]);
        let k0 = splat(b, INV_LINE[1]);
        let twice_inv = b.ins().fma(d, k, k0);
        let correction = b.ins().fmul(err, twice_inv);
        let small = b.ins().fma(st, q, correction);
        b.ins().fadd(twice, small)
    }

    /// e^-|x|, the value sigmoid and softplus of x and of -x are all built from; in [0, 1].
    pub fn exp_neg_abs(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let nx = neg_abs(b, x);
        self.exp_nonpositive(b, nx)
    }

    /// 1/(1 + z) for z = `exp_neg_abs(x)`: the one division sigmoid(x) and sigmoid(-x) share.
    pub fn one_plus_recip(self, b: &mut FunctionBuilder, z: Value) -> Value {
        let one = splat(b, 1.0);
        let u = b.ins().fadd(z, one);
        b.ins().fdiv(one, u)
    }

    /// sigmoid(x) and sigmoid(-x) from z = `exp_neg_abs(x)` and r = 1/(1+z): r on the side
    /// of x's sign and z r on the other. Within 3.5 ulp (one rounding more than
    /// [`Math::sigmoid`]).
    pub fn sigmoid_pair(self, b: &mut FunctionBuilder, x: Value, z: Value, r: Value) -> (Value, Value) {
        let small = b.ins().fmul(z, r);
        let neg = fcmp_k(b, FloatCC::LessThan, x, 0.0);
        let pos = select(b, neg, small, r);
        let negated = select(b, neg, r, small);
        (pos, negated)
    }

    /// sigmoid(x) and sigmoid(-x) as one float, for a value a
    /// sweep leaves for the next: the smaller of the two, which is accurate however far out
    /// in the tail, with x's sign in the sign bit. Carrying sigmoid(x) itself would lose
    /// sigmoid(-x) = 1 - sigmoid(x) for x above about 9 (sigmoid(x) rounds to 1 above 17).
    /// `z` and `r` are as for [`Math::sigmoid_pair`], whose smaller value z r this is.
    pub fn pack_sigmoids(self, b: &mut FunctionBuilder, x: Value, z: Value, r: Value) -> Value {
        let small = b.ins().fmul(z, r);
        or_sign(b, small, x)
    }

    /// (sigmoid(x), sigmoid(-x)) from [`Math::pack_sigmoids`]: the smaller as stored, the
    /// larger (at least 1/2) as 1 minus it, within an ulp. NaN stays NaN.
    pub fn unpack_sigmoids(self, b: &mut FunctionBuilder, packed: Value) -> (Value, Value) {
        let bits = as_int(b, packed);
        // All ones where x was negative (-0 and -inf included): there sigmoid(x) is the smaller.
        let negative = b.ins().sshr_imm_u(bits, 31);
        let magnitude = splat_int(b, !SIGN);
        let small = b.ins().band(bits, magnitude);
        let small = as_float(b, small);
        let one = splat(b, 1.0);
        let large = b.ins().fsub(one, small);
        (select(b, negative, small, large), select(b, negative, large, small))
    }

    /// max(x, 0) + l, softplus's last step.
    pub fn positive_part_plus(self, b: &mut FunctionBuilder, x: Value, l: Value) -> Value {
        let zero = splat(b, 0.0);
        let pos = max(b, x, zero);
        b.ins().fadd(pos, l)
    }

    /// max(-x, 0) + l, softplus(-x)'s last step, as l - min(x, 0): exact (the same rounding
    /// as max(-x, 0) + l), right at x = ±inf, and without a negation (three instructions on
    /// x64).
    pub fn negative_part_plus(self, b: &mut FunctionBuilder, x: Value, l: Value) -> Value {
        let zero = splat(b, 0.0);
        let neg = min(b, x, zero);
        b.ins().fsub(l, neg)
    }

    /// See [`tanh`].
    pub fn tanh(self, b: &mut FunctionBuilder, x: Value) -> Value {
        let ax = abs(b, x);
        // Small |x|: |x| + |x|^3 P(x^2), so the leading term is exact.
        let x2 = b.ins().fmul(ax, ax);
        let p = self.poly(b, x2, &TANH_POLY, 3);
        let x3 = b.ins().fmul(x2, ax);
        let small = self.mul_add(b, x3, p, ax);
        // Larger |x|: 1 - 2z/(1 + z) with z = e^(-2|x|); z reaches 0 at |x| = inf, giving 1.
        let nx = neg_abs(b, x);
        let m2x = b.ins().fadd(nx, nx);
        let z = self.exp_nonpositive(b, m2x);
        let one = splat(b, 1.0);
        let z2 = b.ins().fadd(z, z);
        let den = b.ins().fadd(one, z);
        let q = b.ins().fdiv(z2, den);
        let large = b.ins().fsub(one, q);
        let is_small = fcmp_k(b, FloatCC::LessThan, ax, TANH_SMALL);
        let r = select(b, is_small, small, large); // NaN takes `large`, which is NaN
        or_sign(b, r, x)
    }

    /// See [`pow`]. log|x| and e^(y log|x|) run in f64, two lanes at a time: in f32 the
    /// product's rounding error, up to 2^-24 of |y log x| <= 104, would cost up to 100 ulp.
    /// Special cases follow C99 F.9.4.4:
    /// - pow(x, ±0) = 1 and pow(1, y) = 1 for every x and y, NaN included; pow(-1, ±inf) = 1.
    /// - x < 0 finite and y finite but not an integer: NaN.
    /// - x negative (-0 and -inf included): -pow(|x|, y) if y is an odd integer, else
    ///   pow(|x|, y). So pow(-0, -3) = -inf, pow(-0, -2) = pow(-0, -0.5) = +inf,
    ///   pow(-8, 1/3) = NaN, pow(-2, 3) = -8.
    /// - pow(±0, y > 0) = 0 and pow(±0, y < 0) = inf before the sign rule; inf likewise the
    ///   other way round; y = ±inf gives 0 or inf by whether |x| < 1.
    /// - Any other NaN argument gives NaN.
    pub fn pow(self, b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
        let ax = abs(b, x);
        let (e, f) = split(b, ax, true);
        let e = b.ins().fcvt_from_sint(F32X4, e);
        // log's special values (-inf at 0, inf at inf, NaN) ride in e into the f64 maths.
        let e = log_specials(b, ax, e);
        let lo = self.pow_f64(b, e, f, y);
        let [e, f, y2] = [e, f, y].map(|v| high_to_low(b, v));
        let hi = self.pow_f64(b, e, f, y2);
        let r = concat_low(b, lo, hi);
        pow_specials(b, x, y, r)
    }

    /// e^(y (e ln 2 + log1p f)) in f64 for lanes 0 and 1, returned in lanes 0 and 1 of an f32x4.
    fn pow_f64(self, b: &mut FunctionBuilder, e: Value, f: Value, y: Value) -> Value {
        let [e, f, y] = [e, f, y].map(|v| b.ins().fvpromote_low(v));
        // log1p(f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: Taylor series of atanh to s^13,
        // truncation error below 2^-39 relative.
        let two = splat64(b, 2.0);
        let den = b.ins().fadd(f, two);
        let s = b.ins().fdiv(f, den);
        let s2 = b.ins().fmul(s, s);
        let mut q = splat64(b, 1.0 / 13.0);
        for k in [11.0, 9.0, 7.0, 5.0, 3.0] {
            let c = splat64(b, 1.0 / k);
            q = self.mul_add(b, q, s2, c);
        }
        let s3 = b.ins().fmul(s, s2);
        let atanh = self.mul_add(b, s3, q, s);
        let log1p = b.ins().fmul(atanh, two);
        let ln2 = splat64(b, std::f64::consts::LN_2);
        let ln = self.mul_add(b, e, ln2, log1p);
        let t = b.ins().fmul(y, ln);
        // Every f32 result overflows above 89 and underflows below -104; clamp to keep 2^n finite.
        let hi = splat64(b, 160.0);
        let lo = splat64(b, -160.0);
        let t = min(b, hi, t);
        let t = max(b, lo, t);
        let r = self.exp_f64(b, t);
        b.ins().fvdemote(r)
    }

    /// e^t in f64 for |t| <= 160: n = round(t / ln 2), Taylor series of degree 9 on |r| <= 0.347
    /// (truncation 7e-12 relative), 2^n added to the exponent field.
    fn exp_f64(self, b: &mut FunctionBuilder, t: Value) -> Value {
        let shift = splat64(b, 6_755_399_441_055_744.0); // 1.5 * 2^52
        let log2e = splat64(b, std::f64::consts::LOG2_E);
        let k = self.mul_add(b, t, log2e, shift);
        let n = b.ins().fsub(k, shift);
        let mln2 = splat64(b, -std::f64::consts::LN_2);
        let r = self.mul_add(b, n, mln2, t);
        let mut p = splat64(b, 1.0 / 362_880.0);
        for fact in [40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
            let c = splat64(b, 1.0 / fact);
            p = self.mul_add(b, p, r, c);
        }
        let flags = lanes();
        let ki = b.ins().bitcast(I64X2, flags, k);
        let si = b.ins().bitcast(I64X2, flags, shift);
        let ni = b.ins().isub(ki, si);
        let n52 = b.ins().ishl_imm_u(ni, 52);
        let pi = b.ins().bitcast(I64X2, flags, p);
        let pi = b.ins().iadd(pi, n52);
        b.ins().bitcast(F64X2, flags, pi)
    }

    /// a * x + y: one `fma` when fused, else `fmul` then `fadd`.
    fn mul_add(self, b: &mut FunctionBuilder, a: Value, x: Value, y: Value) -> Value {
        if self.fused {
            b.ins().fma(a, x, y)
        } else {
            let p = b.ins().fmul(a, x);
            b.ins().fadd(p, y)
        }
    }

    /// a * k + y for an f32 constant k.
    fn mul_add_k(self, b: &mut FunctionBuilder, a: Value, k: f32, y: Value) -> Value {
        let k = splat(b, k);
        self.mul_add(b, a, k, y)
    }

    /// A polynomial, coefficients highest degree first: Estrin's scheme for all but the
    /// last `horner` coefficients, then Horner's rule for those. Estrin's pairs and powers
    /// of x are independent, so the dependency chain is about log2 of the degree long
    /// instead of the degree: these kernels are bound by latency, not by throughput. The
    /// lowest terms (where rounding matters most) stay in Horner's exact-ish fma steps.
    fn poly(self, b: &mut FunctionBuilder, x: Value, coeffs: &[f32], horner: usize) -> Value {
        let (head, tail) = coeffs.split_at(coeffs.len() - horner);
        // Lowest degree first: terms[i] is the coefficient of power^i.
        let mut terms: Vec<Value> = head.iter().rev().map(|&c| splat(b, c)).collect();
        let mut power = x;
        while terms.len() > 1 {
            terms = terms
                .chunks(2)
                .map(|pair| match *pair {
                    [low, high] => self.mul_add(b, high, power, low),
                    _ => pair[0],
                })
                .collect();
            if terms.len() > 1 {
                power = b.ins().fmul(power, power);
            }
        }
        let mut p = terms[0];
        for &c in tail {
            let c = splat(b, c);
            p = self.mul_add(b, p, x, c);
        }
        p
    }
}

/// Splits x > 0 into (e, f) with x = 2^e (1 + f), e an i32x4 and 1 + f in [sqrt(1/2), sqrt 2):
/// centring the interval on 1 halves the polynomial's range. `denormals` scales x < 2^-126 by
/// 2^23 first so its exponent field means something. Other x give finite garbage.
fn split(b: &mut FunctionBuilder, x: Value, denormals: bool) -> (Value, Value) {
    let (x, tiny) = if denormals {
        let tiny = fcmp_k(b, FloatCC::LessThan, x, f32::MIN_POSITIVE);
        let k = splat(b, 8_388_608.0); // 2^23
        let scaled = b.ins().fmul(x, k);
        (select(b, tiny, scaled, x), Some(tiny))
    } else {
        (x, None)
    };
    // Measuring the exponent from sqrt(1/2) instead of 1 moves mantissas above sqrt 2 into the
    // next binade; the arithmetic shift keeps e signed.
    let sqrt_half = splat_int(b, SQRT_HALF_BITS);
    let xi = as_int(b, x);
    let i = b.ins().isub(xi, sqrt_half);
    let e = b.ins().sshr_imm_u(i, 23);
    let mant = splat_int(b, 0x007f_ffff);
    let m = b.ins().band(i, mant);
    let m = b.ins().iadd(m, sqrt_half);
    let m = as_float(b, m);
    let one = splat(b, 1.0);
    let f = b.ins().fsub(m, one); // exact: m is within a factor 2 of 1
    let e = match tiny {
        Some(tiny) => {
            let k23 = splat_int(b, 23);
            let adj = b.ins().band(tiny, k23);
            b.ins().isub(e, adj)
        }
        None => e,
    };
    (e, f)
}

/// Replaces `r` where log's argument `x` is special: +inf -> +inf, ±0 -> -inf, x < 0 or NaN -> NaN.
fn log_specials(b: &mut FunctionBuilder, x: Value, r: Value) -> Value {
    let inf = splat(b, f32::INFINITY);
    let ninf = splat(b, f32::NEG_INFINITY);
    let nan = splat(b, f32::NAN);
    let is_inf = b.ins().fcmp(FloatCC::Equal, x, inf);
    let r = select(b, is_inf, inf, r);
    let is_zero = fcmp_k(b, FloatCC::Equal, x, 0.0);
    let r = select(b, is_zero, ninf, r);
    let bad = fcmp_k(b, FloatCC::UnorderedOrLessThan, x, 0.0);
    select(b, bad, nan, r)
}

/// The sign and special-case fix-ups of `pow` on r = pow(|x|, y) (see [`Math::pow`]).
fn pow_specials(b: &mut FunctionBuilder, x: Value, y: Value, r: Value) -> Value {
    // y is an integer if rounding leaves it alone (±inf counts as even), odd if y/2 is not.
    let ry = b.ins().nearest(y);
    let y_int = b.ins().fcmp(FloatCC::Equal, ry, y);
    let half = splat(b, 0.5);
    let h = b.ins().fmul(y, half);
    let rh = b.ins().nearest(h);
    let h_frac = b.ins().fcmp(FloatCC::NotEqual, rh, h);
    let odd = b.ins().band(y_int, h_frac);
    let sign = sign_bit(b, x);
    let sign = b.ins().band(sign, odd);
    let ri = as_int(b, r);
    let r = b.ins().bor(ri, sign);
    let r = as_float(b, r);
    // Finite x < 0 with non-integer y: NaN.
    let neg = fcmp_k(b, FloatCC::LessThan, x, 0.0);
    let finite = fcmp_k(b, FloatCC::GreaterThan, x, f32::NEG_INFINITY);
    let neg = b.ins().band(neg, finite);
    let bad = b.ins().band_not(neg, y_int);
    let nan = splat(b, f32::NAN);
    let r = select(b, bad, nan, r);
    // 1 where y = ±0, x = 1, or |x| = 1 with |y| = inf (0 * inf = NaN in the f64 maths).
    let y0 = fcmp_k(b, FloatCC::Equal, y, 0.0);
    let x1 = fcmp_k(b, FloatCC::Equal, x, 1.0);
    let ax = abs(b, x);
    let ax1 = fcmp_k(b, FloatCC::Equal, ax, 1.0);
    let ay = abs(b, y);
    let ay_inf = fcmp_k(b, FloatCC::Equal, ay, f32::INFINITY);
    let one = b.ins().bor(y0, x1);
    let unit = b.ins().band(ax1, ay_inf);
    let one = b.ins().bor(one, unit);
    let k1 = splat(b, 1.0);
    select(b, one, k1, r)
}

/// Little-endian lane order for bitcasts, which the verifier wants when the lane count changes.
pub(crate) fn lanes() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

pub(crate) fn splat(b: &mut FunctionBuilder, c: f32) -> Value {
    let s = b.ins().f32const(c);
    b.ins().splat(F32X4, s)
}

fn splat64(b: &mut FunctionBuilder, c: f64) -> Value {
    let s = b.ins().f64const(c);
    b.ins().splat(F64X2, s)
}

/// A vector integer constant; `iconst` of a vector type would not verify.
pub(crate) fn splat_int(b: &mut FunctionBuilder, c: u32) -> Value {
    let s = b.ins().iconst(I32, i64::from(c));
    b.ins().splat(I32X4, s)
}

pub(crate) fn as_int(b: &mut FunctionBuilder, v: Value) -> Value {
    b.ins().bitcast(I32X4, lanes(), v)
}

pub(crate) fn as_float(b: &mut FunctionBuilder, v: Value) -> Value {
    b.ins().bitcast(F32X4, lanes(), v)
}

/// 2^n for an i32x4 n in [-126, 127], built in the exponent field.
fn pow2(b: &mut FunctionBuilder, n: Value) -> Value {
    let bias = splat_int(b, 127);
    let e = b.ins().iadd(n, bias);
    let e = b.ins().ishl_imm_u(e, 23);
    as_float(b, e)
}

/// fcmp against a splatted constant; the result is an all-ones/all-zeros i32x4 mask.
fn fcmp_k(b: &mut FunctionBuilder, cc: FloatCC, x: Value, k: f32) -> Value {
    let k = splat(b, k);
    b.ins().fcmp(cc, x, k)
}

/// mask ? a : c lane-wise, for a mask from `fcmp` (an integer vector) and operands of any type.
pub(crate) fn select(b: &mut FunctionBuilder, mask: Value, a: Value, c: Value) -> Value {
    let ty = b.func.dfg.value_type(a);
    let mask = if b.func.dfg.value_type(mask) == ty { mask } else { b.ins().bitcast(ty, lanes(), mask) };
    b.ins().bitselect(mask, a, c)
}

/// a < c ? a : c, one `minps`. A NaN in either operand yields c: put the variable second.
pub(crate) fn min(b: &mut FunctionBuilder, a: Value, c: Value) -> Value {
    let lt = b.ins().fcmp(FloatCC::LessThan, a, c);
    select(b, lt, a, c)
}

/// c < a ? a : c, one `maxps`. A NaN in either operand yields c: put the variable second.
pub(crate) fn max(b: &mut FunctionBuilder, a: Value, c: Value) -> Value {
    let gt = b.ins().fcmp(FloatCC::LessThan, c, a);
    select(b, gt, a, c)
}

/// |x| by clearing the sign bit (`fabs` on f32x4 is three instructions, this is one).
pub(crate) fn abs(b: &mut FunctionBuilder, x: Value) -> Value {
    let m = splat_int(b, !SIGN);
    let xi = as_int(b, x);
    let v = b.ins().band(xi, m);
    as_float(b, v)
}

/// -x by flipping the sign bit (NaN stays NaN).
pub(crate) fn flip_sign(b: &mut FunctionBuilder, x: Value) -> Value {
    let m = splat_int(b, SIGN);
    let xi = as_int(b, x);
    let v = b.ins().bxor(xi, m);
    as_float(b, v)
}

/// -|x| by setting the sign bit.
fn neg_abs(b: &mut FunctionBuilder, x: Value) -> Value {
    let m = splat_int(b, SIGN);
    let xi = as_int(b, x);
    let v = b.ins().bor(xi, m);
    as_float(b, v)
}

/// x's sign bit as an i32x4.
fn sign_bit(b: &mut FunctionBuilder, x: Value) -> Value {
    let m = splat_int(b, SIGN);
    let xi = as_int(b, x);
    b.ins().band(xi, m)
}

/// r with x's sign bit or-ed in.
fn or_sign(b: &mut FunctionBuilder, r: Value, x: Value) -> Value {
    let sign = sign_bit(b, x);
    let ri = as_int(b, r);
    let v = b.ins().bor(ri, sign);
    as_float(b, v)
}

/// Lanes 2 and 3 of an f32x4 moved to lanes 0 and 1 (for `fvpromote_low`).
pub(crate) fn high_to_low(b: &mut FunctionBuilder, v: Value) -> Value {
    let bytes: Vec<u8> = (8..16).chain(8..16).collect();
    let mask = b.func.dfg.immediates.push(ConstantData::from(bytes));
    let v = b.ins().bitcast(I8X16, lanes(), v);
    let v = b.ins().shuffle(v, v, mask);
    as_float(b, v)
}

/// Lanes 0 and 1 of `lo` followed by lanes 0 and 1 of `hi`.
fn concat_low(b: &mut FunctionBuilder, lo: Value, hi: Value) -> Value {
    let bytes: Vec<u8> = (0..8).chain(16..24).collect();
    let mask = b.func.dfg.immediates.push(ConstantData::from(bytes));
    let lo = b.ins().bitcast(I8X16, lanes(), lo);
    let hi = b.ins().bitcast(I8X16, lanes(), hi);
    let v = b.ins().shuffle(lo, hi, mask);
    as_float(b, v)
}

#[cfg(test)]
mod tests {
    //! Each function is JIT-compiled into a loop over f32x4 lanes and compared with Rust's f64
    //! functions over a sweep of the whole f32 range (every 97th bit pattern) and the special
    //! values. Errors are in ulp of the f32 result: 0.5 is correct rounding.

    use std::time::{Duration, Instant};

    use cranelift_codegen::ir::condcodes::IntCC;
    use cranelift_codegen::ir::types::I64;
    use cranelift_codegen::ir::{AbiParam, BlockArg};
    use cranelift_codegen::verify_function;
    use cranelift_frontend::FunctionBuilderContext;
    use cranelift_jit::{JITBuilder, JITModule};
    use cranelift_module::{default_libcall_names, Linkage, Module};

    use super::*;

    type KernelFn = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64);

    /// `dst[i] = op(x[i], y[i])`, JIT-compiled; owns the module that holds the code.
    struct Kernel {
        _module: JITModule,
        f: KernelFn,
    }

    impl Kernel {
        fn new(op: impl Fn(&mut FunctionBuilder, Value, Value) -> Value) -> Kernel {
            let builder = JITBuilder::with_flags(&[("opt_level", "speed")], default_libcall_names()).unwrap();
            let mut module = JITModule::new(builder);
            let mut ctx = module.make_context();
            for _ in 0..4 {
                ctx.func.signature.params.push(AbiParam::new(I64));
            }
            let mut fctx = FunctionBuilderContext::new();
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            emit_loop(&mut b, &op);
            b.seal_all_blocks();
            b.finalize(module.isa().frontend_config());
            if let Err(errors) = verify_function(&ctx.func, module.isa()) {
                panic!("verifier: {errors}\n{}", ctx.func.display());
            }
            let id = module.declare_function("kernel", Linkage::Local, &ctx.func.signature).unwrap();
            module.define_function(id, &mut ctx).unwrap();
            let relocs = ctx.compiled_code().expect("compiled").buffer.relocs().len();
            assert_eq!(relocs, 0, "the maths must be inline: no calls, no relocations");
            module.finalize_definitions().unwrap();
            let code = module.get_finalized_function(id);
            // SAFETY: `code` is the finalized body of a function with exactly this signature,
            // and it lives as long as `_module`, which the Kernel owns.
            let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
            Kernel { _module: module, f }
        }

        fn run(&self, x: &[f32], y: &[f32], out: &mut [f32]) {
            assert!(x.len() == y.len() && x.len() == out.len() && x.len().is_multiple_of(4));
            // SAFETY: the kernel reads x[..n] and y[..n] and writes out[..n], all in bounds.
            unsafe { (self.f)(x.as_ptr(), y.as_ptr(), out.as_mut_ptr(), x.len() as i64) }
        }
    }

    /// for (i = 0; i < n; i += 4) dst[i..i+4] = op(x[i..i+4], y[i..i+4])
    fn emit_loop(b: &mut FunctionBuilder, op: &impl Fn(&mut FunctionBuilder, Value, Value) -> Value) {
        let entry = b.create_block();
        let header = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        b.append_block_params_for_function_params(entry);
        let i = b.append_block_param(header, I64);
        b.switch_to_block(entry);
        let [xs, ys, dst, n] = [0, 1, 2, 3].map(|k| b.block_params(entry)[k]);
        let zero = b.ins().iconst(I64, 0);
        b.ins().jump(header, &[BlockArg::Value(zero)]);
        b.switch_to_block(header);
        let more = b.ins().icmp(IntCC::SignedLessThan, i, n);
        b.ins().brif(more, body, &[], exit, &[]);
        b.switch_to_block(body);
        let off = b.ins().ishl_imm_u(i, 2);
        let mem = MemFlagsData::new().with_notrap(); // f32 slices are only 4-byte aligned
        let [xa, ya, da] = [xs, ys, dst].map(|p| b.ins().iadd(p, off));
        let x = b.ins().load(F32X4, mem, xa, 0);
        let y = b.ins().load(F32X4, mem, ya, 0);
        let r = op(b, x, y);
        b.ins().store(mem, r, da, 0);
        let next = b.ins().iadd_imm_s(i, 4);
        b.ins().jump(header, &[BlockArg::Value(next)]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }

    /// |got - want| in ulp of the f32 result (2^-149 below the normal range), with ±inf counted
    /// as ±2^128, one ulp past the largest float. 0 when both are NaN, infinite when one is.
    fn ulp_error(got: f32, want: f64) -> f64 {
        if got.is_nan() || want.is_nan() {
            return if got.is_nan() && want.is_nan() { 0.0 } else { f64::INFINITY };
        }
        let top = 2f64.powi(128);
        let got = f64::from(got).clamp(-top, top);
        let want = want.clamp(-top, top);
        let mag = want.abs().max(f64::from(f32::MIN_POSITIVE));
        let exponent = ((mag.to_bits() >> 52) as i32) - 1023;
        (got - want).abs() / 2f64.powi(exponent - 23)
    }

    /// Worst error seen, where, and the kernel's time.
    #[derive(Default)]
    struct Stats {
        max: f64,
        at: (f32, f32),
        count: u64,
        time: Duration,
        out: Vec<f32>, // reused, so the timing leaves out first-touch page faults
    }

    impl Stats {
        fn check(&mut self, kernel: &Kernel, x: &[f32], y: &[f32], reference: &impl Fn(f64, f64) -> f64) {
            let mut out = std::mem::take(&mut self.out);
            out.resize(x.len(), 0.0);
            let start = Instant::now();
            kernel.run(x, y, &mut out);
            self.time += start.elapsed();
            self.count += x.len() as u64;
            for ((&a, &c), &got) in x.iter().zip(y).zip(&out) {
                let err = ulp_error(got, reference(f64::from(a), f64::from(c)));
                if err > self.max {
                    self.max = err;
                    self.at = (a, c);
                }
            }
            self.out = out;
        }

        /// Prints the result; true if within `bound`.
        fn report(&self, name: &str, bound: f64) -> bool {
            let ns = self.time.as_secs_f64() * 1e9 / self.count as f64;
            println!(
                "{name}: max error {:.3} ulp (bound {bound}) at x = {:e}, y = {:e} ({} values, {ns:.2} ns/value)",
                self.max, self.at.0, self.at.1, self.count
            );
            self.max <= bound
        }
    }

    /// Every `stride`-th f32 bit pattern, in chunks of 2^20 (zero-padded to whole lanes).
    fn sweep(stride: u64, mut each: impl FnMut(&[f32])) {
        const CHUNK: usize = 1 << 20;
        let mut xs = Vec::with_capacity(CHUNK);
        let mut bits = 0u64;
        while bits < 1 << 32 {
            xs.push(f32::from_bits(bits as u32));
            bits += stride;
            if xs.len() == CHUNK || bits >= 1 << 32 {
                while xs.len() % 4 != 0 {
                    xs.push(0.0);
                }
                each(&xs);
                xs.clear();
            }
        }
    }

    /// Values around every threshold the functions have, both signs.
    fn specials() -> Vec<f32> {
        let mut v = vec![
            0.0,
            f32::INFINITY,
            f32::NAN,
            f32::from_bits(1),           // smallest denormal
            f32::from_bits(0x007f_ffff), // largest denormal
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::EPSILON,
            1.0,
            0.5,
            2.0,
            std::f32::consts::SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
            88.72283,    // largest x with exp(x) finite
            88.722_84,   // smallest with exp(x) = inf
            -87.33654,   // exp(x) at the smallest normal
            -103.27893,  // exp(x) = 2 * smallest denormal
            -103.972_08, // exp(x) rounds to the smallest denormal
            -103.972_09, // ... or to 0
            -104.0,
            16.635532, // sigmoid reaches 1
            9.010913,  // tanh reaches 1
            TANH_SMALL,
            16_777_216.0, // 2^24, log1p's cut-off
            1e-30,
            1e30,
        ];
        for x in v.clone() {
            v.push(-x);
            v.push(f32::from_bits(x.to_bits().wrapping_add(1)));
            v.push(f32::from_bits(x.to_bits().wrapping_sub(1)));
        }
        v.retain(|x| !x.is_nan() || x.to_bits() == f32::NAN.to_bits());
        v.push(f32::NAN);
        while v.len() % 4 != 0 {
            v.push(1.0);
        }
        v
    }

    fn ref_sigmoid(x: f64) -> f64 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let z = x.exp();
            z / (1.0 + z)
        }
    }

    fn ref_softplus(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }

    type Unary = fn(Math, &mut FunctionBuilder, Value) -> Value;

    /// A unary function under test: emitter, f64 reference, and the bounds stated in the module
    /// documentation, in ulp, with and without FMA.
    #[derive(Clone, Copy)]
    struct Case {
        name: &'static str,
        op: Unary,
        reference: fn(f64) -> f64,
        bounds: [f64; 2],
    }

    impl Case {
        fn bound(&self, math: Math) -> f64 {
            self.bounds[usize::from(!math.fused)]
        }
    }

    const UNARY: [Case; 6] = [
        Case { name: "exp", op: Math::exp, reference: f64::exp, bounds: [1.0, 1.25] },
        Case { name: "log", op: Math::log, reference: f64::ln, bounds: [1.0, 1.0] },
        Case { name: "log1p", op: Math::log1p, reference: f64::ln_1p, bounds: [1.0, 1.25] },
        Case { name: "sigmoid", op: Math::sigmoid, reference: ref_sigmoid, bounds: [2.5, 2.5] },
        Case { name: "softplus", op: Math::softplus, reference: ref_softplus, bounds: [2.0, 2.0] },
        Case { name: "tanh", op: Math::tanh, reference: f64::tanh, bounds: [1.25, 1.5] },
    ];

    fn case(name: &str) -> Case {
        *UNARY.iter().find(|c| c.name == name).expect("a unary function")
    }

    fn unary_kernel(math: Math, op: Unary) -> Kernel {
        Kernel::new(move |b, x, _| op(math, b, x))
    }

    /// Every `stride`-th bit pattern; LOSSC_MATH_STRIDE overrides it (1 is exhaustive: about
    /// three minutes per function).
    fn sweep_unary(case: Case, math: Math, stride: u64) -> bool {
        let stride = std::env::var("LOSSC_MATH_STRIDE").map_or(stride, |s| s.parse().expect("a stride"));
        let kernel = unary_kernel(math, case.op);
        let mut stats = Stats::default();
        sweep(stride, |xs| stats.check(&kernel, xs, xs, &|x, _| (case.reference)(x)));
        stats.report(&format!("{} (fma: {}, stride {stride})", case.name, math.fused), case.bound(math))
    }

    #[test]
    fn exp_whole_range() {
        assert!(sweep_unary(case("exp"), Math::host(), 97), "beyond the stated bound");
    }

    #[test]
    fn log_whole_range() {
        assert!(sweep_unary(case("log"), Math::host(), 97), "beyond the stated bound");
    }

    /// `log_normal` on every `stride`-th positive normal float, and on NaN.
    #[test]
    fn log_normal_on_normal_numbers() {
        for math in [Math::host(), Math::with_fma(false)] {
            let kernel = unary_kernel(math, Math::log_normal);
            let xs: Vec<f32> = (f32::MIN_POSITIVE.to_bits()..f32::MAX.to_bits())
                .step_by(101)
                .map(f32::from_bits)
                .chain([1.0, f32::MAX, f32::MIN_POSITIVE, f32::NAN])
                .collect();
            let xs = &xs[..xs.len() / 4 * 4];
            let mut out = vec![0.0; xs.len()];
            kernel.run(xs, xs, &mut out);
            for (&x, &got) in xs.iter().zip(&out) {
                let err = ulp_error(got, f64::from(x).ln());
                assert!(err <= case("log").bound(math), "log_normal({x:e}) = {got:e}: {err} ulp");
            }
        }
    }

    /// `exp_nonpositive` on every 89th float from -0 to -inf (denormal results included)
    /// and on the special values: within exp's bound, fused or not, and bit for bit what
    /// `exp` gives.
    #[test]
    fn exp_nonpositive_below_zero() {
        for math in [Math::host(), Math::with_fma(false)] {
            let specials = [0.0, -0.0, -87.0, -103.9, -104.0, -105.0, f32::NEG_INFINITY, f32::NAN];
            let mut xs: Vec<f32> = specials
                .into_iter()
                .chain(((-0.0f32).to_bits()..=f32::NEG_INFINITY.to_bits()).step_by(89).map(f32::from_bits))
                .collect();
            xs.resize(xs.len().div_ceil(4) * 4, -1.0);
            let (mut out, mut two_step) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
            unary_kernel(math, Math::exp_nonpositive).run(&xs, &xs, &mut out);
            unary_kernel(math, Math::exp).run(&xs, &xs, &mut two_step);
            for ((&x, &got), &want) in xs.iter().zip(&out).zip(&two_step) {
                let err = ulp_error(got, f64::from(x).exp());
                assert!(err <= case("exp").bound(math), "exp_nonpositive({x:e}) = {got:e}: {err} ulp");
                assert_eq!(got.to_bits(), want.to_bits(), "exp_nonpositive({x:e}) = {got:e}, exp: {want:e}");
            }
        }
    }

    #[test]
    fn log1p_whole_range() {
        assert!(sweep_unary(case("log1p"), Math::host(), 97), "beyond the stated bound");
    }

    #[test]
    fn sigmoid_whole_range() {
        assert!(sweep_unary(case("sigmoid"), Math::host(), 97), "beyond the stated bound");
    }

    #[test]
    fn softplus_whole_range() {
        assert!(sweep_unary(case("softplus"), Math::host(), 97), "beyond the stated bound");
    }

    #[test]
    fn tanh_whole_range() {
        assert!(sweep_unary(case("tanh"), Math::host(), 97), "beyond the stated bound");
    }

    /// Without FMA (fmul + fadd): a coarser sweep keeps the test short.
    #[test]
    fn unfused_whole_range() {
        let within = UNARY.map(|case| sweep_unary(case, Math::with_fma(false), 997));
        assert!(within.iter().all(|&w| w), "beyond the stated bound");
    }

    /// The special values: within the bound, and ±0, ±inf and NaN exactly, sign included.
    #[test]
    fn unary_specials() {
        let xs = specials();
        for fused in [true, false] {
            for Case { name, op, reference, .. } in UNARY {
                let math = Math::with_fma(fused);
                let bound = case(name).bound(math);
                let kernel = unary_kernel(math, op);
                let mut out = vec![0.0; xs.len()];
                kernel.run(&xs, &xs, &mut out);
                for (&x, &got) in xs.iter().zip(&out) {
                    let want = reference(f64::from(x));
                    let err = ulp_error(got, want);
                    assert!(err <= bound, "{name}({x:e}) = {got:e}, want {want:e}: {err} ulp");
                    let w = want as f32;
                    if w == 0.0 || w.is_infinite() {
                        assert_eq!(got.to_bits(), w.to_bits(), "{name}({x:e}) = {got:e}, want {w:e}");
                    }
                }
            }
        }
    }

    const POW_BOUND: f64 = 0.51;

    fn pow_kernel(math: Math) -> Kernel {
        Kernel::new(move |b, x, y| math.pow(b, x, y))
    }

    /// Every `stride`-th x against a set of exponents, then random pairs whose result is finite
    /// and nonzero, where |y ln x| reaches 104 and f32 arithmetic alone would lose 100 ulp.
    fn sweep_pow(math: Math, stride: u64, pairs: usize) {
        let kernel = pow_kernel(math);
        let reference = |x: f64, y: f64| x.powf(y);
        let mut stats = Stats::default();
        let exponents = [
            0.5,
            2.0,
            3.0,
            -1.0,
            -2.0,
            -0.5,
            1.0 / 3.0,
            2.5,
            7.0,
            -7.0,
            0.1,
            1e-3,
            10.5,
            100.0,
            -100.0,
            1234.567,
            -3.75,
            1e6,
            16_777_218.0,
            65.0,
        ];
        sweep(stride, |xs| {
            for y in exponents {
                let ys = vec![y; xs.len()];
                stats.check(&kernel, xs, &ys, &reference);
            }
        });
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..pairs {
            let x = (((2.0 * next() - 1.0) * 120.0).exp2()) as f32;
            let t = -103.0 + 191.0 * next(); // ln of the result
            let y = (t / f64::from(x).ln()) as f32;
            xs.push(x);
            ys.push(if y.is_finite() { y } else { 1.0 });
        }
        stats.check(&kernel, &xs, &ys, &reference);
        let name = format!("pow (fma: {}, stride {stride})", math.fused);
        assert!(stats.report(&name, POW_BOUND), "beyond the stated bound");
    }

    #[test]
    fn pow_accuracy() {
        sweep_pow(Math::host(), 9973, 1 << 20);
    }

    #[test]
    fn pow_unfused_accuracy() {
        sweep_pow(Math::with_fma(false), 99_991, 1 << 18);
    }

    /// Every pair of special values, IEEE powf's special cases included, with and without FMA.
    #[test]
    fn pow_specials_match_ieee() {
        let mut values = specials();
        values.extend([-1.0, -2.0, 3.0, -3.0, 0.25, -0.25, 1.5, -1.5, 16_777_217.0, -16_777_217.0]);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for &x in &values {
            for &y in &values {
                xs.push(x);
                ys.push(y);
            }
        }
        while xs.len() % 4 != 0 {
            xs.push(1.0);
            ys.push(1.0);
        }
        for fused in [true, false] {
            let kernel = pow_kernel(Math::with_fma(fused));
            let mut out = vec![0.0; xs.len()];
            kernel.run(&xs, &ys, &mut out);
            for ((&x, &y), &got) in xs.iter().zip(&ys).zip(&out) {
                let want = f64::from(x).powf(f64::from(y));
                let err = ulp_error(got, want);
                assert!(err <= POW_BOUND, "pow({x:e}, {y:e}) = {got:e}, want {want:e}: {err} ulp");
                let w = want as f32;
                if w == 0.0 || w.is_infinite() {
                    assert_eq!(got.to_bits(), w.to_bits(), "pow({x:e}, {y:e}) = {got:e}, want {w:e}");
                }
            }
        }
    }

    #[test]
    fn host_matches_isa() {
        let builder = JITBuilder::with_flags(&[], default_libcall_names()).unwrap();
        let module = JITModule::new(builder);
        assert_eq!(Math::host(), Math::for_isa(module.isa()));
    }

    /// ns per value on a cache-resident buffer, one thread (best of 5):
    /// `cargo test --lib math::tests::throughput -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore]
    fn throughput() {
        let xs: Vec<f32> = (0..1 << 14).map(|i| (i as f32 - 8192.0) / 512.0).collect(); // [-16, 16)
        let ys: Vec<f32> = xs.iter().map(|x| x * 0.25).collect();
        let mut out = vec![0.0; xs.len()];
        let mut kernels: Vec<(&str, Kernel)> =
            UNARY.iter().map(|c| (c.name, unary_kernel(Math::host(), c.op))).collect();
        kernels.push(("pow", pow_kernel(Math::host())));
        kernels.push(("copy", Kernel::new(|_, x, _| x)));
        for (name, kernel) in &kernels {
            let reps = 500;
            let best = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..reps {
                        kernel.run(&xs, &ys, &mut out);
                    }
                    start.elapsed()
                })
                .min()
                .unwrap();
            println!("{name}: {:.2} ns/value", best.as_secs_f64() * 1e9 / (reps * xs.len()) as f64);
        }
    }
}
