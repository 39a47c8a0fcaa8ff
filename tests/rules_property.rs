//! Simplification never changes a value: the exact rules keep every bit of
//! eval(e) for random expressions over every elementwise op and reduction; the
//! stable rules agree with independent accurate formulas.

use lossc::backend::interp;
use lossc::ir::{AxisSet, Graph, NodeId, Op};
use lossc::synth::Rng;
use lossc::Tensor;

const UNARY: &[Op] =
    &[Op::Neg, Op::Exp, Op::Log, Op::Log1p, Op::Sqrt, Op::Abs, Op::Sigmoid, Op::Softplus, Op::Tanh, Op::Relu];
const BINARY: &[Op] = &[Op::Add, Op::Sub, Op::Mul, Op::Div, Op::Pow, Op::Min, Op::Max, Op::Lt, Op::Gt, Op::Eq];

/// A random expression of `depth` over inputs and constants that favour the rules' patterns.
fn random_expr(g: &mut Graph, rng: &mut Rng, inputs: &[NodeId], depth: u32) -> NodeId {
    if depth == 0 || rng.uniform() < 0.2 {
        return if rng.uniform() < 0.6 {
            inputs[rng.below(inputs.len())]
        } else {
            g.constant([0.0, 1.0, -1.0, 2.0, 0.5, 3.0][rng.below(6)])
        };
    }
    match rng.below(10) {
        0..=3 => {
            let a = random_expr(g, rng, inputs, depth - 1);
            g.add(UNARY[rng.below(UNARY.len())], &[a])
        }
        4..=7 => {
            let a = random_expr(g, rng, inputs, depth - 1);
            let b = random_expr(g, rng, inputs, depth - 1);
            g.add(BINARY[rng.below(BINARY.len())], &[a, b])
        }
        8 => {
            let c = random_expr(g, rng, inputs, depth - 1);
            let a = random_expr(g, rng, inputs, depth - 1);
            let b = random_expr(g, rng, inputs, depth - 1);
            g.add(Op::Select, &[c, a, b])
        }
        _ => {
            // Patterns the stability rules look for.
            let a = random_expr(g, rng, inputs, depth - 1);
            let s = g.add(Op::Sigmoid, &[a]);
            let one = g.constant(1.0);
            let d = g.add(Op::Sub, &[one, s]);
            g.add(Op::Log, &[if rng.uniform() < 0.5 { s } else { d }])
        }
    }
}

fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn simplification_preserves_values() {
    let seed: u64 = std::env::var("LOSSC_SEED").map_or_else(|_| rand::random(), |s| s.parse().expect("a number"));
    let mut rng = Rng::new(seed);
    let ext = [2, 2, 5];
    for case in 0..2000 {
        let mut g = Graph::new(false);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let y = g.add(Op::Input { index: 1, axes: AxisSet::ALL }, &[]);
        let e = random_expr(&mut g, &mut rng, &[x, y], 5);
        let root = g.add(Op::Sum(g.axes(e)), &[e]);
        let (simple, roots) = g.rebuild_exact(&[root, e]);
        let inputs: Vec<Tensor> =
            (0..2).map(|_| Tensor::new(ext, (0..20).map(|_| 4.0 * rng.normal()).collect())).collect();
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let before = interp::evaluate(&g, &[root, e], &refs, ext);
        let after = interp::evaluate(&simple, &roots, &refs, ext);
        let full = |t: &Tensor| t.broadcast_to(ext).data;
        let names = ["x".to_string(), "y".to_string()];
        let show = |g: &Graph, r: NodeId| lossc::ir::print_graph(g, &[("e", r)], &names).body;
        for (b, a) in full(&before[1]).iter().zip(full(&after[1])) {
            assert!(
                same(*b, a),
                "case {case} (seed {seed}): {b} became {a}\n{}=>\n{}",
                show(&g, e),
                show(&simple, roots[1])
            );
        }
        assert!(same(before[0].data[0], after[0].data[0]), "case {case} (seed {seed}): sum changed");
    }
}

/// Each stable rule against an accurate formula written independently, over a wide range.
#[test]
fn stable_rules_are_accurate() {
    let softplus_ref = |x: f64| if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() };
    let sigmoid_ref = |x: f64| if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) };
    type Build = fn(&mut Graph, NodeId) -> NodeId;
    let cases: [(&str, Build, &dyn Fn(f64) -> f64); 4] = [
        (
            "log(sigmoid(x))",
            |g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                g.add(Op::Log, &[s])
            },
            &|x| -softplus_ref(-x),
        ),
        (
            "log(1 - sigmoid(x))",
            |g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                let one = g.constant(1.0);
                let d = g.add(Op::Sub, &[one, s]);
                g.add(Op::Log, &[d])
            },
            &|x| -softplus_ref(x),
        ),
        (
            "1 - sigmoid(x)",
            |g, x| {
                let s = g.add(Op::Sigmoid, &[x]);
                let one = g.constant(1.0);
                g.add(Op::Sub, &[one, s])
            },
            &|x| sigmoid_ref(-x),
        ),
        (
            "log(exp(x))",
            |g, x| {
                let e = g.add(Op::Exp, &[x]);
                g.add(Op::Log, &[e])
            },
            &|x| x,
        ),
    ];
    let xs: Vec<f64> = (-400..=400).map(|i| f64::from(i) * 0.25).chain([-1000.0, 1000.0]).collect();
    let n = xs.len();
    for (name, build, reference) in cases {
        let mut g = Graph::new(false);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let e = build(&mut g, x);
        let (simple, roots) = g.rebuild(&[e], true);
        let input = Tensor::new([1, 1, n], xs.clone());
        let got = interp::evaluate(&simple, &roots, &[&input], [1, 1, n]).remove(0).broadcast_to([1, 1, n]);
        for (x, v) in xs.iter().zip(&got.data) {
            let want = reference(*x);
            assert!((v - want).abs() <= 1e-15 * want.abs().max(1e-300), "{name} at x = {x}: {v} vs {want}");
        }
    }
}
