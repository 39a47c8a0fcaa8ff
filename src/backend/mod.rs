//! Backends that run a compiled loss. `interp` is the f64 reference evaluator,
//! the oracle for every other backend; `cranelift` JIT-compiles to native vector code;
//! `ptx` renders the same sweeps for NVIDIA GPUs.

pub mod cranelift;
pub mod interp;
pub mod ptx;
