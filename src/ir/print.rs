//! The canonical printed form: deterministic text for snapshots and review.
//!
//! A node used more than once is printed once as a temporary `tN = ...`
//! (numbered in topological order); everything else prints inline with the
//! fewest parentheses that keep the tree's shape.

use std::collections::HashMap;

use super::{AxisSet, Graph, NodeId, Op, Space};

pub struct Printed {
    /// One line per temporary and per root, each indented by two spaces.
    pub body: String,
}

/// Prints `roots` (each with its label) and the temporaries they share.
pub fn print_graph(g: &Graph, roots: &[(&str, NodeId)], inputs: &[String]) -> Printed {
    let ids: Vec<NodeId> = roots.iter().map(|r| r.1).collect();
    let order = g.reachable(&ids);
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for &a in &g.node(id).args {
            *uses.entry(a).or_default() += 1;
        }
    }
    let mut p = Printer { g, inputs, names: HashMap::new() };
    let mut body = String::new();
    // How deep each node would print inline; a node past MAX_INLINE_DEPTH gets a name,
    // which keeps long chains readable and the printer's recursion bounded.
    let mut height: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        let n = g.node(id);
        let h = 1 + n.args.iter().map(|a| height.get(a).copied().unwrap_or(0)).max().unwrap_or(0);
        let used = uses.get(&id).copied().unwrap_or(0);
        let shared = used > 1 || (n.space == Space::Permutation && used > 0) || h > MAX_INLINE_DEPTH;
        if shared && n.op.arity() > 0 {
            let text = p.expr(id, 0);
            let name = format!("{}{}", if n.space == Space::Permutation { "s" } else { "t" }, p.names.len());
            body += &format!("  {name} = {text}\n");
            p.names.insert(id, name);
            height.insert(id, 0);
        } else {
            height.insert(id, h);
        }
    }
    for (label, id) in roots {
        body += &format!("  {label} = {}\n", p.expr(*id, 0));
    }
    Printed { body }
}

/// Numbers in their shortest round-trip form; integers without a dot.
pub fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 && !(v == 0.0 && v.is_sign_negative()) {
        format!("{}", v as i64)
    } else {
        format!("{v:?}")
    }
}

struct Printer<'a> {
    g: &'a Graph,
    inputs: &'a [String],
    names: HashMap<NodeId, String>,
}

const ATOM: u8 = 6;

/// The deepest expression printed on one line.
const MAX_INLINE_DEPTH: usize = 24;

impl Printer<'_> {
    /// The node as text, parenthesised if its precedence is below `min`.
    fn expr(&self, id: NodeId, min: u8) -> String {
        let (text, prec) = self.text(id);
        if prec < min {
            format!("({text})")
        } else {
            text
        }
    }

    fn arg(&self, id: NodeId) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| self.expr(id, 0))
    }

    /// Text and precedence: 1 comparison, 2 sum, 3 product, 4 negation, 5 power, 6 atom.
    fn text(&self, id: NodeId) -> (String, u8) {
        if let Some(name) = self.names.get(&id) {
            return (name.clone(), ATOM);
        }
        let n = self.g.node(id);
        let a = &n.args;
        let call = |args: &[String]| (format!("{}({})", n.op.name(), args.join(", ")), ATOM);
        let infix = |prec: u8, right_assoc: bool| {
            let (lmin, rmin) = if right_assoc { (prec + 1, prec) } else { (prec, prec + 1) };
            let l = self.sub(a[0], lmin);
            let r = self.sub(a[1], rmin);
            (format!("{l} {} {r}", n.op.name()), prec)
        };
        match n.op {
            Op::Const(bits) => {
                let v = f64::from_bits(bits);
                (format_number(v), if v.is_sign_negative() { 4 } else { ATOM })
            }
            Op::Input { index, .. } => (self.inputs[index as usize].clone(), ATOM),
            Op::ClassIndex => ("class_index()".into(), ATOM),
            Op::Extent(axes) => (format!("size({})", axes_list(axes)), ATOM),
            Op::Neg => (format!("-{}", self.sub(a[0], 4)), 4),
            Op::Exp
            | Op::Log
            | Op::Log1p
            | Op::Sqrt
            | Op::Abs
            | Op::Sign
            | Op::Sigmoid
            | Op::Softplus
            | Op::Tanh
            | Op::Relu
            | Op::Min
            | Op::Max
            | Op::Select
            | Op::Gather
            | Op::Scatter
            | Op::Cumsum
            | Op::RevCumsum
            | Op::Next => call(&a.iter().map(|&x| self.arg(x)).collect::<Vec<_>>()),
            Op::Add | Op::Sub => infix(2, false),
            Op::Mul | Op::Div => infix(3, false),
            Op::Pow => infix(5, true),
            Op::Eq if self.g.node(a[1]).op == Op::ClassIndex => (format!("onehot({})", self.arg(a[0])), ATOM),
            Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::Eq | Op::Ne => infix(1, false),
            Op::Sum(over) | Op::LogSumExp(over) => {
                let arg = self.g.node(a[0]);
                let all = match arg.space {
                    Space::Sorted(_) => over,
                    _ => arg.axes,
                };
                let extra = if over == all {
                    String::new()
                } else if all.contains(over) && arg.space == Space::Elements {
                    format!(", by = {}", axes_list(all.minus(over)))
                } else {
                    format!(", over = {}", axes_list(over))
                };
                (format!("{}({}{extra})", n.op.name(), self.arg(a[0])), ATOM)
            }
            Op::Sort { group, descending } => {
                let order = if descending { "desc" } else { "asc" };
                let by = if group.is_empty() { String::new() } else { format!(", by = {}", axes_list(group)) };
                (format!("sort({} {order}{by})", self.arg(a[0])), ATOM)
            }
            Op::Prev(init) => {
                (format!("prev({}, {}, {})", self.arg(a[0]), self.arg(a[1]), format_number(f64::from_bits(init))), ATOM)
            }
        }
    }

    fn sub(&self, id: NodeId, min: u8) -> String {
        self.expr(id, min)
    }
}

fn axes_list(axes: AxisSet) -> String {
    let names = axes.names();
    if names.len() == 1 {
        names[0].to_string()
    } else {
        format!("({})", names.join(", "))
    }
}
