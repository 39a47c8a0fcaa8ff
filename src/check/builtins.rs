//! The built-in functions of the language, lowered to IR ops.

use std::collections::HashMap;

use super::{axes_value, Lowerer, Scope, R};
use crate::diag::{Diagnostic, Span};
use crate::ir::{AxisSet, NodeId, Op, Space};
use crate::syntax::ast::{Arg, Expr, ExprKind, Ident};

/// Every builtin name, for suggestions and for rejecting them as values.
pub const NAMES: &[&str] = &[
    "exp",
    "log",
    "log1p",
    "sqrt",
    "abs",
    "sigmoid",
    "softplus",
    "log_sigmoid",
    "tanh",
    "relu",
    "min",
    "max",
    "clamp",
    "where",
    "sum",
    "mean",
    "softmax",
    "log_softmax",
    "onehot",
    "cumsum",
    "prev",
];

/// "1 was" or "3 were".
/// "1 was" or "N were", for "..., but N were given".
pub(crate) fn given(n: usize) -> String {
    if n == 1 {
        "1 was".into()
    } else {
        format!("{n} were")
    }
}

pub fn is_builtin(name: &str) -> bool {
    NAMES.contains(&name)
}

fn unary_op(name: &str) -> Option<Op> {
    Some(match name {
        "exp" => Op::Exp,
        "log" => Op::Log,
        "log1p" => Op::Log1p,
        "sqrt" => Op::Sqrt,
        "abs" => Op::Abs,
        "sigmoid" => Op::Sigmoid,
        "softplus" => Op::Softplus,
        "tanh" => Op::Tanh,
        "relu" => Op::Relu,
        _ => return None,
    })
}

/// Positional arguments and the named ones a builtin accepts.
struct Args<'e> {
    positional: Vec<&'e Expr>,
    named: HashMap<&'static str, &'e Expr>,
}

fn split_args<'e>(func: &Ident, args: &'e [Arg], span: Span, count: usize, names: &[&'static str]) -> R<Args<'e>> {
    let mut out = Args { positional: vec![], named: HashMap::new() };
    for a in args {
        match &a.name {
            None => out.positional.push(&a.value),
            Some(n) => {
                let Some(&known) = names.iter().find(|k| **k == n.name) else {
                    let accepted = if names.is_empty() {
                        "it takes no named arguments".to_string()
                    } else {
                        format!("it accepts {}", names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))
                    };
                    let mut d = Diagnostic::new(
                        "check::unknown_argument",
                        n.span,
                        format!("`{}` has no argument `{}`", func.name, n.name),
                    )
                    .label("unknown argument")
                    .note(accepted);
                    if let Some(s) = super::closest(&n.name, names.iter().copied()) {
                        d = d.help(format!("did you mean `{s}`?"));
                    }
                    return Err(d);
                };
                if out.named.insert(known, &a.value).is_some() {
                    return Err(Diagnostic::new(
                        "check::duplicate_argument",
                        n.span,
                        format!("argument `{known}` of `{}` is given twice", func.name),
                    )
                    .label("given again here"));
                }
            }
        }
    }
    if out.positional.len() != count {
        let plural = if count == 1 { "" } else { "s" };
        return Err(Diagnostic::new(
            "check::arity",
            span,
            format!("`{}` takes {count} argument{plural}, but {} given", func.name, given(out.positional.len())),
        )
        .label(format!("expected {count} argument{plural}")));
    }
    Ok(out)
}

impl Lowerer<'_> {
    /// Lowers a call to a builtin; `None` if `func` is not one.
    pub(super) fn builtin(&mut self, func: &Ident, args: &[Arg], span: Span, scope: &Scope) -> Option<R<NodeId>> {
        let name = func.name.as_str();
        if !is_builtin(name) {
            return None;
        }
        Some(self.builtin_inner(func, args, span, scope))
    }

    fn builtin_inner(&mut self, func: &Ident, args: &[Arg], span: Span, scope: &Scope) -> R<NodeId> {
        let name = func.name.as_str();
        if let Some(op) = unary_op(name) {
            let a = split_args(func, args, span, 1, &[])?;
            let x = self.expr(a.positional[0], scope)?;
            return self.build(op, &[x], span);
        }
        match name {
            "log_sigmoid" => {
                let a = split_args(func, args, span, 1, &[])?;
                let x = self.expr(a.positional[0], scope)?;
                let nx = self.build(Op::Neg, &[x], span)?;
                let sp = self.build(Op::Softplus, &[nx], span)?;
                self.build(Op::Neg, &[sp], span)
            }
            "min" | "max" => {
                let a = split_args(func, args, span, 2, &[])?;
                let (x, y) = (self.expr(a.positional[0], scope)?, self.expr(a.positional[1], scope)?);
                self.build(if name == "min" { Op::Min } else { Op::Max }, &[x, y], span)
            }
            "clamp" => {
                let a = split_args(func, args, span, 3, &[])?;
                let x = self.expr(a.positional[0], scope)?;
                let lo = self.expr(a.positional[1], scope)?;
                let hi = self.expr(a.positional[2], scope)?;
                let low = self.build(Op::Max, &[x, lo], span)?;
                self.build(Op::Min, &[low, hi], span)
            }
            "where" => {
                let a = split_args(func, args, span, 3, &[])?;
                let c = self.expr(a.positional[0], scope)?;
                let x = self.expr(a.positional[1], scope)?;
                let y = self.expr(a.positional[2], scope)?;
                self.build(Op::Select, &[c, x, y], span)
            }
            "sum" | "mean" => self.reduction(func, args, span, scope),
            "softmax" | "log_softmax" => {
                let a = split_args(func, args, span, 1, &[])?;
                let x = self.expr(a.positional[0], scope)?;
                if !self.g.axes(x).contains(AxisSet::CLASS) {
                    return Err(Diagnostic::new(
                        "shape::missing_class_axis",
                        a.positional[0].span,
                        format!("`{name}` runs over the class axis, but this does not vary over it"),
                    )
                    .label(format!("varies over {}", self.g.axes(x))));
                }
                let lse = self.build(Op::LogSumExp(AxisSet::CLASS), &[x], span)?;
                let log_sm = self.build(Op::Sub, &[x, lse], span)?;
                if name == "softmax" {
                    self.build(Op::Exp, &[log_sm], span)
                } else {
                    Ok(log_sm)
                }
            }
            "onehot" => {
                let a = split_args(func, args, span, 1, &[])?;
                let arg = a.positional[0];
                let labels = AxisSet::BATCH.union(AxisSet::SPATIAL);
                let t = match &arg.kind {
                    ExprKind::Name(n) => self.name(n, arg.span, scope, labels)?,
                    _ => self.expr(arg, scope)?,
                };
                if self.g.axes(t).contains(AxisSet::CLASS) {
                    return Err(Diagnostic::new(
                        "shape::onehot_of_classes",
                        arg.span,
                        "`onehot` takes index labels, which must not vary over the class axis",
                    )
                    .label(format!("varies over {}", self.g.axes(t)))
                    .help("declare the input as `t[batch, spatial]`"));
                }
                let c = self.build(Op::ClassIndex, &[], span)?;
                self.build(Op::Eq, &[t, c], span)
            }
            "cumsum" | "prev" => {
                let Some(sort) = scope.sorted else {
                    return Err(Diagnostic::new(
                        "check::scan_outside_sorted",
                        span,
                        format!("`{name}` is only defined inside a `sorted` block"),
                    )
                    .label("not in a `sorted` block")
                    .help("scan along an order: `sorted (e desc, g = y) { ... cumsum(g) ... }`"));
                };
                let count = if name == "prev" { 2 } else { 1 };
                let a = split_args(func, args, span, count, &[])?;
                let v = self.expr(a.positional[0], scope)?;
                let op = if name == "prev" {
                    let init = self.expr(a.positional[1], scope)?;
                    let value = self.g.fold(init).ok_or_else(|| {
                        Diagnostic::new(
                            "check::prev_init_not_constant",
                            a.positional[1].span,
                            "the first value of `prev` must be a constant",
                        )
                        .label("not a constant")
                    })?;
                    Op::Prev(value.to_bits())
                } else {
                    Op::Cumsum
                };
                self.build(op, &[sort, v], span)
            }
            other => unreachable!("builtin `{other}` is listed in NAMES but not lowered"),
        }
    }

    /// `sum(e, by = axes, mask = m)` and `mean(...)`: over the axes of `e` not kept by `by`,
    /// or over the whole group inside a `sorted` block. A mask removes elements from the
    /// sum and, for `mean`, from the count.
    fn reduction(&mut self, func: &Ident, args: &[Arg], span: Span, scope: &Scope) -> R<NodeId> {
        let a = split_args(func, args, span, 1, &["by", "mask"])?;
        let e = self.expr(a.positional[0], scope)?;
        let mask = a.named.get("mask").map(|m| self.expr(m, scope)).transpose()?;
        let v = match mask {
            Some(m) => self.build(Op::Mul, &[e, m], span)?,
            None => e,
        };
        let keep = a.named.get("by").map(|b| axes_value(b)).transpose()?;
        let over = match self.g.space(v) {
            Space::Sorted(sort) => {
                if let Some(by) = a.named.get("by") {
                    return Err(Diagnostic::new(
                        "check::by_inside_sorted",
                        by.span,
                        "inside a `sorted` block a reduction runs over each whole group",
                    )
                    .label("`by` is not allowed here")
                    .help("set the groups on the block: `sorted (e desc; by = batch)`"));
                }
                let Op::Sort { group, .. } = self.g.node(sort).op else { unreachable!("Sorted names a Sort") };
                AxisSet::ALL.minus(group)
            }
            _ => {
                let all = self.g.axes(v);
                let keep = keep.unwrap_or(AxisSet::NONE);
                if !all.contains(keep) {
                    let by = a.named["by"];
                    return Err(Diagnostic::new(
                        "shape::missing_axis",
                        by.span,
                        format!("cannot keep {}: {}", keep.minus(all), super::varies_over(all)),
                    )
                    .label("not an axis of the value"));
                }
                all.minus(keep)
            }
        };
        let total = self.build(Op::Sum(over), &[v], span)?;
        if func.name == "sum" {
            return Ok(total);
        }
        let count = match mask {
            Some(m) => self.build(Op::Sum(over), &[m], span)?,
            None => self.build(Op::Extent(over), &[], span)?,
        };
        self.build(Op::Div, &[total, count], span)
    }
}
