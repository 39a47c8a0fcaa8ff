//! What the engine tests (native kernels, PTX in the interpreter, the GPU) count as a
//! float32 gradient agreeing with its reference: one rule, shared.

/// The absolute tolerance for the elements of a gradient whose largest magnitude is
/// `scale`: 1e-5 of it. A gradient that is exactly 0 comes out as float32 rounding noise:
/// 1e-4 absolute. On fewer than 8 elements (`tiny`) gradients are differences of terms of
/// order 1 (one element is the whole intersection and union): 1e-4 of max|g| there.
pub fn gradient_tolerance(scale: f64, tiny: bool) -> f64 {
    if scale == 0.0 {
        1e-4
    } else if tiny {
        1e-4 * scale
    } else {
        1e-5 * scale
    }
}

/// Whether `got` is within `tolerance` of `want`, NaN agreeing with NaN.
pub fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= tolerance || (got.is_nan() && want.is_nan())
}
