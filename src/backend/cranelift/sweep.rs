//! One native function per sweep: the loop over a block's positions, four at a time.
//!
//! A sweep kernel runs over one block (one batch item, `len` consecutive spatial
//! positions). Per group of four positions it loads the inputs it streams as `f32x4`,
//! computes every value the sweep needs in registers (each value that varies over
//! class is `C` separate vectors: the class loop is unrolled, so softmax and per-class
//! sums are straight-line code), adds the reduction operands to `f32x4` accumulators
//! (masked to the live lanes) and stores the gradients. A block is a multiple of four
//! positions; the runtime runs the last `len % 4` positions of a row as one more block,
//! copied into scratch rows padded to four, with fewer live lanes. At the end each
//! accumulator is summed across lanes in f64, in a fixed order, into the block's
//! partials. Values that do not vary over positions (results of earlier sweeps, class
//! weights) arrive as one `f32` per class in the tail slots.

use std::cell::RefCell;
use std::collections::HashMap;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, F64X2, I32, I32X4, I64};
use cranelift_codegen::ir::{AbiParam, Block, ConstantData, InstBuilder, MemFlagsData, Value};
use cranelift_codegen::ir::{Function, Signature};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{verify_function, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use rayon::prelude::*;

use super::math::{self, Math};
use super::schedule;
use crate::ir::{AxisSet, Graph, NodeId, Op};
use crate::schedule::streamed;

/// What a sweep kernel is called with, once per block. Strides are in elements; 0 along
/// an axis where the tensor is broadcast.
#[repr(C)]
pub struct Args {
    /// Per input: the start of its data.
    pub inputs: *const *const f32,
    /// Per input: `[batch stride, class stride]`.
    pub input_strides: *const [i64; 2],
    /// Per written gradient (in `SweepSpec::writes` order): the start of its buffer.
    pub grads: *const *mut f32,
    /// Per written gradient: `[batch stride, class stride]`.
    pub grad_strides: *const [i64; 2],
    /// This block's batch item's tail slots: `classes` values per slot.
    pub tail: *const f32,
    /// This block's partial sums, one per reduction cell.
    pub partials: *mut f64,
    /// The block: batch item, first spatial position, number of positions (a positive
    /// multiple of 4).
    pub b: i64,
    pub s0: i64,
    pub len: i64,
    /// Lanes of each group of four that count in the sums: 4, or fewer for a block of
    /// the last positions padded to four (their gradients land in scratch lanes).
    pub live: i64,
}

pub type SweepFn = unsafe extern "C" fn(*const Args);

/// A gradient a sweep writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Write {
    pub input: usize,
    pub node: NodeId,
    /// Class rows of the input's buffer: the class count, or 1.
    pub rows: usize,
    /// The input is given with one class row but used for every class: its gradient is
    /// the sum over classes.
    pub sum_classes: bool,
    /// Not a gradient: a value this sweep leaves in the buffer for the next sweep, which
    /// reads it there before writing the gradient (`SweepSpec::stashed`). A sigmoid is
    /// carried packed with its mirror image (`Math::pack_sigmoids`).
    pub carry: bool,
}

/// What one kernel computes, in terms of the graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SweepSpec {
    /// Values summed over the block's positions (operands of reductions, gradients of
    /// inputs broadcast along the spatial axis): one partial sum per class of each.
    pub sums: Vec<NodeId>,
    /// Gradients it writes.
    pub writes: Vec<Write>,
    /// Values it reads from the tail (not constants), one slot each.
    pub slots: Vec<NodeId>,
    /// Values an earlier sweep left in the buffer of one of this sweep's writes (by index
    /// into `writes`): loaded there instead of computed again, before the gradient
    /// overwrites them.
    pub stashed: Vec<(NodeId, usize)>,
}

impl SweepSpec {
    /// The spec for these sums and writes; the slots are every value the sweep reads
    /// that does not vary over positions.
    pub fn new(g: &Graph, sums: Vec<NodeId>, writes: Vec<Write>, stashed: Vec<(NodeId, usize)>) -> SweepSpec {
        let leaves: Vec<NodeId> = stashed.iter().map(|(v, _)| *v).collect();
        let (_, slots) = body_and_slots(g, &roots(&sums, &writes), &leaves);
        SweepSpec { sums, writes, slots, stashed }
    }

    /// The values computed per position, in topological order.
    pub fn body(&self, g: &Graph) -> Vec<NodeId> {
        let leaves: Vec<NodeId> = self.stashed.iter().map(|(v, _)| *v).collect();
        body_and_slots(g, &roots(&self.sums, &self.writes), &leaves).0
    }

    /// Partial sums per block: one per class of each summed value.
    pub fn cells(&self, g: &Graph, classes: usize) -> Vec<usize> {
        self.sums.iter().map(|&v| classes_of(g, v, classes)).collect()
    }
}

/// The values a sweep must produce: what it sums and what it writes.
fn roots(sums: &[NodeId], writes: &[Write]) -> Vec<NodeId> {
    sums.iter().copied().chain(writes.iter().map(|w| w.node)).collect()
}

/// Nodes computed per position (in topological order) and the tail values they read;
/// `leaves` are loaded, not computed from their arguments.
fn body_and_slots(g: &Graph, roots: &[NodeId], leaves: &[NodeId]) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = roots.to_vec();
    while let Some(id) = stack.pop() {
        if seen.insert(id) && streamed(g, id) && !leaves.contains(&id) {
            stack.extend(g.node(id).args.iter().copied());
        }
    }
    let (body, tail): (Vec<NodeId>, Vec<NodeId>) = seen.into_iter().partition(|&id| streamed(g, id));
    let slots = tail.into_iter().filter(|&id| g.constant_value(id).is_none()).collect();
    (body, slots)
}

fn classes_of(g: &Graph, id: NodeId, classes: usize) -> usize {
    if g.axes(id).contains(AxisSet::CLASS) {
        classes
    } else {
        1
    }
}

/// Compiled kernels and the module that owns their code.
pub struct Kernels {
    module: Option<JITModule>,
    pub sweeps: Vec<SweepFn>,
}

// SAFETY: after `finalize_definitions` the module's code and data are never written
// again; the kernels are plain functions that touch only what `Args` points to. The
// module itself is only used again to free the memory, in `drop`, with `&mut self`.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: the function pointers in `sweeps` die with `self`; nothing else
            // refers to the code.
            unsafe { module.free_memory() };
        }
    }
}

/// How the kernels of one loss are specialised: the class count (unrolled) and, per
/// input, whether it is broadcast along the spatial axis (splat instead of vector loads).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub classes: usize,
    pub spatial_broadcast: Vec<bool>,
}

/// Instructions in a kernel past which its registers are allocated in a single pass:
/// the backtracking allocator's time grows faster than the kernel there (a chain of 400
/// sigmoids, 15,700 instructions, took 0.8 s; of 800, 7 s). The 64-class kernels have
/// about 8,000.
const HUGE: usize = 16_384;

/// The host's ISA, as `cranelift_native` detects it: to optimise the kernels, and to
/// lower them after lossc's own passes without optimising (reordering) them again; a
/// loop of thousands of instructions (a user's chain of hundreds of sigmoids) with a
/// register allocator whose time grows linearly, not quadratically, with its length.
struct Isas {
    optimize: OwnedTargetIsa,
    lower: OwnedTargetIsa,
    lower_huge: OwnedTargetIsa,
}

impl Isas {
    fn host() -> Result<Isas, String> {
        Ok(Isas {
            optimize: host_isa("speed", "backtracking")?,
            lower: host_isa("none", "backtracking")?,
            lower_huge: host_isa("none", "single_pass")?,
        })
    }
}

fn host_isa(opt_level: &str, regalloc: &str) -> Result<OwnedTargetIsa, String> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| f.set(k, v).map_err(|e| format!("{k}={v}: {e}"));
    set(&mut flags, "opt_level", opt_level)?;
    set(&mut flags, "regalloc_algorithm", regalloc)?;
    // The verifier runs in debug builds (and so in the tests), not on users' compiles.
    set(&mut flags, "enable_verifier", if cfg!(debug_assertions) { "true" } else { "false" })?;
    cranelift_native::builder()
        .map_err(|e| format!("cannot target this CPU: {e}"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("cannot target this CPU: {e}"))
}

/// Compiles one kernel per spec, the kernels in parallel (each is self-contained machine
/// code: no calls, constants in its own buffer).
pub fn compile(g: &Graph, specs: &[SweepSpec], shape: &Shape) -> Result<Kernels, String> {
    let isas = Isas::host()?;
    let codes: Vec<(Vec<u8>, u64)> = specs
        .par_iter()
        .enumerate()
        .map(|(k, spec)| machine_code(g, spec, shape, &isas, k))
        .collect::<Result<_, _>>()?;
    let isa = isas.lower;
    let mut module = JITModule::new(JITBuilder::with_isa(isa.clone(), default_libcall_names()));
    let mut signature = Signature::new(isa.default_call_conv());
    signature.params.push(AbiParam::new(I64));
    let mut ids: Vec<FuncId> = Vec::new();
    for (k, (bytes, alignment)) in codes.iter().enumerate() {
        let id =
            module.declare_function(&format!("sweep{k}"), Linkage::Local, &signature).map_err(|e| e.to_string())?;
        module.define_function_bytes(id, *alignment, bytes, &[]).map_err(|e| e.to_string())?;
        ids.push(id);
    }
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let sweeps = ids
        .iter()
        .map(|&id| {
            let code = module.get_finalized_function(id);
            // SAFETY: `code` is a finalized function with signature `fn(i64)`, and an
            // `extern "C" fn(*const Args)` passes its pointer the same way.
            unsafe { std::mem::transmute::<*const u8, SweepFn>(code) }
        })
        .collect();
    Ok(Kernels { module: Some(module), sweeps })
}

/// One kernel's machine code and its alignment.
fn machine_code(g: &Graph, spec: &SweepSpec, shape: &Shape, isas: &Isas, k: usize) -> Result<(Vec<u8>, u64), String> {
    let isa = &*isas.optimize;
    let mut func = Function::new();
    func.signature = Signature::new(isa.default_call_conv());
    func.signature.params.push(AbiParam::new(I64));
    let mut fctx = FunctionBuilderContext::new();
    let inner = {
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let inner =
            Emitter { g, spec, shape, math: Math::for_isa(isa), hoisted: HashMap::new(), masks: RefCell::default() }
                .emit(&mut b)?;
        b.seal_all_blocks();
        b.finalize(isa.frontend_config());
        inner
    };
    if cfg!(debug_assertions) {
        verify_function(&func, isa).map_err(|e| format!("sweep {k} does not verify: {e}"))?;
    }
    let mut ctx = Context::for_function(func);
    ctx.optimize(&*isas.optimize, &mut ControlPlane::default()).map_err(|e| format!("sweep {k}: {e:?}"))?;
    // From here on the loop's instruction order is ours: `isas.lower` optimises no further.
    // Only kernels over one class are reordered (see `schedule`): the many-class kernels
    // have independent chains enough. Invariants move to memory only where far more
    // vectors are live than there are registers: where the register allocator copes, a
    // load that lowering cannot fold costs an instruction that a register would save
    // (combo's gradient sweep: 61 instructions a step moved, 44 kept). Multiclass Dice's
    // first sweep, C exps and 3C accumulators, went from 270 instructions a step to 216
    // (about 5% faster, interleaved runs).
    if shape.classes == 1 {
        schedule::block(&mut ctx.func, inner);
    }
    // Not in a loop of thousands of instructions: cutting costs time quadratic in the
    // loop's length.
    let small = ctx.func.layout.block_insts(inner).count() <= schedule::LARGEST_CUT;
    if small && schedule::vector_pressure(&ctx.func, inner) > schedule::CROWDED {
        let blocks = schedule::cut_after_shared_values(&mut ctx.func, inner);
        schedule::invariants_from_memory(&mut ctx.func, &blocks);
    }
    if cfg!(debug_assertions) {
        verify_function(&ctx.func, &*isas.lower)
            .map_err(|e| format!("sweep {k} does not verify once scheduled: {e}"))?;
    }
    // LOSSC_DISASM=1 prints each kernel's machine code (for work on the code generator);
    // LOSSC_DISASM_DIR=DIR also writes its bytes to DIR/sweepK.bin, for objdump and perf.
    let disasm = std::env::var_os("LOSSC_DISASM").is_some();
    // Lowered directly: `Context::compile` would first replace the parameters of the
    // blocks `cut_after_shared_values` made by their only incoming values, which undoes
    // the cut. The function is already legal for this target (`ctx.optimize`).
    ctx.func.dfg.resolve_all_aliases();
    ctx.compute_cfg();
    ctx.compute_domtree();
    let size: usize = ctx.func.layout.blocks().map(|b| ctx.func.layout.block_insts(b).count()).sum();
    let lower = if size > HUGE { &isas.lower_huge } else { &isas.lower };
    let code = lower
        .compile_function(&ctx.func, &ctx.domtree, &mut regalloc2::Ctx::default(), disasm, &mut ControlPlane::default())
        .map_err(|e| format!("sweep {k}: {e:?}"))?
        .apply_params(&ctx.func.params);
    if !code.buffer.relocs().is_empty() {
        return Err(format!("sweep {k} calls out of the kernel: its maths must be inline"));
    }
    if disasm {
        eprintln!("sweep {k}:\n{}", code.vcode.as_deref().unwrap_or("(no disassembly)"));
        if let Some(dir) = std::env::var_os("LOSSC_DISASM_DIR") {
            let _ = std::fs::write(std::path::Path::new(&dir).join(format!("sweep{k}.bin")), code.code_buffer());
        }
    }
    Ok((code.code_buffer().to_vec(), u64::from(code.buffer.alignment)))
}

/// Of a class log-sum-exp: e^(x_c - max) per class, their sum, and its reciprocal once needed.
type SoftmaxParts = (Vec<Value>, Value, Option<Value>);

/// The vectors of one group of lanes, by node and class.
type Values = HashMap<(NodeId, usize), Value>;

/// Where `Values` keeps the packed form of a carried sigmoid of class `c`, beside its
/// value (no class index comes near).
const fn packed(c: usize) -> usize {
    usize::MAX - c
}

/// Where a group of four lanes is: this byte offset past the rows' current addresses.
#[derive(Clone, Copy)]
struct At(i32);

/// A row of a tensor: its address at the block's first position, read at the loop's
/// byte offset (one index register for every row: a many-class kernel has too many rows
/// to keep a moving pointer for each in a register), or fixed (an input broadcast along
/// positions).
#[derive(Clone, Copy)]
enum Row {
    Moving(Value),
    Fixed(Value),
}

impl Row {
    fn get(&self, b: &mut FunctionBuilder, offset: Value) -> Value {
        match *self {
            Row::Moving(start) => b.ins().iadd(start, offset),
            Row::Fixed(p) => p,
        }
    }
}

struct Emitter<'a> {
    g: &'a Graph,
    spec: &'a SweepSpec,
    shape: &'a Shape,
    math: Math,
    /// Loop-invariant vectors (constants, tail values), by node and class.
    hoisted: Values,
    /// The lane mask behind each comparison's 0/1 vector, so that a `where` on it selects
    /// with the mask itself instead of comparing the 0/1 vector with 0 again.
    masks: RefCell<HashMap<Value, Value>>,
}

/// A sweep whose sums move to loops of their own (`Emitter::split_sums`).
struct Split {
    /// What the loop over the run computes: the values written and what they need.
    writes: Vec<NodeId>,
    /// What the sums loops compute, from `stash` and the inputs.
    sums: Vec<NodeId>,
    /// The values the run writes, read back from their buffers.
    stash: Vec<(NodeId, usize)>,
}

/// Sum cells from which a multiclass sweep's sums get loops of their own: 3 sums of 4 classes.
const SPLIT_CELLS: usize = 12;

/// Positions between moves of the f32 sums into the f64 ones (a multiple of 4 UNROLL).
const FLUSH: i64 = 64;

/// Groups of four positions per step of the inner loop, computed side by side so that
/// their dependency chains (exp, division, log) overlap.
const UNROLL: usize = 1;

/// The most vectors computed a step ahead (see `Emitter::ahead`).
const MAX_AHEAD: usize = 2;

/// Byte offsets of the `Args` fields.
const ARG_INPUTS: i32 = 0;
const ARG_INPUT_STRIDES: i32 = 8;
const ARG_GRADS: i32 = 16;
const ARG_GRAD_STRIDES: i32 = 24;
const ARG_TAIL: i32 = 32;
const ARG_PARTIALS: i32 = 40;
const ARG_B: i32 = 48;
const ARG_S0: i32 = 56;
const ARG_LEN: i32 = 64;
const ARG_LIVE: i32 = 72;

fn data() -> MemFlagsData {
    // f32 buffers are only 4-byte aligned; every access is in bounds.
    MemFlagsData::new().with_notrap()
}

impl Emitter<'_> {
    fn classes(&self, id: NodeId) -> usize {
        classes_of(self.g, id, self.shape.classes)
    }

    /// Emits the kernel; returns the block of its loop over positions.
    fn emit(&mut self, b: &mut FunctionBuilder) -> Result<Block, String> {
        let g = self.g;
        let leaves: Vec<NodeId> = self.spec.stashed.iter().map(|(v, _)| *v).collect();
        let (mut body, slots) = body_and_slots(g, &roots(&self.spec.sums, &self.spec.writes), &leaves);
        debug_assert_eq!(slots, self.spec.slots);
        // Stashed values are plain loads: first, so that anything may use them.
        body.sort_by_key(|id| !leaves.contains(id));
        let entry = b.create_block();
        let outer = b.create_block();
        let inner = b.create_block();
        let flush_block = b.create_block();
        let done = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let args = b.block_params(entry)[0];
        let field =
            |b: &mut FunctionBuilder, ptr: Value, off: i32| b.ins().load(I64, MemFlagsData::trusted(), ptr, off);
        let inputs = field(b, args, ARG_INPUTS);
        let input_strides = field(b, args, ARG_INPUT_STRIDES);
        let grads = field(b, args, ARG_GRADS);
        let grad_strides = field(b, args, ARG_GRAD_STRIDES);
        let tail = field(b, args, ARG_TAIL);
        let partials = field(b, args, ARG_PARTIALS);
        let batch = field(b, args, ARG_B);
        let s0 = field(b, args, ARG_S0);
        let len = field(b, args, ARG_LEN);

        // Row addresses at the block's first position, read at the loop's offset (a fixed
        // row, for inputs broadcast along positions, at every position).
        let row_start = |b: &mut FunctionBuilder, base: Value, bs: Value, cs: Value, c: usize, along: bool| {
            let mut offset = b.ins().imul(batch, bs);
            if along {
                offset = b.ins().iadd(offset, s0);
            }
            let cc = b.ins().iconst(I64, c as i64);
            let co = b.ins().imul(cs, cc);
            let o = b.ins().iadd(offset, co);
            let o = b.ins().ishl_imm_u(o, 2);
            b.ins().iadd(base, o)
        };
        let mut rows: HashMap<(usize, usize), Row> = HashMap::new();
        for &id in &body {
            if let Op::Input { index, .. } = g.node(id).op {
                let i = index as usize;
                let base = field(b, inputs, 8 * index as i32);
                let bs = field(b, input_strides, 16 * index as i32);
                let cs = field(b, input_strides, 16 * index as i32 + 8);
                let fixed = self.shape.spatial_broadcast[i];
                for c in 0..self.classes(id) {
                    let start = row_start(b, base, bs, cs, c, !fixed);
                    rows.insert((i, c), if fixed { Row::Fixed(start) } else { Row::Moving(start) });
                }
            }
        }
        let mut write_rows: Vec<Vec<Row>> = Vec::new();
        for (w, write) in self.spec.writes.iter().enumerate() {
            let base = field(b, grads, 8 * w as i32);
            let bs = field(b, grad_strides, 16 * w as i32);
            let cs = field(b, grad_strides, 16 * w as i32 + 8);
            let list = (0..write.rows).map(|c| Row::Moving(row_start(b, base, bs, cs, c, true))).collect();
            write_rows.push(list);
        }
        // Tail slots and constants, splatted once per block.
        for (k, &id) in slots.iter().enumerate() {
            for c in 0..self.classes(id) {
                let off = ((k * self.shape.classes + c) * 4) as i32;
                let v = b.ins().load(F32, MemFlagsData::trusted(), tail, off);
                self.hoisted.insert((id, c), b.ins().splat(F32X4, v));
            }
        }
        for &id in body.iter().chain(&slots) {
            for &a in &g.node(id).args {
                if let Some(v) = g.constant_value(a) {
                    self.hoisted.entry((a, 0)).or_insert_with(|| math::splat(b, v as f32));
                }
            }
        }
        for w in &self.spec.writes {
            if let Some(v) = g.constant_value(w.node) {
                self.hoisted.entry((w.node, 0)).or_insert_with(|| math::splat(b, v as f32));
            }
        }

        // Accumulators per sum cell: an f32x4 over FLUSH positions, then two f64x2.
        let cells: Vec<usize> = self.spec.cells(g, self.shape.classes);
        let zero = math::splat(b, 0.0);
        let zero64 = {
            let z = b.ins().f64const(0.0);
            b.ins().splat(F64X2, z)
        };
        let i = b.declare_var(I64);
        let izero = b.ins().iconst(I64, 0);
        b.def_var(i, izero);
        let mut narrow: Vec<Variable> = Vec::new();
        let mut wide: Vec<[Variable; 2]> = Vec::new();
        for _ in 0..cells.iter().sum::<usize>() {
            let v = b.declare_var(F32X4);
            b.def_var(v, zero);
            narrow.push(v);
            let halves = [b.declare_var(F64X2), b.declare_var(F64X2)];
            for h in halves {
                b.def_var(h, zero64);
            }
            wide.push(halves);
        }
        // Lanes past `live` (a padded run of fewer than four positions, which is one step)
        // are dropped when a run is moved into f64, rather than at every step's add.
        let live = field(b, args, ARG_LIVE);
        let live = b.ins().ireduce(I32, live);
        let live = b.ins().splat(I32X4, live);
        let lane_bytes: Vec<u8> = (0u32..4).flat_map(|k| k.to_le_bytes()).collect();
        let lane_ids = b.func.dfg.constants.insert(ConstantData::from(lane_bytes));
        let lane_ids = b.ins().vconst(I32X4, lane_ids);
        let mask = b.ins().icmp(IntCC::SignedLessThan, lane_ids, live);
        let mask = b.ins().bitcast(F32X4, math::lanes(), mask);
        let flush = |b: &mut FunctionBuilder| {
            for (&var, halves) in narrow.iter().zip(&wide) {
                let a = b.use_var(var);
                let a = b.ins().band(a, mask);
                let high = math::high_to_low(b, a);
                for (h, part) in halves.iter().zip([a, high]) {
                    let x = b.ins().fvpromote_low(part);
                    let s = b.use_var(*h);
                    let s = b.ins().fadd(s, x);
                    b.def_var(*h, s);
                }
                b.def_var(var, zero);
            }
        };
        let advance = |b: &mut FunctionBuilder, groups: usize| {
            let iv = b.use_var(i);
            let next = b.ins().iadd_imm_s(iv, 4 * groups as i64);
            b.def_var(i, next);
            next
        };
        // A crowded multiclass sweep that writes and sums runs its sums in loops of their own.
        let split = self.split_sums();
        let main: &[NodeId] = split.as_ref().map_or(&body, |s| &s.writes);
        // e^-|x| of each logistic argument, one step ahead (see `Emitter::ahead`): the
        // first step's here, each next step's in the step before.
        let ahead = self.ahead_plan(main);
        let mut ahead_vars: Vec<HashMap<(NodeId, usize), Variable>> = vec![HashMap::new(); UNROLL];
        if !ahead.bases.is_empty() {
            let zero = b.ins().iconst(I64, 0);
            let here = self.positions(b, &rows, &write_rows, zero);
            let zero = b.ins().iconst(I64, 0);
            let first = self.ahead(b, &ahead, &here, zero)?;
            for (vars, zs) in ahead_vars.iter_mut().zip(first) {
                for (key, z) in zs {
                    let var = b.declare_var(F32X4);
                    b.def_var(var, z);
                    vars.insert(key, var);
                }
            }
        }
        let last = b.ins().iadd_imm_s(len, -4 * UNROLL as i64);
        // Runs of up to FLUSH positions, four at a time, summed in f32, then moved into f64.
        b.ins().jump(outer, &[]);
        b.switch_to_block(outer);
        let iv = b.use_var(i);
        let run_start = iv;
        let more = b.ins().icmp(IntCC::SignedLessThan, iv, len);
        let stop = b.ins().iadd_imm_s(iv, FLUSH);
        let short = b.ins().icmp(IntCC::SignedLessThan, len, stop);
        let stop = b.ins().select(short, len, stop);
        b.ins().brif(more, inner, &[], done, &[]);

        b.switch_to_block(inner);
        let iv = b.use_var(i);
        let offset = b.ins().ishl_imm_u(iv, 2);
        let here = self.positions(b, &rows, &write_rows, offset);
        let ats: Vec<At> = (0..UNROLL).map(|u| At(16 * u as i32)).collect();
        let seeds: Vec<Values> =
            ahead_vars.iter().map(|vars| vars.iter().map(|(&key, &var)| (key, b.use_var(var))).collect()).collect();
        if !ahead.bases.is_empty() {
            // The next step's positions, or this step's again at the block's last step (its
            // results are never used, and nothing past the block is read).
            // Compared with `len` less a step, not as `i + step < len`: the sum would stay
            // live to the loop's end as the next index, which costs a register and a move.
            let iv = b.use_var(i);
            let has_next = b.ins().icmp(IntCC::SignedLessThan, iv, last);
            let step = b.ins().iconst(I64, 16 * UNROLL as i64);
            let zero = b.ins().iconst(I64, 0);
            let step = b.ins().select(has_next, step, zero);
            let zs = self.ahead(b, &ahead, &here, step)?;
            for (vars, zs) in ahead_vars.iter().zip(zs) {
                for (key, z) in zs {
                    b.def_var(vars[&key], z);
                }
            }
        }
        let values = self.body(b, main, &here.0, &here.1, &ats, &seeds, &self.spec.stashed, None)?;
        if split.is_none() {
            self.accumulate(b, &values, &narrow, None);
        }
        for (v, &at) in values.iter().zip(&ats) {
            self.store(b, v, &here.1, at);
        }
        let next = advance(b, UNROLL);
        let more = b.ins().icmp(IntCC::SignedLessThan, next, stop);
        let sums_loops: Vec<Block> = match &split {
            Some(_) => (0..self.shape.classes).map(|_| b.create_block()).collect(),
            None => Vec::new(),
        };
        b.ins().brif(more, inner, &[], *sums_loops.first().unwrap_or(&flush_block), &[]);

        // The run again, a class at a time: its sums from what the run wrote and the inputs.
        if let Some(split) = &split {
            let j = b.declare_var(I64);
            for (c, &setup) in sums_loops.iter().enumerate() {
                b.switch_to_block(setup);
                b.def_var(j, run_start);
                let step = b.create_block();
                b.ins().jump(step, &[]);
                b.switch_to_block(step);
                let jv = b.use_var(j);
                let offset = b.ins().ishl_imm_u(jv, 2);
                let here = self.positions(b, &rows, &write_rows, offset);
                let values = self.body(b, &split.sums, &here.0, &here.1, &[At(0)], &[], &split.stash, Some(c))?;
                self.accumulate(b, &values, &narrow, Some(c));
                let next = b.ins().iadd_imm_s(jv, 4);
                b.def_var(j, next);
                let more = b.ins().icmp(IntCC::SignedLessThan, next, stop);
                let after = sums_loops.get(c + 1).copied().unwrap_or(flush_block);
                b.ins().brif(more, step, &[], after, &[]);
            }
        }

        b.switch_to_block(flush_block);
        flush(b);
        b.ins().jump(outer, &[]);

        // Lanes summed in f64, in a fixed order, into the block's partials.
        b.switch_to_block(done);
        flush(b);
        for (cell, halves) in wide.iter().enumerate() {
            let [lo, hi] = halves.map(|h| {
                let v = b.use_var(h);
                let l0 = b.ins().extractlane(v, 0);
                let l1 = b.ins().extractlane(v, 1);
                b.ins().fadd(l0, l1)
            });
            let s = b.ins().fadd(lo, hi);
            b.ins().store(MemFlagsData::trusted(), s, partials, (cell * 8) as i32);
        }
        b.ins().return_(&[]);
        Ok(inner)
    }

    /// Where a multiclass sweep both writes values and sums cheap functions of them and of
    /// the inputs (multiclass Dice's first sweep: softmax p written, then y p, p and y summed
    /// per class), the sums move to loops of their own: once a run of positions is written,
    /// one loop per class reads it back (from L1) with the inputs and sums. The C exps'
    /// loop then keeps no 3C accumulators in registers, and each sums loop keeps three. The
    /// sums add the same f32 values in the same order, except that a sigmoid carried packed
    /// is read back as the gradient sweep reads it (1 - sigmoid(-x) for x >= 0, within an
    /// ulp of the value computed).
    fn split_sums(&self) -> Option<Split> {
        let g = self.g;
        if self.shape.classes == 1 || self.spec.sums.is_empty() {
            return None;
        }
        // Each buffer must hold one value: two writes into one leave only the last.
        let mut buffers: Vec<usize> = self.spec.writes.iter().map(|w| w.input).collect();
        buffers.sort_unstable();
        if buffers.windows(2).any(|pair| pair[0] == pair[1]) {
            return None;
        }
        // What the run leaves in the write buffers, stored as `body` loads a stash (a
        // sigmoid packed only where it is carried).
        let mut stash: Vec<(NodeId, usize)> = Vec::new();
        for (w, write) in self.spec.writes.iter().enumerate() {
            let as_stored = write.carry || !self.packs(write.node);
            let known = stash.iter().any(|(v, _)| *v == write.node);
            if !write.sum_classes && as_stored && !known && g.constant_value(write.node).is_none() {
                stash.push((write.node, w));
            }
        }
        let leaves: Vec<NodeId> = stash.iter().map(|(v, _)| *v).collect();
        // Values an earlier sweep stashed are gone by then (the run overwrote them with
        // gradients): sums that need one stay in the run's loop.
        let own: Vec<NodeId> = self.spec.stashed.iter().map(|(v, _)| *v).collect();
        let mut bounds = leaves.clone();
        bounds.extend(own.iter().filter(|v| !leaves.contains(v)));
        let (mut sums, _) = body_and_slots(g, &self.spec.sums, &bounds);
        let cheap = |id: &NodeId| {
            leaves.contains(id)
                || matches!(
                    g.node(*id).op,
                    Op::Input { .. } | Op::Neg | Op::Abs | Op::Relu | Op::Add | Op::Sub | Op::Mul | Op::Min | Op::Max
                )
        };
        // Worth a second pass over the run only where the sums crowd out registers and
        // what they read back replaces real work.
        let cells: usize = self.spec.cells(g, self.shape.classes).iter().sum();
        let gone = |id: &NodeId| own.contains(id) && !leaves.contains(id);
        if cells < SPLIT_CELLS || leaves.is_empty() || sums.iter().any(gone) || !sums.iter().all(cheap) {
            return None;
        }
        let roots: Vec<NodeId> = self.spec.writes.iter().map(|w| w.node).collect();
        let (mut main, _) = body_and_slots(g, &roots, &own);
        main.sort_by_key(|id| !own.contains(id));
        sums.sort_by_key(|id| !leaves.contains(id));
        Some(Split { writes: main, sums, stash })
    }

    /// The addresses of the input rows and of the gradient rows `offset` bytes into the block.
    fn positions(
        &self,
        b: &mut FunctionBuilder,
        rows: &HashMap<(usize, usize), Row>,
        write_rows: &[Vec<Row>],
        offset: Value,
    ) -> Positions {
        let inputs = rows.iter().map(|(k, r)| (*k, (r.get(b, offset), matches!(r, Row::Fixed(_))))).collect();
        let writes = write_rows.iter().map(|list| list.iter().map(|r| r.get(b, offset)).collect()).collect();
        (inputs, writes)
    }

    /// Adds each summed value (of class `only`, if given) to its f32 accumulator (all four
    /// lanes: `flush` drops the lanes of a padded run that are not live).
    fn accumulate(&self, b: &mut FunctionBuilder, values: &[Values], narrow: &[Variable], only: Option<usize>) {
        let mut vars = narrow.iter();
        for &operand in &self.spec.sums {
            for c in 0..self.classes(operand) {
                let var = *vars.next().expect("invariant: one accumulator per cell");
                if only.is_some_and(|k| k != c) {
                    continue;
                }
                let mut v = self.value(&values[0], operand, c);
                for more in &values[1..] {
                    let w = self.value(more, operand, c);
                    v = b.ins().fadd(v, w);
                }
                let a = b.use_var(var);
                let s = b.ins().fadd(a, v);
                b.def_var(var, s);
            }
        }
    }

    fn value(&self, values: &Values, id: NodeId, c: usize) -> Value {
        let c = if self.g.axes(id).contains(AxisSet::CLASS) { c } else { 0 };
        *values
            .get(&(id, c))
            .or_else(|| self.hoisted.get(&(id, c)))
            .unwrap_or_else(|| panic!("invariant: {id:?} class {c} is computed before use"))
    }

    /// The packed form of a carried sigmoid (`Math::pack_sigmoids`), by class like `value`.
    fn packed_value(&self, values: &Values, id: NodeId, c: usize) -> Value {
        let c = if self.g.axes(id).contains(AxisSet::CLASS) { c } else { 0 };
        *values.get(&(id, packed(c))).unwrap_or_else(|| panic!("invariant: {id:?} class {c} is packed before use"))
    }

    /// Stores every gradient the sweep writes at the body's positions.
    fn store(&self, b: &mut FunctionBuilder, values: &Values, rows: &[Vec<Value>], at: At) {
        for (w, addrs) in self.spec.writes.iter().zip(rows) {
            for (r, &addr) in addrs.iter().enumerate() {
                let v = if w.sum_classes {
                    let n = self.classes(w.node);
                    let mut s = self.value(values, w.node, 0);
                    for c in 1..n {
                        let x = self.value(values, w.node, c);
                        s = b.ins().fadd(s, x);
                    }
                    if n == 1 {
                        let k = math::splat(b, self.shape.classes as f32);
                        s = b.ins().fmul(s, k);
                    }
                    s
                } else if w.carry && self.packs(w.node) {
                    self.packed_value(values, w.node, r)
                } else {
                    self.value(values, w.node, r)
                };
                b.ins().store(data(), v, addr, at.0);
            }
        }
    }

    /// Emits every body node at `at` (of class `only` along the class axis, if given), with
    /// the `stash` values loaded from the write buffers; returns their values by (node, class).
    #[allow(clippy::too_many_arguments)]
    fn body(
        &self,
        b: &mut FunctionBuilder,
        body: &[NodeId],
        rows: &HashMap<(usize, usize), (Value, bool)>,
        write_rows: &[Vec<Value>],
        ats: &[At],
        seeds: &[Values],
        stash: &[(NodeId, usize)],
        only: Option<usize>,
    ) -> Result<Vec<Values>, String> {
        let g = self.g;
        let mut all: Vec<Values> = vec![HashMap::new(); ats.len()];
        let mut logistic = Logistic::default();
        let mut softmax: HashMap<(usize, NodeId), SoftmaxParts> = HashMap::new();
        // Node by node, each for every group of lanes: independent chains side by side.
        for &id in body {
            let node = g.node(id);
            let n = self.classes(id);
            for (copy, (values, &at)) in all.iter_mut().zip(ats).enumerate() {
                // The classes to compute: all, or `only` (of a node along the class axis).
                let classes = match only {
                    Some(c) if n > 1 => c..c + 1,
                    _ => 0..n,
                };
                if let Some(&(_, w)) = stash.iter().find(|(v, _)| *v == id) {
                    for c in classes {
                        let list = &write_rows[w];
                        let stored = load(b, list[c.min(list.len() - 1)], at);
                        if self.packs(id) {
                            let (pos, _) = self.math.unpack_sigmoids(b, stored);
                            values.insert((id, packed(c)), stored);
                            values.insert((id, c), pos);
                        } else {
                            values.insert((id, c), stored);
                        }
                    }
                    continue;
                }
                match node.op {
                    // softmax: exp(x - logsumexp(x)) is e^(x - max) / sum, from the logsumexp.
                    Op::Exp if self.softmax_of(node.args[0]).is_some_and(|l| softmax.contains_key(&(copy, l))) => {
                        let l = self.softmax_of(node.args[0]).expect("checked above");
                        let (exps, sum, recip) = softmax.get_mut(&(copy, l)).expect("checked above");
                        let r = *recip.get_or_insert_with(|| {
                            let one = math::splat(b, 1.0);
                            b.ins().fdiv(one, *sum)
                        });
                        for (c, &e) in exps.iter().enumerate() {
                            let v = b.ins().fmul(e, r);
                            values.insert((id, c), v);
                        }
                    }
                    // sigmoid and softplus of x and of -x share e^-|x|, one division, one log1p.
                    Op::Sigmoid | Op::Softplus => {
                        let (base, negated) = self.logistic_base(id);
                        // With sigmoid(x) stashed, sigmoid(-x) comes from the same packed value.
                        if let Some(v) = self.stashed_sigmoid(id) {
                            for c in 0..n {
                                let stored = self.packed_value(values, v, c);
                                let (_, neg) = self.math.unpack_sigmoids(b, stored);
                                values.insert((id, c), neg);
                            }
                            continue;
                        }
                        for c in 0..n {
                            let x = self.value(values, base, c);
                            if let Some(&z) = seeds.get(copy).and_then(|zs| zs.get(&(base, c))) {
                                logistic.seed(x, z);
                            }
                            let v = if node.op == Op::Sigmoid {
                                let (pos, neg) = logistic.sigmoids(self.math, b, x);
                                if self.carries_packed(id) {
                                    values.insert((id, packed(c)), logistic.packed(self.math, b, x));
                                }
                                if negated {
                                    neg
                                } else {
                                    pos
                                }
                            } else {
                                let l = logistic.log1p(self.math, b, x);
                                if negated {
                                    self.math.negative_part_plus(b, x, l)
                                } else {
                                    self.math.positive_part_plus(b, x, l)
                                }
                            };
                            values.insert((id, c), v);
                        }
                    }
                    Op::Input { index, .. } => {
                        for c in classes {
                            let (row, fixed) = rows[&(index as usize, c)];
                            let v = if fixed {
                                let x = b.ins().load(F32, data(), row, 0);
                                b.ins().splat(F32X4, x)
                            } else {
                                load(b, row, at)
                            };
                            values.insert((id, c), v);
                        }
                    }
                    Op::Sum(over) if over == AxisSet::CLASS => {
                        let a = node.args[0];
                        let v = if self.classes(a) > 1 {
                            let mut s = self.value(values, a, 0);
                            for c in 1..self.classes(a) {
                                let x = self.value(values, a, c);
                                s = b.ins().fadd(s, x);
                            }
                            s
                        } else {
                            let x = self.value(values, a, 0);
                            let k = math::splat(b, self.shape.classes as f32);
                            b.ins().fmul(x, k)
                        };
                        values.insert((id, 0), v);
                    }
                    Op::LogSumExp(over) if over == AxisSet::CLASS => {
                        let a = node.args[0];
                        let v = if self.classes(a) > 1 {
                            let xs: Vec<Value> = (0..self.classes(a)).map(|c| self.value(values, a, c)).collect();
                            let (v, exps, sum) = self.log_sum_exp(b, &xs);
                            softmax.insert((copy, id), (exps, sum, None));
                            v
                        } else {
                            let x = self.value(values, a, 0);
                            let k = math::splat(b, (self.shape.classes as f32).ln());
                            b.ins().fadd(x, k)
                        };
                        values.insert((id, 0), v);
                    }
                    op => {
                        for c in classes {
                            let args: Vec<Value> = node.args.iter().map(|&a| self.value(values, a, c)).collect();
                            let v = self.elementwise(b, op, &node.args, &args)?;
                            values.insert((id, c), v);
                        }
                    }
                }
            }
        }
        Ok(all)
    }

    /// The argument of a logistic node (sigmoid or softplus, of x or of -x) and whether it
    /// is negated.
    fn logistic_base(&self, id: NodeId) -> (NodeId, bool) {
        let arg = self.g.node(id).args[0];
        match self.g.node(arg).op {
            Op::Neg => (self.g.node(arg).args[0], true),
            _ => (arg, false),
        }
    }

    /// Whether `id` is carried between sweeps packed (`Math::pack_sigmoids`): a sigmoid of
    /// a value that is not itself negated (sigmoid(-x) then comes from the same packing).
    fn packs(&self, id: NodeId) -> bool {
        self.g.node(id).op == Op::Sigmoid && !self.logistic_base(id).1
    }

    /// Whether this sweep leaves `id` for the next one packed.
    fn carries_packed(&self, id: NodeId) -> bool {
        self.packs(id) && self.spec.writes.iter().any(|w| w.carry && w.node == id)
    }

    /// For sigmoid(-x) in a sweep that has sigmoid(x) stashed: that stashed value.
    fn stashed_sigmoid(&self, id: NodeId) -> Option<NodeId> {
        let g = self.g;
        let (base, negated) = self.logistic_base(id);
        self.spec.stashed.iter().map(|(v, _)| *v).find(|&v| {
            negated && g.node(id).op == Op::Sigmoid && g.node(v).op == Op::Sigmoid && g.node(v).args[0] == base
        })
    }

    /// Which e^-|x| are computed a step ahead: the arguments of the body's logistic nodes
    /// (those not loaded from a stash or served by one) that vary over positions, and the
    /// body nodes they need.
    fn ahead_plan(&self, body: &[NodeId]) -> Ahead {
        let g = self.g;
        let mut bases: Vec<NodeId> = Vec::new();
        for &id in body {
            let logistic = matches!(g.node(id).op, Op::Sigmoid | Op::Softplus);
            if logistic && !self.spec.stashed.iter().any(|(v, _)| *v == id) && self.stashed_sigmoid(id).is_none() {
                let (base, _) = self.logistic_base(id);
                if body.contains(&base) && !bases.contains(&base) {
                    bases.push(base);
                }
            }
        }
        let mut needed = std::collections::BTreeSet::new();
        let mut stack = bases.clone();
        while let Some(id) = stack.pop() {
            if body.contains(&id) && needed.insert(id) && !self.spec.stashed.iter().any(|(v, _)| *v == id) {
                stack.extend(g.node(id).args.iter().copied());
            }
        }
        // With many classes the body has independent chains enough, and carrying one
        // vector per class across steps costs registers.
        let carried: usize = bases.iter().map(|&b| self.classes(b)).sum();
        if carried > MAX_AHEAD {
            return Ahead { bases: Vec::new(), body: Vec::new() };
        }
        Ahead { bases, body: body.iter().copied().filter(|id| needed.contains(id)).collect() }
    }

    /// e^-|x| for each of `ahead`'s arguments at the positions `step` bytes past `here`, per
    /// group of lanes. Computing them a step early is software pipelining: the chain from
    /// the loads through exp no longer sits in front of the division, log and stores of
    /// the same step, so the core overlaps two steps' chains instead of waiting on one.
    fn ahead(
        &self,
        b: &mut FunctionBuilder,
        ahead: &Ahead,
        here: &Positions,
        step: Value,
    ) -> Result<Vec<Values>, String> {
        let rows = here
            .0
            .iter()
            .map(|(&k, &(row, fixed))| (k, (if fixed { row } else { b.ins().iadd(row, step) }, fixed)))
            .collect();
        let writes: Vec<Vec<Value>> =
            here.1.iter().map(|list| list.iter().map(|&row| b.ins().iadd(row, step)).collect()).collect();
        let ats: Vec<At> = (0..UNROLL).map(|u| At(16 * u as i32)).collect();
        let none = vec![HashMap::new(); UNROLL];
        let values = self.body(b, &ahead.body, &rows, &writes, &ats, &none, &self.spec.stashed, None)?;
        Ok(values
            .iter()
            .map(|values| {
                let mut zs = HashMap::new();
                for &base in &ahead.bases {
                    for c in 0..self.classes(base) {
                        let x = self.value(values, base, c);
                        zs.insert((base, c), self.math.exp_neg_abs(b, x));
                    }
                }
                zs
            })
            .collect())
    }

    /// The class log-sum-exp `l` when `arg` is `x - l` with `l = logsumexp(x, over class)`.
    fn softmax_of(&self, arg: NodeId) -> Option<NodeId> {
        let n = self.g.node(arg);
        let l = *n.args.get(1)?;
        let ln = self.g.node(l);
        (n.op == Op::Sub
            && ln.op == Op::LogSumExp(AxisSet::CLASS)
            && ln.args[0] == n.args[0]
            && self.classes(n.args[0]) > 1)
            .then_some(l)
    }

    /// log(sum(exp(x))) over the vectors, shifted by their maximum; an infinite maximum
    /// is the result (as in the reference), a NaN anywhere gives NaN. Also returns the
    /// shifted exponentials e^(x - max) and their sum, which softmax reuses.
    fn log_sum_exp(&self, b: &mut FunctionBuilder, xs: &[Value]) -> (Value, Vec<Value>, Value) {
        // `maxps` drops NaNs; a NaN still reaches the sum of exponentials (checked below).
        let mut m = xs[0];
        for &x in &xs[1..] {
            m = math::max(b, x, m);
        }
        let exps: Vec<Value> = xs
            .iter()
            .map(|&x| {
                let d = b.ins().fsub(x, m); // <= 0, or NaN
                self.math.exp_nonpositive(b, d)
            })
            .collect();
        let mut s = exps[0];
        for &e in &exps[1..] {
            s = b.ins().fadd(s, e);
        }
        let l = self.math.log(b, s);
        let r = b.ins().fadd(m, l);
        // An infinite maximum makes x - m NaN (inf - inf) and so the sum: whether a NaN was
        // among the inputs is asked of the inputs themselves.
        let inf = math::splat(b, f32::INFINITY);
        let am = math::abs(b, m);
        let mut infinite = b.ins().fcmp(FloatCC::Equal, am, inf);
        for pair in xs.chunks(2) {
            let no_nan = b.ins().fcmp(FloatCC::Ordered, pair[0], pair[pair.len() - 1]);
            infinite = b.ins().band(infinite, no_nan);
        }
        (math::select(b, infinite, m, r), exps, s)
    }

    /// One elementwise op on f32x4 values; `ids` are the argument nodes (for constant exponents).
    fn elementwise(&self, b: &mut FunctionBuilder, op: Op, ids: &[NodeId], x: &[Value]) -> Result<Value, String> {
        let m = self.math;
        let one = || 1.0f32;
        let flag = |b: &mut FunctionBuilder, cc: FloatCC| {
            let mask = b.ins().fcmp(cc, x[0], x[1]);
            let (t, f) = (math::splat(b, one()), math::splat(b, 0.0));
            let v = math::select(b, mask, t, f);
            self.masks.borrow_mut().insert(v, mask);
            v
        };
        Ok(match op {
            // One xor with the sign bit (a memory operand in the loop), where Cranelift's
            // `fneg` of a vector builds its mask with two more instructions each time.
            Op::Neg => math::flip_sign(b, x[0]),
            Op::Exp => m.exp(b, x[0]),
            Op::Log if positive_normal(self.g, ids[0]) => m.log_normal(b, x[0]),
            Op::Log => m.log(b, x[0]),
            Op::Log1p => m.log1p(b, x[0]),
            Op::Sqrt => b.ins().sqrt(x[0]),
            Op::Abs => math::abs(b, x[0]),
            Op::Sign => {
                let z = math::splat(b, 0.0);
                let (p, n) = (math::splat(b, 1.0), math::splat(b, -1.0));
                let zero_or_nan = b.ins().fmul(x[0], z);
                let lt = b.ins().fcmp(FloatCC::LessThan, x[0], z);
                let r = math::select(b, lt, n, zero_or_nan);
                let gt = b.ins().fcmp(FloatCC::GreaterThan, x[0], z);
                math::select(b, gt, p, r)
            }
            Op::Sigmoid => m.sigmoid(b, x[0]),
            Op::Softplus => m.softplus(b, x[0]),
            Op::Tanh => m.tanh(b, x[0]),
            Op::Relu => {
                let z = math::splat(b, 0.0);
                let keep = b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, x[0], z);
                math::select(b, keep, x[0], z)
            }
            Op::Add => b.ins().fadd(x[0], x[1]),
            Op::Sub => b.ins().fsub(x[0], x[1]),
            Op::Mul => b.ins().fmul(x[0], x[1]),
            Op::Div => b.ins().fdiv(x[0], x[1]),
            Op::Pow => match self.g.constant_value(ids[1]) {
                Some(1.0) => x[0],
                Some(2.0) => b.ins().fmul(x[0], x[0]),
                Some(3.0) => {
                    let sq = b.ins().fmul(x[0], x[0]);
                    b.ins().fmul(sq, x[0])
                }
                _ => m.pow(b, x[0], x[1]),
            },
            Op::Min => nan_aware(self.g, b, ids, x, math::min),
            Op::Max => nan_aware(self.g, b, ids, x, math::max),
            Op::Lt => flag(b, FloatCC::LessThan),
            Op::Le => flag(b, FloatCC::LessThanOrEqual),
            Op::Gt => flag(b, FloatCC::GreaterThan),
            Op::Ge => flag(b, FloatCC::GreaterThanOrEqual),
            Op::Eq => flag(b, FloatCC::Equal),
            Op::Ne => flag(b, FloatCC::NotEqual),
            Op::Select => {
                let known = self.masks.borrow().get(&x[0]).copied();
                let pick = known.unwrap_or_else(|| {
                    let z = math::splat(b, 0.0);
                    b.ins().fcmp(FloatCC::NotEqual, x[0], z)
                });
                math::select(b, pick, x[1], x[2])
            }
            other => return Err(format!("`{}` is not computed by native kernels", other.name())),
        })
    }
}

/// `min` or `max` (`pick`: `maxps`-like, yielding its second operand where either is
/// NaN) that is NaN where either argument is, like the reference: one instruction
/// against a constant (put second, so a NaN variable passes), else a fix-up of the lanes
/// where the first argument is NaN. Cranelift's `fmin`/`fmax` take eight instructions.
fn nan_aware(
    g: &Graph,
    b: &mut FunctionBuilder,
    ids: &[NodeId],
    x: &[Value],
    pick: fn(&mut FunctionBuilder, Value, Value) -> Value,
) -> Value {
    match (g.constant_value(ids[0]), g.constant_value(ids[1])) {
        (Some(c), _) if !c.is_nan() => pick(b, x[0], x[1]),
        (_, Some(c)) if !c.is_nan() => pick(b, x[1], x[0]),
        _ => {
            let r = pick(b, x[0], x[1]);
            let nan = b.ins().fcmp(FloatCC::Unordered, x[0], x[0]);
            math::select(b, nan, x[0], r)
        }
    }
}

/// Whether a value is known to be NaN or a positive normal finite float32, so that its
/// log needs no denormal or special-value paths: bounds propagated through constants,
/// min, max, + and -, and `where` on a comparison with a constant (clamped probabilities,
/// one minus them, and the `sub_clamp` rule's form of that).
fn positive_normal(g: &Graph, id: NodeId) -> bool {
    /// The range of `id`, given `known` ranges of some nodes (from the branches of a
    /// `where` on a comparison with a constant: a NaN takes the else branch, which is fine,
    /// NaN being allowed).
    fn range(g: &Graph, id: NodeId, known: &[(NodeId, f64, f64)]) -> (f64, f64) {
        let n = g.node(id);
        let all = (f64::NEG_INFINITY, f64::INFINITY);
        if let Some(c) = g.constant_value(id) {
            return (c, c);
        }
        if let Some(&(_, lo, hi)) = known.iter().rfind(|(k, ..)| *k == id) {
            return (lo, hi);
        }
        if n.op == Op::Select {
            // where(x < k, a, b): b sees x >= k; where(x > k, a, b): b sees x <= k.
            let cond = g.node(n.args[0]);
            let mut inner = known.to_vec();
            if let (Some(x), Some(k)) = (cond.args.first(), cond.args.get(1).and_then(|&k| g.constant_value(k))) {
                let (lo, hi) = range(g, *x, known);
                match cond.op {
                    Op::Lt => inner.push((*x, lo.max(k), hi)),
                    Op::Gt => inner.push((*x, lo, hi.min(k))),
                    _ => {}
                }
            }
            let ((la, ha), (lb, hb)) = (range(g, n.args[1], known), range(g, n.args[2], &inner));
            return (la.min(lb), ha.max(hb));
        }
        if n.args.len() != 2 {
            return all;
        }
        let ((la, ha), (lb, hb)) = (range(g, n.args[0], known), range(g, n.args[1], known));
        match n.op {
            Op::Max => (la.max(lb), ha.max(hb)),
            Op::Min => (la.min(lb), ha.min(hb)),
            Op::Add => (la + lb, ha + hb),
            Op::Sub => (la - hb, ha - lb),
            _ => all,
        }
    }
    let (lo, hi) = range(g, id, &[]);
    // Margins for float32 rounding of the bounds: far inside the normal range.
    lo >= 1e-30 && hi <= 1e30
}

/// Shared parts of sigmoid and softplus within one body, by argument: z = e^-|x| and
/// 1/(1 + z), so that all four of sigmoid(±x), softplus(±x) cost one exp, a division for
/// the sigmoids and one for the log.
#[derive(Default)]
struct Logistic {
    z: HashMap<Value, Value>,
    sigmoids: HashMap<Value, (Value, Value)>,
    log1p: HashMap<Value, Value>,
}

impl Logistic {
    /// Takes z = e^-|x| as computed elsewhere (a step ahead).
    fn seed(&mut self, x: Value, z: Value) {
        self.z.insert(x, z);
    }
    fn z(&mut self, m: Math, b: &mut FunctionBuilder, x: Value) -> Value {
        *self.z.entry(x).or_insert_with(|| m.exp_neg_abs(b, x))
    }
    /// (sigmoid(x), sigmoid(-x)).
    fn sigmoids(&mut self, m: Math, b: &mut FunctionBuilder, x: Value) -> (Value, Value) {
        if let Some(&p) = self.sigmoids.get(&x) {
            return p;
        }
        let z = self.z(m, b, x);
        let r = m.one_plus_recip(b, z);
        let p = m.sigmoid_pair(b, x, z, r);
        self.sigmoids.insert(x, p);
        p
    }
    /// sigmoid(x) and sigmoid(-x) packed as one float (`Math::pack_sigmoids`).
    fn packed(&mut self, m: Math, b: &mut FunctionBuilder, x: Value) -> Value {
        let z = self.z(m, b, x);
        // The same division as `sigmoids`' (the optimiser merges the two).
        let r = m.one_plus_recip(b, z);
        m.pack_sigmoids(b, x, z, r)
    }
    /// log1p(e^-|x|).
    fn log1p(&mut self, m: Math, b: &mut FunctionBuilder, x: Value) -> Value {
        if let Some(&l) = self.log1p.get(&x) {
            return l;
        }
        let z = self.z(m, b, x);
        let l = m.log1p_unit(b, z);
        self.log1p.insert(x, l);
        l
    }
}

/// Logistic arguments whose e^-|x| is computed a step ahead, and the body nodes (in
/// order) that compute them.
struct Ahead {
    bases: Vec<NodeId>,
    body: Vec<NodeId>,
}

/// The current addresses of the input rows (and whether each is fixed) and of the gradient
/// rows.
type Positions = (HashMap<(usize, usize), (Value, bool)>, Vec<Vec<Value>>);

/// Four lanes from `row` at `at`.
fn load(b: &mut FunctionBuilder, row: Value, at: At) -> Value {
    b.ins().load(F32X4, data(), row, at.0)
}
