//! Every stdlib loss against a plain-Rust transcription of its published formula.
//!
//! The references below are written from the loss specifications (and the cited
//! papers: Lin et al. 2017 for focal, Sudre et al. 2017 for generalized Dice,
//! Berman et al. 2018 for Lovász, Yeung et al. 2022 for the unified focal loss),
//! not from the `.loss` sources, so that a slip in either shows up as a mismatch.
//! Inputs are drawn with `lossc::synth` from a fresh seed each run; every failure
//! message prints the seed, and `LOSSC_SEED=<n>` replays a run.

use std::collections::HashMap;

use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor};

// ---------------------------------------------------------------------------
// Inputs, broadcast to the full [batch, class, spatial] domain.

/// The inputs of one evaluation, each broadcast to the common extents.
struct Data {
    ext: [usize; 3],
    vals: HashMap<String, Vec<f64>>,
}

impl Data {
    fn new(names: &[String], tensors: &[Tensor]) -> Data {
        let mut ext = [1usize; 3];
        for t in tensors {
            for (e, &n) in ext.iter_mut().zip(&t.shape) {
                *e = (*e).max(n);
            }
        }
        let vals = names.iter().zip(tensors).map(|(n, t)| (n.clone(), broadcast(t, ext))).collect();
        Data { ext, vals }
    }

    fn get(&self, name: &str) -> &[f64] {
        self.vals.get(name).unwrap_or_else(|| panic!("the loss has no input named `{name}`"))
    }

    fn len(&self) -> usize {
        self.ext.iter().product()
    }

    fn at(&self, b: usize, c: usize, s: usize) -> usize {
        (b * self.ext[1] + c) * self.ext[2] + s
    }
}

/// Reads `t` as if it had shape `ext`: an axis of extent 1 repeats.
fn broadcast(t: &Tensor, ext: [usize; 3]) -> Vec<f64> {
    let [tb, tc, ts] = t.shape;
    let mut out = Vec::with_capacity(ext.iter().product());
    for b in 0..ext[0] {
        for c in 0..ext[1] {
            for s in 0..ext[2] {
                let (bi, ci, si) =
                    (if tb == 1 { 0 } else { b }, if tc == 1 { 0 } else { c }, if ts == 1 { 0 } else { s });
                out.push(t.data[(bi * tc + ci) * ts + si]);
            }
        }
    }
    out
}

/// Hyperparameters given to the loss; references fall back to the spec's defaults.
struct Hp(HashMap<String, f64>);

impl Hp {
    fn parse(text: &str) -> Hp {
        let mut m = HashMap::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').expect("hyperparameter as name=value");
            m.insert(k.trim().to_string(), v.trim().parse().expect("hyperparameter value is a number"));
        }
        Hp(m)
    }

    fn get(&self, name: &str, default: f64) -> f64 {
        self.0.get(name).copied().unwrap_or(default)
    }
}

// ---------------------------------------------------------------------------
// Numerical helpers.

/// Neumaier-compensated sum.
fn ksum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for x in xs {
        let t = s + x;
        c += if s.abs() >= x.abs() { (s - t) + x } else { (x - t) + s };
        s = t;
    }
    s + c
}

fn mean(xs: &[f64]) -> f64 {
    ksum(xs.iter().copied()) / xs.len() as f64
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// ln(1 + e^z), stable for large |z|.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn clamp(p: f64, eps: f64) -> f64 {
    p.max(eps).min(1.0 - eps)
}

fn elementwise(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&u, &v)| f(u, v)).collect()
}

/// Sums of `v` grouped by one axis (0 batch, 1 class): entry `k` sums the elements
/// whose index along `axis` is `k`.
fn sums_by(d: &Data, v: &[f64], axis: usize) -> Vec<f64> {
    (0..d.ext[axis])
        .map(|k| {
            let mut items = Vec::new();
            for b in 0..d.ext[0] {
                for c in 0..d.ext[1] {
                    for s in 0..d.ext[2] {
                        if [b, c, s][axis] == k {
                            items.push(v[d.at(b, c, s)]);
                        }
                    }
                }
            }
            ksum(items)
        })
        .collect()
}

/// log_softmax over the class axis, per (b, s).
fn log_softmax(d: &Data, x: &[f64]) -> Vec<f64> {
    let [nb, nc, ns] = d.ext;
    let mut out = vec![0.0; x.len()];
    for b in 0..nb {
        for s in 0..ns {
            let m = (0..nc).map(|c| x[d.at(b, c, s)]).fold(f64::NEG_INFINITY, f64::max);
            let lse = m + ksum((0..nc).map(|c| (x[d.at(b, c, s)] - m).exp())).ln();
            for c in 0..nc {
                out[d.at(b, c, s)] = x[d.at(b, c, s)] - lse;
            }
        }
    }
    out
}

fn softmax(d: &Data, x: &[f64]) -> Vec<f64> {
    log_softmax(d, x).into_iter().map(f64::exp).collect()
}

// ---------------------------------------------------------------------------
// Shared pieces of the formulas.

/// (2 Σpy + s) / (Σp + Σy + s).
fn dice_ratio(p: &[f64], y: &[f64], smooth: f64) -> f64 {
    let i = ksum(p.iter().zip(y).map(|(a, b)| a * b));
    (2.0 * i + smooth) / (ksum(p.iter().copied()) + ksum(y.iter().copied()) + smooth)
}

/// Per-class Dice ratios, sums over (batch, spatial).
fn dice_per_class(d: &Data, p: &[f64], y: &[f64], smooth: f64) -> Vec<f64> {
    let i = sums_by(d, &elementwise(p, y, |a, b| a * b), 1);
    let ps = sums_by(d, p, 1);
    let ys = sums_by(d, y, 1);
    (0..d.ext[1]).map(|c| (2.0 * i[c] + smooth) / (ps[c] + ys[c] + smooth)).collect()
}

fn bce_logits_elem(x: f64, y: f64, pos_weight: f64, ls: f64) -> f64 {
    let y = y * (1.0 - ls) + ls / 2.0;
    pos_weight * y * softplus(-x) + (1.0 - y) * softplus(x)
}

fn bce_logits_value(d: &Data, pos_weight: f64, ls: f64) -> f64 {
    mean(&elementwise(d.get("x"), d.get("y"), |x, y| bce_logits_elem(x, y, pos_weight, ls)))
}

/// Lin et al. 2017, eq. 5, per element with p = σ(x).
fn focal_value(d: &Data, alpha: f64, gamma: f64) -> f64 {
    mean(&elementwise(d.get("x"), d.get("y"), |x, y| {
        let p = sigmoid(x);
        let pt = p * y + (1.0 - p) * (1.0 - y);
        let at = alpha * y + (1.0 - alpha) * (1.0 - y);
        let ce = y * softplus(-x) + (1.0 - y) * softplus(x);
        at * (1.0 - pt).powf(gamma) * ce
    }))
}

fn dice_multilabel_value(d: &Data, smooth: f64) -> f64 {
    let p: Vec<f64> = d.get("x").iter().map(|&x| sigmoid(x)).collect();
    1.0 - mean(&dice_per_class(d, &p, d.get("y"), smooth))
}

fn dice_multiclass_value(d: &Data, smooth: f64) -> f64 {
    let p = softmax(d, d.get("x"));
    1.0 - mean(&dice_per_class(d, &p, d.get("y"), smooth))
}

fn cross_entropy_value(d: &Data, ls: f64) -> f64 {
    let nc = d.ext[1] as f64;
    let lsm = log_softmax(d, d.get("x"));
    let terms = elementwise(d.get("y"), &lsm, |y, l| -(y * (1.0 - ls) + ls / nc) * l);
    ksum(terms) / (d.ext[0] * d.ext[2]) as f64
}

/// (TP + s) / (TP + α FP + β FN + s) over the given slices.
fn tversky_ratio(p: &[f64], y: &[f64], alpha: f64, beta: f64, smooth: f64) -> f64 {
    let tp = ksum(p.iter().zip(y).map(|(p, y)| p * y));
    let fp = ksum(p.iter().zip(y).map(|(p, y)| p * (1.0 - y)));
    let fneg = ksum(p.iter().zip(y).map(|(p, y)| (1.0 - p) * y));
    (tp + smooth) / (tp + alpha * fp + beta * fneg + smooth)
}

fn iou_ratio(p: &[f64], y: &[f64], smooth: f64) -> f64 {
    let i = ksum(p.iter().zip(y).map(|(a, b)| a * b));
    let u = ksum(p.iter().copied()) + ksum(y.iter().copied()) - i;
    (i + smooth) / (u + smooth)
}

/// The elements of batch item `b` (its C·S values), in layout order.
fn item(d: &Data, v: &[f64], b: usize) -> Vec<f64> {
    let n = d.ext[1] * d.ext[2];
    v[b * n..(b + 1) * n].to_vec()
}

/// 1 - mean over batch items of `ratio(p_b, y_b)`.
fn per_image(d: &Data, p: &str, ratio: impl Fn(&[f64], &[f64]) -> f64) -> f64 {
    let r: Vec<f64> = (0..d.ext[0]).map(|b| ratio(&item(d, d.get(p), b), &item(d, d.get("y"), b))).collect();
    1.0 - mean(&r)
}

/// Berman et al. 2018, Alg. 1 / `lovasz_grad`: the gradient of the Lovász
/// extension of the Jaccard loss w.r.t. sorted errors, given sorted ground truth.
fn lovasz_grad(gt_sorted: &[f64]) -> Vec<f64> {
    let gts: f64 = gt_sorted.iter().sum();
    let mut cum_gt = 0.0;
    let mut cum_not = 0.0;
    let mut jaccard = Vec::with_capacity(gt_sorted.len());
    for &g in gt_sorted {
        cum_gt += g;
        cum_not += 1.0 - g;
        let intersection = gts - cum_gt;
        let union = gts + cum_not;
        jaccard.push(1.0 - intersection / union);
    }
    let mut grad = jaccard.clone();
    for k in (1..grad.len()).rev() {
        grad[k] = jaccard[k] - jaccard[k - 1];
    }
    grad
}

/// Σ f(errors sorted descending) · lovasz_grad(labels in that order).
fn lovasz_flat(errors: &[f64], labels: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut order: Vec<usize> = (0..errors.len()).collect();
    order.sort_by(|&a, &b| errors[b].total_cmp(&errors[a]));
    let gt_sorted: Vec<f64> = order.iter().map(|&i| labels[i]).collect();
    let grad = lovasz_grad(&gt_sorted);
    ksum(order.iter().zip(&grad).map(|(&i, g)| f(errors[i]) * g))
}

fn lovasz_hinge_flat(x: &[f64], y: &[f64]) -> f64 {
    let errors = elementwise(x, y, |x, y| 1.0 - x * (2.0 * y - 1.0));
    lovasz_flat(&errors, y, |e| e.max(0.0))
}

// ---------------------------------------------------------------------------
// The references, one per stdlib loss.

type Reference = fn(&Data, &Hp) -> f64;

fn r_bce(d: &Data, h: &Hp) -> f64 {
    let eps = h.get("eps", 1e-7);
    mean(&elementwise(d.get("p"), d.get("y"), |p, y| {
        let pc = clamp(p, eps);
        -(y * pc.ln() + (1.0 - y) * (1.0 - pc).ln())
    }))
}

fn r_bce_logits(d: &Data, h: &Hp) -> f64 {
    bce_logits_value(d, h.get("pos_weight", 1.0), h.get("label_smoothing", 0.0))
}

fn r_dice_bce(d: &Data, h: &Hp) -> f64 {
    let p: Vec<f64> = d.get("x").iter().map(|&x| sigmoid(x)).collect();
    bce_logits_value(d, 1.0, 0.0) + 1.0 - dice_ratio(&p, d.get("y"), h.get("smooth", 1.0))
}

fn r_focal(d: &Data, h: &Hp) -> f64 {
    focal_value(d, h.get("alpha", 0.25), h.get("gamma", 2.0))
}

fn r_focal_on_mean_bce(d: &Data, h: &Hp) -> f64 {
    let b = bce_logits_value(d, 1.0, 0.0);
    h.get("alpha", 0.8) * (1.0 - (-b).exp()).powf(h.get("gamma", 2.0)) * b
}

fn r_dice_focal(d: &Data, h: &Hp) -> f64 {
    h.get("lambda_dice", 1.0) * dice_multilabel_value(d, h.get("smooth", 1.0))
        + h.get("lambda_focal", 1.0) * focal_value(d, h.get("alpha", 0.25), h.get("gamma", 2.0))
}

fn r_dice(d: &Data, h: &Hp) -> f64 {
    1.0 - dice_ratio(d.get("p"), d.get("y"), h.get("smooth", 1.0))
}

fn r_dice_per_image(d: &Data, h: &Hp) -> f64 {
    let s = h.get("smooth", 1.0);
    per_image(d, "p", |p, y| dice_ratio(p, y, s))
}

/// ln(cosh(d)) as ln1p(2 sinh²(d/2)): exact to a few ulp even for small d, where the
/// literal ln(cosh(d)) keeps only the absolute accuracy of one ulp of 1.
fn r_log_cosh_dice(d: &Data, h: &Hp) -> f64 {
    (2.0 * (r_dice(d, h) / 2.0).sinh().powi(2)).ln_1p()
}

fn r_iou(d: &Data, h: &Hp) -> f64 {
    1.0 - iou_ratio(d.get("p"), d.get("y"), h.get("smooth", 1.0))
}

fn r_iou_per_image(d: &Data, h: &Hp) -> f64 {
    let s = h.get("smooth", 1.0);
    per_image(d, "p", |p, y| iou_ratio(p, y, s))
}

fn r_tversky(d: &Data, h: &Hp) -> f64 {
    1.0 - tversky_ratio(d.get("p"), d.get("y"), h.get("alpha", 0.5), h.get("beta", 0.5), h.get("smooth", 1.0))
}

fn r_focal_tversky(d: &Data, h: &Hp) -> f64 {
    r_tversky(d, h).powf(h.get("gamma", 1.0))
}

fn r_tversky_per_image(d: &Data, h: &Hp) -> f64 {
    let (a, b, s) = (h.get("alpha", 0.5), h.get("beta", 0.5), h.get("smooth", 1.0));
    per_image(d, "p", |p, y| tversky_ratio(p, y, a, b, s))
}

fn r_combo(d: &Data, h: &Hp) -> f64 {
    let (alpha, ratio) = (h.get("alpha", 0.5), h.get("ce_ratio", 0.5));
    let (smooth, eps) = (h.get("smooth", 1.0), h.get("eps", 1e-7));
    let ce = mean(&elementwise(d.get("p"), d.get("y"), |p, y| {
        let pc = clamp(p, eps);
        -(alpha * y * pc.ln() + (1.0 - alpha) * (1.0 - y) * (1.0 - pc).ln())
    }));
    let dc = dice_ratio(d.get("p"), d.get("y"), smooth);
    ratio * ce - (1.0 - ratio) * dc
}

fn r_mcc(d: &Data, h: &Hp) -> f64 {
    let (p, y) = (d.get("p"), d.get("y"));
    let tp = ksum(elementwise(p, y, |p, y| p * y));
    let tn = ksum(elementwise(p, y, |p, y| (1.0 - p) * (1.0 - y)));
    let fp = ksum(elementwise(p, y, |p, y| p * (1.0 - y)));
    let fneg = ksum(elementwise(p, y, |p, y| (1.0 - p) * y));
    let den = ((tp + fp) * (tp + fneg) * (tn + fp) * (tn + fneg) + h.get("eps", 1e-7)).sqrt();
    1.0 - (tp * tn - fp * fneg) / den
}

fn r_sensitivity_specificity(d: &Data, h: &Hp) -> f64 {
    let (r, s) = (h.get("r", 0.05), h.get("smooth", 1.0));
    let (p, y) = (d.get("p"), d.get("y"));
    let sens = ksum(elementwise(p, y, |p, y| (y - p).powi(2) * y)) / (ksum(y.iter().copied()) + s);
    let spec = ksum(elementwise(p, y, |p, y| (y - p).powi(2) * (1.0 - y))) / (ksum(y.iter().map(|y| 1.0 - y)) + s);
    r * sens + (1.0 - r) * spec
}

/// Yeung et al. 2022: asymmetric focal loss + asymmetric focal Tversky loss.
fn r_unified_focal(d: &Data, h: &Hp) -> f64 {
    let weight = h.get("weight", 0.5);
    let delta = h.get("delta", 0.6);
    let gamma = h.get("gamma", 0.5);
    let eps = h.get("eps", 1e-7);
    let pc: Vec<f64> = d.get("p").iter().map(|&p| clamp(p, eps)).collect();
    let y = d.get("y");
    let f = mean(&elementwise(&pc, y, |p, y| {
        delta * (-y * p.ln()) + (1.0 - delta) * p.powf(gamma) * (-(1.0 - y) * (1.0 - p).ln())
    }));
    let per_item: Vec<f64> = (0..d.ext[0])
        .map(|b| {
            let (p, y) = (item(d, &pc, b), item(d, y, b));
            let tp_f = ksum(elementwise(&p, &y, |p, y| p * y));
            let fn_f = ksum(elementwise(&p, &y, |p, y| (1.0 - p) * y));
            let fp_f = ksum(elementwise(&p, &y, |p, y| p * (1.0 - y)));
            let tp_b = ksum(elementwise(&p, &y, |p, y| (1.0 - p) * (1.0 - y)));
            let fn_b = ksum(elementwise(&p, &y, |p, y| p * (1.0 - y)));
            let fp_b = ksum(elementwise(&p, &y, |p, y| (1.0 - p) * y));
            let mti_f = (tp_f + eps) / (tp_f + delta * fn_f + (1.0 - delta) * fp_f + eps);
            let mti_b = (tp_b + eps) / (tp_b + delta * fn_b + (1.0 - delta) * fp_b + eps);
            ((1.0 - mti_b) + (1.0 - mti_f).powf(1.0 - gamma)) / 2.0
        })
        .collect();
    weight * mean(&per_item) + (1.0 - weight) * f
}

fn r_boundary(d: &Data, _: &Hp) -> f64 {
    mean(&elementwise(d.get("p"), d.get("dist"), |p, q| p * q))
}

fn r_dice_multiclass(d: &Data, h: &Hp) -> f64 {
    dice_multiclass_value(d, h.get("smooth", 1.0))
}

fn r_dice_multiclass_weighted(d: &Data, h: &Hp) -> f64 {
    let p = softmax(d, d.get("x"));
    let dc = dice_per_class(d, &p, d.get("y"), h.get("smooth", 1.0));
    let w: Vec<f64> = (0..d.ext[1]).map(|c| d.get("w")[d.at(0, c, 0)]).collect();
    1.0 - ksum(dc.iter().zip(&w).map(|(a, b)| a * b)) / ksum(w.iter().copied())
}

fn r_dice_multilabel(d: &Data, h: &Hp) -> f64 {
    dice_multilabel_value(d, h.get("smooth", 1.0))
}

fn r_cross_entropy(d: &Data, h: &Hp) -> f64 {
    cross_entropy_value(d, h.get("label_smoothing", 0.0))
}

fn r_dice_ce(d: &Data, h: &Hp) -> f64 {
    h.get("lambda_dice", 1.0) * dice_multiclass_value(d, h.get("smooth", 1.0))
        + h.get("lambda_ce", 1.0) * cross_entropy_value(d, 0.0)
}

/// Sudre et al. 2017, eq. 2, with w_c = 1 / Y_c² (0 for absent classes).
fn r_generalized_dice(d: &Data, h: &Hp) -> f64 {
    let s = h.get("smooth", 1e-5);
    let p = softmax(d, d.get("x"));
    let y = d.get("y");
    let i = sums_by(d, &elementwise(&p, y, |a, b| a * b), 1);
    let ps = sums_by(d, &p, 1);
    let ys = sums_by(d, y, 1);
    let w: Vec<f64> = ys.iter().map(|&v| if v > 0.0 { 1.0 / (v * v) } else { 0.0 }).collect();
    let num = ksum((0..d.ext[1]).map(|c| w[c] * i[c]));
    let den = ksum((0..d.ext[1]).map(|c| w[c] * (ps[c] + ys[c])));
    1.0 - (2.0 * num + s) / (den + s)
}

fn r_lovasz_hinge(d: &Data, _: &Hp) -> f64 {
    lovasz_hinge_flat(d.get("x"), d.get("y"))
}

fn r_lovasz_hinge_per_image(d: &Data, _: &Hp) -> f64 {
    let per: Vec<f64> =
        (0..d.ext[0]).map(|b| lovasz_hinge_flat(&item(d, d.get("x"), b), &item(d, d.get("y"), b))).collect();
    mean(&per)
}

/// Berman et al. 2018, `lovasz_softmax_flat` with `classes='present'`.
fn r_lovasz_softmax(d: &Data, _: &Hp) -> f64 {
    let p = softmax(d, d.get("x"));
    let y = d.get("y");
    let mut losses = Vec::new();
    for c in 0..d.ext[1] {
        let mut fg = Vec::new();
        let mut pc = Vec::new();
        for b in 0..d.ext[0] {
            for s in 0..d.ext[2] {
                fg.push(y[d.at(b, c, s)]);
                pc.push(p[d.at(b, c, s)]);
            }
        }
        if ksum(fg.iter().copied()) == 0.0 {
            continue;
        }
        let errors = elementwise(&fg, &pc, |f, q| (f - q).abs());
        losses.push(lovasz_flat(&errors, &fg, |e| e));
    }
    if losses.is_empty() {
        0.0
    } else {
        mean(&losses)
    }
}

fn r_dice_masked(d: &Data, h: &Hp) -> f64 {
    let m = d.get("m");
    let p = elementwise(d.get("p"), m, |a, b| a * b);
    let y = elementwise(d.get("y"), m, |a, b| a * b);
    1.0 - dice_ratio(&p, &y, h.get("smooth", 1.0))
}

fn r_bce_logits_masked(d: &Data, h: &Hp) -> f64 {
    let pw = h.get("pos_weight", 1.0);
    let (x, y, m) = (d.get("x"), d.get("y"), d.get("m"));
    let num = ksum((0..d.len()).map(|i| m[i] * bce_logits_elem(x[i], y[i], pw, 0.0)));
    num / ksum(m.iter().copied())
}

fn r_cross_entropy_index(d: &Data, h: &Hp) -> f64 {
    let ignore = h.get("ignore_index", -100.0);
    let lsm = log_softmax(d, d.get("x"));
    let t = d.get("t");
    let (mut num, mut count) = (Vec::new(), Vec::new());
    for b in 0..d.ext[0] {
        for s in 0..d.ext[2] {
            let label = t[d.at(b, 0, s)];
            let valid = label != ignore;
            count.push(if valid { 1.0 } else { 0.0 });
            if valid {
                num.push(-lsm[d.at(b, label as usize, s)]);
            }
        }
    }
    ksum(num) / ksum(count)
}

const REFERENCES: &[(&str, Reference)] = &[
    ("bce", r_bce),
    ("bce_logits", r_bce_logits),
    ("dice_bce", r_dice_bce),
    ("focal", r_focal),
    ("focal_on_mean_bce", r_focal_on_mean_bce),
    ("dice_focal", r_dice_focal),
    ("dice", r_dice),
    ("dice_per_image", r_dice_per_image),
    ("log_cosh_dice", r_log_cosh_dice),
    ("iou", r_iou),
    ("jaccard", r_iou),
    ("iou_per_image", r_iou_per_image),
    ("tversky", r_tversky),
    ("focal_tversky", r_focal_tversky),
    ("tversky_per_image", r_tversky_per_image),
    ("combo", r_combo),
    ("mcc", r_mcc),
    ("sensitivity_specificity", r_sensitivity_specificity),
    ("unified_focal", r_unified_focal),
    ("boundary", r_boundary),
    ("dice_multiclass", r_dice_multiclass),
    ("dice_multiclass_weighted", r_dice_multiclass_weighted),
    ("dice_multilabel", r_dice_multilabel),
    ("cross_entropy", r_cross_entropy),
    ("dice_ce", r_dice_ce),
    ("generalized_dice", r_generalized_dice),
    ("lovasz_hinge", r_lovasz_hinge),
    ("lovasz_hinge_per_image", r_lovasz_hinge_per_image),
    ("lovasz_softmax", r_lovasz_softmax),
    ("dice_masked", r_dice_masked),
    ("bce_logits_masked", r_bce_logits_masked),
    ("cross_entropy_index", r_cross_entropy_index),
];

fn reference(name: &str) -> Option<Reference> {
    REFERENCES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

// ---------------------------------------------------------------------------
// The comparison.

/// Binary, multiclass, a single element, and an odd shape.
const SHAPES: &[[usize; 3]] = &[[2, 1, 63], [2, 3, 30], [1, 1, 1], [3, 4, 17]];

/// Draws per (loss, hyperparameters, shape).
const DRAWS: usize = 3;

fn seed() -> u64 {
    match std::env::var("LOSSC_SEED") {
        Ok(s) => s.trim().parse().expect("LOSSC_SEED is a u64"),
        Err(_) => rand::random::<u64>(),
    }
}

/// Whether `got` is within 1e-12 relative of `want`, plus `slack` absolute.
///
/// A NaN reference needs a NaN: the spec's 0/0 cases, which the [1, 1, 1] shape
/// draws now and then (`cross_entropy_index` with its one label ignored,
/// `bce_logits_masked` with its one mask value 0).
fn close(got: f64, want: f64, slack: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    (got - want).abs() <= 1e-12 * want.abs().max(1e-6) + slack
}

/// Extra absolute tolerance for a loss whose formula, evaluated literally in f64,
/// cannot be accurate to 1e-12 relative. `log_cosh_dice` is ln(cosh(d)) with d the
/// Dice loss: cosh(d) = 1 + d²/2 + ... is rounded to one ulp of 1 (2.2e-16) before
/// the log, so for a small Dice loss (say d = 0.01, value 5e-5) any literal
/// evaluation is off by up to ~1e-16 absolute, i.e. ~1e-12 relative. The reference
/// is the exact form; lossc may round cosh, so allow a few ulp of 1.
fn slack(name: &str) -> f64 {
    match name {
        "log_cosh_dice" => 4.0 * f64::EPSILON,
        _ => 0.0,
    }
}

/// Compares lossc with the reference on `DRAWS` draws per shape; returns the mismatches.
fn compare(name: &str, params: &str, rng: &mut Rng, seed: u64) -> Vec<String> {
    let loss = Loss::compile(name, params).unwrap_or_else(|e| panic!("`{name}` with `{params}` compiles: {e}"));
    let reference = reference(name).unwrap_or_else(|| panic!("no reference for `{name}`"));
    let hp = Hp::parse(params);
    let names: Vec<String> = loss.inputs().iter().map(|i| i.name.clone()).collect();
    let mut failures = Vec::new();
    for &shape in SHAPES {
        for draw in 0..DRAWS {
            let tensors = synth::inputs(loss.inputs(), shape, rng);
            let refs: Vec<&Tensor> = tensors.iter().collect();
            let got = match loss.eval(&refs) {
                Ok(v) => v,
                Err(e) => {
                    failures
                        .push(format!("seed {seed}: `{name}`({params}) shape {shape:?} draw {draw}: eval failed: {e}"));
                    continue;
                }
            };
            let want = reference(&Data::new(&names, &tensors), &hp);
            if !close(got, want, slack(name)) {
                let shapes: Vec<String> =
                    names.iter().zip(&tensors).map(|(n, t)| format!("{n}{:?}", t.shape)).collect();
                failures.push(format!(
                    "seed {seed}: `{name}`({params}) shape {shape:?} draw {draw} inputs [{}]: \
                     lossc {got:.17e}, reference {want:.17e}, diff {:.3e}",
                    shapes.join(", "),
                    (got - want).abs()
                ));
            }
        }
    }
    failures
}

fn assert_no_failures(failures: &[String], seed: u64) {
    assert!(
        failures.is_empty(),
        "seed {seed} (replay with LOSSC_SEED={seed}): {} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_loss_matches_its_reference_at_default_hyperparameters() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for (name, _) in REFERENCES {
        failures.extend(compare(name, "", &mut rng, seed));
    }
    assert_no_failures(&failures, seed);
}

#[test]
fn losses_match_their_references_at_other_hyperparameters() {
    let cases: &[(&str, &str)] = &[
        ("bce", "eps=0.05"),
        ("bce_logits", "pos_weight=2,label_smoothing=0.1"),
        ("dice_bce", "smooth=0.5"),
        ("focal", "alpha=0.4,gamma=1.5"),
        ("focal", "gamma=0"),
        ("focal_on_mean_bce", "alpha=0.5,gamma=3"),
        ("dice_focal", "smooth=2,alpha=0.3,gamma=1,lambda_dice=0.7,lambda_focal=2"),
        ("dice", "smooth=0.01"),
        ("dice_per_image", "smooth=3"),
        ("log_cosh_dice", "smooth=0.1"),
        ("iou", "smooth=0.2"),
        ("jaccard", "smooth=2"),
        ("iou_per_image", "smooth=0.5"),
        ("tversky", "alpha=0.3,beta=0.7"),
        ("tversky", "alpha=0.7,beta=0.3,smooth=0.01"),
        ("focal_tversky", "gamma=0.75"),
        ("focal_tversky", "alpha=0.3,beta=0.7,gamma=1.33,smooth=0.5"),
        ("tversky_per_image", "alpha=0.2,beta=0.8"),
        ("combo", "alpha=0.7,ce_ratio=0.3"),
        ("combo", "alpha=0.2,ce_ratio=0.9,smooth=0.1,eps=0.05"),
        ("mcc", "eps=0.001"),
        ("sensitivity_specificity", "r=0.3,smooth=0.5"),
        ("unified_focal", "weight=0.3,delta=0.7,gamma=0.3"),
        ("unified_focal", "weight=0.8,delta=0.4,gamma=0.75,eps=0.05"),
        ("dice_multiclass", "smooth=0.01"),
        ("dice_multiclass_weighted", "smooth=2"),
        ("dice_multilabel", "smooth=0.3"),
        ("cross_entropy", "label_smoothing=0.1"),
        ("dice_ce", "smooth=0.5,lambda_dice=0.4,lambda_ce=1.6"),
        ("generalized_dice", "smooth=1"),
        ("dice_masked", "smooth=0.2"),
        ("bce_logits_masked", "pos_weight=3"),
    ];
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for (name, params) in cases {
        failures.extend(compare(name, params, &mut rng, seed));
    }
    assert_no_failures(&failures, seed);
}

#[test]
fn every_public_stdlib_loss_has_a_reference() {
    let mut missing = Vec::new();
    let mut covered = 0;
    for def in &lossc::stdlib::stdlib().defs {
        let name = def.name.name.as_str();
        // Helpers that do not compile on their own (not scalar) are not public losses.
        if Loss::compile(name, "").is_err() {
            continue;
        }
        covered += 1;
        if reference(name).is_none() {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "stdlib losses without a reference in tests/reference_values.rs: {}",
        missing.join(", ")
    );
    assert!(
        covered >= REFERENCES.len(),
        "only {covered} stdlib losses compile, but {} have references: \
         a stdlib loss was removed or stopped compiling",
        REFERENCES.len()
    );
}

#[test]
fn broadcast_reads_size_one_axes_repeatedly() {
    // The reference's own broadcasting, checked on a tiny case by hand.
    let w = Tensor::new([1, 2, 1], vec![3.0, 5.0]);
    assert_eq!(broadcast(&w, [2, 2, 3]), vec![3.0, 3.0, 3.0, 5.0, 5.0, 5.0, 3.0, 3.0, 3.0, 5.0, 5.0, 5.0]);
    let m = Tensor::new([2, 1, 2], vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(broadcast(&m, [2, 3, 2]), vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
}

#[test]
fn lovasz_grad_matches_a_hand_computed_case() {
    // gt = [1, 0, 1]: gts = 2; inter = [1, 1, 0]; union = [2, 3, 3];
    // J = [1/2, 2/3, 1]; grad = [1/2, 1/6, 1/3].
    let g = lovasz_grad(&[1.0, 0.0, 1.0]);
    let want = [0.5, 1.0 / 6.0, 1.0 / 3.0];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{g:?}");
    }
}
