//! `lossc bench`: forward+backward time of losses against yardsticks measured in
//! the same run, on the same threads:
//! - a memory-bandwidth probe that streams the same arrays in the same sweeps as the
//!   loss's plan (read x, y; then read x, y and write dx, for Dice);
//! - for losses that sort, a rayon `par_sort_unstable_by` of as many (f32, u32) pairs;
//! - the f64 interpreter (`Backend::Interp`), the obviously-correct baseline.
//!
//! What is timed is what a trainer calls: `Loss::evaluate` with the gradient of the
//! first input only, into a buffer allocated once and reused (a fresh buffer would time
//! page faults, not kernels). One warm-up call, which also pays any JIT compile, is
//! not timed. `--compile` instead times compiling every stdlib loss.

mod compile;
pub mod probe;
mod report;

use std::time::{Duration, Instant};

use lossc::synth::{self, Rng};
use lossc::{Backend, Error, Loss, View};

use report::{Column, Json};

/// Options of `lossc bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Losses to time: stdlib names or expressions [default: dice, tversky, focal_tversky,
    /// combo, dice_bce, bce_logits, focal, dice_multiclass, lovasz_hinge].
    pub losses: Vec<String>,
    /// Sizes, comma-separated: element counts (64K, 16M; K = 1024) or shapes BxCxS.
    /// A count N is [1, 1, N], or [4, 5, N/20] for a multiclass loss (one with softmax
    /// over classes or per-class statistics) [default: 16M; dice_multiclass 4x5x262144,
    /// also when named alone].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Thread counts, comma-separated; each runs in its own rayon pool [default: 1 and all cores].
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Timed runs per measurement (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Timed runs of the f64 interpreter baseline (slow at large sizes; no warm-up).
    #[arg(long, default_value_t = 3)]
    pub baseline_runs: usize,
    /// Skip the f64 interpreter baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time compilation (parse, check, differentiate, schedule, JIT) of every stdlib
    /// loss, or of the LOSSES given, instead of evaluation.
    #[arg(long)]
    pub compile: bool,
}

/// The default suite: the acceptance benchmarks' losses at their sizes.
const SUITE: &[(&str, Size)] = &[
    ("dice", Size::Count(16 << 20)),
    ("tversky", Size::Count(16 << 20)),
    ("focal_tversky", Size::Count(16 << 20)),
    ("combo", Size::Count(16 << 20)),
    ("dice_bce", Size::Count(16 << 20)),
    ("bce_logits", Size::Count(16 << 20)),
    ("focal", Size::Count(16 << 20)),
    ("dice_multiclass", Size::Shape([4, 5, 262_144])),
    ("lovasz_hinge", Size::Count(16 << 20)),
];

/// A problem size as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// Elements; the shape depends on the loss (see `shape`).
    Count(usize),
    /// `[batch, class, spatial]`.
    Shape([usize; 3]),
}

/// `64K`, `16M`, `1000` (K = 1024, M = 1024^2, G = 1024^3), or `BxCxS`.
pub fn parse_size(text: &str) -> Result<Size, String> {
    let count = |t: &str| -> Result<usize, String> {
        let t = t.trim();
        let (digits, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&t[..t.len() - 1], 1usize << 10),
            Some('M') => (&t[..t.len() - 1], 1 << 20),
            Some('G') => (&t[..t.len() - 1], 1 << 30),
            _ => (t, 1),
        };
        match digits.parse::<usize>().ok().and_then(|n| n.checked_mul(scale)) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(format!("error: bad size `{text}`: expected a count like 64K or 16M, or a shape BxCxS\n")),
        }
    };
    let parts: Vec<&str> = text.split(['x', 'X']).collect();
    match parts.as_slice() {
        [n] => Ok(Size::Count(count(n)?)),
        [b, c, s] => {
            let shape = [count(b)?, count(c)?, count(s)?];
            match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
                Some(_) => Ok(Size::Shape(shape)),
                None => Err(format!("error: bad size `{text}`: more elements than 64-bit indexing reaches\n")),
            }
        }
        _ => Err(format!("error: bad size `{text}`: a shape has three extents, BxCxS\n")),
    }
}

/// The `[batch, class, spatial]` a loss is benchmarked at: a count N is one image of N
/// pixels, or for a multiclass loss 4 images of 5 classes of N/20 pixels (N elements).
pub fn shape(loss: &Loss, size: Size) -> [usize; 3] {
    match size {
        Size::Shape(s) => s,
        Size::Count(n) if probe::multiclass(loss) => [4, 5, (n / 20).max(1)],
        Size::Count(n) => [1, 1, n],
    }
}

/// Random inputs of a loss at extents `ext`, as float32, with their shapes.
pub fn inputs(loss: &Loss, ext: [usize; 3], seed: u64) -> Vec<([usize; 3], Vec<f32>)> {
    let mut rng = Rng::new(seed);
    loss.inputs()
        .iter()
        .map(|spec| {
            let t = synth::input(spec, ext, &mut rng);
            (t.shape, t.data.iter().map(|&v| v as f32).collect())
        })
        .collect()
}

/// The median in milliseconds (the mean of the middle two for an even count); NaN if empty.
pub fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    let n = times.len();
    if n == 0 {
        return f64::NAN;
    }
    (times[(n - 1) / 2] + times[n / 2]).as_secs_f64() / 2.0 * 1e3
}

pub fn run(args: &Args) -> Result<(), String> {
    if args.runs == 0 {
        return Err("error: --runs must be at least 1\n".into());
    }
    if args.compile {
        return compile::run(&args.losses, args.runs, args.json);
    }
    let threads = thread_counts(&args.threads)?;
    let sizes = args.sizes.iter().map(|s| parse_size(s)).collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> =
        if args.losses.is_empty() { SUITE.iter().map(|(n, _)| n.to_string()).collect() } else { args.losses.clone() };
    // Without --sizes, a suite loss runs at its suite size, anything else at 16M.
    let jobs: Vec<(String, Vec<Size>)> = names
        .into_iter()
        .map(|name| {
            let default = SUITE.iter().find(|(n, _)| *n == name).map_or(Size::Count(16 << 20), |(_, s)| *s);
            let sizes = if sizes.is_empty() { vec![default] } else { sizes.clone() };
            (name, sizes)
        })
        .collect();
    let mut out = Output::new(args);
    let mut failed = 0;
    for (source, sizes) in &jobs {
        let loss = Loss::compile(source, "").map_err(|e| e.render())?;
        for &size in sizes {
            let ext = shape(&loss, size);
            for row in bench_loss(&loss, ext, &threads, args) {
                failed += usize::from(row.error.is_some());
                out.row(source, &row);
            }
        }
    }
    if failed > 0 {
        return Err(format!("error: {failed} measurement(s) failed (see above)\n"));
    }
    Ok(())
}

fn thread_counts(given: &[usize]) -> Result<Vec<usize>, String> {
    if given.contains(&0) {
        return Err("error: --threads must be at least 1\n".into());
    }
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(if all > 1 { vec![1, all] } else { vec![1] })
}

/// One measurement: a loss at one shape on one thread count.
#[derive(Clone)]
pub struct Row {
    pub shape: [usize; 3],
    pub threads: usize,
    pub sweeps: usize,
    pub bytes: usize,
    pub runs: usize,
    pub value: f64,
    pub median_ms: f64,
    pub probe_ms: f64,
    pub sort_ms: Option<f64>,
    /// The f64 interpreter's median and value, if measured.
    pub baseline: Option<(f64, f64)>,
    pub error: Option<String>,
}

impl Row {
    /// A row at `shape` with nothing measured yet.
    fn new(shape: [usize; 3]) -> Row {
        Row {
            shape,
            threads: 0,
            sweeps: 0,
            bytes: 0,
            runs: 0,
            value: f64::NAN,
            median_ms: f64::NAN,
            probe_ms: f64::NAN,
            sort_ms: None,
            baseline: None,
            error: None,
        }
    }
}

/// Times `loss` at `ext` on each thread count. Inputs and the baseline are shared by all.
fn bench_loss(loss: &Loss, ext: [usize; 3], threads: &[usize], args: &Args) -> Vec<Row> {
    if let Err(e) = fits(loss, ext, args) {
        let error = Some(e.to_string().trim().to_string());
        return threads.iter().map(|&t| Row { threads: t, error: error.clone(), ..Row::new(ext) }).collect();
    }
    let data = inputs(loss, ext, 7);
    let views: Vec<View> = data.iter().map(|(s, d)| View::new(*s, d)).collect();
    let sweeps = probe::traffic(loss);
    let lens: Vec<usize> = data.iter().map(|(_, d)| d.len()).collect();
    let base = Row { sweeps: sweeps.len(), bytes: probe::bytes(&sweeps, &lens), runs: args.runs, ..Row::new(ext) };
    // Allocated once and written now: no timed run pays its page faults.
    let mut grad = vec![1.0f32; lens[0]];
    let baseline = if args.no_baseline { None } else { baseline(loss, &views, &mut grad, args.baseline_runs) };
    let mut sorter = lossc::runtime::has_sort(loss).then(|| probe::SortProbe::new(&data[0].1));
    threads
        .iter()
        .map(|&t| {
            let mut row = Row { threads: t, baseline, ..base.clone() };
            if let Err(e) = measure(loss, &views, &sweeps, &mut grad, sorter.as_mut(), args.runs, &mut row) {
                row.error = Some(e.to_string().trim().to_string());
            }
            row
        })
        .collect()
}

/// Refuses a size whose buffers would not fit in memory (an allocation that fails aborts
/// the process): per element, each input in f64 as drawn and in f32, the gradient, the
/// sort probe's records and the interpreter's f64 values.
fn fits(loss: &Loss, ext: [usize; 3], args: &Args) -> Result<(), lossc::Error> {
    let inputs = loss.inputs().len() as f64;
    let sort = if lossc::runtime::has_sort(loss) { 32.0 } else { 0.0 };
    let baseline = if args.no_baseline { 0.0 } else { 64.0 * (inputs + 1.0) };
    let per_element = 12.0 * inputs + 4.0 + sort + baseline;
    let elements = ext.iter().map(|&e| e as f64).product::<f64>();
    lossc::runtime::ensure_memory(ext, per_element * elements, "the benchmark's inputs and buffers")
}

/// The f64 interpreter's median time and value; `None` if it cannot run the loss.
/// It is single-threaded, so it is measured once for all thread counts.
fn baseline(loss: &Loss, views: &[View], grad: &mut [f32], runs: usize) -> Option<(f64, f64)> {
    let mut times = Vec::new();
    let mut value = f64::NAN;
    for _ in 0..runs.max(1) {
        let mut slots = grad_slots(views.len(), grad);
        let start = Instant::now();
        value = loss.evaluate_on(Backend::Interp, views, &mut slots).ok()?;
        times.push(start.elapsed());
    }
    Some((median(&mut times), value))
}

/// Gradient slots asking for the first input's gradient only.
fn grad_slots(n: usize, grad: &mut [f32]) -> Vec<Option<&mut [f32]>> {
    let mut slots: Vec<Option<&mut [f32]>> = (0..n).map(|_| None).collect();
    slots[0] = Some(grad);
    slots
}

/// Times the loss, the probe and the sort in one pool of `row.threads` threads,
/// interleaved run by run so that a slow spell of the machine hits all of them.
fn measure(
    loss: &Loss,
    views: &[View],
    sweeps: &[probe::Traffic],
    grad: &mut [f32],
    mut sorter: Option<&mut probe::SortProbe>,
    runs: usize,
    row: &mut Row,
) -> Result<(), Error> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(row.threads)
        .build()
        .map_err(|e| Error::Unsupported(format!("cannot start {} threads: {e}", row.threads)))?;
    let arrays: Vec<&[f32]> = views.iter().map(|v| v.data).collect();
    pool.install(|| {
        let (mut t_loss, mut t_probe, mut t_sort) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..=runs {
            let start = Instant::now();
            row.value = loss.evaluate(views, &mut grad_slots(views.len(), grad))?;
            let elapsed = start.elapsed();
            let (probe, _) = probe::run_plan(sweeps, &arrays, grad);
            let sort = sorter.as_mut().map(|s| s.run());
            // Run 0 is the warm-up.
            if run > 0 {
                t_loss.push(elapsed);
                t_probe.push(probe);
                t_sort.extend(sort);
            }
        }
        row.median_ms = median(&mut t_loss);
        row.probe_ms = median(&mut t_probe);
        row.sort_ms = (!t_sort.is_empty()).then(|| median(&mut t_sort));
        Ok(())
    })
}

/// Where rows go: JSON lines or the table, printed as each row is measured.
struct Output {
    json: bool,
    baseline_runs: Option<usize>,
    started: bool,
}

const COLUMNS: &[Column] = &[
    Column { name: "loss", width: 16, right: false },
    Column { name: "shape", width: 16, right: false },
    Column { name: "thr", width: 3, right: true },
    Column { name: "sweeps", width: 6, right: true },
    Column { name: "MB", width: 7, right: true },
    Column { name: "ms", width: 8, right: true },
    Column { name: "GB/s", width: 6, right: true },
    Column { name: "probe ms", width: 8, right: true },
    Column { name: "x probe", width: 7, right: true },
    Column { name: "sort ms", width: 8, right: true },
    Column { name: "x sort", width: 6, right: true },
    Column { name: "interp ms", width: 9, right: true },
    Column { name: "speedup", width: 7, right: true },
];

impl Output {
    fn new(args: &Args) -> Output {
        Output { json: args.json, baseline_runs: (!args.no_baseline).then_some(args.baseline_runs), started: false }
    }

    fn row(&mut self, loss: &str, r: &Row) {
        if self.json {
            println!("{}", json(loss, r));
            return;
        }
        if !self.started {
            self.started = true;
            println!(
                "forward + gradient of the first input, median of the runs after a warm-up; MB: the plan's traffic\n\
                 as float32; probe: streams the same arrays in the same sweeps; sort: par_sort_unstable_by of\n\
                 (f32, u32) pairs; interp: {}; x: ratio of times\n",
                match self.baseline_runs {
                    Some(n) => format!("the f64 interpreter (one thread, median of {n})"),
                    None => "skipped (--no-baseline)".into(),
                }
            );
            println!("{}", report::header(COLUMNS));
        }
        let shape = format!("{}x{}x{}", r.shape[0], r.shape[1], r.shape[2]);
        let mut cells = vec![loss.to_string(), shape, r.threads.to_string()];
        if let Some(e) = &r.error {
            cells.push(format!("  {e}"));
            println!("{}", report::row(&COLUMNS[..4], &cells));
            return;
        }
        cells.extend([
            r.sweeps.to_string(),
            format!("{:.1}", r.bytes as f64 / 1e6),
            report::ms(r.median_ms),
            format!("{:.1}", r.bytes as f64 / r.median_ms / 1e6),
            report::ms(r.probe_ms),
            format!("{:.2}", r.median_ms / r.probe_ms),
            report::opt(r.sort_ms, report::ms),
            report::opt(r.sort_ms, |s| format!("{:.2}", r.median_ms / s)),
            report::opt(r.baseline.map(|b| b.0), report::ms),
            report::opt(r.baseline.map(|b| b.0), |b| format!("{:.1}", b / r.median_ms)),
        ]);
        println!("{}", report::row(COLUMNS, &cells));
    }
}

/// One row as a JSON object: ratios are loss time / yardstick time (below 1 is faster).
fn json(loss: &str, r: &Row) -> String {
    let elements: usize = r.shape.iter().product();
    let line = Json::default()
        .str("loss", loss)
        .ints("shape", &r.shape)
        .int("elements", elements)
        .int("threads", r.threads)
        .int("sweeps", r.sweeps)
        .int("bytes", r.bytes)
        .int("runs", r.runs);
    if let Some(e) = &r.error {
        return line.str("error", e).line();
    }
    let baseline = r.baseline.map(|b| b.0);
    line.num("value", r.value)
        .num("median_ms", r.median_ms)
        .num("gbps", r.bytes as f64 / r.median_ms / 1e6)
        .num("probe_ms", r.probe_ms)
        .num("probe_ratio", r.median_ms / r.probe_ms)
        .opt("sort_ms", r.sort_ms)
        .opt("sort_ratio", r.sort_ms.map(|s| r.median_ms / s))
        .str("baseline", if baseline.is_some() { "interp_f64" } else { "none" })
        .opt("baseline_ms", baseline)
        .opt("baseline_value", r.baseline.map(|b| b.1))
        .line()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64K"), Ok(Size::Count(65_536)));
        assert_eq!(parse_size("16m"), Ok(Size::Count(16_777_216)));
        assert_eq!(parse_size("1000"), Ok(Size::Count(1000)));
        assert_eq!(parse_size("4x5x256K"), Ok(Size::Shape([4, 5, 262_144])));
        assert!(parse_size("0").is_err() && parse_size("4x5").is_err() && parse_size("lots").is_err());
    }

    #[test]
    fn counts_map_to_shapes_by_loss() {
        let dice = Loss::compile("dice", "").expect("compiles");
        let multi = Loss::compile("dice_multiclass", "").expect("compiles");
        assert_eq!(shape(&dice, Size::Count(1 << 20)), [1, 1, 1 << 20]);
        assert_eq!(shape(&multi, Size::Count(20 << 10)), [4, 5, 1 << 10]);
        assert_eq!(shape(&multi, Size::Shape([2, 3, 4])), [2, 3, 4]);
    }

    #[test]
    fn medians() {
        let ms = |v: &[u64]| median(&mut v.iter().map(|&m| Duration::from_millis(m)).collect::<Vec<_>>());
        assert_eq!(ms(&[5, 1, 3]), 3.0);
        assert_eq!(ms(&[4, 2]), 3.0);
        assert!(ms(&[]).is_nan());
    }
}
