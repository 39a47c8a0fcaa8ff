//! `lossc bench --compile`: the latency from a loss's text to its first gradient:
//! `Loss::compile` (parse, check, differentiate, simplify) and the first `evaluate`
//! on a tiny input, which is the call that schedules and JIT-compiles the kernels.

use std::time::{Duration, Instant};

use lossc::{Loss, View};

use super::report::{self, Column, Json};
use super::{inputs, median, probe};

/// The budget the issue sets for the median compile latency of each stdlib loss.
const TARGET_MS: f64 = 10.0;

/// One loss's compile latency.
struct Latency {
    shape: [usize; 3],
    compile_ms: f64,
    first_ms: f64,
    total_ms: f64,
}

/// Times `selected` losses, or every stdlib definition that compiles as a loss
/// (helpers that do not reduce to a scalar are skipped).
pub fn run(selected: &[String], runs: usize, json: bool) -> Result<(), String> {
    let names: Vec<String> = if selected.is_empty() {
        lossc::stdlib::stdlib()
            .defs
            .iter()
            .map(|d| d.name.name.clone())
            .filter(|n| Loss::compile(n, "").is_ok())
            .collect()
    } else {
        for n in selected {
            Loss::compile(n, "").map_err(|e| e.render())?;
        }
        selected.to_vec()
    };
    let columns = [
        Column { name: "loss", width: 26, right: false },
        Column { name: "compile ms", width: 10, right: true },
        Column { name: "first eval ms", width: 13, right: true },
        Column { name: "total ms", width: 8, right: true },
    ];
    if !json {
        println!(
            "Loss::compile, then the first evaluate with gradients on a tiny input (it schedules and compiles\n\
             the kernels); median of {runs} runs, each from the text\n"
        );
        println!("{}", report::header(&columns));
    }
    let mut slowest: Option<(f64, &str)> = None;
    let mut failed = 0;
    for name in &names {
        match latency(name, runs) {
            Ok(l) => {
                if slowest.is_none_or(|(ms, _)| l.total_ms > ms) {
                    slowest = Some((l.total_ms, name));
                }
                if json {
                    let line = Json::default()
                        .str("loss", name)
                        .ints("shape", &l.shape)
                        .int("runs", runs)
                        .num("compile_ms", l.compile_ms)
                        .num("first_eval_ms", l.first_ms)
                        .num("median_ms", l.total_ms)
                        .line();
                    println!("{line}");
                } else {
                    let cells =
                        [name.clone(), report::ms(l.compile_ms), report::ms(l.first_ms), report::ms(l.total_ms)];
                    println!("{}", report::row(&columns, &cells));
                }
            }
            Err(e) => {
                failed += 1;
                if json {
                    println!("{}", Json::default().str("loss", name).str("error", e.trim()).line());
                } else {
                    println!("{name:<26}  {}", e.trim());
                }
            }
        }
    }
    if let (Some((ms, name)), false) = (slowest, json) {
        let verdict = if ms < TARGET_MS { "within" } else { "over" };
        println!("\nslowest median: {} ms ({name}), {verdict} the {TARGET_MS} ms target", report::ms(ms));
    }
    if failed > 0 {
        return Err(format!("error: {failed} loss(es) failed to compile or evaluate (see above)\n"));
    }
    Ok(())
}

/// Median latencies of `runs` compiles of `name`, each followed by its first evaluate.
fn latency(name: &str, runs: usize) -> Result<Latency, String> {
    let render = |e: lossc::Error| e.render();
    let loss = Loss::compile(name, "").map_err(render)?;
    let shape = [1, if probe::multiclass(&loss) { 4 } else { 1 }, 8];
    let data = inputs(&loss, shape, 7);
    let views: Vec<View> = data.iter().map(|(s, d)| View::new(*s, d)).collect();
    let mut grad = vec![0.0f32; data[0].1.len()];
    let (mut compile, mut first, mut total) = (Vec::new(), Vec::new(), Vec::<Duration>::new());
    for _ in 0..runs {
        let start = Instant::now();
        let loss = Loss::compile(name, "").map_err(render)?;
        let compiled = start.elapsed();
        let mut slots: Vec<Option<&mut [f32]>> = (0..views.len()).map(|_| None).collect();
        slots[0] = Some(&mut grad);
        loss.evaluate(&views, &mut slots).map_err(render)?;
        let done = start.elapsed();
        compile.push(compiled);
        first.push(done - compiled);
        total.push(done);
    }
    Ok(Latency { shape, compile_ms: median(&mut compile), first_ms: median(&mut first), total_ms: median(&mut total) })
}
