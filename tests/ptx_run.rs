//! The PTX backend's kernels, run in a PTX interpreter (`ptx_sim`) on the CPU, against the
//! f64 reference evaluator: the GPU code's logic (indexing, block reductions, the tail
//! kernels, gradients) checked without a GPU.
//!
//! Inputs are rounded to f32 first and the reference runs on the rounded values.
//! Tolerances as in `tests/native.rs`: the loss within 1e-5 relative (relative to at least
//! `LOSS_FLOOR`), each gradient within 1e-5 of its largest magnitude (1e-4 on fewer than 8
//! elements, 1e-4 absolute where the reference gradient is all zero). Each program also
//! runs twice on the same buffers (bitwise the same), with a sweep grid of 1 and 2 blocks
//! along the batch (bitwise the same: the result depends on `G` only), and with its f32
//! buffers 4 bytes past a 16-byte boundary (no vector loads).
mod common;
mod ptx_sim;

use lossc::backend::ptx::{self, Grid, Layout, Program, Target};
use lossc::synth::{self, Rng};
use lossc::{runtime, Loss, Tensor};
use ptx_sim::{Memory, Module};

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

/// What one run of a program gives: the loss and the wanted gradients.
#[derive(Debug)]
struct Out {
    loss: f64,
    grads: Vec<Option<Vec<f32>>>,
}

impl Out {
    fn bits(&self) -> (u64, Vec<Option<Vec<u32>>>) {
        let grads = self.grads.iter().map(|g| g.as_ref().map(|g| g.iter().map(|v| v.to_bits()).collect())).collect();
        (self.loss.to_bits(), grads)
    }
}

/// How to run a program: the sweep grid `g x y`, how many times on one set of buffers, and
/// whether the f32 buffers start 4 bytes past a 16-byte boundary (as a view into a larger
/// tensor can), which rules out vector loads.
#[derive(Clone, Copy)]
struct Setup {
    g: usize,
    y: u32,
    times: usize,
    misaligned: bool,
}

/// Runs `program` per `setup`.
fn run(
    program: &Program,
    module: &Module,
    names: &[&str],
    data: &[Vec<f32>],
    want: &[bool],
    ext: [usize; 3],
    setup: Setup,
) -> Result<Vec<Out>, String> {
    let Setup { g, y, times, misaligned } = setup;
    let skew = if misaligned { 4 } else { 0 };
    let mut mem = Memory::new();
    let inputs: Vec<u64> = data
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (d, name))| {
            let a = mem.alloc_named(skew + 4 * d.len(), &format!("in{i} ({name})")) + skew as u64;
            mem.write_f32s(a, d);
            a
        })
        .collect();
    let grads: Vec<u64> = data
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (d, &w))| if w { mem.alloc_named(skew + 4 * d.len(), &format!("grad{i}")) + skew as u64 } else { 0 })
        .collect();
    let ws = mem.alloc_named(8 * program.workspace_len(ext[0], g), "ws");
    let mut params = inputs.clone();
    params.extend(&grads);
    params.extend([ws, ext[0] as u64, ext[2] as u64, g as u64]);
    let mut outs = Vec::new();
    for _ in 0..times {
        for l in &program.launches {
            let grid = match l.grid {
                Grid::Sweep => [g as u32, y],
                Grid::Single => [1, 1],
            };
            module.launch(&l.kernel, grid, &params, &mut mem)?;
        }
        let grads = data
            .iter()
            .zip(&grads)
            .zip(want)
            .map(|((d, &a), &w)| if w { Some(mem.read_f32s(a, d.len())) } else { None })
            .collect();
        outs.push(Out { loss: mem.read_f64s(ws, 1)[0], grads });
    }
    Ok(outs)
}

/// Below this a loss is usually a near-cancellation of terms of order 1 (`combo` is a
/// cross-entropy minus a Dice coefficient, both about 0.5): f32 elementwise arithmetic
/// leaves absolute noise of order 1e-8 there, so the loss is compared within 1e-5 of this
/// (on fewer than 8 elements, of 10 times this: a mean of a few terms averages out less).
const LOSS_FLOOR: f64 = 1e-2;

/// Within 1e-5 relative, of `want` or of `floor` where `want` is smaller.
fn close_value(got: f64, want: f64, floor: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(floor).max(1e-30) || (got.is_nan() && want.is_nan())
}

/// The loss and wanted gradients of `out` against the reference's.
fn agrees(loss: &Loss, out: &Out, value: f64, grads: &[Tensor], tiny: bool, floor: f64) -> Result<(), String> {
    if !close_value(out.loss, value, floor) {
        return Err(format!("loss {} vs {value}", out.loss));
    }
    for (i, (g, w)) in out.grads.iter().zip(grads).enumerate() {
        let Some(g) = g else { continue };
        let scale = w.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let tolerance = common::gradient_tolerance(scale, tiny);
        let bad: Vec<usize> =
            (0..g.len()).filter(|&k| !common::within(f64::from(g[k]), w.data[k], tolerance)).collect();
        if let Some(&k) = bad.first() {
            return Err(format!(
                "d/d{} [{k}] = {} vs {} (max |g| {scale}; {} of {} elements off)",
                loss.inputs()[i].name,
                g[k],
                w.data[k],
                bad.len(),
                g.len()
            ));
        }
    }
    Ok(())
}

/// Emits `loss` for these inputs and runs it in the interpreter: against the reference
/// with sweep grids `2 x 1` and every `(g, y)` of `extra`, twice on the same buffers and
/// with `Y = 2` bitwise the same as the first run.
fn check(loss: &Loss, inputs: &[Tensor], want: &[bool], extra: &[(usize, u32)]) -> Result<(), String> {
    check_within(loss, inputs, want, extra, LOSS_FLOOR)
}

/// `check` with the loss compared within 1e-5 of `max(|loss|, floor)`.
fn check_within(
    loss: &Loss,
    inputs: &[Tensor],
    want: &[bool],
    extra: &[(usize, u32)],
    floor: f64,
) -> Result<(), String> {
    let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
    let ext = loss.extents(&shapes).map_err(|e| e.to_string())?;
    let layout = Layout::of(&shapes, ext, want);
    match ptx::unsupported(loss, &layout) {
        None => check_layout(loss, inputs, &layout, extra, floor),
        Some(why) => Err(format!("unsupported: {why}")),
    }
}

/// `check` with a given layout.
fn check_layout(
    loss: &Loss,
    inputs: &[Tensor],
    layout: &Layout,
    extra: &[(usize, u32)],
    floor: f64,
) -> Result<(), String> {
    let want = &layout.want;
    let (data, tensors) = rounded(inputs);
    let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
    let ext = loss.extents(&shapes).map_err(|e| e.to_string())?;
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let (value, grads) = loss.eval_grad(&refs).map_err(|e| format!("reference: {e}"))?;
    let tiny = ext.iter().product::<usize>() < 8;
    let floor = if tiny { 10.0 * floor } else { floor };
    let names: Vec<&str> = loss.inputs().iter().map(|i| i.name.as_str()).collect();
    let target = Target::parse("sm_80").expect("a target");
    let program = ptx::emit(loss, layout, target).map_err(|e| format!("emit: {e}"))?;
    let module = Module::parse(&program.text).map_err(|e| format!("parse: {e}"))?;

    let setup = |g: usize, y: u32, times: usize, misaligned: bool| Setup { g, y, times, misaligned };
    let first = run(&program, &module, &names, &data, want, ext, setup(2, 1, 2, false))?;
    agrees(loss, &first[0], value, &grads, tiny, floor).map_err(|e| format!("G = 2, Y = 1: {e}"))?;
    if first[1].bits() != first[0].bits() {
        return Err(format!("a second run on the same buffers differs: loss {} then {}", first[0].loss, first[1].loss));
    }
    let wide = run(&program, &module, &names, &data, want, ext, setup(2, 2, 1, false))?;
    if wide[0].bits() != first[0].bits() {
        return Err(format!("Y = 2 differs from Y = 1: loss {} vs {}", wide[0].loss, first[0].loss));
    }
    let skewed = run(&program, &module, &names, &data, want, ext, setup(2, 1, 1, true))?;
    agrees(loss, &skewed[0], value, &grads, tiny, floor)
        .map_err(|e| format!("G = 2, Y = 1, buffers 4 bytes past 16-byte alignment: {e}"))?;
    for &(g, y) in extra {
        let out = run(&program, &module, &names, &data, want, ext, setup(g, y, 1, false))?;
        agrees(loss, &out[0], value, &grads, tiny, floor).map_err(|e| format!("G = {g}, Y = {y}: {e}"))?;
    }
    Ok(())
}

/// Extents, and sweep grids `(G, Y)` to run besides `2 x 1` and `2 x 2`.
type Case = ([usize; 3], &'static [(usize, u32)]);

/// Extents: binary, multiclass, batched; one element, fewer than a warp, a block and one,
/// more than a block; S a multiple of 4 (vector loads where the buffers are aligned) and
/// not; with sweep grids beyond `2 x 1`: `G = 3` (idle blocks), `G = 1` (a block striding
/// over positions), `Y = 2` for three items (a block over two items).
const CASES: [Case; 5] = [
    ([1, 1, 1], &[]),
    ([1, 1, 7], &[]),
    ([2, 1, 300], &[(1, 1)]),
    ([2, 3, 257], &[(3, 1), (1, 2)]),
    ([3, 4, 132], &[(3, 2)]),
];

#[test]
fn every_stdlib_loss_runs_in_the_interpreter() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let losses: Vec<Loss> =
        lossc::stdlib::stdlib().defs.iter().filter_map(|d| Loss::compile(&d.name.name, "").ok()).collect();
    let mut failures = Vec::new();
    let mut ran = 0;
    for loss in &losses {
        for (ext, extra) in CASES {
            // On one element MCC's denominator is its smoothing term: the gradient of the
            // targets is cancellation noise (about 1e-13 in f64, 1e-4 in f32).
            if loss.name() == "mcc" && ext == [1, 1, 1] {
                continue;
            }
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
            let all = vec![true; inputs.len()];
            // Exactly the sort-based losses (Lovász) do not run on the GPU.
            if runtime::has_sort(loss) {
                let why = ptx::unsupported(loss, &Layout::of(&shapes, ext, &all));
                assert!(why.is_some(), "{} sorts but is supported at {ext:?}", loss.name());
                continue;
            }
            ran += 1;
            if let Err(e) = check(loss, &inputs, &all, extra) {
                failures.push(format!("{} at {ext:?}: {e}", loss.name()));
            }
        }
    }
    assert!(ran >= 28 * CASES.len(), "{ran} runs");
    assert!(failures.is_empty(), "seed {seed}: {} failures:\n{}", failures.len(), failures.join("\n"));
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
        ("mean(abs(x) * y + x ^ 3 - exp(x) / (1 + x ^ 2) + p ^ y)", ""),
    ];
    let mut failures = Vec::new();
    for (source, params) in cases {
        let loss = Loss::compile(source, params).unwrap_or_else(|e| panic!("{source}: {e}"));
        for ext in [[2, 3, 260], [1, 1, 6]] {
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let all = vec![true; inputs.len()];
            if let Err(e) = check(&loss, &inputs, &all, &[]) {
                failures.push(format!("`{source}` ({params}) at {ext:?}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

#[test]
fn some_gradients_and_value_only() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for name in ["dice", "focal_tversky", "dice_multiclass", "cross_entropy", "bce_logits_masked"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let inputs = synth::inputs(loss.inputs(), [2, 3, 300], &mut rng);
        let mut first = vec![false; inputs.len()];
        first[0] = true;
        // Gradient pointers are 0 where not wanted: a kernel that touches one fails.
        for want in [first, vec![false; inputs.len()]] {
            if let Err(e) = check(&loss, &inputs, &want, &[]) {
                failures.push(format!("{name} wanting {want:?}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

#[test]
fn broadcast_inputs() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let uniform = |rng: &mut Rng, shapes: &[[usize; 3]]| -> Vec<Tensor> {
        shapes.iter().map(|&s| Tensor::new(s, (0..s.iter().product()).map(|_| rng.uniform()).collect())).collect()
    };
    // Targets with one class row for three classes (their gradient summed over classes),
    // a map shared by the batch (whose gradient the GPU does not write).
    let loss = Loss::compile("dice(p, y) + mean(p * d)", "").expect("compiles");
    let shapes = [[2, 3, 300], [2, 1, 300], [1, 1, 300]];
    let inputs = uniform(&mut rng, &shapes);
    if let Err(e) = check(&loss, &inputs, &[true, true, false], &[(1, 2)]) {
        failures.push(format!("class and batch broadcast: {e}"));
    }
    let layout = Layout::of(&shapes, [2, 3, 300], &[true; 3]);
    assert!(ptx::unsupported(&loss, &layout).is_some(), "the gradient of a batch-broadcast map");
    // Weights per class, given as [1, C, 1] for an input with every axis: read at one
    // position for all; their gradient (a sum over positions) is refused on the GPU.
    let loss = Loss::compile("dice(p, y) + mean(w * p)", "").expect("compiles");
    for s in [300, 301] {
        let shapes = [[2, 3, s], [2, 3, s], [1, 3, 1]];
        let inputs = uniform(&mut rng, &shapes);
        let want = [true, true, false];
        if let Err(e) = check(&loss, &inputs, &want, &[]) {
            failures.push(format!("weights [1, C, 1] for an input with a spatial axis, S = {s}: {e}"));
        }
        let why = ptx::unsupported(&loss, &Layout::of(&shapes, [2, 3, s], &[true; 3]));
        assert!(why.as_deref().is_some_and(|w| w.contains("broadcast along positions")), "{why:?}");
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// A NaN input gives a NaN loss, and NaN gradients where the reference has them.
#[test]
fn nan_inputs_propagate() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for name in ["dice", "focal", "bce_logits", "cross_entropy", "dice_multiclass", "generalized_dice", "mcc"] {
        let loss = Loss::compile(name, "").expect("compiles");
        let mut inputs = synth::inputs(loss.inputs(), [2, 3, 100], &mut rng);
        inputs[0].data[137] = f64::NAN;
        let all = vec![true; inputs.len()];
        if let Err(e) = check(&loss, &inputs, &all, &[]) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// A block sum of `%tid.x` (shuffles within warps, warps through shared memory), one
/// result per block: the interpreter's own check of shuffles, barriers and memory.
const BLOCK_SUM: &str = r#"
.version 7.0
.target sm_80
.address_size 64

.visible .entry block_sum(
	.param .u64 out,
	.param .u64 n
)
.reqntid 64, 1, 1
{
	.shared .align 8 .f64 buf[2];
	.reg .pred %p<3>;
	.reg .b32 %r<12>;
	.reg .b64 %rd<10>;
	.reg .f64 %fd<6>;
	ld.param.u64 %rd1, [out];
	cvta.to.global.u64 %rd1, %rd1;
	mov.u32 %r1, %tid.x;
	cvt.u64.u32 %rd2, %r1;
	cvt.rn.f64.u64 %fd1, %rd2;
	mov.u32 %r9, 16;
$L_shfl:
	mov.b64 {%r2, %r3}, %fd1;
	shfl.sync.down.b32 %r4, %r2, %r9, 31, -1;
	shfl.sync.down.b32 %r5, %r3, %r9, 31, -1;
	mov.b64 %fd2, {%r4, %r5};
	add.rn.f64 %fd1, %fd1, %fd2;
	shr.u32 %r9, %r9, 1;
	setp.ne.u32 %p1, %r9, 0;
	@%p1 bra $L_shfl;
	and.b32 %r6, %r1, 31;
	shr.u32 %r7, %r1, 5;
	cvt.u64.u32 %rd3, %r7;
	mov.u64 %rd4, buf;
	mad.lo.u64 %rd5, %rd3, 8, %rd4;
	setp.ne.u32 %p2, %r6, 0;
	@%p2 bra $L_skip;
	st.shared.f64 [%rd5], %fd1;
$L_skip:
	bar.sync 0;
	@%p2 bra $L_end;
	setp.ne.u32 %p2, %r1, 0;
	@%p2 bra $L_end;
	ld.shared.f64 %fd3, [%rd4];
	ld.shared.f64 %fd4, [%rd4+8];
	add.rn.f64 %fd3, %fd3, %fd4;
	mov.u32 %r8, %ctaid.x;
	cvt.u64.u32 %rd6, %r8;
	mad.lo.u64 %rd7, %rd6, 8, %rd1;
	st.global.f64 [%rd7], %fd3;
$L_end:
	ret;
}
"#;

#[test]
fn the_interpreter_runs_shuffles_barriers_and_catches_mistakes() {
    let module = Module::parse(BLOCK_SUM).expect("parses");
    let mut mem = Memory::new();
    let out = mem.alloc(3 * 8);
    module.launch("block_sum", [3, 1], &[out, 3], &mut mem).expect("runs");
    assert_eq!(mem.read_f64s(out, 3), vec![2016.0; 3]);

    // One block too many: past the allocation.
    let e = module.launch("block_sum", [4, 1], &[out, 4], &mut mem).expect_err("out of range");
    assert!(e.contains("outside `allocation #0` of 24 bytes") && e.contains("block (3, 0)"), "{e}");
    // A null pointer.
    let e = module.launch("block_sum", [1, 1], &[0, 1], &mut mem).expect_err("null");
    assert!(e.contains("not in any allocation"), "{e}");

    // A vector load must be aligned to the whole vector.
    let text = BLOCK_SUM.replace("ld.shared.f64 %fd4, [%rd4+8];", "ld.shared.v2.f64 {%fd4, %fd5}, [%rd4+8];");
    let e = Module::parse(&text).expect("parses").launch("block_sum", [1, 1], &[out, 1], &mut mem);
    assert!(e.as_ref().is_err_and(|e| e.contains("misaligned 16-byte access")), "{e:?}");

    // Unknown instructions are errors naming the line, not no-ops.
    let text = BLOCK_SUM.replace("add.rn.f64 %fd3, %fd3, %fd4;", "add.rz.f64 %fd3, %fd3, %fd4;");
    let e = Module::parse(&text).err().expect("unknown instruction");
    let line = 1 + text.lines().position(|l| l.contains("add.rz")).expect("the line");
    assert!(e.contains(&format!("line {line}:")) && e.contains("unknown instruction `add.rz.f64`"), "{e}");
    // A register of the wrong kind.
    let text = BLOCK_SUM.replace("cvt.u64.u32 %rd2, %r1;", "cvt.u64.u32 %rd2, %rd1;");
    assert!(Module::parse(&text).is_err());

    // Without the barrier thread 0 reads what lane 0 of warp 1 wrote: a race.
    let text = BLOCK_SUM.replace("\tbar.sync 0;\n", "");
    let e = Module::parse(&text).expect("parses").launch("block_sum", [1, 1], &[out, 1], &mut mem);
    assert!(e.as_ref().is_err_and(|e| e.contains("race") || e.contains("never written")), "{e:?}");
    // Every thread storing its result: threads of one block writing the same word.
    let text = BLOCK_SUM.replace("\t@%p2 bra $L_end;\n\tsetp.ne.u32 %p2, %r1, 0;\n\t@%p2 bra $L_end;\n", "");
    let e = Module::parse(&text).expect("parses").launch("block_sum", [1, 1], &[out, 1], &mut mem);
    assert!(e.as_ref().is_err_and(|e| e.contains("race")), "{e:?}");
    // A shuffle that only some lanes reach.
    let text =
        BLOCK_SUM.replace("mov.u32 %r9, 16;", "mov.u32 %r9, 16;\n\tsetp.eq.u32 %p1, %r1, 5;\n\t@%p1 bra $L_end;");
    let e = Module::parse(&text).expect("parses").launch("block_sum", [1, 1], &[out, 1], &mut mem);
    assert!(e.as_ref().is_err_and(|e| e.contains("has exited")), "{e:?}");
}

/// Small values through the tail's f64 transcendentals: log(cosh(x)) of a dice loss near 0
/// is log of a number near 1, which must not lose digits to a rounding to f32 first.
#[test]
fn small_losses_keep_their_relative_accuracy() {
    let mut failures = Vec::new();
    for (name, p) in [("log_cosh_dice", 0.9), ("log_cosh_dice", 0.99), ("dice", 0.99), ("iou", 0.999)] {
        let loss = Loss::compile(name, "").expect("compiles");
        let shape = [2, 1, 5];
        let inputs = [Tensor::new(shape, vec![p; 10]), Tensor::new(shape, vec![1.0; 10])];
        // Strictly relative: these losses are small, not cancellations.
        if let Err(e) = check_within(&loss, &inputs, &[true, true], &[], 0.0) {
            failures.push(format!("{name} with p = {p}, y = 1: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The tail's f64 functions (exp, log, log1p, sigmoid, softplus, tanh, pow) to double
/// precision: each loss is a function of `mean(x)`, whose f64 sum the kernels and the
/// reference compute from the same f32 values, so only the tail's maths can differ.
#[test]
fn tail_functions_are_double_precision() {
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let sources = [
        "exp(mean(x) * 30)",
        "exp(-mean(x) * 700)",
        "log(mean(x))",
        "log(mean(x) * 1e-300)",
        "log(mean(x) * 1e-310)",
        "log1p(mean(x) * 1e-9)",
        "log1p(mean(x) * 5)",
        "sigmoid(mean(x) * 7 - 3)",
        "sigmoid(-mean(x) * 50)",
        "softplus(mean(x) * 4 - 2)",
        "softplus(-mean(x) * 40)",
        "tanh(mean(x) * 1e-3)",
        "tanh(mean(x) * 0.5)",
        "tanh(-mean(x) * 5)",
        "mean(x) ^ 2.5",
        "(mean(x) - 2) ^ 3.0 + (mean(x) + 1) ^ -1.5",
        "-mean(log_softmax(mean(x, by = class) * 9))",
    ];
    let mut failures = Vec::new();
    for source in sources {
        let loss = Loss::compile(source, "").unwrap_or_else(|e| panic!("{source}: {e}"));
        let ext = [2, 3, 37];
        let inputs: Vec<Tensor> = vec![Tensor::new(ext, (0..222).map(|_| 0.2 + rng.uniform()).collect())];
        let (data, tensors) = rounded(&inputs);
        let want = loss.eval(&tensors.iter().collect::<Vec<_>>()).expect("reference");
        let layout = Layout::of(&[ext], ext, &[false]);
        let program = ptx::emit(&loss, &layout, Target::parse("sm_80").expect("target")).expect("emits");
        let module = Module::parse(&program.text).expect("parses");
        let setup = Setup { g: 2, y: 1, times: 1, misaligned: false };
        let got = run(&program, &module, &["x"], &data, &[false], ext, setup).expect("runs")[0].loss;
        if (got - want).abs() > 1e-13 * want.abs() || got.is_nan() {
            failures.push(format!("{source}: {got:e} vs {want:e} ({:.1e} relative)", (got - want).abs() / want.abs()));
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}
