//! The native engine (Cranelift kernels per sweep) against the f64 reference evaluator,
//! and bitwise the same for any number of threads.
//!
//! Inputs are rounded to f32 first and the reference runs on the rounded values, so the
//! comparison measures the kernels' arithmetic, not the input conversion. Tolerances: the
//! loss within 1e-5 relative (for a loss whose terms cancel, within 1e-5 of its
//! [`sensitivity`]), each gradient within 1e-5 of its largest magnitude.

mod common;

use lossc::runtime::{self, Engine};
use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor, View};

/// Inputs rounded to f32, as the kernels see them and as f64 tensors for the reference.
fn rounded(inputs: &[Tensor]) -> (Vec<Vec<f32>>, Vec<Tensor>) {
    let data: Vec<Vec<f32>> = inputs.iter().map(|t| t.data.iter().map(|&v| v as f32).collect()).collect();
    let tensors = inputs
        .iter()
        .zip(&data)
        .map(|(t, d)| Tensor::new(t.shape, d.iter().map(|&v| f64::from(v)).collect()))
        .collect();
    (data, tensors)
}

/// Value and every gradient by the native runtime.
fn native(loss: &Loss, shapes: &[[usize; 3]], data: &[Vec<f32>], want: &[bool]) -> (f64, Vec<Vec<f32>>) {
    let views: Vec<View> = shapes.iter().zip(data).map(|(s, d)| View::new(*s, d)).collect();
    let ext = loss.extents(shapes).expect("shapes");
    assert_eq!(runtime::engine(loss, &views, ext, want), Engine::Native, "{} at {shapes:?}", loss.name());
    let mut bufs: Vec<Vec<f32>> = data.iter().map(|d| vec![f32::NAN; d.len()]).collect();
    let mut slots: Vec<Option<&mut [f32]>> =
        bufs.iter_mut().zip(want).map(|(b, &w)| if w { Some(b.as_mut_slice()) } else { None }).collect();
    let value = loss.evaluate(&views, &mut slots).unwrap_or_else(|e| panic!("{}: {e}", loss.name()));
    (value, bufs)
}

fn close_value(got: f64, want: f64) -> bool {
    close_value_at(got, want, 0.0)
}

/// Within 1e-5 relative; for a loss whose terms cancel (its `sensitivity` over 100 times
/// its value), within 1e-5 of that sensitivity.
fn close_value_at(got: f64, want: f64, sensitivity: f64) -> bool {
    let scale = if sensitivity > 100.0 * want.abs() { sensitivity } else { want.abs() };
    (got - want).abs() <= 1e-5 * scale.max(1e-30) || (got.is_nan() && want.is_nan())
}

/// How much the loss moves under relative changes of its inputs: the sum of |x dL/dx| over
/// every element of every input. A loss whose terms cancel (`boundary` is mean(p dist) with
/// signed distances: terms of order 1 summing to 1e-4) cannot be relatively exact in f32:
/// the f32 rounding of each term and partial sum is relative to the terms, and this sum
/// measures them.
fn sensitivity(inputs: &[Tensor], grads: &[Tensor]) -> f64 {
    inputs.iter().zip(grads).flat_map(|(x, g)| x.data.iter().zip(&g.data).map(|(x, g)| (x * g).abs())).sum()
}

/// Checks value and wanted gradients against the reference; returns a failure description.
fn compare(loss: &Loss, inputs: &[Tensor], want: &[bool], what: &str) -> Result<(), String> {
    let (data, tensors) = rounded(inputs);
    let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let (value, grads) = loss.eval_grad(&refs).map_err(|e| e.to_string())?;
    let (got, got_grads) = native(loss, &shapes, &data, want);
    let tiny = loss.extents(&shapes).expect("shapes").iter().product::<usize>() < 8;
    if !close_value_at(got, value, sensitivity(&tensors, &grads)) {
        return Err(format!("{} {what}: loss {got} vs {value}", loss.name()));
    }
    for (i, (g, w)) in got_grads.iter().zip(&grads).enumerate() {
        if !want[i] {
            continue;
        }
        let scale = w.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let tolerance = common::gradient_tolerance(scale, tiny);
        for (k, (a, b)) in g.iter().zip(&w.data).enumerate() {
            let a = f64::from(*a);
            if !common::within(a, *b, tolerance) {
                return Err(format!(
                    "{} {what}: d/d{} [{k}] = {a} vs {b} (max |g| {scale})",
                    loss.name(),
                    loss.inputs()[i].name
                ));
            }
        }
    }
    Ok(())
}

fn stdlib_losses() -> Vec<Loss> {
    lossc::stdlib::stdlib()
        .defs
        .iter()
        .filter_map(|d| Loss::compile(&d.name.name, "").ok())
        .filter(|l| !runtime::has_sort(l))
        .collect()
}

#[test]
fn every_stdlib_loss_agrees_with_the_reference() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let losses = stdlib_losses();
    assert!(losses.len() >= 28, "{}", losses.len());
    let mut failures = Vec::new();
    // Binary, multiclass, batched; sizes that are not multiples of 4 or of the block.
    for ext in [[1, 1, 1], [1, 1, 7], [2, 1, 4099], [3, 4, 1030], [2, 5, 2048 + 13]] {
        for loss in &losses {
            // On one element MCC's denominator is its smoothing term: the gradient of the
            // targets is cancellation noise (about 1e-13 in f64, 1e-4 in f32).
            if loss.name() == "mcc" && ext == [1, 1, 1] {
                continue;
            }
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let all = vec![true; inputs.len()];
            if let Err(e) = compare(loss, &inputs, &all, &format!("at {ext:?}")) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// Probabilities of exactly 0 and 1 (a saturated sigmoid in float32) against the
/// reference: the clamped logs of `bce`, `combo` and `unified_focal` must stop at eps
/// itself, not at the float32 rounding of 1 - eps (1% off in the value, more in d/dy).
#[test]
fn saturated_probabilities_agree_with_the_reference() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for name in ["bce", "combo", "unified_focal", "dice", "tversky"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let mut inputs = synth::inputs(loss.inputs(), [2, 1, 203], &mut rng);
        let (p, y) = inputs.split_at_mut(1);
        // 0 and 1, and just inside and outside the float32 clamp bounds, where 1 - p rounds
        // onto 1 - eps: the gradient must be the clamp's (0 outside), as in the reference.
        let below_eps = f64::from(f32::from_bits(1e-7f32.to_bits() - 1));
        let edges = [1.0, 0.0, below_eps, 9.5e-8, 9e-8, 1e-7, 1.0 - 6e-8, 1.0 - 1.2e-7];
        for (k, (p, y)) in p[0].data.iter_mut().zip(&mut y[0].data).enumerate().take(64) {
            *p = f64::from(edges[k % edges.len()] as f32);
            *y = if (k / edges.len()) % 2 == 0 { 1.0 } else { 0.0 };
        }
        compare(&loss, &inputs, &[true, true], "at p = 0, 1 and the clamp's edges")
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    // `1 - clamp(p, lo, hi)` with lo > hi is 1 - hi everywhere (the clamp's min is last).
    let loss = Loss::compile("loss f(p) = mean(1 - clamp(p, 0.8, 0.2));", "").expect("compiles");
    let p: Vec<f32> = (0..37).map(|_| rng.uniform() as f32).collect();
    let views = [View::new([1, 1, 37], &p)];
    let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
    let native = loss.evaluate(&views, &mut []).expect("evaluates");
    let reference = loss.eval(&tensors.iter().collect::<Vec<_>>()).expect("evaluates");
    assert!((native - 0.8).abs() < 1e-6 && (reference - 0.8).abs() < 1e-12, "{native} {reference}");
}

/// Far out in the tail every element of the gradient keeps its relative accuracy in the
/// losses whose second sweep reads sigmoid(x) back from the first: the value carried is
/// the smaller of sigmoid(x) and sigmoid(-x), not sigmoid(x), whose 1 - sigmoid(x) rounds
/// to 0 above x = 17 in float32.
#[test]
fn sigmoid_tails_keep_their_accuracy_across_sweeps() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let n = 203;
    let x: Vec<f32> = (0..n).map(|_| (rng.uniform() * 80.0 - 40.0) as f32).collect();
    let y: Vec<f32> = (0..n).map(|_| (rng.uniform() < 0.5) as u8 as f32).collect();
    let views = [View::new([1, 1, n], &x), View::new([1, 1, n], &y)];
    let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
    for name in ["dice_bce", "dice_multilabel", "dice_focal", "loss f(x, y) = sum(sigmoid(x)) / (1 + sum(y));"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let mut g = vec![0.0f32; n];
        loss.evaluate(&views, &mut [Some(&mut g), None]).expect("evaluates");
        let (_, grads) = loss.eval_grad(&tensors.iter().collect::<Vec<_>>()).expect("the reference evaluates");
        for (k, (&a, &b)) in g.iter().zip(&grads[0].data).enumerate() {
            // Below the normal float32 range an element cannot be relatively accurate.
            if b.abs() > 1e-36 {
                let rel = (f64::from(a) - b).abs() / b.abs();
                assert!(rel < 1e-5, "seed {seed}: {name}: d/dx at x = {}: {a} vs {b}", x[k]);
            }
        }
    }
}

#[test]
fn value_only_and_some_gradients() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for name in ["dice", "focal_tversky", "dice_multiclass", "cross_entropy", "bce_logits_masked"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), [2, 3, 999], &mut rng);
        let mut first = vec![false; inputs.len()];
        first[0] = true;
        compare(&loss, &inputs, &first, "first gradient").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        // Value only: no gradient buffers at all.
        let (data, tensors) = rounded(&inputs);
        let views: Vec<View> = inputs.iter().zip(&data).map(|(t, d)| View::new(t.shape, d)).collect();
        let got = loss.evaluate(&views, &mut []).expect("value");
        let want = loss.eval(&tensors.iter().collect::<Vec<_>>()).expect("reference");
        assert!(close_value(got, want), "{name} value only (seed {seed}): {got} vs {want}");
    }
}

#[test]
fn hyperparameters_and_user_losses() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let cases = [
        ("tversky", "alpha=0.2,beta=0.8"),
        ("focal", "gamma=2.5,alpha=0.3"),
        ("focal_tversky", "gamma=1.7"),
        ("combo", "alpha=0.3,ce_ratio=0.6"),
        ("0.5*dice(sigmoid(x), y) + bce_logits(x, y)", ""),
        ("mean(where(x > 0, log1p(exp(-x)), tanh(x) ^ 2) + min(x, y) - max(abs(x), 0.5) * clamp(x, -1, 1))", ""),
        ("mean(softplus(x) * y - log_softmax(x) * y) + mean(sqrt(abs(x)) ^ 1.5)", ""),
        ("mean((x >= 0) + (x <= y) + (x == y) + (x != y) + (x < 1) + relu(x - y))", ""),
    ];
    for (source, params) in cases {
        let loss = Loss::compile(source, params).unwrap_or_else(|e| panic!("{source}: {e}"));
        for ext in [[2, 3, 1501], [1, 1, 6]] {
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let all = vec![true; inputs.len()];
            compare(&loss, &inputs, &all, &format!("{source} at {ext:?}"))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}

/// A kernel of tens of thousands of instructions (a chain of 600 steps with a sigmoid and its
/// gradient) compiles in well under a second and agrees with the reference. Its register
/// allocation used to take time quadratic in its length (15 s for 800).
#[test]
fn very_long_user_losses() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let mut source = String::from("loss chain(x, y) {\n    let a0 = x;\n");
    for i in 1..=600 {
        source += &format!("    let a{i} = a{j} + 0.01 * sigmoid(a{j} - 0.2);\n", j = i - 1);
    }
    source += "    mean(a600 * y + a300)\n}\n";
    let loss = Loss::compile(&source, "").expect("compiles");
    let inputs = synth::inputs(loss.inputs(), [1, 1, 1001], &mut rng);
    compare(&loss, &inputs, &[true, true], "a chain of 600 sigmoids").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// Multiclass sweeps whose sums run in loops of their own after the run is written
/// (`split_sums`): sums of values an earlier sweep stashed (overwritten by then), and of a
/// sigmoid written as a gradient (stored plain, not packed), for each set of gradients.
#[test]
fn sums_after_the_run_is_written() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for src in [
        "loss f(x, y) { let p = softmax(x); let s = mean(p * y); let m = mean(p * p); \
         s * s + mean(sum((p - m) * (p - m), by = class)) }",
        "loss f(x, y) = sum(y * sigmoid(x)) + mean(sum(sigmoid(x), by = class) ^ 2);",
        "dice_multiclass",
        "dice_multilabel",
    ] {
        let loss = Loss::compile(src, "").expect("compiles");
        for classes in [4, 6, 13] {
            let inputs = synth::inputs(loss.inputs(), [2, classes, 37], &mut rng);
            for want in [[true, true], [false, true], [true, false]] {
                compare(&loss, &inputs, &want, &format!("{src} at C = {classes}, {want:?}"))
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            }
        }
    }
}

/// Values broadcast under a constant adjoint (see gradcheck's test of the same name): the
/// kernels agree with the reference.
#[test]
fn broadcast_values_under_constant_adjoints() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for (src, shapes) in [
        ("mean(x + sum(y)) + mean(x * y)", vec![[2, 3, 1001], [2, 3, 1001]]),
        ("0.5 * dice_multiclass(x, y) + 0.1 * mean(log_softmax(x))", vec![[2, 4, 1001], [2, 4, 1001]]),
        ("loss f(x, w[class]) = mean(sigmoid(x) + w);", vec![[2, 3, 1001], [1, 3, 1]]),
    ] {
        let loss = Loss::compile(src, "").expect("compiles");
        let inputs: Vec<Tensor> =
            shapes.iter().map(|&s| Tensor::new(s, (0..s.iter().product()).map(|_| rng.normal()).collect())).collect();
        let all = vec![true; inputs.len()];
        compare(&loss, &inputs, &all, src).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn broadcast_inputs() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    // Targets with one class row for three classes, weights per class, a map shared by the batch.
    let loss = Loss::compile("dice(p, y) + mean(w * p) + mean(p * d)", "").expect("compiles");
    let shapes = [[2, 3, 1500], [2, 1, 1500], [1, 3, 1], [1, 1, 1500]];
    let inputs: Vec<Tensor> =
        shapes.iter().map(|&s| Tensor::new(s, (0..s.iter().product()).map(|_| rng.uniform()).collect())).collect();
    // Gradients of inputs broadcast over classes (summed) and of class weights (tail values).
    compare(&loss, &inputs, &[true, true, true, false], "broadcast").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    // An input constant along the spatial axis is read by splatting.
    let shapes = [[2, 3, 1500], [2, 3, 1]];
    let loss = Loss::compile("mean(sigmoid(x) * y)", "").expect("compiles");
    let inputs: Vec<Tensor> =
        shapes.iter().map(|&s| Tensor::new(s, (0..s.iter().product()).map(|_| rng.normal()).collect())).collect();
    compare(&loss, &inputs, &[true, false], "spatial broadcast").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// At 4M elements a plain f32 running sum would drift; block sums in f32 combined in f64 do not.
#[test]
fn four_million_elements() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for (name, ext) in [("dice", [1, 1, 1 << 22]), ("focal", [4, 1, 1 << 20]), ("dice_multiclass", [2, 4, 1 << 19])] {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
        let mut first = vec![false; inputs.len()];
        first[0] = true;
        compare(&loss, &inputs, &first, &format!("at {ext:?}")).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn results_are_bitwise_identical_for_any_thread_count() {
    let seed = common::seed();
    // Above and below the size that runs on the calling thread alone.
    for (name, extents) in
        ["dice", "dice_multiclass", "focal", "tversky_per_image", "cross_entropy_index", "generalized_dice"]
            .into_iter()
            .flat_map(|name| [(name, [3, 4, 30_001]), (name, [2, 3, 1_001])])
    {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), extents, &mut Rng::new(seed));
        let (data, _) = rounded(&inputs);
        let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
        let all = vec![true; inputs.len()];
        // In pools of 1, 2 and 7 threads, and from this thread (outside any pool: the
        // global pool's).
        let mut results: Vec<(f64, Vec<Vec<f32>>)> = [1, 2, 7]
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
                pool.install(|| native(&loss, &shapes, &data, &all))
            })
            .collect();
        results.push(native(&loss, &shapes, &data, &all));
        for r in &results[1..] {
            assert_eq!(r.0.to_bits(), results[0].0.to_bits(), "{name} (seed {seed})");
            for (a, b) in r.1.iter().zip(&results[0].1) {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} (seed {seed})");
            }
        }
    }
}

/// First calls from many threads at once: each compiles kernels on the thread pool, and a
/// pool thread waiting for one compilation may take up another thread's evaluation.
#[test]
fn concurrent_first_calls_compile_without_deadlock() {
    let seed = common::seed();
    for name in ["focal", "dice", "bce"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), [1, 1, 70_001], &mut Rng::new(seed));
        let (data, _) = rounded(&inputs);
        let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
        let all = vec![true; inputs.len()];
        let results: Vec<(f64, Vec<Vec<f32>>)> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..8).map(|_| s.spawn(|| native(&loss, &shapes, &data, &all))).collect();
            runs.into_iter().map(|r| r.join().expect("no panic")).collect()
        });
        for r in &results[1..] {
            assert_eq!(r.0.to_bits(), results[0].0.to_bits(), "{name} (seed {seed})");
        }
    }
}

#[test]
fn non_finite_inputs_give_nan_not_a_crash() {
    let loss = Loss::compile("dice", "").expect("compiles");
    let mut p: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
    p[37] = f32::NAN;
    let y: Vec<f32> = (0..100).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let mut g = vec![0.0f32; 100];
    let views = [View::new([1, 1, 100], &p), View::new([1, 1, 100], &y)];
    let value = loss.evaluate(&views, &mut [Some(&mut g), None]).expect("evaluates");
    assert!(value.is_nan());
}

/// Infinite and huge logits through sigmoid and softplus of x and of -x (which share
/// e^-|x| and take max(x, 0) and min(x, 0) apart): the reference's values and gradients.
#[test]
fn infinite_logits_give_the_reference_values() {
    let x = [f32::INFINITY, f32::NEG_INFINITY, 0.0, 3.5, -3.5, 1e30, -1e30, 20.0, -20.0];
    let n = x.len();
    let y: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    let views = [View::new([1, 1, n], &x), View::new([1, 1, n], &y)];
    let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
    let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs().max(1e-30);
    for source in [
        "sum(softplus(-x))",
        "sum(softplus(x) * y)",
        "sum(sigmoid(x) + 2 * sigmoid(-x))",
        "sum(log(sigmoid(x)) * y)",
        "sum(softplus(-x) * y + softplus(x))",
    ] {
        let loss = Loss::compile(&format!("loss f(x, y) = {source};"), "").expect("compiles");
        let mut g = vec![0.0f32; n];
        let got = loss.evaluate(&views, &mut [Some(&mut g), None]).expect("evaluates");
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let (want, grads) = loss.eval_grad(&refs).expect("the reference evaluates");
        assert!(same(got, want), "{source}: native {got}, reference {want}");
        for (i, (&a, &b)) in g.iter().zip(&grads[0].data).enumerate() {
            assert!(same(f64::from(a), b), "{source}: d/dx at x = {}: native {a}, reference {b}", x[i]);
        }
    }
}

/// An infinite logit makes the class log-sum-exp infinite, as in the reference: +inf in
/// another class than the label gives the loss +inf, not NaN (the shifted exponentials
/// are NaN there, inf - inf, which must not be taken for a NaN input).
#[test]
fn infinite_logits_through_the_class_log_sum_exp() {
    let (c, s) = (3, 8);
    let mut x: Vec<f32> = (0..c * s).map(|i| ((i * 7) % 11) as f32 / 3.0 - 1.5).collect();
    let labels: Vec<usize> = (0..s).map(|k| k % c).collect();
    let mut y = vec![0.0f32; c * s];
    for (k, &l) in labels.iter().enumerate() {
        y[l * s + k] = 1.0;
    }
    x[((labels[5] + 1) % c) * s + 5] = f32::INFINITY;
    let views = [View::new([1, c, s], &x), View::new([1, c, s], &y)];
    let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let source = "loss f(x, y) = sum(where(y > 0.5, -log_softmax(x), 0));";
    let loss = Loss::compile(source, "").expect("compiles");
    let got = loss.evaluate(&views, &mut [None, None]).expect("evaluates");
    let (want, _) = loss.eval_grad(&refs).expect("the reference evaluates");
    assert_eq!(want, f64::INFINITY, "the reference");
    assert_eq!(got, want, "native {got}, reference {want}");
}

/// A logit of -inf in a class other than the label (a class masked out) leaves
/// `cross_entropy_index` finite, as in PyTorch: the label's log-probability is picked with
/// `where`, not by multiplying every class's by 0 or 1 (0 * -inf is NaN). Checked against
/// the formula by hand, on both engines. And a label that names no class gives NaN.
#[test]
fn cross_entropy_index_ignores_minus_infinity_in_other_classes_and_flags_bad_labels() {
    let seed = rand::random::<u64>();
    let mut rng = Rng::new(seed);
    let (c, s) = (4usize, 37usize);
    let mut x: Vec<f32> = (0..c * s).map(|_| rng.normal() as f32 * 2.0).collect();
    let t: Vec<f32> = (0..s).map(|_| (rng.uniform() * c as f64).floor() as f32).collect();
    for (k, &label) in t.iter().enumerate() {
        x[((label as usize + 1) % c) * s + k] = f32::NEG_INFINITY;
    }
    let want: f64 = (0..s)
        .map(|k| {
            let logits: Vec<f64> = (0..c).map(|j| f64::from(x[j * s + k])).collect();
            let lse = logits.iter().map(|v| v.exp()).sum::<f64>().ln();
            lse - logits[t[k] as usize]
        })
        .sum::<f64>()
        / s as f64;
    let loss = Loss::compile("cross_entropy_index", "").expect("compiles");
    let views = [View::new([1, c, s], &x), View::new([1, 1, s], &t)];
    let mut g = vec![0.0f32; c * s];
    let native = loss.evaluate(&views, &mut [Some(&mut g), None]).expect("evaluates");
    let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
    let (reference, grads) = loss.eval_grad(&tensors.iter().collect::<Vec<_>>()).expect("the reference evaluates");
    assert!((reference - want).abs() <= 1e-12 * want, "seed {seed}: reference {reference}, by hand {want}");
    assert!((native - want).abs() <= 1e-5 * want, "seed {seed}: native {native}, by hand {want}");
    for (k, (&a, &b)) in g.iter().zip(&grads[0].data).enumerate() {
        assert!(b.is_finite() && (f64::from(a) - b).abs() <= 1e-6, "seed {seed}: d/dx[{k}]: native {a}, reference {b}");
    }

    // A label that names no class makes the loss NaN on both engines; ignore_index does not.
    for bad in [c as f32, -1.0, 1.5, f32::NAN, f32::INFINITY] {
        let mut t = t.clone();
        t[s / 2] = bad;
        let views = [View::new([1, c, s], &x), View::new([1, 1, s], &t)];
        let native = loss.evaluate(&views, &mut []).expect("evaluates");
        let tensors: Vec<Tensor> = views.iter().map(View::to_tensor).collect();
        let reference = loss.eval(&tensors.iter().collect::<Vec<_>>()).expect("the reference evaluates");
        assert!(native.is_nan() && reference.is_nan(), "label {bad}: native {native}, reference {reference}");
        t[s / 2] = -100.0;
        let views = [View::new([1, c, s], &x), View::new([1, 1, s], &t)];
        assert!(loss.evaluate(&views, &mut []).expect("evaluates").is_finite(), "an ignored label");
    }
}

/// NaN in an input reaches the loss and the gradients where the reference has it: through
/// `min`, `max` and `clamp` (one `minps`/`maxps` each, which alone would drop a NaN) and
/// through the class log-sum-exp (whose maximum skips NaNs; the sum catches them).
#[test]
fn nan_inputs_propagate_through_min_max_and_logsumexp() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for source in
        ["bce", "combo", "dice_multiclass", "cross_entropy", "mean(min(x, y) + max(y, x) + max(x, 0.3) + min(0.7, x))"]
    {
        let loss = Loss::compile(source, "").expect("compiles");
        for at in [0, 5, 4100] {
            let mut inputs = synth::inputs(loss.inputs(), [2, 3, 2051], &mut rng);
            inputs[0].data[at] = f64::NAN;
            let all = vec![true; inputs.len()];
            compare(&loss, &inputs, &all, &format!("NaN at {at}")).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
            let (got, _) = native(&loss, &shapes, &rounded(&inputs).0, &all);
            assert!(got.is_nan(), "{source}: NaN at {at} gives {got}");
        }
    }
}
