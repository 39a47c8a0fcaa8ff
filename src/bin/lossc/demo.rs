//! `lossc demo`: train a small per-pixel model on synthetic segmentation data
//! with any loss written as text, and report the loss curve and held-out IoU.

use std::time::Instant;

use lossc::synth::Rng;
use lossc::{Loss, Tensor};

/// Side of the square images.
const SIDE: usize = 32;
/// Per-pixel features: intensity, 3x3 mean, 7x7 mean, and a constant.
const FEATURES: usize = 4;

/// One image's features (`FEATURES` per pixel) and its mask.
struct Image {
    features: Vec<[f64; FEATURES]>,
    mask: Vec<f64>,
}

/// Discs and rectangles of higher intensity on a shaded background, in noise.
fn synthetic_image(rng: &mut Rng) -> Image {
    let mut mask = vec![0.0; SIDE * SIDE];
    for _ in 0..1 + rng.below(3) {
        let (cy, cx) = (rng.range(4.0, 28.0), rng.range(4.0, 28.0));
        let (ry, rx) = (rng.range(2.5, 7.0), rng.range(2.5, 7.0));
        let disc = rng.uniform() < 0.5;
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (dy, dx) = ((y as f64 - cy) / ry, (x as f64 - cx) / rx);
                if (disc && dy * dy + dx * dx <= 1.0) || (!disc && dy.abs() <= 1.0 && dx.abs() <= 1.0) {
                    mask[y * SIDE + x] = 1.0;
                }
            }
        }
    }
    let (gy, gx) = (rng.range(-0.5, 0.5), rng.range(-0.5, 0.5));
    let intensity: Vec<f64> = (0..SIDE * SIDE)
        .map(|i| {
            let (y, x) = ((i / SIDE) as f64 / SIDE as f64, (i % SIDE) as f64 / SIDE as f64);
            mask[i] + gy * y + gx * x + 0.7 * rng.normal()
        })
        .collect();
    let mean = |r: isize, i: usize| {
        let (y, x) = ((i / SIDE) as isize, (i % SIDE) as isize);
        let mut total = 0.0;
        let mut n = 0.0;
        for yy in (y - r).max(0)..=(y + r).min(SIDE as isize - 1) {
            for xx in (x - r).max(0)..=(x + r).min(SIDE as isize - 1) {
                total += intensity[yy as usize * SIDE + xx as usize];
                n += 1.0;
            }
        }
        total / n
    };
    let features = (0..SIDE * SIDE).map(|i| [intensity[i], mean(1, i), mean(3, i), 1.0]).collect();
    Image { features, mask }
}

/// Logits of a batch of images under weights `w`, as a `[batch, 1, pixels]` tensor.
fn logits(images: &[&Image], w: &[f64; FEATURES]) -> Tensor {
    let data = images
        .iter()
        .flat_map(|im| im.features.iter().map(|f| f.iter().zip(w).map(|(a, b)| a * b).sum::<f64>()))
        .collect();
    Tensor::new([images.len(), 1, SIDE * SIDE], data)
}

fn masks(images: &[&Image]) -> Tensor {
    Tensor::new([images.len(), 1, SIDE * SIDE], images.iter().flat_map(|im| im.mask.iter().copied()).collect())
}

/// Intersection over union of `logits > 0` against the masks.
fn iou(images: &[&Image], w: &[f64; FEATURES]) -> f64 {
    let x = logits(images, w);
    let y = masks(images);
    let (mut inter, mut union) = (0.0, 0.0);
    for (p, t) in x.data.iter().zip(&y.data) {
        let p = f64::from(u8::from(*p > 0.0));
        inter += p * t;
        union += p.max(*t);
    }
    inter / union.max(1.0)
}

pub struct Settings {
    pub loss: String,
    pub steps: usize,
    pub seed: u64,
}

/// Trains with Adam and prints the loss curve, the held-out IoU and the throughput.
pub fn train(settings: &Settings) -> Result<(), String> {
    let loss = Loss::compile(&settings.loss, "").map_err(|e| e.render())?;
    let names: Vec<&str> = loss.inputs().iter().map(|i| i.name.as_str()).collect();
    let (Some(xi), Some(yi)) = (names.iter().position(|n| *n == "x"), names.iter().position(|n| *n == "y")) else {
        return Err(format!("error: the demo feeds logits `x` and masks `y`; this loss takes {}\n", names.join(", ")));
    };
    if names.len() != 2 {
        return Err(format!("error: the demo feeds only `x` and `y`; this loss takes {}\n", names.join(", ")));
    }
    let mut rng = Rng::new(settings.seed);
    let train: Vec<Image> = (0..64).map(|_| synthetic_image(&mut rng)).collect();
    let held_out: Vec<Image> = (0..16).map(|_| synthetic_image(&mut rng)).collect();
    let held: Vec<&Image> = held_out.iter().collect();
    let batch = 8;
    println!(
        "training a per-pixel logistic model on {} synthetic {SIDE}x{SIDE} images (batch {batch}) with\n  {}\n",
        train.len(),
        settings.loss
    );
    let mut w = [0.0f64; FEATURES];
    let (mut m, mut v) = ([0.0f64; FEATURES], [0.0f64; FEATURES]);
    let (lr, b1, b2) = (0.05, 0.9, 0.999);
    println!("held-out IoU before training: {:.3}", iou(&held, &w));
    let mut kernel_seconds = 0.0;
    let mut elements = 0usize;
    let mut curve = Vec::new();
    for step in 1..=settings.steps {
        let images: Vec<&Image> = (0..batch).map(|_| &train[rng.below(train.len())]).collect();
        let x = logits(&images, &w);
        let y = masks(&images);
        let mut inputs = vec![&x, &y];
        if xi > yi {
            inputs.swap(0, 1);
        }
        let start = Instant::now();
        let (value, grads) = loss.eval_grad(&inputs).map_err(|e| e.render())?;
        kernel_seconds += start.elapsed().as_secs_f64();
        elements += x.len();
        // Chain rule through the linear model: dL/dw_k = sum_pixels dL/dx * feature_k.
        let dx = &grads[xi].data;
        let mut g = [0.0f64; FEATURES];
        for (k, gk) in g.iter_mut().enumerate() {
            *gk = images.iter().flat_map(|im| im.features.iter()).zip(dx).map(|(f, d)| f[k] * d).sum::<f64>();
        }
        for k in 0..FEATURES {
            m[k] = b1 * m[k] + (1.0 - b1) * g[k];
            v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
            let (mh, vh) = (m[k] / (1.0 - b1.powi(step as i32)), v[k] / (1.0 - b2.powi(step as i32)));
            w[k] -= lr * mh / (vh.sqrt() + 1e-8);
        }
        curve.push(value);
        if step % (settings.steps / 10).max(1) == 0 || step == settings.steps {
            let recent = &curve[curve.len().saturating_sub(10)..];
            let avg = recent.iter().sum::<f64>() / recent.len() as f64;
            let bar = "#".repeat(step * 30 / settings.steps);
            println!("step {step:>4}/{} [{bar:<30}] loss {avg:.4}", settings.steps);
        }
    }
    let final_iou = iou(&held, &w);
    println!("held-out IoU after training:  {final_iou:.3}");
    println!(
        "loss + gradient: {:.1} M elements/s (f64 reference evaluator, {} evaluations)",
        elements as f64 / kernel_seconds.max(1e-9) / 1e6,
        settings.steps
    );
    Ok(())
}
