//! Cranelift backend: JIT-compiles loss kernels to native f32x4 code. `math` emits the inline
//! vector transcendentals (exp, log, sigmoid, ...) those kernels use.

pub mod math;
mod schedule;
pub mod sweep;
