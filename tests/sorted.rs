//! The sorted engine (Lovász losses and user `sorted` blocks on f32 inputs) against the
//! f64 reference evaluator, and bitwise the same for any number of threads.
//!
//! Float32 and float64 can order two nearly equal keys differently, which moves a
//! Lovász weight from one element to another; so the inputs compared are drawn with
//! keys that float32 keeps apart (or with exact ties, which both break by element order).

use lossc::synth::Rng;
use lossc::{Loss, Tensor, View};

/// Loss value relative tolerance; gradients are compared to this fraction of max |g|.
const TOL: f64 = 1e-5;

/// The f32 inputs, as the caller holds them.
struct Case {
    shapes: Vec<[usize; 3]>,
    data: Vec<Vec<f32>>,
}

impl Case {
    fn views(&self) -> Vec<View<'_>> {
        self.shapes.iter().zip(&self.data).map(|(s, d)| View::new(*s, d)).collect()
    }
    fn tensors(&self) -> Vec<Tensor> {
        self.views().iter().map(View::to_tensor).collect()
    }
}

/// The engine's value and the gradients asked for by `want` (empty: value only).
fn run(loss: &Loss, case: &Case, want: &[bool]) -> (f64, Vec<Option<Vec<f32>>>) {
    let mut bufs: Vec<Option<Vec<f32>>> =
        want.iter().zip(&case.data).map(|(&w, d)| w.then(|| vec![f32::NAN; d.len()])).collect();
    let mut grads: Vec<Option<&mut [f32]>> = bufs.iter_mut().map(|b| b.as_deref_mut()).collect();
    let value = loss.evaluate(&case.views(), &mut grads).unwrap_or_else(|e| panic!("{}: {e}", loss.name()));
    (value, bufs)
}

/// Compares the engine with the reference for the given gradient requests.
fn agree(loss: &Loss, case: &Case, want: &[bool], what: &str) {
    let tensors = case.tensors();
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let (ref_value, ref_grads) = loss.eval_grad(&refs).expect("reference");
    let (value, grads) = run(loss, case, want);
    let close = (value - ref_value).abs() <= TOL * ref_value.abs().max(1e-12);
    assert!(close, "{} {what}: loss {value} vs reference {ref_value}", loss.name());
    for (i, (g, w)) in grads.iter().zip(&ref_grads).enumerate() {
        let Some(g) = g else { continue };
        // A gradient that cancels to 0 (a scalar broadcast over every element, whose
        // copies' gradients sum to nothing) is rounding noise of f64 terms of order 1 in
        // both: compare it at 1e-9, not at its own noise (seen: 3.5e-16 against 2.7e-16).
        let scale = w.data.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-9);
        let worst = g.iter().zip(&w.data).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        assert!(
            worst <= TOL * scale,
            "{} {what}: d/d{} off by {worst:e} (max |g| {scale:e})",
            loss.name(),
            loss.inputs()[i].name
        );
    }
}

/// Every way of asking: all gradients, none, each one alone, an empty request.
fn agree_all_requests(loss: &Loss, case: &Case, what: &str) {
    let n = case.data.len();
    agree(loss, case, &vec![true; n], what);
    agree(loss, case, &[], what);
    agree(loss, case, &vec![false; n], what);
    for i in 0..n {
        let only: Vec<bool> = (0..n).map(|j| j == i).collect();
        agree(loss, case, &only, &format!("{what}, only d/d{}", loss.inputs()[i].name));
    }
}

/// Binary logits whose hinge errors e = 1 - x (2y - 1) are a shuffled grid with step
/// `step` (off the relu kink at 0), and labels in {0, 1}.
fn hinge_case(shape: [usize; 3], step: f64, rng: &mut Rng) -> Case {
    let n: usize = shape.iter().product();
    let errors: Vec<f64> = shuffled_grid(n, step, rng).iter().map(|e| e - n as f64 / 2.0 * step).collect();
    let y: Vec<f32> = (0..n).map(|_| if rng.uniform() < 0.4 { 1.0 } else { 0.0 }).collect();
    let x: Vec<f32> = errors.iter().zip(&y).map(|(e, &y)| ((1.0 - e) * (2.0 * f64::from(y) - 1.0)) as f32).collect();
    Case { shapes: vec![shape, shape], data: vec![x, y] }
}

/// (i + 1/2) step for i < n, in random order.
fn shuffled_grid(n: usize, step: f64, rng: &mut Rng) -> Vec<f64> {
    let mut grid: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) * step).collect();
    for i in (1..n).rev() {
        grid.swap(i, rng.below(i + 1));
    }
    grid
}

/// Whether keys, grouped, are all further apart than float32 rounding can blur.
fn apart(groups: Vec<Vec<f64>>) -> bool {
    groups.into_iter().all(|mut keys| {
        keys.sort_by(f64::total_cmp);
        keys.windows(2).all(|w| w[1] - w[0] > 5e-7 * w[0].abs().max(w[1].abs()).max(1e-3))
    })
}

/// Draws `draw` until the keys it yields (per group) are apart.
fn redraw(rng: &mut Rng, draw: impl Fn(&mut Rng) -> Case, keys: impl Fn(&Case) -> Vec<Vec<f64>>) -> Case {
    for _ in 0..1000 {
        let case = draw(rng);
        if apart(keys(&case)) {
            return case;
        }
    }
    panic!("no draw with separated keys");
}

/// Logits and one-hot labels over the class axis.
fn softmax_case(shape: [usize; 3], rng: &mut Rng) -> Case {
    let [b, c, s] = shape;
    let x: Vec<f32> = (0..b * c * s).map(|_| (2.0 * rng.normal()) as f32).collect();
    let mut y = vec![0.0f32; b * c * s];
    for bi in 0..b {
        for si in 0..s {
            y[(bi * c + rng.below(c)) * s + si] = 1.0;
        }
    }
    Case { shapes: vec![shape, shape], data: vec![x, y] }
}

/// lovasz_softmax's keys |y - softmax(x)|, per class.
fn softmax_keys(case: &Case) -> Vec<Vec<f64>> {
    let [b, c, s] = case.shapes[0];
    let (x, y) = (&case.data[0], &case.data[1]);
    let mut groups = vec![Vec::new(); c];
    for bi in 0..b {
        for si in 0..s {
            let at = |ci: usize| (bi * c + ci) * s + si;
            let z: f64 = (0..c).map(|ci| f64::from(x[at(ci)]).exp()).sum();
            for (ci, g) in groups.iter_mut().enumerate() {
                g.push((f64::from(y[at(ci)]) - f64::from(x[at(ci)]).exp() / z).abs());
            }
        }
    }
    groups
}

#[test]
fn lovasz_hinge_agrees_with_the_reference() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    for shape in [[1, 1, 4099], [3, 1, 1000], [2, 4, 777], [1, 1, 1]] {
        let case = hinge_case(shape, 1e-3, &mut rng);
        agree_all_requests(&loss, &case, &format!("{shape:?} (seed {seed})"));
    }
}

#[test]
fn lovasz_hinge_per_image_agrees_with_the_reference() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let loss = Loss::compile("lovasz_hinge_per_image", "").expect("compiles");
    for shape in [[3, 1, 1000], [1, 1, 4099], [2, 4, 777], [1, 1, 1]] {
        let case = hinge_case(shape, 1e-3, &mut rng);
        agree_all_requests(&loss, &case, &format!("{shape:?} (seed {seed})"));
    }
}

#[test]
fn lovasz_softmax_agrees_with_the_reference() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let loss = Loss::compile("lovasz_softmax", "").expect("compiles");
    // Large groups almost always hold two keys float32 cannot tell apart: keep them small.
    for shape in [[2, 4, 777], [3, 5, 300], [1, 2, 1200], [1, 1, 1]] {
        let case = redraw(&mut rng, |r| softmax_case(shape, r), softmax_keys);
        agree_all_requests(&loss, &case, &format!("{shape:?} (seed {seed})"));
    }
}

/// The example of docs/language.md: groups by batch, an ascending key, cumsum and prev
/// (whose gradients are revcumsum and next).
const USER_BY_BATCH: &str = "loss f(x, y) = mean(sorted (k = abs(x - y) asc, y; by = batch) {
    let c = cumsum(y);
    mean(k * (c - prev(c, 0)))
});";

/// Groups by class, a class-weight input used inside the block, a cumsum of the key.
const USER_BY_CLASS: &str = "loss g(x, y, w[class]) {
    let p = sigmoid(x);
    sum(sorted (k = p * (1 - y) + (1 - p) * y desc, y; by = class) {
        let c = cumsum(k);
        sum(w * k * (1 + y) / (1 + c))
    })
}";

#[test]
fn user_sorted_blocks_agree_with_the_reference() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let by_batch = Loss::compile(USER_BY_BATCH, "").expect("compiles");
    let by_class = Loss::compile(USER_BY_CLASS, "").expect("compiles");
    for shape in [[1, 1, 4099], [3, 1, 1000], [2, 4, 777], [1, 1, 1]] {
        let [b, c, s] = shape;
        let what = format!("{shape:?} (seed {seed})");
        // Keys |x - y| on a shuffled grid per batch item (random draws of thousands of keys
        // almost always hold two that float32 cannot tell apart).
        let draw = |r: &mut Rng| {
            let y: Vec<f32> = (0..b * c * s).map(|_| r.uniform() as f32).collect();
            let keys: Vec<f64> = (0..b).flat_map(|_| shuffled_grid(c * s, 1e-3, r)).collect();
            let x: Vec<f32> = y
                .iter()
                .zip(&keys)
                .map(|(&y, k)| (f64::from(y) + if r.uniform() < 0.5 { -k } else { *k }) as f32)
                .collect();
            Case { shapes: vec![shape, shape], data: vec![x, y] }
        };
        let case = redraw(&mut rng, draw, |case| {
            let keys = case.data[0].iter().zip(&case.data[1]).map(|(x, y)| f64::from(x - y).abs());
            let keys: Vec<f64> = keys.collect();
            (0..b).map(|bi| keys[bi * c * s..(bi + 1) * c * s].to_vec()).collect()
        });
        agree_all_requests(&by_batch, &case, &what);

        // Keys p (1 - y) + (1 - p) y = p or 1 - p on a shuffled grid in (0, 1) per class.
        let draw = |r: &mut Rng| {
            let mut case = draw(r);
            case.data[1].iter_mut().for_each(|v| *v = if *v < 0.5 { 0.0 } else { 1.0 });
            for ci in 0..c {
                let at: Vec<usize> = (0..b).flat_map(|bi| (0..s).map(move |si| (bi * c + ci) * s + si)).collect();
                let keys = shuffled_grid(at.len(), 1.0 / at.len() as f64, r);
                for (&i, k) in at.iter().zip(keys) {
                    let p = if case.data[1][i] == 0.0 { k } else { 1.0 - k };
                    case.data[0][i] = (p / (1.0 - p)).ln() as f32;
                }
            }
            case.shapes.push([1, c, 1]);
            case.data.push((0..c).map(|_| r.range(0.5, 2.0) as f32).collect());
            case
        };
        let case = redraw(&mut rng, draw, |case| {
            let key = |i: usize| {
                let p = 1.0 / (1.0 + (-f64::from(case.data[0][i])).exp());
                let y = f64::from(case.data[1][i]);
                p * (1.0 - y) + (1.0 - p) * y
            };
            (0..c)
                .map(|ci| (0..b).flat_map(|bi| (0..s).map(move |si| (bi * c + ci) * s + si)).map(key).collect())
                .collect()
        });
        agree_all_requests(&by_class, &case, &what);
    }
}

#[test]
fn ties_in_the_key_keep_element_order() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    // Exact ties: x on a coarse grid, so e = 1 - x (2y - 1) takes five values.
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    let per_image = Loss::compile("lovasz_hinge_per_image", "").expect("compiles");
    for shape in [[1, 1, 4099], [3, 1, 1000]] {
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|_| rng.below(5) as f32 * 0.5 - 1.0).collect();
        let y: Vec<f32> = (0..n).map(|_| rng.below(2) as f32).collect();
        let case = Case { shapes: vec![shape, shape], data: vec![x, y] };
        agree(&loss, &case, &[true, true], &format!("ties {shape:?} (seed {seed})"));
        agree(&per_image, &case, &[true, true], &format!("ties {shape:?} (seed {seed})"));
    }
    // lovasz_softmax with one class: every error is |1 - 1| = 0.
    let softmax = Loss::compile("lovasz_softmax", "").expect("compiles");
    let case = Case { shapes: vec![[2, 1, 50]; 2], data: vec![vec![0.3; 100], vec![1.0; 100]] };
    agree(&softmax, &case, &[true, true], "all ties");
}

#[test]
fn broadcast_inputs_get_gradients_summed_over_their_copies() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    // y shared by every batch item: d/dy sums over the batch.
    let draw = |r: &mut Rng| {
        let x: Vec<f32> = (0..3 * 300).map(|_| r.normal() as f32).collect();
        let y: Vec<f32> = (0..300).map(|_| r.below(2) as f32).collect();
        Case { shapes: vec![[3, 1, 300], [1, 1, 300]], data: vec![x, y] }
    };
    let case = redraw(&mut rng, draw, |case| {
        let (x, y) = (&case.data[0], &case.data[1]);
        vec![(0..900).map(|i| 1.0 - f64::from(x[i]) * (2.0 * f64::from(y[i % 300]) - 1.0)).collect()]
    });
    agree(&loss, &case, &[true, true], &format!("broadcast y (seed {seed})"));
    // A scalar x broadcast over everything: exact ties everywhere.
    let y: Vec<f32> = (0..800).map(|_| rng.below(2) as f32).collect();
    let case = Case { shapes: vec![[1, 1, 1], [2, 1, 400]], data: vec![vec![0.7], y] };
    agree(&loss, &case, &[true, true], &format!("scalar x (seed {seed})"));
    // x and a broadcast b share one gradient node: only x's can be written in sorted order.
    let shared = Loss::compile(
        "loss f(x, b, y) { let e = 1 - (x + b) * (2 * y - 1); sorted (e desc, g = y) { lovasz_dot(relu(e), g) } }",
        "",
    )
    .expect("compiles");
    let s = 3000;
    // Hinge errors on a grid (keys apart), with x + b in place of x.
    let draw = |r: &mut Rng| {
        let h = hinge_case([2, 3, s], 1e-3, r);
        let b: Vec<f32> = (0..s).map(|_| (0.1 * r.normal()) as f32).collect();
        let x: Vec<f32> = h.data[0].iter().enumerate().map(|(i, &x)| x - b[i % s]).collect();
        Case { shapes: vec![[2, 3, s], [1, 1, s], [2, 3, s]], data: vec![x, b, h.data[1].clone()] }
    };
    let case = redraw(&mut rng, draw, |case| {
        let (x, b, y) = (&case.data[0], &case.data[1], &case.data[2]);
        let e = |i: usize| 1.0 - (f64::from(x[i]) + f64::from(b[i % s])) * (2.0 * f64::from(y[i]) - 1.0);
        vec![(0..6 * s).map(e).collect()]
    });
    agree(&shared, &case, &[true, true, true], &format!("shared gradient, broadcast b (seed {seed})"));
}

#[test]
fn bitwise_identical_for_any_thread_count() {
    let seed: u64 = rand::random();
    let cases: Vec<(Loss, Case)> = vec![
        (Loss::compile("lovasz_hinge", "").expect("compiles"), hinge_case([1, 1, 300_001], 1e-3, &mut Rng::new(seed))),
        (
            Loss::compile("lovasz_hinge_per_image", "").expect("compiles"),
            hinge_case([3, 1, 40_000], 1e-3, &mut Rng::new(seed)),
        ),
        (Loss::compile("lovasz_softmax", "").expect("compiles"), softmax_case([2, 4, 30_000], &mut Rng::new(seed))),
        (Loss::compile(USER_BY_BATCH, "").expect("compiles"), hinge_case([3, 2, 20_000], 1e-3, &mut Rng::new(seed))),
    ];
    for (loss, case) in &cases {
        let want = vec![true; case.data.len()];
        let results: Vec<(u64, Vec<Vec<u32>>)> = [1, 2, 7]
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
                let (v, g) = pool.install(|| run(loss, case, &want));
                (v.to_bits(), g.into_iter().map(|g| g.expect("asked").iter().map(|x| x.to_bits()).collect()).collect())
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{} differs across thread counts (seed {seed})", loss.name());
    }
}

#[test]
fn four_million_elements_still_agree() {
    let seed: u64 = rand::random();
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    let case = hinge_case([1, 1, 1 << 22], 1e-4, &mut Rng::new(seed));
    agree(&loss, &case, &[true, true], &format!("4M (seed {seed})"));
}

#[test]
fn nan_and_inf_inputs_give_what_the_reference_gives() {
    let seed: u64 = rand::random();
    for name in ["lovasz_hinge", "lovasz_hinge_per_image", "lovasz_softmax"] {
        let loss = Loss::compile(name, "").expect("compiles");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 17, 599] {
                let mut case = softmax_case([2, 3, 100], &mut Rng::new(seed));
                case.data[at % 2][at] = bad;
                let (value, grads) = run(&loss, &case, &[true, true]);
                let tensors = case.tensors();
                let want = loss.eval(&tensors.iter().collect::<Vec<_>>()).expect("reference");
                let what = format!("{name} with {bad} at {at} (seed {seed}): {value} vs reference {want}");
                // An infinite logit on the right side of the hinge costs nothing: finite is right then.
                if want.is_finite() {
                    assert!((value - want).abs() <= TOL * want.abs().max(1e-12), "{what}");
                } else {
                    assert!(!value.is_finite() && value.is_nan() == want.is_nan(), "{what}");
                }
                if bad.is_nan() {
                    assert!(value.is_nan(), "{what}");
                }
                assert!(grads.iter().all(|g| g.as_ref().is_some_and(|g| g.len() == 600)));
            }
        }
    }
}

/// Gathers more inputs than the sort carries in its records (four): the rest are read
/// at the element indices.
const USER_FIVE_GATHERS: &str = "loss h(x, a, b, c, d) {
    sum(sorted (k = x desc, a, b, c, d) {
        let s = cumsum(a * b + c);
        sum(k * s * d) / (1 + sum(a))
    })
}";

#[test]
fn inputs_carried_through_the_sort_or_read_at_indices_agree() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    // A label broadcast over classes is read at the element indices; the same labels
    // given at full size ride in the sort's records. Same value and d/dx, bit for bit.
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    let [b, c, s] = [2, 3, 4000];
    let x: Vec<f32> = (0..b * c * s).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..b * s).map(|_| rng.below(2) as f32).collect();
    let full: Vec<f32> = (0..b * c * s).map(|i| y[(i / (c * s)) * s + i % s]).collect();
    let shared = Case { shapes: vec![[b, c, s], [b, 1, s]], data: vec![x.clone(), y] };
    let carried = Case { shapes: vec![[b, c, s], [b, c, s]], data: vec![x, full] };
    let (v1, g1) = run(&loss, &shared, &[true, false]);
    let (v2, g2) = run(&loss, &carried, &[true, false]);
    assert_eq!(v1.to_bits(), v2.to_bits(), "loss (seed {seed})");
    assert!(g1[0].iter().zip(&g2[0]).all(|(a, b)| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())));

    let five = Loss::compile(USER_FIVE_GATHERS, "").expect("compiles");
    let n = 20_000;
    let data: Vec<Vec<f32>> = (0..5).map(|_| (0..n).map(|_| rng.normal() as f32).collect()).collect();
    let case = Case { shapes: vec![[1, 1, n]; 5], data };
    agree_all_requests(&five, &case, &format!("five gathered inputs (seed {seed})"));
}
