//! Backends that run a compiled loss. `interp` is the f64 reference evaluator,
//! the oracle for every other backend.

pub mod interp;
