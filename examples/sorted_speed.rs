//! Times lovasz_hinge forward + backward on the sorted engine against a rayon
//! `par_sort_unstable_by` of as many (f32, u32) pairs, in the same run. The gradient
//! asked for is that of the logits x (as `lossc bench` does), or of x and y with `xy`.
//!
//! cargo run --release --example sorted_speed -- [ELEMENTS] [THREADS] [x|xy]
//! (defaults: 16777216 elements, 2 threads, x)

use std::time::Instant;

use lossc::synth::Rng;
use lossc::{Loss, View};
use rayon::prelude::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(1 << 24, |a| a.parse().expect("ELEMENTS is a number"));
    let threads: usize = args.next().map_or(2, |a| a.parse().expect("THREADS is a number"));
    let both = args.next().is_some_and(|a| a == "xy");
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..n).map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 }).collect();
    let loss = Loss::compile("lovasz_hinge", "").expect("compiles");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let (mut gx, mut gy) = (vec![0.0f32; n], vec![0.0f32; n]);
        let inputs = [View::new([1, 1, n], &x), View::new([1, 1, n], &y)];
        let mut engine = Vec::new();
        for i in 0..7 {
            let t = Instant::now();
            let grads = if both { [Some(&mut gx[..]), Some(&mut gy[..])] } else { [Some(&mut gx[..]), None] };
            let value = loss.evaluate(&inputs, &mut { grads }).expect("evaluates");
            let dt = t.elapsed().as_secs_f64();
            println!("lovasz_hinge fwd+bwd run {i}: {:.1} ms (loss {value:.6})", dt * 1e3);
            // The first call maps the engine's buffers (page faults): report it, time the rest.
            if i > 0 {
                engine.push(dt);
            }
        }
        let pairs: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &k)| (k, i as u32)).collect();
        let mut sort = Vec::new();
        for i in 0..3 {
            let mut p = pairs.clone();
            let t = Instant::now();
            p.par_sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let dt = t.elapsed().as_secs_f64();
            println!("par_sort_unstable_by run {i}: {:.1} ms", dt * 1e3);
            sort.push(dt);
        }
        let (e, s) = (median(engine), median(sort));
        println!(
            "{n} elements, {threads} threads: engine {:.1} ms, sort {:.1} ms, ratio {:.2}",
            e * 1e3,
            s * 1e3,
            e / s
        );
    });
}
