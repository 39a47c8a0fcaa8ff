//! The `lossc` command line: check, show, evaluate and list losses.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use lossc::{Backend, Error, Loss, Program, Tensor, View};

mod bench;
mod demo;
mod npy;
mod outputs;

use outputs::Outputs;

#[derive(Parser)]
#[command(name = "lossc", version, about = "A compiler for loss functions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check a loss; print diagnostics and exit 1 if it has errors.
    Check { source: String },
    /// Print the canonical form of a loss (with --grad, of its gradients; with --plan, its sweeps).
    Show {
        source: String,
        #[arg(long)]
        grad: bool,
        /// Print the sweep plan: what each pass over the elements computes.
        #[arg(long, conflicts_with = "grad")]
        plan: bool,
        /// Hyperparameters, as `alpha=0.3,beta=0.7`.
        #[arg(long, default_value = "")]
        params: String,
    },
    /// Evaluate a loss on .npy inputs; print the value as the last line.
    Eval {
        source: String,
        #[arg(long, default_value = "")]
        params: String,
        /// An input, as NAME=FILE.npy (one per input of the loss).
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// Write d loss / d NAME to OUT.npy.
        #[arg(long = "grad", value_name = "NAME=OUT")]
        grads: Vec<String>,
        /// `jit`: native kernels on float32 (inputs are converted); `interp`: the f64 reference.
        #[arg(long, default_value = "jit", value_parser = ["jit", "interp"])]
        backend: String,
        /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Print the loss and its gradients as code for another machine (`--ptx`: NVIDIA GPUs).
    Emit {
        source: String,
        /// PTX text: the kernels, with their parameters and launch order in comments.
        #[arg(long, required = true)]
        ptx: bool,
        /// The GPU architecture: 70 (Volta), 80 (Ampere) or 90 (Hopper).
        #[arg(long, default_value = "80")]
        sm: String,
        /// The class count the kernels are specialised to [default: 1; a loss that works over
        /// classes (softmax, per-class statistics) says so on stderr]
        #[arg(long)]
        classes: Option<usize>,
        #[arg(long, default_value = "")]
        params: String,
    },
    /// List the standard losses with their signatures.
    List,
    /// Time forward+backward against a memory-bandwidth probe and a baseline, in one run.
    Bench(bench::Args),
    /// Train a per-pixel model on synthetic segmentation data with a loss given as text.
    Demo {
        /// The loss, in terms of logits `x` and masks `y`.
        #[arg(long, default_value = "0.5*dice(sigmoid(x), y) + bce_logits(x, y)")]
        loss: String,
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        steps: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Instead of training, evaluate every stdlib loss and its gradient once.
        #[arg(long)]
        stdlib: bool,
    },
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a write to a closed pipe (`lossc list | head`) fails and
    // `println!` panics. A filter should end quietly there, as `cat` does.
    #[cfg(unix)]
    // SAFETY: sets the action of one signal at start-up, before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { source } => check(&source),
        Command::Show { source, grad, plan, params } => show(&source, grad, plan, &params),
        Command::Eval { source, params, inputs, grads, backend, threads } => {
            let backend = if backend == "interp" { Backend::Interp } else { Backend::Jit };
            set_threads(threads).and_then(|()| eval(&source, &params, &inputs, &grads, backend))
        }
        Command::Bench(args) => bench::run(&args).map_err(Failure),
        Command::Emit { source, ptx: _, sm, classes, params } => emit(&source, &sm, classes, &params),
        Command::List => {
            list();
            Ok(())
        }
        Command::Demo { stdlib: true, .. } => demo(),
        Command::Demo { loss, steps, seed, stdlib: false } => {
            demo::train(&demo::Settings { loss, steps: steps as usize, seed }).map_err(Failure)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A failure of the command, already rendered for a person.
struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(e.render())
    }
}

/// SOURCE is a stdlib name, a path to a `.loss` file, or a bare expression.
fn program(source: &str) -> Result<Program, Failure> {
    let path = Path::new(source);
    if lossc::stdlib::stdlib().get(source).is_none() && (source.ends_with(".loss") || path.is_file()) {
        let text = std::fs::read_to_string(path).map_err(|e| Failure(format!("error: cannot read {source}: {e}\n")))?;
        return Ok(Program::parse(source, &text)?);
    }
    Ok(Program::parse("<expr>", source)?)
}

fn compile(source: &str, params: &str) -> Result<Loss, Failure> {
    Ok(program(source)?.compile(&lossc::parse_params(params)?)?)
}

fn emit(source: &str, sm: &str, classes: Option<usize>, params: &str) -> Result<(), Failure> {
    let loss = compile(source, params)?;
    if classes.is_none() && bench::probe::multiclass(&loss) {
        eprintln!("note: `{}` works over classes; these kernels are for 1 class (--classes N for N)", loss.name());
    }
    print!("{}", loss.emit_ptx(sm, classes.unwrap_or(1))?.text);
    Ok(())
}

fn check(source: &str) -> Result<(), Failure> {
    let loss = compile(source, "")?;
    let names: Vec<&str> = loss.inputs().iter().map(|i| i.name.as_str()).collect();
    println!("ok: {} takes {}", loss.name(), names.join(", "));
    Ok(())
}

fn show(source: &str, grad: bool, plan: bool, params: &str) -> Result<(), Failure> {
    let loss = compile(source, params)?;
    let text = if plan {
        lossc::schedule::schedule(&loss).print(&loss)
    } else if grad {
        loss.show_grad()
    } else {
        loss.show()
    };
    print!("{text}");
    Ok(())
}

/// The most worker threads `--threads` (or RAYON_NUM_THREADS) starts.
const MAX_THREADS: usize = lossc::runtime::MAX_THREADS;

/// Sizes rayon's global pool; without `--threads` rayon follows RAYON_NUM_THREADS, held
/// to the same bounds.
fn set_threads(threads: Option<usize>) -> Result<(), Failure> {
    if threads.is_none() {
        if let Some((variable, n)) = lossc::runtime::threads_from_environment().filter(|&(_, n)| n > MAX_THREADS) {
            return Err(Failure(format!("error: {variable}={n}: at most {MAX_THREADS} threads\n")));
        }
    }
    if let Some(n) = threads {
        if n == 0 || n > MAX_THREADS {
            return Err(Failure(format!("error: --threads must be between 1 and {MAX_THREADS}\n")));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Failure(format!("error: cannot start {n} threads: {e}\n")))?;
    }
    Ok(())
}

fn eval(source: &str, params: &str, inputs: &[String], grads: &[String], backend: Backend) -> Result<(), Failure> {
    let loss = compile(source, params)?;
    let split = |s: &str| -> Result<(String, String), Failure> {
        s.split_once('=')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .ok_or_else(|| Failure(format!("error: expected NAME=FILE, found `{s}`\n")))
    };
    let position = |name: &str| -> Result<usize, Failure> {
        loss.inputs()
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Failure(format!("error: `{}` has no input `{name}`\n", loss.name())))
    };
    let mut given: Vec<Option<npy::Array>> = vec![None; loss.inputs().len()];
    for item in inputs {
        let (name, file) = split(item)?;
        let i = position(&name)?;
        if given[i].is_some() {
            return Err(Failure(format!("error: --input {name} is given twice\n")));
        }
        given[i] = Some(npy::read(Path::new(&file)).map_err(|e| Failure(format!("error: {file}: {e}\n")))?);
    }
    let mut arrays = Vec::new();
    for (spec, g) in loss.inputs().iter().zip(given) {
        arrays.push(g.ok_or_else(|| Failure(format!("error: missing --input {}=FILE.npy\n", spec.name)))?);
    }
    let mut wanted: Vec<(usize, String)> = Vec::new();
    for item in grads {
        let (name, file) = split(item)?;
        let i = position(&name)?;
        if wanted.iter().any(|(j, _)| *j == i) {
            return Err(Failure(format!("error: --grad {name} is given twice\n")));
        }
        wanted.push((i, file));
    }
    let mut reads: Vec<&Path> =
        inputs.iter().filter_map(|item| item.split_once('=')).map(|(_, f)| Path::new(f)).collect();
    reads.push(Path::new(source));
    let outputs = Outputs::prepare(&wanted, &reads).map_err(|e| Failure(format!("error: {e}\n")))?;
    let data: Vec<Vec<f32>> = arrays.iter().map(|a| a.tensor.data.iter().map(|&v| v as f32).collect()).collect();
    let views: Vec<View> = arrays.iter().zip(&data).map(|(a, d)| View::new(a.tensor.shape, d)).collect();
    let (value, gradients) = if backend == Backend::Interp {
        // The reference keeps float64 inputs exact.
        let tensors: Vec<&Tensor> = arrays.iter().map(|a| &a.tensor).collect();
        if wanted.is_empty() {
            (loss.eval(&tensors)?, vec![])
        } else {
            loss.eval_grad(&tensors)?
        }
    } else {
        let mut buffers: Vec<Vec<f32>> = arrays
            .iter()
            .enumerate()
            .map(|(i, a)| if wanted.iter().any(|(j, _)| *j == i) { vec![0.0; a.tensor.len()] } else { vec![] })
            .collect();
        let mut slots: Vec<Option<&mut [f32]>> =
            buffers.iter_mut().map(|b| if b.is_empty() { None } else { Some(b.as_mut_slice()) }).collect();
        if wanted.is_empty() {
            slots.clear();
        }
        let value = loss.evaluate(&views, &mut slots)?;
        let tensors = arrays
            .iter()
            .zip(&buffers)
            .map(|(a, b)| {
                if b.is_empty() {
                    Tensor::filled(a.tensor.shape, 0.0)
                } else {
                    Tensor::new(a.tensor.shape, b.iter().map(|&v| f64::from(v)).collect())
                }
            })
            .collect();
        (value, tensors)
    };
    outputs
        .commit(|out, file| npy::write(file, &gradients[out.input], &arrays[out.input]))
        .map_err(|e| Failure(format!("error: {e}\n")))?;
    println!("{value:?}");
    Ok(())
}

/// The stdlib definitions that are losses (reduce to a scalar), and the helpers that are not.
fn stdlib_losses() -> (Vec<(&'static lossc::syntax::ast::LossDef, Loss)>, Vec<&'static lossc::syntax::ast::LossDef>) {
    let mut losses = Vec::new();
    let mut helpers = Vec::new();
    for def in &lossc::stdlib::stdlib().defs {
        match Loss::compile(&def.name.name, "") {
            Ok(l) => losses.push((def, l)),
            Err(_) => helpers.push(def),
        }
    }
    (losses, helpers)
}

fn list() {
    let (losses, helpers) = stdlib_losses();
    for (def, _) in &losses {
        println!("{:<64} {}", lossc::check::signature(def), def.doc.first().map_or("", String::as_str));
    }
    println!("\nhelpers (not scalar losses, callable from others):");
    for def in helpers {
        println!("{:<64} {}", lossc::check::signature(def), def.doc.first().map_or("", String::as_str));
    }
}

fn demo() -> Result<(), Failure> {
    let ext = [2, 3, 4096];
    println!("every stdlib loss on a synthetic batch [batch, class, spatial] = {ext:?}, f64 reference evaluator\n");
    println!("{:<26} {:>14} {:>12} {:>10}", "loss", "value", "max |grad|", "ms");
    let mut rng = lossc::synth::Rng::new(7);
    for (def, loss) in stdlib_losses().0 {
        let inputs = lossc::synth::inputs(loss.inputs(), ext, &mut rng);
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let start = Instant::now();
        let (value, grads) = loss.eval_grad(&refs)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let gmax = grads.iter().flat_map(|g| &g.data).fold(0.0f64, |m, v| m.max(v.abs()));
        println!("{:<26} {value:>14.8} {gmax:>12.3e} {ms:>10.1}", def.name.name);
    }
    Ok(())
}
