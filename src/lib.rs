//! lossc: a compiler for loss functions.
//!
//! A loss is a few lines of text. lossc parses it (`syntax`), checks and
//! inlines it into one expression graph (`check`, `ir`), differentiates it
//! symbolically (`autodiff`) and evaluates it (`backend::interp`, the f64
//! reference). `Loss` is the API every front end (CLI, C ABI) uses.

pub mod autodiff;
pub mod backend;
pub mod capi;
pub mod check;
pub mod diag;
pub mod error;
pub mod ir;
pub mod loss;
pub mod runtime;
pub mod schedule;
pub mod stdlib;
pub mod syntax;
pub mod synth;
pub mod tensor;

pub use error::Error;
pub use loss::{parse_params, Loss, Program};
pub use runtime::Backend;
pub use tensor::{Tensor, View};
