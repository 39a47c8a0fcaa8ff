//! The one list of operations, grouped by kind, with their scalar meaning.

use super::AxisSet;

/// Every operation of the IR. Matches on it have no catch-all arm, so adding
/// an op makes the compiler list every place that must learn about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    // Leaves.
    /// A number, stored as its bits so that nodes can be hashed.
    Const(u64),
    /// A tensor input, in declaration order, with the axes it may vary over.
    Input {
        index: u32,
        axes: AxisSet,
    },
    /// The index `c` along the class axis (`onehot(t)` is `t == c`).
    ClassIndex,
    /// The product of the extents of these axes (the count behind `mean`).
    Extent(AxisSet),

    // Elementwise, one argument.
    Neg,
    Exp,
    Log,
    Log1p,
    Sqrt,
    Abs,
    /// -1, 0 or 1; 0 at 0 (the subgradient of `abs` we use).
    Sign,
    Sigmoid,
    /// log(1 + exp(x)), computed without overflow.
    Softplus,
    Tanh,
    Relu,

    // Elementwise, two arguments. Comparisons give 1 or 0.
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,

    // Elementwise, three arguments: `where(cond, a, b)`, cond != 0 picks a.
    Select,

    // Reductions over the given axes.
    Sum(AxisSet),
    /// log(sum(exp(x))) over the axes, computed stably.
    LogSumExp(AxisSet),

    // Sorting and scans: the first argument is always the `Sort` node.
    /// The permutation that sorts the key within each group (the `group` axes fixed).
    /// Ties keep element order. A permutation, not a number.
    Sort {
        group: AxisSet,
        descending: bool,
    },
    /// Values reordered into sorted order.
    Gather,
    /// Sorted values put back in element order (the inverse of `Gather`).
    Scatter,
    /// Inclusive running sum along the sorted order, within each group.
    Cumsum,
    /// Inclusive running sum from the end of each group.
    RevCumsum,
    /// The value one step back in sorted order; the constant at the first position.
    Prev(u64),
    /// The value one step ahead in sorted order; 0 at the last position.
    Next,
}

impl Op {
    pub fn arity(self) -> usize {
        match self {
            Op::Const(_) | Op::Input { .. } | Op::ClassIndex | Op::Extent(_) => 0,
            Op::Neg
            | Op::Exp
            | Op::Log
            | Op::Log1p
            | Op::Sqrt
            | Op::Abs
            | Op::Sign
            | Op::Sigmoid
            | Op::Softplus
            | Op::Tanh
            | Op::Relu
            | Op::Sum(_)
            | Op::LogSumExp(_)
            | Op::Sort { .. } => 1,
            Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Pow
            | Op::Min
            | Op::Max
            | Op::Lt
            | Op::Le
            | Op::Gt
            | Op::Ge
            | Op::Eq
            | Op::Ne
            | Op::Gather
            | Op::Scatter
            | Op::Cumsum
            | Op::RevCumsum
            | Op::Prev(_)
            | Op::Next => 2,
            Op::Select => 3,
        }
    }

    /// The name used by the printer for function-call syntax.
    pub fn name(self) -> &'static str {
        match self {
            Op::Const(_) => "const",
            Op::Input { .. } => "input",
            Op::ClassIndex => "class_index",
            Op::Extent(_) => "size",
            Op::Neg => "neg",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Log1p => "log1p",
            Op::Sqrt => "sqrt",
            Op::Abs => "abs",
            Op::Sign => "sign",
            Op::Sigmoid => "sigmoid",
            Op::Softplus => "softplus",
            Op::Tanh => "tanh",
            Op::Relu => "relu",
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
            Op::Div => "/",
            Op::Pow => "^",
            Op::Min => "min",
            Op::Max => "max",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Select => "where",
            Op::Sum(_) => "sum",
            Op::LogSumExp(_) => "logsumexp",
            Op::Sort { .. } => "sort",
            Op::Gather => "gather",
            Op::Scatter => "scatter",
            Op::Cumsum => "cumsum",
            Op::RevCumsum => "revcumsum",
            Op::Prev(_) => "prev",
            Op::Next => "next",
        }
    }

    /// Whether the op maps elements to elements (and so can be constant-folded).
    pub fn is_elementwise(self) -> bool {
        self.arity() > 0 && self.apply(&[0.5; 3]).is_some()
    }

    /// The scalar meaning of an elementwise op; `None` for the others.
    /// The reference evaluator and constant folding both use this one table.
    pub fn apply(self, a: &[f64]) -> Option<f64> {
        let b = |c: bool| if c { 1.0 } else { 0.0 };
        Some(match self {
            Op::Neg => -a[0],
            Op::Exp => a[0].exp(),
            Op::Log => a[0].ln(),
            Op::Log1p => a[0].ln_1p(),
            Op::Sqrt => a[0].sqrt(),
            Op::Abs => a[0].abs(),
            Op::Sign => {
                if a[0] > 0.0 {
                    1.0
                } else if a[0] < 0.0 {
                    -1.0
                } else {
                    a[0] * 0.0 // 0 for ±0, NaN for NaN
                }
            }
            Op::Sigmoid => sigmoid(a[0]),
            Op::Softplus => softplus(a[0]),
            Op::Tanh => a[0].tanh(),
            Op::Relu => {
                // NaN passes through.
                if a[0] > 0.0 || a[0].is_nan() {
                    a[0]
                } else {
                    0.0
                }
            }
            Op::Add => a[0] + a[1],
            Op::Sub => a[0] - a[1],
            Op::Mul => a[0] * a[1],
            Op::Div => a[0] / a[1],
            Op::Pow => a[0].powf(a[1]),
            // NaN-propagating, unlike f64::min.
            Op::Min => {
                if a[0].is_nan() || a[1].is_nan() {
                    f64::NAN
                } else {
                    a[0].min(a[1])
                }
            }
            Op::Max => {
                if a[0].is_nan() || a[1].is_nan() {
                    f64::NAN
                } else {
                    a[0].max(a[1])
                }
            }
            Op::Lt => b(a[0] < a[1]),
            Op::Le => b(a[0] <= a[1]),
            Op::Gt => b(a[0] > a[1]),
            Op::Ge => b(a[0] >= a[1]),
            Op::Eq => b(a[0] == a[1]),
            Op::Ne => b(a[0] != a[1]),
            Op::Select => {
                if a[0] != 0.0 {
                    a[1]
                } else {
                    a[2]
                }
            }
            Op::Const(_)
            | Op::Input { .. }
            | Op::ClassIndex
            | Op::Extent(_)
            | Op::Sum(_)
            | Op::LogSumExp(_)
            | Op::Sort { .. }
            | Op::Gather
            | Op::Scatter
            | Op::Cumsum
            | Op::RevCumsum
            | Op::Prev(_)
            | Op::Next => return None,
        })
    }
}

/// 1 / (1 + e^-x), without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^x) = max(x, 0) + log1p(e^-|x|), without overflow.
pub fn softplus(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_and_sigmoid_saturate_without_overflow() {
        assert_eq!(softplus(1000.0), 1000.0);
        assert_eq!(softplus(-1000.0), 0.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((softplus(0.3) - (1.0 + 0.3f64.exp()).ln()).abs() < 1e-15);
    }
}
