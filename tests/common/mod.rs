//! What the engine tests (native kernels, PTX in the interpreter, the GPU) count as a
//! float32 gradient agreeing with its reference: one rule, shared.

/// The absolute tolerance for the elements of a gradient whose largest magnitude is
/// `scale`: 1e-5 of it. A gradient that is exactly 0 comes out as float32 rounding noise:
/// 1e-4 absolute. On fewer than 8 elements (`tiny`) gradients are differences of terms of
/// order 1 (one element is the whole intersection and union): 1e-4 of max|g| there, and
/// at least 1e-6, for a gradient that cancels to far below its terms (bce_logits' d/dy at
/// one element is softplus(-x) - softplus(x) = -x, each term about 0.69: at x = 1e-5 its
/// float32 rounding alone is 0.2% of it).
pub fn gradient_tolerance(scale: f64, tiny: bool) -> f64 {
    if scale == 0.0 {
        1e-4
    } else if tiny {
        1e-4 * scale.max(1e-2)
    } else {
        1e-5 * scale
    }
}

/// Whether `got` is within `tolerance` of `want`, NaN agreeing with NaN.
pub fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= tolerance || (got.is_nan() && want.is_nan())
}

/// A fresh random seed for a test's inputs, or `LOSSC_TEST_SEED` to replay the one a
/// failure printed.
pub fn seed() -> u64 {
    std::env::var("LOSSC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}
