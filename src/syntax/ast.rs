//! The abstract syntax tree, with a span on everything a diagnostic may point at.

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A parsed source: loss definitions, or one bare expression.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceItem {
    Defs(Vec<LossDef>),
    Expr(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LossDef {
    pub name: Ident,
    /// The `///` lines, each without the leading `///` and one space.
    pub doc: Vec<String>,
    pub tensors: Vec<TensorParam>,
    pub hypers: Vec<HyperParam>,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorParam {
    pub name: Ident,
    /// `w[class]`: the axes the input may vary over; `None` means all of them.
    pub axes: Option<Vec<Ident>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HyperParam {
    pub name: Ident,
    pub default: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub lets: Vec<(Ident, Expr)>,
    pub result: Box<Expr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
    /// The height of the tree below this node (1 for a leaf). The parser bounds it,
    /// so no pass that recurses over the tree can overflow the stack.
    pub depth: u32,
}

impl Expr {
    pub fn new(kind: ExprKind, span: Span) -> Expr {
        let block = |b: &Block| b.lets.iter().map(|(_, e)| e.depth).chain([b.result.depth]).max().unwrap_or(0);
        let below = match &kind {
            ExprKind::Number(_) | ExprKind::BadNumber(_) | ExprKind::Name(_) => 0,
            ExprKind::Neg(a) => a.depth,
            ExprKind::Binary(_, a, b) => a.depth.max(b.depth),
            ExprKind::Call { args, .. } => args.iter().map(|a| a.value.depth).max().unwrap_or(0),
            ExprKind::Tuple(items) => items.iter().map(|e| e.depth).max().unwrap_or(0),
            ExprKind::Sorted(s) => {
                let binds = s.binds.iter().filter_map(|(_, e)| e.as_ref().map(|e| e.depth));
                let opts = s.options.iter().map(|(_, e)| e.depth);
                s.key_value.iter().map(|e| e.depth).chain(binds).chain(opts).chain([block(&s.body)]).max().unwrap_or(0)
            }
        };
        Expr { kind, span, depth: below + 1 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Number(f64),
    /// Text that starts like a number but is not one (`1e`, `1.2.3`).
    BadNumber(String),
    Name(String),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call {
        func: Ident,
        args: Vec<Arg>,
    },
    /// `(a, b)`: only meaningful as the value of `by = ...`.
    Tuple(Vec<Expr>),
    Sorted(Box<SortedBlock>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SortedBlock {
    /// The sort key: a name, optionally bound to a new expression.
    pub key: Ident,
    pub key_value: Option<Expr>,
    pub descending: bool,
    /// Other values reordered along with the key (`g = y`, or just `y`).
    pub binds: Vec<(Ident, Option<Expr>)>,
    /// `; by = batch`
    pub options: Vec<(Ident, Expr)>,
    pub body: Block,
}
