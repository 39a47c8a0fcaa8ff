//! Transcendental functions on f32 registers, built on the GPU's `ex2.approx` and
//! `lg2.approx` (one special-function-unit instruction each) with the corrections that
//! make them accurate:
//! - `exp`: the rounding error of `x log2(e)` is carried into a first-order correction,
//!   so the result is within a few ulp (`ex2.approx` itself is within 2 ulp);
//! - `log` and `log1p`: near 1 (|x - 1| < 1/4) a series of atanh, within 2 ulp; elsewhere
//!   `lg2.approx`, whose absolute error of 2^-22 is at most 1e-6 relative to |log x| > 0.22;
//! - sigmoid, softplus and tanh from those, without overflow for large |x|; pow as
//!   exp(y log|x|) with the sign and special cases of `powf`.
//!
//! NaN propagates through all of them, as in the reference evaluator.

use super::asm::{f32_imm, f64_imm, Asm, Kind};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// log2(e) - LOG2E, the part of log2(e) that LOG2E drops.
const LOG2E_LO: f32 = 1.925_963e-8;
const LN2: f32 = std::f32::consts::LN_2;

impl Asm {
    fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.def(Kind::F32, op, &format!("{a}, {b}"))
    }

    fn fma(&mut self, a: &str, b: &str, c: &str) -> String {
        self.def(Kind::F32, "fma.rn.f32", &format!("{a}, {b}, {c}"))
    }

    fn pick(&mut self, p: &str, yes: &str, no: &str) -> String {
        self.def(Kind::F32, "selp.f32", &format!("{yes}, {no}, {p}"))
    }

    /// A predicate: `setp.{cc}.f32 p, a, b`.
    pub fn test(&mut self, cc: &str, a: &str, b: &str) -> String {
        self.def(Kind::Pred, &format!("setp.{cc}.f32"), &format!("{a}, {b}"))
    }

    /// e^x.
    pub fn exp(&mut self, x: &str) -> String {
        let l = f32_imm(LOG2E);
        let t = self.bin("mul.rn.f32", x, &l);
        let neg_t = self.def(Kind::F32, "neg.f32", &t);
        // e = x log2(e) - t, from the exact product and the low part of log2(e).
        let e = self.fma(x, &l, &neg_t);
        let e = self.fma(x, &f32_imm(LOG2E_LO), &e);
        let r = self.def(Kind::F32, "ex2.approx.f32", &t);
        let m = self.bin("mul.rn.f32", &e, &f32_imm(LN2));
        let y = self.fma(&r, &m, &r);
        // Past the range the correction is 0 * inf; the plain power is right there.
        let at = self.def(Kind::F32, "abs.f32", &t);
        let big = self.test("gtu", &at, &f32_imm(126.0));
        self.pick(&big, &r, &y)
    }

    /// log1p(d) = 2 atanh(d / (2 + d)) for |d| < 1/4 (|s| < 1/7: the series to s^9 is
    /// exact to 3e-10 relative).
    fn log1p_series(&mut self, d: &str) -> String {
        let den = self.bin("add.rn.f32", d, &f32_imm(2.0));
        let s = self.bin("div.rn.f32", d, &den);
        let s2 = self.bin("mul.rn.f32", &s, &s);
        let mut q = self.f32(1.0 / 9.0);
        for k in [7.0f32, 5.0, 3.0, 1.0] {
            q = self.fma(&q, &s2, &f32_imm(1.0 / k));
        }
        let two_s = self.bin("add.rn.f32", &s, &s);
        self.bin("mul.rn.f32", &two_s, &q)
    }

    /// ln x.
    pub fn log(&mut self, x: &str) -> String {
        let d = self.bin("sub.rn.f32", x, &f32_imm(1.0));
        let ad = self.def(Kind::F32, "abs.f32", &d);
        let near = self.test("lt", &ad, &f32_imm(0.25));
        let series = self.log1p_series(&d);
        let l2 = self.def(Kind::F32, "lg2.approx.f32", x);
        let far = self.bin("mul.rn.f32", &l2, &f32_imm(LN2));
        self.pick(&near, &series, &far)
    }

    /// ln(1 + x).
    pub fn log1p(&mut self, x: &str) -> String {
        let ax = self.def(Kind::F32, "abs.f32", x);
        let near = self.test("lt", &ax, &f32_imm(0.25));
        let series = self.log1p_series(x);
        let u = self.bin("add.rn.f32", x, &f32_imm(1.0));
        let l2 = self.def(Kind::F32, "lg2.approx.f32", &u);
        let far = self.bin("mul.rn.f32", &l2, &f32_imm(LN2));
        self.pick(&near, &series, &far)
    }

    /// e^-|x|.
    fn exp_neg_abs(&mut self, x: &str) -> String {
        let a = self.def(Kind::F32, "abs.f32", x);
        let n = self.def(Kind::F32, "neg.f32", &a);
        self.exp(&n)
    }

    /// 1 / (1 + e^-x): e^-|x| never overflows.
    pub fn sigmoid(&mut self, x: &str) -> String {
        let z = self.exp_neg_abs(x);
        let u = self.bin("add.rn.f32", &z, &f32_imm(1.0));
        let r = self.def(Kind::F32, "rcp.rn.f32", &u);
        let n = self.bin("mul.rn.f32", &z, &r);
        let p = self.test("ge", x, &f32_imm(0.0));
        self.pick(&p, &r, &n)
    }

    /// log(1 + e^x) = max(x, 0) + log1p(e^-|x|).
    pub fn softplus(&mut self, x: &str) -> String {
        let z = self.exp_neg_abs(x);
        let l = self.log1p(&z);
        let m = self.bin("max.f32", x, &f32_imm(0.0));
        self.bin("add.rn.f32", &m, &l)
    }

    /// tanh x: (1 - e^-2|x|) / (1 + e^-2|x|) with the sign of x; an odd series below 1/8,
    /// where that difference cancels.
    pub fn tanh(&mut self, x: &str) -> String {
        let a = self.def(Kind::F32, "abs.f32", x);
        let m2 = self.bin("mul.rn.f32", &a, &f32_imm(-2.0));
        let e = self.exp(&m2);
        let num = self.bin("sub.rn.f32", &f32_imm(1.0), &e);
        let den = self.bin("add.rn.f32", &f32_imm(1.0), &e);
        let t = self.bin("div.rn.f32", &num, &den);
        let nt = self.def(Kind::F32, "neg.f32", &t);
        let neg = self.test("lt", x, &f32_imm(0.0));
        let far = self.pick(&neg, &nt, &t);
        let x2 = self.bin("mul.rn.f32", x, x);
        let mut q = self.f32(-17.0 / 315.0);
        for c in [2.0f32 / 15.0, -1.0 / 3.0, 1.0] {
            q = self.fma(&q, &x2, &f32_imm(c));
        }
        let series = self.bin("mul.rn.f32", x, &q);
        let small = self.test("lt", &a, &f32_imm(0.125));
        self.pick(&small, &series, &far)
    }

    /// x^y as `powf`: exp(y ln|x|), negative for a negative x and an odd integer y, NaN
    /// for a negative x and a non-integer y, 1 where y = 0 or x = 1.
    pub fn pow(&mut self, x: &str, y: &str) -> String {
        let ax = self.def(Kind::F32, "abs.f32", x);
        let l = self.log(&ax);
        let yl = self.bin("mul.rn.f32", y, &l);
        let r = self.exp(&yl);
        let yi = self.def(Kind::F32, "cvt.rzi.f32.f32", y);
        let int = self.test("eq", &yi, y);
        let half = self.bin("mul.rn.f32", y, &f32_imm(0.5));
        let hi = self.def(Kind::F32, "cvt.rzi.f32.f32", &half);
        let odd = self.test("neu", &hi, &half);
        let nr = self.def(Kind::F32, "neg.f32", &r);
        let signed = self.pick(&odd, &nr, &r);
        let nan = self.f32(f32::NAN);
        let negative = self.pick(&int, &signed, &nan);
        let neg = self.test("lt", x, &f32_imm(0.0));
        let r = self.pick(&neg, &negative, &r);
        let y0 = self.test("eq", y, &f32_imm(0.0));
        let x1 = self.test("eq", x, &f32_imm(1.0));
        let one = self.def(Kind::Pred, "or.pred", &format!("{y0}, {x1}"));
        self.pick(&one, &f32_imm(1.0), &r)
    }
}

/// The f64 versions, for the tail (one thread, a handful of values): range reduction and
/// series to double precision, a few ulp, instead of the f32 special-function unit.
impl Asm {
    fn bin64(&mut self, op: &str, a: &str, b: &str) -> String {
        self.def(Kind::F64, op, &format!("{a}, {b}"))
    }

    fn fma64(&mut self, a: &str, b: &str, c: &str) -> String {
        self.def(Kind::F64, "fma.rn.f64", &format!("{a}, {b}, {c}"))
    }

    fn pick64(&mut self, p: &str, yes: &str, no: &str) -> String {
        self.def(Kind::F64, "selp.f64", &format!("{yes}, {no}, {p}"))
    }

    /// A predicate: `setp.{cc}.f64 p, a, b`.
    pub fn test64(&mut self, cc: &str, a: &str, b: &str) -> String {
        self.def(Kind::Pred, &format!("setp.{cc}.f64"), &format!("{a}, {b}"))
    }

    /// 2^n for an integer-valued f64 n in [-1100, 1100], as two exact powers (so that
    /// the product overflows or underflows gradually, as the true value would).
    fn exp2_int64(&mut self, n: &str) -> String {
        let ni = self.def(Kind::B64, "cvt.rni.s64.f64", n);
        let half = self.def(Kind::B64, "shr.s64", &format!("{ni}, 1"));
        let rest = self.def(Kind::B64, "sub.s64", &format!("{ni}, {half}"));
        let mut factors = Vec::new();
        for e in [half, rest] {
            let biased = self.def(Kind::B64, "add.s64", &format!("{e}, 1023"));
            let bits = self.def(Kind::B64, "shl.b64", &format!("{biased}, 52"));
            factors.push(self.def(Kind::F64, "mov.b64", &bits));
        }
        self.bin64("mul.rn.f64", &factors[0], &factors[1])
    }

    /// e^x in f64: x = n ln 2 + r, |r| <= ln2/2, e^r by its Taylor series to r^13.
    pub fn exp64(&mut self, x: &str) -> String {
        let lo = f64_imm(-746.0);
        let hi = f64_imm(710.0);
        let clamped = self.bin64("max.f64", x, &lo);
        let clamped = self.bin64("min.f64", &clamped, &hi);
        let t = self.bin64("mul.rn.f64", &clamped, &f64_imm(std::f64::consts::LOG2_E));
        let n = self.def(Kind::F64, "cvt.rni.f64.f64", &t);
        // ln 2 in two parts: n * LN2_HI is exact for |n| < 2^20.
        let ln2_hi = f64::from_bits(0x3fe6_2e42_fee0_0000);
        let ln2_lo = std::f64::consts::LN_2 - ln2_hi;
        let nn = self.def(Kind::F64, "neg.f64", &n);
        let r = self.fma64(&nn, &f64_imm(ln2_hi), &clamped);
        let r = self.fma64(&nn, &f64_imm(ln2_lo), &r);
        let mut q = self.f64(1.0 / (1..=13).map(f64::from).product::<f64>());
        for k in (0..13).rev() {
            let c = 1.0 / (1..=k).map(f64::from).product::<f64>();
            q = self.fma64(&q, &r, &f64_imm(c));
        }
        let scale = self.exp2_int64(&n);
        let e = self.bin64("mul.rn.f64", &q, &scale);
        let nan = self.def(Kind::Pred, "testp.notanumber.f64", x);
        self.pick64(&nan, x, &e)
    }

    /// ln x in f64: x = m 2^e with m in [sqrt(1/2), sqrt 2), ln m = 2 atanh((m-1)/(m+1)) by
    /// its series to s^23 (|s| < 0.172).
    pub fn log64(&mut self, x: &str) -> String {
        // Subnormals: scaled into the normal range first.
        let tiny = self.test64("lt", x, &f64_imm(f64::MIN_POSITIVE));
        let scaled = self.bin64("mul.rn.f64", x, &f64_imm(2f64.powi(54)));
        let v = self.pick64(&tiny, &scaled, x);
        let shift = self.pick64(&tiny, &f64_imm(-54.0), &f64_imm(0.0));
        let bits = self.def(Kind::B64, "mov.b64", &v);
        let field = self.def(Kind::B64, "shr.u64", &format!("{bits}, 52"));
        let field = self.def(Kind::B64, "and.b64", &format!("{field}, 2047"));
        let e = self.def(Kind::B64, "sub.s64", &format!("{field}, 1023"));
        let e = self.def(Kind::F64, "cvt.rn.f64.s64", &e);
        let e = self.bin64("add.rn.f64", &e, &shift);
        let mant = self.def(Kind::B64, "and.b64", &format!("{bits}, 4503599627370495"));
        let mant = self.def(Kind::B64, "or.b64", &format!("{mant}, 4607182418800017408"));
        let m = self.def(Kind::F64, "mov.b64", &mant);
        let big = self.test64("gt", &m, &f64_imm(std::f64::consts::SQRT_2));
        let halved = self.bin64("mul.rn.f64", &m, &f64_imm(0.5));
        let m = self.pick64(&big, &halved, &m);
        let e1 = self.bin64("add.rn.f64", &e, &f64_imm(1.0));
        let e = self.pick64(&big, &e1, &e);
        let num = self.bin64("sub.rn.f64", &m, &f64_imm(1.0));
        let den = self.bin64("add.rn.f64", &m, &f64_imm(1.0));
        let s = self.bin64("div.rn.f64", &num, &den);
        let s2 = self.bin64("mul.rn.f64", &s, &s);
        let mut q = self.f64(1.0 / 23.0);
        for k in (0..11).rev() {
            q = self.fma64(&q, &s2, &f64_imm(1.0 / f64::from(2 * k + 1)));
        }
        let two_s = self.bin64("add.rn.f64", &s, &s);
        let lm = self.bin64("mul.rn.f64", &two_s, &q);
        let ln2_hi = f64::from_bits(0x3fe6_2e42_fee0_0000);
        let ln2_lo = std::f64::consts::LN_2 - ln2_hi;
        let low = self.fma64(&e, &f64_imm(ln2_lo), &lm);
        let r = self.fma64(&e, &f64_imm(ln2_hi), &low);
        // Specials: log 0 = -inf, log of a negative = NaN, log inf = inf, NaN stays.
        let zero = self.test64("eq", x, &f64_imm(0.0));
        let r = self.pick64(&zero, &f64_imm(f64::NEG_INFINITY), &r);
        let neg = self.test64("lt", x, &f64_imm(0.0));
        let r = self.pick64(&neg, &f64_imm(f64::NAN), &r);
        let inf = self.test64("eq", x, &f64_imm(f64::INFINITY));
        let r = self.pick64(&inf, x, &r);
        let nan = self.def(Kind::Pred, "testp.notanumber.f64", x);
        self.pick64(&nan, x, &r)
    }

    /// ln(1 + x) in f64: log(u) for u = 1 + x, less the rounding of u ((u - 1) - x) / u.
    pub fn log1p64(&mut self, x: &str) -> String {
        let u = self.bin64("add.rn.f64", x, &f64_imm(1.0));
        let l = self.log64(&u);
        let um1 = self.bin64("sub.rn.f64", &u, &f64_imm(1.0));
        let err = self.bin64("sub.rn.f64", &um1, x);
        let c = self.bin64("div.rn.f64", &err, &u);
        let r = self.bin64("sub.rn.f64", &l, &c);
        let exact = self.test64("eq", &u, &f64_imm(1.0));
        let r = self.pick64(&exact, x, &r);
        // Where u is infinite the correction is inf/inf.
        let inf = self.test64("eq", x, &f64_imm(f64::INFINITY));
        self.pick64(&inf, x, &r)
    }

    /// 1 / (1 + e^-x) in f64.
    pub fn sigmoid64(&mut self, x: &str) -> String {
        let a = self.def(Kind::F64, "abs.f64", x);
        let n = self.def(Kind::F64, "neg.f64", &a);
        let z = self.exp64(&n);
        let u = self.bin64("add.rn.f64", &z, &f64_imm(1.0));
        let r = self.def(Kind::F64, "rcp.rn.f64", &u);
        let nr = self.bin64("mul.rn.f64", &z, &r);
        let p = self.test64("ge", x, &f64_imm(0.0));
        self.pick64(&p, &r, &nr)
    }

    /// log(1 + e^x) = max(x, 0) + log1p(e^-|x|) in f64.
    pub fn softplus64(&mut self, x: &str) -> String {
        let a = self.def(Kind::F64, "abs.f64", x);
        let n = self.def(Kind::F64, "neg.f64", &a);
        let z = self.exp64(&n);
        let l = self.log1p64(&z);
        let m = self.bin64("max.f64", x, &f64_imm(0.0));
        self.bin64("add.rn.f64", &m, &l)
    }

    /// tanh x in f64: from e^-2|x|, an odd series below 1/16.
    pub fn tanh64(&mut self, x: &str) -> String {
        let a = self.def(Kind::F64, "abs.f64", x);
        let m2 = self.bin64("mul.rn.f64", &a, &f64_imm(-2.0));
        let e = self.exp64(&m2);
        let num = self.bin64("sub.rn.f64", &f64_imm(1.0), &e);
        let den = self.bin64("add.rn.f64", &f64_imm(1.0), &e);
        let t = self.bin64("div.rn.f64", &num, &den);
        let nt = self.def(Kind::F64, "neg.f64", &t);
        let neg = self.test64("lt", x, &f64_imm(0.0));
        let far = self.pick64(&neg, &nt, &t);
        let x2 = self.bin64("mul.rn.f64", x, x);
        // tanh x = x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925 + ...).
        let mut q = self.f64(21844.0 / 6081075.0);
        for c in [-1382.0 / 155925.0, 62.0 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0, 1.0] {
            q = self.fma64(&q, &x2, &f64_imm(c));
        }
        let series = self.bin64("mul.rn.f64", x, &q);
        let small = self.test64("lt", &a, &f64_imm(0.0625));
        self.pick64(&small, &series, &far)
    }

    /// x^y in f64 as `powf`: exp(y ln|x|) with its signs and special cases.
    pub fn pow64(&mut self, x: &str, y: &str) -> String {
        let ax = self.def(Kind::F64, "abs.f64", x);
        let l = self.log64(&ax);
        let yl = self.bin64("mul.rn.f64", y, &l);
        let r = self.exp64(&yl);
        let yi = self.def(Kind::F64, "cvt.rzi.f64.f64", y);
        let int = self.test64("eq", &yi, y);
        let half = self.bin64("mul.rn.f64", y, &f64_imm(0.5));
        let hi = self.def(Kind::F64, "cvt.rzi.f64.f64", &half);
        let odd = self.test64("neu", &hi, &half);
        let nr = self.def(Kind::F64, "neg.f64", &r);
        let signed = self.pick64(&odd, &nr, &r);
        let negative = self.pick64(&int, &signed, &f64_imm(f64::NAN));
        let neg = self.test64("lt", x, &f64_imm(0.0));
        let r = self.pick64(&neg, &negative, &r);
        let y0 = self.test64("eq", y, &f64_imm(0.0));
        let x1 = self.test64("eq", x, &f64_imm(1.0));
        let one = self.def(Kind::Pred, "or.pred", &format!("{y0}, {x1}"));
        self.pick64(&one, &f64_imm(1.0), &r)
    }
}
