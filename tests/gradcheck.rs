//! The symbolic gradient of every stdlib loss, evaluated by the reference
//! interpreter, against central finite differences in f64.

use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor};

/// Every stdlib definition that is a scalar loss.
fn stdlib_losses() -> Vec<Loss> {
    lossc::stdlib::stdlib().defs.iter().filter_map(|d| Loss::compile(&d.name.name, "").ok()).collect()
}

/// Inputs that are index labels: compared with `==`, so finite differences are meaningless.
fn is_label(name: &str) -> bool {
    name == "t"
}

/// Keeps sort keys apart and away from the relu/abs kinks, so that a step of `h`
/// changes neither the sort order nor the side of a kink.
fn away_from_kinks(loss: &Loss, inputs: &[Tensor]) -> bool {
    let name = loss.name();
    if !name.starts_with("lovasz") {
        return true;
    }
    let (x, y) = (&inputs[0], &inputs[1]);
    let mut keys: Vec<f64> = if name == "lovasz_softmax" {
        // The sort keys are |y - softmax(x)| over the class axis.
        let [b, c, s] = x.shape;
        let mut keys = Vec::new();
        for bi in 0..b {
            for si in 0..s {
                let at = |ci: usize| (bi * c + ci) * s + si;
                let z: f64 = (0..c).map(|ci| x.data[at(ci)].exp()).sum();
                keys.extend((0..c).map(|ci| (y.data[at(ci)] - x.data[at(ci)].exp() / z).abs()));
            }
        }
        keys
    } else {
        x.data.iter().zip(&y.data).map(|(x, y)| 1.0 - x * (2.0 * y - 1.0)).collect()
    };
    if keys.iter().any(|k| k.abs() < 1e-3) {
        return false;
    }
    // One step moves one key by at most about 2 |x| h (hinge) or h (softmax errors).
    let gap = if name == "lovasz_softmax" { 3e-5 } else { 2e-4 };
    keys.sort_by(f64::total_cmp);
    keys.windows(2).all(|w| w[1] - w[0] > gap)
}

/// `soft`: targets drawn from (0.05, 0.95) instead of {0, 1} (so that a step of h
/// never leaves the domain, e.g. for one-element inputs).
fn check(loss: &Loss, ext: [usize; 3], seed: u64, soft: bool) {
    let mut rng = Rng::new(seed);
    let inputs = loop {
        let mut candidate = synth::inputs(loss.inputs(), ext, &mut rng);
        if soft {
            for (spec, t) in loss.inputs().iter().zip(&mut candidate) {
                if spec.name == "y" {
                    t.data.iter_mut().for_each(|v| *v = rng.range(0.05, 0.95));
                }
            }
        }
        // A mask or label set that ignores everything gives NaN by definition (as PyTorch).
        let defined = loss.eval(&candidate.iter().collect::<Vec<_>>()).is_ok_and(|v| v.is_finite());
        if defined && away_from_kinks(loss, &candidate) {
            break candidate;
        }
    };
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let (_, grads) = loss.eval_grad(&refs).expect("evaluates");
    for (i, spec) in loss.inputs().iter().enumerate() {
        if is_label(&spec.name) {
            assert!(grads[i].data.iter().all(|&g| g == 0.0), "{}: labels get no gradient", loss.name());
            continue;
        }
        // The floor keeps rounding noise (about 1e-11 absolute) from counting where the gradient is 0.
        let scale = grads[i].data.iter().fold(0.0f64, |m, g| m.max(g.abs())).max(1e-4);
        let f = |t: &Vec<Tensor>| loss.eval(&t.iter().collect::<Vec<_>>()).expect("evaluates");
        let central = |k: usize, h: f64| {
            let mut plus = inputs.clone();
            plus[i].data[k] += h;
            let mut minus = inputs.clone();
            minus[i].data[k] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        };
        for k in 0..inputs[i].len() {
            let h = 1e-5 * inputs[i].data[k].abs().max(1.0);
            let mut fd = central(k, h);
            let mut err = (fd - grads[i].data[k]).abs() / scale;
            if err >= 1e-6 {
                // A kink (a clamp, max, abs) within h of the point averages two slopes: a
                // step ten times smaller is past it, unless the gradient is wrong.
                fd = central(k, h / 10.0);
                err = (fd - grads[i].data[k]).abs() / scale;
            }
            assert!(
                err < 1e-6,
                "{} d/d{}[{k}] at {ext:?} (seed {seed}): symbolic {} vs finite difference {fd} (relative error {err:.2e})",
                loss.name(),
                spec.name,
                grads[i].data[k]
            );
        }
    }
}

#[test]
fn every_stdlib_gradient_matches_finite_differences() {
    let losses = stdlib_losses();
    assert!(losses.len() >= 25, "only {} stdlib losses", losses.len());
    for loss in &losses {
        for ext in [[2, 1, 63], [2, 3, 30], [1, 1, 1]] {
            check(loss, ext, rand::random(), true);
            // With one class and hard labels, lovasz_softmax's errors |y - 1| all tie at 0 or 1:
            // every step crosses a kink. Its soft-label check above covers that shape.
            let all_ties = loss.name() == "lovasz_softmax" && ext[1] == 1;
            if ext != [1, 1, 1] && !all_ties {
                check(loss, ext, rand::random(), false);
            }
        }
    }
}

#[test]
fn non_default_hyperparameters() {
    for (name, params) in [
        ("tversky", "alpha=0.3,beta=0.7"),
        ("focal_tversky", "gamma=0.75"),
        ("focal", "alpha=0.4,gamma=1.5"),
        ("bce_logits", "pos_weight=2,label_smoothing=0.1"),
        ("cross_entropy", "label_smoothing=0.1"),
        ("combo", "alpha=0.7,ce_ratio=0.3"),
        ("unified_focal", "weight=0.3,delta=0.7,gamma=0.3"),
    ] {
        let loss = Loss::compile(name, params).expect("compiles");
        check(&loss, [2, 3, 11], rand::random(), false);
    }
}

#[test]
fn user_expressions_and_broadcast_inputs() {
    for src in [
        "0.5 * dice(sigmoid(x), y) + bce_logits(x, y)",
        "0.7 * tversky(sigmoid(x), y, alpha = 0.3, beta = 0.7) + 0.3 * bce_logits(x, y)",
        "mean(where(x > 0, x ^ 2, exp(x) - 1) * y) + sum(w * sum(softmax(x), by = class)) / 100",
        "loss f(x, y, w[class]) { let p = softmax(x); mean(w * (p - y) ^ 2) + log(sum(exp(x))) / 1000 }",
        "mean(tanh(x) * sqrt(1 + x * x) + log1p(x * x) + abs(x - 0.5) * y + min(x, y) + max(x, 0.2 * y))",
    ] {
        let loss = Loss::compile(src, "").unwrap_or_else(|e| panic!("{src}: {e}"));
        check(&loss, [2, 3, 7], rand::random(), true);
    }
}

/// Finite differences on explicitly shaped inputs (fresh normal values).
fn check_shapes(src: &str, shapes: &[[usize; 3]], seed: u64) {
    let loss = Loss::compile(src, "").unwrap_or_else(|e| panic!("{src}: {e}"));
    let mut rng = Rng::new(seed);
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|&s| Tensor::new(s, (0..s.iter().product::<usize>()).map(|_| rng.range(0.1, 2.0)).collect()))
        .collect();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let (_, grads) = loss.eval_grad(&refs).expect("evaluates");
    for (i, t) in inputs.iter().enumerate() {
        assert_eq!(grads[i].shape, t.shape, "{src}: the gradient has the input's shape");
        for k in 0..t.len() {
            let h = 1e-5;
            let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
            plus[i].data[k] += h;
            minus[i].data[k] -= h;
            let f = |t: &Vec<Tensor>| loss.eval(&t.iter().collect::<Vec<_>>()).expect("evaluates");
            let fd = (f(&plus) - f(&minus)) / (2.0 * h);
            let err = (fd - grads[i].data[k]).abs() / fd.abs().max(1e-3);
            assert!(err < 1e-6, "{src} input {i}[{k}] (seed {seed}): {} vs {fd}", grads[i].data[k]);
        }
    }
}

/// A value broadcast inside an elementwise op whose adjoint is constant along the
/// broadcast axes (a mean's 1/N): its gradient sums the adjoint over those axes, N times.
#[test]
fn broadcast_values_under_constant_adjoints() {
    let seed = rand::random();
    let s = [2, 3, 5];
    check_shapes("mean(x + sum(y))", &[s, s], seed);
    check_shapes("sum(sum(x, by = (batch, spatial)) + y)", &[s, s], seed);
    check_shapes("sum(x - mean(x)) + mean(x * x)", &[s], seed);
    check_shapes("mean(exp(x) + mean(y) ^ 2)", &[s, s], seed);
    check_shapes("loss f(x, t[batch, spatial]) = sum(x + t);", &[s, [2, 1, 5]], seed);
    check_shapes("loss f(x, w[class]) = sum(x * x + w);", &[s, [1, 3, 1]], seed);
    check_shapes("mean(log_softmax(x))", &[s], seed);
    check_shapes("loss f(x, m[batch, spatial]) = -mean(log_softmax(x), mask = m);", &[s, [2, 1, 5]], seed);
    // In a sorted block: an outer value added to each element of a group.
    check_shapes("mean(sorted (k = x asc, v = y; by = batch) { sum(v + mean(y)) })", &[s, s], seed);
    check_shapes("sum(sorted (k = x asc, v = y) { sum(cumsum(v) * 0.5 + mean(y) * v) })", &[s, s], seed);
}

/// Inputs given with extent 1 along an axis they may vary over are used once per
/// element there; their gradient sums those uses.
#[test]
fn inputs_broadcast_at_run_time() {
    let seed = rand::random();
    check_shapes("mean(p) + mean(y)", &[[1, 1, 4], [2, 1, 4]], seed);
    check_shapes(
        "loss f(x, y, w) = sum(w * sum(x * y, by = class)) / sum(w);",
        &[[2, 3, 4], [2, 3, 4], [1, 3, 1]],
        seed,
    );
    check_shapes("dice(p, y) + sum(w)", &[[2, 3, 5], [2, 1, 5], [1, 3, 1]], seed);
    check_shapes(
        "loss f(x, m[batch, spatial]) = sorted (e = x desc, mm = m) { sum(relu(e)) / sum(mm) };",
        &[[2, 3, 4], [2, 1, 4]],
        seed,
    );
    check_shapes("loss f(w[class]) = sorted (k = w desc) { sum(k * k) };", &[[1, 3, 1]], seed);
}
