//! `lossc demo`: train a small per-pixel model on synthetic segmentation data
//! with any loss written as text, and report the loss curve, the held-out IoU
//! and the throughput of the loss kernels.
//!
//! Each step evaluates the loss and its gradient with the native float32 runtime
//! (`Loss::evaluate`) into buffers allocated once, as a training loop should.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lossc::synth::Rng;
use lossc::{Backend, Error, Loss, View};

use crate::bench::probe;

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

/// Writes the logits of `images` under weights `w` into `out` (`[batch, 1, pixels]`).
fn logits(images: &[&Image], w: &[f64; FEATURES], out: &mut [f32]) {
    let pixels = images.iter().flat_map(|im| &im.features);
    for (o, f) in out.iter_mut().zip(pixels) {
        *o = f.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() as f32;
    }
}

fn masks(images: &[&Image], out: &mut [f32]) {
    for (o, m) in out.iter_mut().zip(images.iter().flat_map(|im| &im.mask)) {
        *o = *m as f32;
    }
}

/// Intersection over union of `logits > 0` against the masks.
fn iou(images: &[&Image], w: &[f64; FEATURES]) -> f64 {
    let (mut inter, mut union) = (0.0, 0.0);
    for im in images {
        for (f, t) in im.features.iter().zip(&im.mask) {
            let p = f64::from(u8::from(f.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() > 0.0));
            inter += p * t;
            union += p.max(*t);
        }
    }
    inter / union.max(1.0)
}

pub struct Settings {
    pub loss: String,
    pub steps: usize,
    pub seed: u64,
}

/// Adam on the linear model's weights.
struct Adam {
    m: [f64; FEATURES],
    v: [f64; FEATURES],
    step: i32,
}

impl Adam {
    const LR: f64 = 0.05;
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;

    fn update(&mut self, w: &mut [f64; FEATURES], g: &[f64; FEATURES]) {
        self.step += 1;
        for k in 0..FEATURES {
            self.m[k] = Self::B1 * self.m[k] + (1.0 - Self::B1) * g[k];
            self.v[k] = Self::B2 * self.v[k] + (1.0 - Self::B2) * g[k] * g[k];
            let mh = self.m[k] / (1.0 - Self::B1.powi(self.step));
            let vh = self.v[k] / (1.0 - Self::B2.powi(self.step));
            w[k] -= Self::LR * mh / (vh.sqrt() + 1e-8);
        }
    }
}

/// The loss with its input order, and the runtime that evaluates it.
struct Objective {
    loss: Loss,
    /// Positions of `x` and `y` among the loss's inputs.
    xi: usize,
    yi: usize,
    backend: Backend,
}

impl Objective {
    fn new(text: &str) -> Result<Objective, String> {
        let loss = Loss::compile(text, "").map_err(|e| e.render())?;
        let names: Vec<&str> = loss.inputs().iter().map(|i| i.name.as_str()).collect();
        let (Some(xi), Some(yi)) = (names.iter().position(|n| *n == "x"), names.iter().position(|n| *n == "y")) else {
            return Err(format!(
                "error: the demo feeds logits `x` and masks `y`; this loss takes {}\n",
                names.join(", ")
            ));
        };
        if names.len() != 2 {
            return Err(format!("error: the demo feeds only `x` and `y`; this loss takes {}\n", names.join(", ")));
        }
        Ok(Objective { loss, xi, yi, backend: Backend::Jit })
    }

    /// The loss value; d loss / d x goes into `dx`. A loss the native runtime cannot run
    /// yet moves the demo to the f64 reference evaluator, once, with a note.
    fn evaluate(&mut self, x: &[f32], y: &[f32], dx: &mut [f32], shape: [usize; 3]) -> Result<f64, String> {
        let mut views = [View::new(shape, x), View::new(shape, y)];
        let mut slots: [Option<&mut [f32]>; 2] = [Some(dx), None];
        if self.xi > self.yi {
            views.swap(0, 1);
            slots.swap(0, 1);
        }
        match self.loss.evaluate_on(self.backend, &views, &mut slots) {
            Err(Error::Unsupported(why)) if self.backend == Backend::Jit => {
                println!(
                    "note: the native runtime cannot run this loss yet ({why}); using the f64 reference evaluator"
                );
                self.backend = Backend::Interp;
                self.loss.evaluate_on(self.backend, &views, &mut slots).map_err(|e| e.render())
            }
            other => other.map_err(|e| e.render()),
        }
    }
}

/// Trains with Adam and prints the loss curve, the held-out IoU and the throughput.
pub fn train(settings: &Settings) -> Result<(), String> {
    let mut objective = Objective::new(&settings.loss)?;
    let mut rng = Rng::new(settings.seed);
    let train: Vec<Image> = (0..64).map(|_| synthetic_image(&mut rng)).collect();
    let held_out: Vec<Image> = (0..16).map(|_| synthetic_image(&mut rng)).collect();
    let held: Vec<&Image> = held_out.iter().collect();
    let batch = 8;
    let shape = [batch, 1, SIDE * SIDE];
    println!(
        "training a per-pixel logistic model on {} synthetic {SIDE}x{SIDE} images (batch {batch}) with\n  {}\n",
        train.len(),
        settings.loss
    );
    let mut w = [0.0f64; FEATURES];
    let mut adam = Adam { m: [0.0; FEATURES], v: [0.0; FEATURES], step: 0 };
    println!("held-out IoU before training: {:.3}", iou(&held, &w));
    println!("loss curve (mean of the last 10 steps; the bar is the loss relative to the first line):");
    // Reused every step: a fresh gradient buffer per call would time page faults.
    let n = batch * SIDE * SIDE;
    let (mut x, mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    // Drawn on stderr, and only when it is a terminal: piped output stays plain lines.
    let bar = ProgressBar::new(settings.steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps, {per_sec}, loss {msg}")
            .expect("invariant: a valid template"),
    );
    let (mut kernel, mut curve, mut first) = (Duration::ZERO, Vec::new(), None);
    let started = Instant::now();
    for step in 1..=settings.steps {
        let images: Vec<&Image> = (0..batch).map(|_| &train[rng.below(train.len())]).collect();
        logits(&images, &w, &mut x);
        masks(&images, &mut y);
        let start = Instant::now();
        let value = objective.evaluate(&x, &y, &mut dx, shape)?;
        kernel += start.elapsed();
        // Chain rule through the linear model: dL/dw_k = sum_pixels dL/dx * feature_k.
        let mut g = [0.0f64; FEATURES];
        for (f, d) in images.iter().flat_map(|im| im.features.iter()).zip(&dx) {
            for (gk, fk) in g.iter_mut().zip(f) {
                *gk += fk * f64::from(*d);
            }
        }
        adam.update(&mut w, &g);
        curve.push(value);
        bar.set_message(format!("{value:.4}"));
        bar.inc(1);
        if step % (settings.steps / 10).max(1) == 0 || step == settings.steps {
            let recent = &curve[curve.len().saturating_sub(10)..];
            let avg = recent.iter().sum::<f64>() / recent.len() as f64;
            let scale = *first.get_or_insert(avg);
            let len = if scale > 0.0 { (30.0 * avg / scale).round().clamp(0.0, 30.0) as usize } else { 0 };
            bar.suspend(|| println!("step {step:>4}/{} [{:<30}] loss {avg:.4}", settings.steps, "#".repeat(len)));
        }
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    println!("held-out IoU after training:  {:.3}", iou(&held, &w));
    report_throughput(&objective, settings.steps, shape, kernel, wall);
    Ok(())
}

/// Elements and plan bytes per second of the loss evaluations alone.
fn report_throughput(objective: &Objective, steps: usize, shape: [usize; 3], kernel: Duration, wall: f64) {
    let elements = (steps * shape.iter().product::<usize>()) as f64;
    let bytes = steps * probe::bytes(&probe::traffic(&objective.loss), &[shape.iter().product(); 2]);
    let seconds = kernel.as_secs_f64().max(1e-9);
    let engine = match objective.backend {
        Backend::Jit => "native float32 runtime",
        Backend::Interp => "f64 reference evaluator",
    };
    println!(
        "loss + gradient: {:.1} M elements/s, {:.2} GB/s of plan traffic ({engine}, {steps} calls of {}x{}x{}, \
         {:.0}% of the {wall:.2} s run)",
        elements / seconds / 1e6,
        bytes as f64 / seconds / 1e9,
        shape[0],
        shape[1],
        shape[2],
        100.0 * seconds / wall.max(1e-9),
    );
}
