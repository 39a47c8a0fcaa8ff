//! Source text to syntax tree: the pest grammar in `grammar/lossc.pest`,
//! a Pratt parser for operator precedence, and parse diagnostics.

pub mod ast;
mod parse;

pub use parse::parse;
