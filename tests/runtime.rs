//! The blocked runtime (sweeps over blocks, in parallel) against the reference
//! evaluator, and bitwise the same for any number of threads.

use lossc::runtime::{self, Backend};
use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor, View};

fn blockable_losses() -> Vec<Loss> {
    lossc::stdlib::stdlib()
        .defs
        .iter()
        .filter_map(|d| Loss::compile(&d.name.name, "").ok())
        .filter(|l| !l.name().starts_with("lovasz"))
        .collect()
}

fn run(loss: &Loss, inputs: &[Tensor]) -> (f64, Vec<Tensor>) {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    lossc::runtime::blocked::evaluate(loss, &refs, true).unwrap_or_else(|e| panic!("{}: {e}", loss.name()))
}

#[test]
fn blocked_sweeps_agree_with_the_reference() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let losses = blockable_losses();
    assert!(losses.len() >= 25);
    // Several blocks per batch item, a ragged last block, and a single element.
    for ext in [[2, 3, 2500], [3, 1, 1030], [1, 1, 1]] {
        for loss in &losses {
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let (want, want_grads) = loss.eval_grad(&refs).expect("reference");
            let (got, grads) = run(loss, &inputs);
            let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-12 * scale || (a.is_nan() && b.is_nan());
            assert!(
                close(got, want, want.abs().max(1e-300)),
                "{} at {ext:?} (seed {seed}): {got} vs {want}",
                loss.name()
            );
            for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
                assert_eq!(g.shape, w.shape);
                let scale = w.data.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
                for (a, b) in g.data.iter().zip(&w.data) {
                    assert!(close(*a, *b, scale), "{} d/d{} at {ext:?} (seed {seed}): {a} vs {b}", loss.name(), i);
                }
            }
        }
    }
}

#[test]
fn results_are_bitwise_identical_for_any_thread_count() {
    let seed: u64 = rand::random();
    for name in ["dice", "dice_multiclass", "focal", "tversky_per_image", "cross_entropy_index"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), [3, 4, 3000], &mut Rng::new(seed));
        let results: Vec<(f64, Vec<Tensor>)> = [1, 2, 7]
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
                pool.install(|| run(&loss, &inputs))
            })
            .collect();
        for r in &results[1..] {
            assert_eq!(r.0.to_bits(), results[0].0.to_bits(), "{name} (seed {seed})");
            for (a, b) in r.1.iter().zip(&results[0].1) {
                assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} (seed {seed})");
            }
        }
    }
}

#[test]
fn inputs_broadcast_across_blocks() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let loss = Loss::compile("dice(p, y) + mean(w * p)", "").expect("compiles");
    let shapes = [[2, 3, 1500], [2, 1, 1500], [1, 3, 1]];
    let inputs: Vec<Tensor> =
        shapes.iter().map(|&s| Tensor::new(s, (0..s.iter().product()).map(|_| rng.uniform()).collect())).collect();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let (want, want_grads) = loss.eval_grad(&refs).expect("reference");
    let (got, grads) = run(&loss, &inputs);
    assert!((got - want).abs() <= 1e-12 * want.abs(), "seed {seed}");
    for (g, w) in grads.iter().zip(&want_grads) {
        let scale = w.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(g.data.iter().zip(&w.data).all(|(a, b)| (a - b).abs() <= 1e-12 * scale), "seed {seed}");
    }
}

#[test]
fn sorting_is_reported_not_run() {
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    let inputs = synth::inputs(loss.inputs(), [1, 1, 8], &mut Rng::new(1));
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let err = lossc::runtime::blocked::evaluate(&loss, &refs, true).expect_err("not supported yet");
    assert!(err.to_string().contains("sorting"), "{err}");
}

/// Small inputs whose broadcast is vast (x [2^22, 1, 1] against y [1, 1, 2^22]: 2^44
/// elements from two 16 MB arrays) are refused with a shape error before any engine
/// allocates for the broadcast: a failed allocation would abort the caller's process.
#[test]
fn an_outer_product_broadcast_is_an_error_not_an_abort() {
    let n = 1usize << 22;
    let mut rng = lossc::synth::Rng::new(rand::random());
    let a: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
    let views = [View::new([n, 1, 1], &a), View::new([1, 1, n], &b)];
    for (name, backend, engine) in [
        ("dice", Backend::Jit, "native engine"),
        ("lovasz_hinge", Backend::Jit, "sort"),
        ("dice", Backend::Interp, "reference"),
    ] {
        let loss = Loss::compile(name, "").expect("compiles");
        let mut ga = vec![0.0f32; n];
        let err = runtime::evaluate(&loss, backend, &views, &mut [Some(&mut ga), None])
            .expect_err("2^44 broadcast elements from inputs of 2^22");
        let message = err.to_string();
        assert!(matches!(err, lossc::Error::Shape(_)), "{name} on the {engine}: {message}");
        assert!(message.contains("[4194304, 1, 4194304]") && message.contains("full shape"), "{name}: {message}");
    }
}

/// What the kernels cannot take runs on the interpreters rather than failing: a loss with
/// more values per position than the kernels take (thousands of `let`s), and reductions
/// across the batch that keep positions (which the per-block interpreter cannot run
/// either: the whole-tensor one does).
#[test]
fn what_the_kernels_cannot_take_runs_on_the_interpreters() {
    let seed: u64 = rand::random();
    let mut rng = Rng::new(seed);
    let mut long = String::from("loss chain(x) {\n  let a0 = x;\n");
    for i in 1..2000 {
        long += &format!("  let a{i} = a{} * 0.999 + x * {i};\n", i - 1);
    }
    long += "  mean(a1999 * a1999) / 1e12\n}";
    for (src, ext, why) in [
        (long.as_str(), [2, 16, 50], "values per position"),
        ("sum(exp(mean(x, by = spatial)))", [3, 4, 70], "over elements"),
        ("sum(sum(x, by = (class, spatial)) ^ 2) + mean(x * x)", [3, 4, 70], "over elements"),
    ] {
        let loss = Loss::compile(src, "").unwrap_or_else(|e| panic!("{e}"));
        let x: Vec<f32> = (0..ext.iter().product::<usize>()).map(|_| rng.normal() as f32).collect();
        let views = [View::new(ext, &x)];
        match runtime::engine(&loss, &views, ext, &[true]) {
            runtime::Engine::Blocked(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{src}: {other:?}"),
        }
        let mut dx = vec![f32::NAN; x.len()];
        let got = loss.evaluate(&views, &mut [Some(&mut dx)]).unwrap_or_else(|e| panic!("{src}: {e}"));
        let t = Tensor::new(ext, x.iter().map(|&v| f64::from(v)).collect());
        let (want, grads) = loss.eval_grad(&[&t]).expect("reference");
        assert!((got - want).abs() <= 1e-9 * want.abs(), "{src} (seed {seed}): {got} vs {want}");
        let scale = grads[0].data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (k, (a, b)) in dx.iter().zip(&grads[0].data).enumerate() {
            assert!((f64::from(*a) - b).abs() <= 1e-6 * scale, "{src} (seed {seed}): d/dx[{k}] = {a} vs {b}");
        }
    }
}
