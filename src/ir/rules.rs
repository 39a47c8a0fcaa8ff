//! Simplification as named rewrite rules, applied to each node as it is built.
//!
//! Every rule is `Exact` (the same bits for every input, NaN, ±Inf and -0.0
//! included) or `Stable` (the same real value, computed with less rounding or
//! no overflow). No rule makes code worse, and there is no blanket
//! commutativity or associativity: `x + 0 -> x` is wrong for -0.0 and
//! `x * 0 -> 0` is wrong for NaN and Inf, so neither is here.

use super::{Graph, NodeId, Op, TypeError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleSafety {
    Exact,
    Stable,
}

pub struct Rule {
    pub name: &'static str,
    pub pattern: &'static str,
    pub safety: RuleSafety,
    apply: fn(&mut Graph, Op, &[NodeId]) -> Option<NodeId>,
}

use RuleSafety::{Exact, Stable};

#[rustfmt::skip]
pub static RULES: &[Rule] = &[
    Rule { name: "fold_constants",        pattern: "f(c1, c2, ...) => c",               safety: Exact,  apply: fold_constants },
    Rule { name: "select_constant",       pattern: "where(c, a, b) => a or b",          safety: Exact,  apply: select_constant },
    Rule { name: "select_same",           pattern: "where(c, x, x) => x",               safety: Exact,  apply: select_same },
    Rule { name: "mul_one",               pattern: "1 * x => x",                        safety: Exact,  apply: mul_one },
    Rule { name: "mul_minus_one",         pattern: "-1 * x => -x",                      safety: Exact,  apply: mul_minus_one },
    Rule { name: "mul_neg_neg",           pattern: "(-x) * (-y) => x * y",              safety: Exact,  apply: mul_neg_neg },
    Rule { name: "div_one",               pattern: "x / 1 => x",                        safety: Exact,  apply: div_one },
    Rule { name: "sub_zero",              pattern: "x - 0 => x",                        safety: Exact,  apply: sub_zero },
    Rule { name: "add_neg",               pattern: "x + -y => x - y",                   safety: Exact,  apply: add_neg },
    Rule { name: "sub_neg",               pattern: "x - -y => x + y",                   safety: Exact,  apply: sub_neg },
    Rule { name: "neg_neg",               pattern: "-(-x) => x",                        safety: Exact,  apply: neg_neg },
    Rule { name: "pow_one",               pattern: "x ^ 1 => x",                        safety: Exact,  apply: pow_one },
    Rule { name: "pow_two",               pattern: "x ^ 2 => x * x",                    safety: Stable, apply: pow_two },
    Rule { name: "log_exp",               pattern: "log(exp(x)) => x",                  safety: Stable, apply: log_exp },
    Rule { name: "one_minus_sigmoid",     pattern: "1 - sigmoid(x) => sigmoid(-x)",     safety: Stable, apply: one_minus_sigmoid },
    Rule { name: "log_sigmoid",           pattern: "log(sigmoid(x)) => -softplus(-x)",  safety: Stable, apply: log_sigmoid },
    Rule { name: "log_one_minus_sigmoid", pattern: "log(1 - sigmoid(x)) => -softplus(x)", safety: Stable, apply: log_one_minus_sigmoid },
    Rule { name: "sub_clamp",             pattern: "c - clamp(x, lo, hi) => where(x < lo, c - lo, where(x > hi, c - hi, c - x))", safety: Stable, apply: sub_clamp },
];

/// The first rule that applies to `op(args)`, if any, already built.
pub(super) fn rewrite(g: &mut Graph, op: Op, args: &[NodeId]) -> Result<Option<NodeId>, TypeError> {
    g.infer(op, args)?; // a rule must never hide a type error
    let exact_only = g.exact_only;
    Ok(RULES.iter().filter(|r| !exact_only || r.safety == Exact).find_map(|r| (r.apply)(g, op, args)))
}

fn is_const(g: &Graph, id: NodeId, v: f64) -> bool {
    g.constant_value(id).is_some_and(|c| c.to_bits() == v.to_bits())
}

fn op_of(g: &Graph, id: NodeId) -> (Op, Vec<NodeId>) {
    let n = g.node(id);
    (n.op, n.args.clone())
}

fn fold_constants(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    let vals: Option<Vec<f64>> = args.iter().map(|&a| g.constant_value(a)).collect();
    let v = op.apply(&vals?)?;
    Some(g.constant(v))
}

fn select_constant(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    let c = (op == Op::Select).then(|| g.constant_value(args[0]))??;
    Some(if c != 0.0 { args[1] } else { args[2] })
}

fn select_same(_: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    (op == Op::Select && args[1] == args[2]).then(|| args[1])
}

fn mul_one(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Mul {
        return None;
    }
    if is_const(g, args[0], 1.0) {
        Some(args[1])
    } else if is_const(g, args[1], 1.0) {
        Some(args[0])
    } else {
        None
    }
}

fn mul_minus_one(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Mul {
        return None;
    }
    let other = if is_const(g, args[0], -1.0) {
        args[1]
    } else if is_const(g, args[1], -1.0) {
        args[0]
    } else {
        return None;
    };
    g.try_add(Op::Neg, &[other]).ok()
}

fn mul_neg_neg(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Mul {
        return None;
    }
    let (Op::Neg, a) = op_of(g, args[0]) else {
        return None;
    };
    let (Op::Neg, b) = op_of(g, args[1]) else {
        return None;
    };
    g.try_add(Op::Mul, &[a[0], b[0]]).ok()
}

fn div_one(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    (op == Op::Div && is_const(g, args[1], 1.0)).then(|| args[0])
}

fn sub_zero(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    (op == Op::Sub && is_const(g, args[1], 0.0)).then(|| args[0])
}

fn add_neg(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Add {
        return None;
    }
    let (lhs, neg) = match (op_of(g, args[0]).0, op_of(g, args[1]).0) {
        (_, Op::Neg) => (args[0], args[1]),
        (Op::Neg, _) => (args[1], args[0]),
        _ => return None,
    };
    let inner = g.node(neg).args[0];
    g.try_add(Op::Sub, &[lhs, inner]).ok()
}

fn sub_neg(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Sub {
        return None;
    }
    let (Op::Neg, inner) = op_of(g, args[1]) else {
        return None;
    };
    g.try_add(Op::Add, &[args[0], inner[0]]).ok()
}

fn neg_neg(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Neg {
        return None;
    }
    let (Op::Neg, inner) = op_of(g, args[0]) else {
        return None;
    };
    Some(inner[0])
}

fn pow_one(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    (op == Op::Pow && is_const(g, args[1], 1.0)).then(|| args[0])
}

fn pow_two(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op == Op::Pow && is_const(g, args[1], 2.0) {
        g.try_add(Op::Mul, &[args[0], args[0]]).ok()
    } else {
        None
    }
}

fn log_exp(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Log {
        return None;
    }
    let (Op::Exp, inner) = op_of(g, args[0]) else {
        return None;
    };
    Some(inner[0])
}

fn one_minus_sigmoid(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Sub || !is_const(g, args[0], 1.0) {
        return None;
    }
    let (Op::Sigmoid, x) = op_of(g, args[1]) else {
        return None;
    };
    let neg = g.try_add(Op::Neg, &[x[0]]).ok()?;
    g.try_add(Op::Sigmoid, &[neg]).ok()
}

fn log_sigmoid(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Log {
        return None;
    }
    let (Op::Sigmoid, x) = op_of(g, args[0]) else {
        return None;
    };
    let neg = g.try_add(Op::Neg, &[x[0]]).ok()?;
    let sp = g.try_add(Op::Softplus, &[neg]).ok()?;
    g.try_add(Op::Neg, &[sp]).ok()
}

fn log_one_minus_sigmoid(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Log {
        return None;
    }
    let (Op::Sub, d) = op_of(g, args[0]) else {
        return None;
    };
    if !is_const(g, d[0], 1.0) {
        return None;
    }
    let (Op::Sigmoid, x) = op_of(g, d[1]) else {
        return None;
    };
    let sp = g.try_add(Op::Softplus, &[x[0]]).ok()?;
    g.try_add(Op::Neg, &[sp]).ok()
}

/// `c - clamp(x, lo, hi)` with the bounds' differences folded in f64:
/// `1 - clamp(p, eps, 1 - eps)` (the log(1 - p) of a clamped BCE) then stops at eps
/// itself. Evaluated literally in f32, 1 - eps rounds to 1 - 1.19e-7 and the subtraction
/// gives 1.19e-7, not 1e-7: -log of it is 1% off at p = 1. The branches test x itself, as
/// the clamp does, so the gradient is the clamp's: -1 for lo <= x <= hi, else 0 (a
/// `min`/`max` of c - x against the folded bounds would tie where c - x rounds onto one,
/// and pass a gradient there). Only for lo <= hi: otherwise the clamp is hi everywhere.
fn sub_clamp(g: &mut Graph, op: Op, args: &[NodeId]) -> Option<NodeId> {
    if op != Op::Sub || g.constant_value(args[0]).is_none() {
        return None;
    }
    // clamp(x, lo, hi) is built as min(max(x, lo), hi).
    let (Op::Min, outer) = op_of(g, args[1]) else { return None };
    let (Op::Max, inner) = op_of(g, outer[0]) else { return None };
    let (c, x, lo, hi) = (args[0], inner[0], inner[1], outer[1]);
    let (Some(l), Some(h)) = (g.constant_value(lo), g.constant_value(hi)) else { return None };
    if !(l <= h) {
        return None;
    }
    let below = g.try_add(Op::Lt, &[x, lo]).ok()?;
    let above = g.try_add(Op::Gt, &[x, hi]).ok()?;
    let at_lo = g.try_add(Op::Sub, &[c, lo]).ok()?;
    let at_hi = g.try_add(Op::Sub, &[c, hi]).ok()?;
    let inside = g.try_add(Op::Sub, &[c, x]).ok()?;
    let upper = g.try_add(Op::Select, &[above, at_hi, inside]).ok()?;
    g.try_add(Op::Select, &[below, at_lo, upper]).ok()
}

#[cfg(test)]
mod tests {
    use super::super::{print_graph, AxisSet};
    use super::*;

    /// Builds `f` with rules off and on and prints the simplified form.
    fn simplified(f: impl Fn(&mut Graph, NodeId) -> NodeId) -> String {
        let mut g = Graph::new(false);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let root = f(&mut g, x);
        let (g2, roots) = g.rebuild(&[root], true);
        print_graph(&g2, &[("e", roots[0])], &["x".to_string()]).body
    }

    #[test]
    fn each_rule_in_one_line() {
        let c = |g: &mut Graph, v: f64| g.constant(v);
        assert_eq!(
            simplified(|g, _| {
                let (a, b) = (c(g, 2.0), c(g, 3.0));
                g.add(Op::Mul, &[a, b])
            }),
            "  e = 6\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let o = c(g, 1.0);
                g.add(Op::Mul, &[x, o])
            }),
            "  e = x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let o = c(g, -1.0);
                g.add(Op::Mul, &[o, x])
            }),
            "  e = -x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let o = c(g, 1.0);
                g.add(Op::Div, &[x, o])
            }),
            "  e = x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let o = c(g, 0.0);
                g.add(Op::Sub, &[x, o])
            }),
            "  e = x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let n = g.add(Op::Neg, &[x]);
                g.add(Op::Neg, &[n])
            }),
            "  e = x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let o = c(g, 2.0);
                g.add(Op::Pow, &[x, o])
            }),
            "  e = x * x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let e = g.add(Op::Exp, &[x]);
                g.add(Op::Log, &[e])
            }),
            "  e = x\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                g.add(Op::Log, &[s])
            }),
            "  e = -softplus(-x)\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                let o = c(g, 1.0);
                let d = g.add(Op::Sub, &[o, s]);
                g.add(Op::Log, &[d])
            }),
            "  e = -softplus(x)\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                let o = c(g, 1.0);
                g.add(Op::Sub, &[o, s])
            }),
            "  e = sigmoid(-x)\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let n = g.add(Op::Neg, &[x]);
                let y = g.add(Op::Exp, &[x]);
                g.add(Op::Add, &[y, n])
            }),
            "  e = exp(x) - x\n"
        );
    }

    #[test]
    fn ieee_unsafe_rewrites_are_not_made() {
        let c = |g: &mut Graph, v: f64| g.constant(v);
        assert_eq!(
            simplified(|g, x| {
                let z = c(g, 0.0);
                g.add(Op::Add, &[x, z])
            }),
            "  e = x + 0\n"
        );
        assert_eq!(
            simplified(|g, x| {
                let z = c(g, 0.0);
                g.add(Op::Mul, &[x, z])
            }),
            "  e = 0 * x\n"
        );
    }
}
