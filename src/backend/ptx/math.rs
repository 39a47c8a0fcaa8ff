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

use super::asm::{f32_imm, Asm, Kind};

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
