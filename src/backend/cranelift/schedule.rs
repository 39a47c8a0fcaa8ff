//! Instruction order for the kernel's loop: a list scheduler over one block.
//!
//! The transcendental kernels are bound by latency: each step is a few long dependency
//! chains (exp, the division, log), and Cranelift's optimiser lays out each chain whole,
//! one after the other, in the order the stores and sums need them. The core then finds
//! only one chain's next instruction ready at a time, its schedulers fill with waiting
//! instructions, and it issues two instructions a cycle where it could issue four. This
//! pass reorders the block by the classic critical-path list schedule (longest remaining
//! latency first, a few instructions a cycle), which interleaves the independent chains
//! so that their latencies overlap. Interleaved chains keep more values live, and a
//! spilled temporary costs a store and a reload on its chain: once [`LIVE`] vectors are
//! live, the schedule takes what frees registers first.
//!
//! The caller reorders only kernels over one class: the unrolled many-class kernels have
//! independent chains enough (one per class), measured 0-20% slower reordered (more live
//! values, more spills), and their register allocation takes longer, which counts in
//! compile latency. For the same reason blocks over [`LARGEST`] instructions keep their
//! order. Memory accesses keep their relative order; the terminator stays last.
//!
//! It runs after the optimiser and before lowering with no further optimisation, so the
//! order it picks is the order of the machine code.
//!
//! Where the loop needs far more vectors than there are registers ([`vector_pressure`]
//! over [`CROWDED`]: the kernels with an exp or a log, whose polynomials take some twenty
//! constants), [`invariants_from_memory`] gives each use of a loop-invariant vector its
//! own load, which lowering folds into the instruction as a memory operand, as a C
//! compiler does with its constants; [`cut_after_shared_values`] first makes the loads
//! foldable.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{Block, Function, Inst, InstBuilder, MemFlagsData, Opcode, StackSlotData, StackSlotKind};
use cranelift_codegen::ir::{BlockArg, InstructionData, Value, ValueDef};

/// Instructions issued per modelled cycle (Zen 3 and recent Intel cores issue four to six
/// vector instructions a cycle).
const WIDTH: usize = 4;

/// Vector values live at once past which the schedule prefers what frees registers.
const LIVE: usize = 14;

/// The largest block reordered.
const LARGEST: usize = 256;

/// The largest loop [`cut_after_shared_values`] cuts (the stdlib's reach 240 instructions).
pub const LARGEST_CUT: usize = 1024;

/// Reorders the instructions of `block` (but its terminator) into a critical-path list
/// schedule.
pub fn block(func: &mut Function, block: Block) {
    let Some(terminator) = func.layout.last_inst(block) else { return };
    let insts: Vec<Inst> = func.layout.block_insts(block).filter(|&i| i != terminator).collect();
    if insts.len() > LARGEST {
        return;
    }
    let index: HashMap<Inst, usize> = insts.iter().enumerate().map(|(k, &i)| (i, k)).collect();
    // Edges: each instruction's operands defined in the block, and the previous memory access.
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); insts.len()];
    let mut last_memory = None;
    for (k, &inst) in insts.iter().enumerate() {
        for &arg in func.dfg.inst_args(inst) {
            if let ValueDef::Result(def, _) = func.dfg.value_def(arg) {
                if let Some(&d) = index.get(&def) {
                    preds[k].push(d);
                }
            }
        }
        let op = func.dfg.insts[inst].opcode();
        if op.can_load() || op.can_store() || op.other_side_effects() || op.can_trap() {
            if let Some(m) = last_memory {
                preds[k].push(m);
            }
            last_memory = Some(k);
        }
    }
    let latency: Vec<u32> = insts.iter().map(|&i| latency(func.dfg.insts[i].opcode())).collect();
    // Priority: the longest latency from the start of an instruction to the end of the
    // block. The block's order is topological, so one backward pass computes it.
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); insts.len()];
    for (k, ps) in preds.iter().enumerate() {
        for &p in ps {
            succs[p].push(k);
        }
    }
    let mut priority = vec![0u32; insts.len()];
    for k in (0..insts.len()).rev() {
        priority[k] = latency[k] + succs[k].iter().map(|&s| priority[s]).max().unwrap_or(0);
    }

    // Cycle by cycle: up to WIDTH of the instructions whose operands are ready, the most
    // critical first.
    // Register pressure: the uses left of each vector value (the terminator's too), and
    // how many vectors are live.
    let is_vector = |v: Value| func.dfg.value_type(v).is_vector();
    let mut uses_left: HashMap<Value, usize> = HashMap::new();
    for inst in func.layout.block_insts(block) {
        for v in func.dfg.inst_values(inst) {
            if is_vector(v) {
                *uses_left.entry(v).or_default() += 1;
            }
        }
    }
    let defined_here = |v: Value| match func.dfg.value_def(v) {
        ValueDef::Result(def, _) => index.contains_key(&def),
        ValueDef::Param(b, _) => b == block,
        _ => false,
    };
    let mut live = func.dfg.block_params(block).iter().filter(|&&v| uses_left.contains_key(&v)).count();
    // How issuing `k` changes the live count: its results, less the values it uses last.
    let growth = |k: usize, uses_left: &HashMap<Value, usize>| {
        let inst = insts[k];
        let born = func.dfg.inst_results(inst).iter().filter(|r| uses_left.contains_key(r)).count() as isize;
        let mut args: Vec<Value> =
            func.dfg.inst_args(inst).iter().copied().filter(|&v| is_vector(v) && defined_here(v)).collect();
        args.sort_unstable();
        args.dedup();
        let dying = args
            .iter()
            .filter(|&&v| uses_left[&v] == func.dfg.inst_args(inst).iter().filter(|&&a| a == v).count())
            .count() as isize;
        born - dying
    };

    let mut waiting: Vec<usize> = preds.iter().map(Vec::len).collect();
    let mut ready_at = vec![0u32; insts.len()];
    let mut ready: Vec<usize> = (0..insts.len()).filter(|&k| waiting[k] == 0).collect();
    let mut order: Vec<usize> = Vec::with_capacity(insts.len());
    let mut cycle = 0u32;
    while order.len() < insts.len() {
        let mut issued = 0;
        while issued < WIDTH {
            let candidates = ready.iter().copied().filter(|&k| ready_at[k] <= cycle);
            // Most critical first; with the registers full, what frees them first.
            let pick = if live >= LIVE {
                candidates.min_by_key(|&k| (growth(k, &uses_left), Reverse(priority[k]), k))
            } else {
                candidates.max_by_key(|&k| (priority[k], Reverse(k)))
            };
            let Some(k) = pick else { break };
            live = (live as isize + growth(k, &uses_left)) as usize;
            for &v in func.dfg.inst_args(insts[k]) {
                if let Some(n) = uses_left.get_mut(&v) {
                    *n -= 1;
                }
            }
            ready.retain(|&r| r != k);
            order.push(k);
            issued += 1;
            for &s in &succs[k] {
                ready_at[s] = ready_at[s].max(cycle + latency[k]);
                waiting[s] -= 1;
                if waiting[s] == 0 {
                    ready.push(s);
                }
            }
        }
        cycle = if issued > 0 {
            cycle + 1
        } else {
            // Nothing ready this cycle: skip to the next that has something. (A DAG always
            // has an instruction whose operands are all scheduled.)
            ready.iter().map(|&k| ready_at[k]).min().expect("the dependences form a DAG")
        };
    }
    for &k in &order {
        func.layout.remove_inst(insts[k]);
        func.layout.insert_inst(insts[k], terminator);
    }
}

/// Vector registers of x86-64 (`xmm0` to `xmm15`).
const VECTOR_REGISTERS: usize = 16;

/// A [`vector_pressure`] over which a loop's invariants are better read from memory: half
/// again the registers. Over the stdlib, the kernels with an exp or a log are at 25-92,
/// the others at 18 or under.
pub const CROWDED: usize = VECTOR_REGISTERS * 3 / 2;

/// The most vector values live at once in the loop `block`: those defined outside it that
/// it uses (live throughout) and, at the busiest point, those it defines or takes as
/// parameters. More than [`VECTOR_REGISTERS`] means spills.
pub fn vector_pressure(func: &Function, block: Block) -> usize {
    let is_vector = |v: Value| func.dfg.value_type(v).is_vector();
    let insts: Vec<Inst> = func.layout.block_insts(block).collect();
    let mut invariants: HashSet<Value> = HashSet::new();
    // Per value of the block: where it is defined and last used (0 for a parameter).
    let mut span: HashMap<Value, (usize, usize)> = HashMap::new();
    for &v in func.dfg.block_params(block) {
        if is_vector(v) {
            span.insert(v, (0, 0));
        }
    }
    for (k, &inst) in insts.iter().enumerate() {
        for v in func.dfg.inst_values(inst) {
            if !is_vector(v) {
                continue;
            }
            match span.get_mut(&v) {
                Some(s) => s.1 = k + 1,
                None => {
                    invariants.insert(v);
                }
            }
        }
        for &r in func.dfg.inst_results(inst) {
            if is_vector(r) {
                span.insert(r, (k + 1, k + 1));
            }
        }
    }
    // Live at point k: defined at or before k, last used after it. Counted by a running
    // sum of births and deaths, in one pass (a big loop has thousands of values).
    let mut change = vec![0isize; insts.len() + 2];
    for &(d, u) in span.values().filter(|&&(d, u)| d < u) {
        change[d] += 1;
        change[u] -= 1;
    }
    let busiest = change.iter().scan(0isize, |live, c| {
        *live += c;
        Some(*live)
    });
    invariants.len() + busiest.max().unwrap_or(0).max(0) as usize
}

/// Splits the loop `block` right after each instruction whose result is used more than
/// once, into a chain of blocks, each taking that result as its parameter; returns the
/// loop's blocks in order.
///
/// Lowering folds a load into the instruction that uses it only when nothing can compute
/// that instruction twice, and it decides so by marking everything a value used more
/// than once depends on as used more than once, through every instruction up to the
/// block parameters. In a kernel, where e^-|x| feeds five uses, that marks nearly every
/// load. Passing each such value through a block parameter stops the marking there.
/// Every other value dominates its uses still (the blocks form a chain), so it is used
/// across blocks as it is. The blocks follow each other in the layout: the jumps cost
/// nothing. Not cut: constants, which lowering makes again where they are used, and
/// compares (and masks cast from them) and negations, which lowering fuses with their
/// users (`vpblendvb` with its compare, `vfnmadd` with its negation) only within sight.
pub fn cut_after_shared_values(func: &mut Function, block: Block) -> Vec<Block> {
    let Some(terminator) = func.layout.last_inst(block) else { return vec![block] };
    let insts: Vec<Inst> = func.layout.block_insts(block).collect();
    // Uses in the whole function: the loop's values are used after it too.
    let mut uses: HashMap<Value, usize> = HashMap::new();
    for b in func.layout.blocks() {
        for inst in func.layout.block_insts(b) {
            for v in func.dfg.inst_values(inst) {
                *uses.entry(v).or_default() += 1;
            }
        }
    }
    let mut blocks = vec![block];
    let mut renamed: HashMap<Value, Value> = HashMap::new();
    for (k, &inst) in insts.iter().enumerate() {
        func.dfg.map_inst_values(inst, |v| renamed.get(&v).copied().unwrap_or(v));
        if inst == terminator {
            continue;
        }
        let is_compare = |op: Opcode| matches!(op, Opcode::Fcmp | Opcode::Icmp);
        let fused = match func.dfg.insts[inst].opcode() {
            Opcode::Iconst | Opcode::F32const | Opcode::F64const | Opcode::Vconst | Opcode::Fneg => true,
            op if is_compare(op) => true,
            // A mask: the bitcast of a compare.
            Opcode::Bitcast => match func.dfg.value_def(func.dfg.inst_args(inst)[0]) {
                ValueDef::Result(def, _) => is_compare(func.dfg.insts[def].opcode()),
                _ => false,
            },
            _ => false,
        };
        let shared: Vec<Value> =
            func.dfg.inst_results(inst).iter().copied().filter(|r| uses.get(r).copied().unwrap_or(0) > 1).collect();
        if fused || shared.is_empty() {
            continue;
        }
        let next = func.dfg.make_block();
        func.layout.split_block(next, insts[k + 1]);
        let mut args = Vec::with_capacity(shared.len());
        for v in shared {
            let ty = func.dfg.value_type(v);
            let param = func.dfg.append_block_param(next, ty);
            args.push(BlockArg::Value(v));
            renamed.insert(v, param);
        }
        let previous = *blocks.last().expect("the loop's first block");
        FuncCursor::new(func).at_bottom(previous).ins().jump(next, &args);
        blocks.push(next);
    }
    // After the loop, which the last block dominates, its values are the last names too.
    let after: Vec<Inst> = func
        .layout
        .blocks()
        .filter(|b| !blocks.contains(b))
        .flat_map(|b| func.layout.block_insts(b).collect::<Vec<_>>())
        .collect();
    for inst in after {
        func.dfg.map_inst_values(inst, |v| renamed.get(&v).copied().unwrap_or(v));
    }
    blocks
}

/// Reads every loop-invariant vector that the loop (`blocks`) uses from a stack slot, one
/// load right before each use, instead of keeping it in a register.
///
/// A kernel with an exp and a log uses some twenty constant vectors, more than the sixteen
/// vector registers hold beside the loop's own values: the register allocator spilled
/// them, reloading each before its use, and spilled the loop's temporaries around them.
/// A load right before its only use, with no other memory access in between, is folded
/// by lowering into the instruction (`vfmadd213ps 0x40(%rdi), %xmm1, %xmm2`), as a C
/// compiler does with its constants, so most of these reads cost no instruction and the
/// registers hold the loop's temporaries. Each invariant is stored to its slot right
/// after it is defined (outside the loop).
pub fn invariants_from_memory(func: &mut Function, blocks: &[Block]) {
    let in_loop = |func: &Function, v: Value| match func.dfg.value_def(v) {
        ValueDef::Result(def, _) => func.layout.inst_block(def).is_some_and(|b| blocks.contains(&b)),
        ValueDef::Param(b, _) => blocks.contains(&b),
        _ => true,
    };
    // All zeros or all ones: lowering makes these in a register without reading memory
    // (`vpxor`, `vpcmpeqd`), so each use gets its own.
    let idiom = |func: &Function, v: Value| match func.dfg.value_def(v) {
        ValueDef::Result(def, _) => match func.dfg.insts[def] {
            InstructionData::UnaryConst { opcode: Opcode::Vconst, constant_handle } => {
                let bytes = func.dfg.constants.get(constant_handle).as_slice();
                bytes.iter().all(|&b| b == 0) || bytes.iter().all(|&b| b == 0xff)
            }
            _ => false,
        },
        _ => false,
    };
    // The invariants in order of first use, each with its slot's offset.
    let mut slots: Vec<Value> = Vec::new();
    let mut uses: Vec<(Inst, usize, Value)> = Vec::new();
    for &block in blocks {
        for inst in func.layout.block_insts(block) {
            if func.dfg.insts[inst].opcode().is_branch() {
                continue;
            }
            for (k, &arg) in func.dfg.inst_args(inst).iter().enumerate() {
                if func.dfg.value_type(arg).is_vector() && !in_loop(func, arg) {
                    if !idiom(func, arg) && !slots.contains(&arg) {
                        slots.push(arg);
                    }
                    uses.push((inst, k, arg));
                }
            }
        }
    }
    if uses.is_empty() {
        return;
    }
    let offset = |v: Value| 16 * slots.iter().position(|&s| s == v).expect("a slot") as i32;
    let entry = func.layout.entry_block().expect("a kernel has a body");
    let mut pos = FuncCursor::new(func);
    // One address for all: a load from a `stack_addr` of its own would be lowered as an
    // `lea` and a load through it.
    let base = (!slots.is_empty()).then(|| {
        let slot = pos.func.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            16 * slots.len() as u32,
            4,
        ));
        pos.goto_first_insertion_point(entry);
        let base = pos.ins().stack_addr(I64, slot, 0);
        for &v in &slots {
            match pos.func.dfg.value_def(v) {
                ValueDef::Result(def, _) => pos.goto_after_inst(def),
                // After `base`, for a parameter of the entry block.
                ValueDef::Param(b, _) if b == entry => {
                    let at = pos.func.dfg.value_def(base).unwrap_inst();
                    pos.goto_after_inst(at)
                }
                ValueDef::Param(b, _) => pos.goto_first_insertion_point(b),
                _ => unreachable!("an argument is an instruction's result or a block parameter"),
            }
            pos.ins().store(MemFlagsData::trusted(), v, base, offset(v));
        }
        base
    });
    // `bitselect(fcmp(lt, a, c), a, c)` lowers to one `minps`/`maxps` only while the select
    // and the compare take the same values: a select shares its compare's reload.
    let mut reloads: HashMap<(Inst, Value), Value> = HashMap::new();
    for (inst, k, v) in uses {
        if let Some(compare) = min_max_compare(pos.func, inst) {
            if let Some(&fresh) = reloads.get(&(compare, v)) {
                pos.func.dfg.inst_args_mut(inst)[k] = fresh;
                continue;
            }
        }
        pos.goto_inst(inst);
        let ty = pos.func.dfg.value_type(v);
        let fresh = match pos.func.dfg.value_def(v) {
            ValueDef::Result(def, _) if !slots.contains(&v) => match pos.func.dfg.insts[def] {
                InstructionData::UnaryConst { constant_handle, .. } => pos.ins().vconst(ty, constant_handle),
                _ => unreachable!("an idiom is a constant"),
            },
            _ => {
                let base = base.expect("a slot for each invariant that is no idiom");
                pos.ins().load(ty, MemFlagsData::trusted(), base, offset(v))
            }
        };
        pos.func.dfg.inst_args_mut(inst)[k] = fresh;
        reloads.insert((inst, v), fresh);
    }
}

/// The `fcmp` whose mask `inst` selects by, where `inst` is a `bitselect`.
fn min_max_compare(func: &Function, inst: Inst) -> Option<Inst> {
    if func.dfg.insts[inst].opcode() != Opcode::Bitselect {
        return None;
    }
    let mut def = func.dfg.value_def(func.dfg.inst_args(inst)[0]).inst()?;
    if func.dfg.insts[def].opcode() == Opcode::Bitcast {
        def = func.dfg.value_def(func.dfg.inst_args(def)[0]).inst()?;
    }
    (func.dfg.insts[def].opcode() == Opcode::Fcmp).then_some(def)
}

/// Cycles from issue to result on a Zen 3-like core, roughly; what matters is the ratio
/// of the long operations (division, multiply-add, loads) to the short ones.
fn latency(op: Opcode) -> u32 {
    match op {
        Opcode::Fdiv => 11,
        Opcode::Sqrt => 14,
        Opcode::Fma => 4,
        Opcode::Fmul | Opcode::Fadd | Opcode::Fsub | Opcode::FcvtFromSint => 3,
        Opcode::Load => 5,
        Opcode::Fcmp | Opcode::Fmin | Opcode::Fmax => 2,
        Opcode::Bitcast | Opcode::Iconst | Opcode::F32const | Opcode::F64const => 0,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use cranelift_codegen::ir::condcodes::IntCC;
    use cranelift_codegen::ir::types::{F32X4, I64};
    use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, Signature};
    use cranelift_codegen::isa::{CallConv, OwnedTargetIsa};
    use cranelift_codegen::settings;
    use cranelift_codegen::verify_function;
    use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

    use super::*;

    /// One block: load a and b from `p`, two independent chains of `n` multiply-adds, store
    /// each chain's result back to `p`. Returns the function, the block and each chain's
    /// instructions in order.
    fn two_chains(n: usize) -> (Function, Block, [Vec<Inst>; 2]) {
        let mut func = Function::new();
        func.signature = Signature::new(CallConv::SystemV);
        func.signature.params.push(AbiParam::new(I64));
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let block = b.create_block();
        b.append_block_params_for_function_params(block);
        b.switch_to_block(block);
        let p = b.block_params(block)[0];
        let flags = MemFlagsData::trusted();
        let mut chains: [Vec<Inst>; 2] = Default::default();
        let mut ends = Vec::new();
        for (k, chain) in chains.iter_mut().enumerate() {
            let mut v = b.ins().load(F32X4, flags, p, 16 * k as i32);
            for _ in 0..n {
                v = b.ins().fma(v, v, v);
                chain.push(b.func.dfg.value_def(v).unwrap_inst());
            }
            ends.push(v);
        }
        for (k, v) in ends.into_iter().enumerate() {
            b.ins().store(flags, v, p, 32 + 16 * k as i32);
        }
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(host().frontend_config());
        (func, block, chains)
    }

    fn host() -> OwnedTargetIsa {
        let flags = settings::Flags::new(settings::builder());
        cranelift_native::builder().expect("a supported host").finish(flags).expect("an ISA")
    }

    fn position(func: &Function, block: Block, inst: Inst) -> usize {
        func.layout.block_insts(block).position(|i| i == inst).expect("in the block")
    }

    #[test]
    fn interleaves_independent_chains_and_keeps_the_function_valid() {
        let (mut func, block, chains) = two_chains(8);
        // Built one chain after the other.
        assert!(position(&func, block, chains[0][7]) < position(&func, block, chains[1][0]));
        let memory_before: Vec<Inst> = func
            .layout
            .block_insts(block)
            .filter(|&i| func.dfg.insts[i].opcode().can_load() || func.dfg.insts[i].opcode().can_store())
            .collect();
        super::block(&mut func, block);
        verify_function(&func, &*host()).unwrap_or_else(|e| panic!("{e}\n{}", func.display()));
        // Now the second chain starts before the first ends, each chain keeps its order,
        // the memory accesses keep theirs, and the return stays last.
        assert!(position(&func, block, chains[1][0]) < position(&func, block, chains[0][7]), "{}", func.display());
        for chain in &chains {
            let at: Vec<usize> = chain.iter().map(|&i| position(&func, block, i)).collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{}", func.display());
        }
        let memory_after: Vec<Inst> = func
            .layout
            .block_insts(block)
            .filter(|&i| func.dfg.insts[i].opcode().can_load() || func.dfg.insts[i].opcode().can_store())
            .collect();
        assert_eq!(memory_before, memory_after);
        let last = func.layout.last_inst(block).expect("a terminator");
        assert!(func.dfg.insts[last].opcode().is_terminator());
    }

    #[test]
    fn leaves_blocks_over_the_limit_alone() {
        let (mut func, block, _) = two_chains(LARGEST / 2 + 1);
        let before: Vec<Inst> = func.layout.block_insts(block).collect();
        super::block(&mut func, block);
        assert_eq!(func.layout.block_insts(block).collect::<Vec<_>>(), before);
    }

    /// A loop over `n` bytes at `p`: y = x * 1.5 + 0.25, stores max(y * y - (y + 0.25), 0.25) + 0.
    /// Returns the function and the loop's block.
    fn a_loop() -> (Function, Block) {
        let mut func = Function::new();
        func.signature = Signature::new(CallConv::SystemV);
        func.signature.params.extend([AbiParam::new(I64), AbiParam::new(I64)]);
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let (entry, body, exit) = (b.create_block(), b.create_block(), b.create_block());
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let (p, n) = (b.block_params(entry)[0], b.block_params(entry)[1]);
        let splat = |b: &mut FunctionBuilder, x: f32| {
            let c = b.ins().f32const(x);
            b.ins().splat(F32X4, c)
        };
        let (scale, shift) = (splat(&mut b, 1.5), splat(&mut b, 0.25));
        let zeros = b.func.dfg.constants.insert(vec![0u8; 16].into());
        let zero = b.ins().vconst(F32X4, zeros);
        let start = b.ins().iconst(I64, 0);
        b.ins().jump(body, &[BlockArg::Value(start)]);
        b.switch_to_block(body);
        let i = b.append_block_param(body, I64);
        let flags = MemFlagsData::trusted();
        let at = b.ins().iadd(p, i);
        let x = b.ins().load(F32X4, flags, at, 0);
        let y = b.ins().fma(x, scale, shift);
        let square = b.ins().fmul(y, y);
        let shifted = b.ins().fadd(y, shift);
        let difference = b.ins().fsub(square, shifted);
        let clipped = crate::backend::cranelift::math::max(&mut b, difference, shift);
        let out = b.ins().fadd(clipped, zero);
        b.ins().store(flags, out, at, 0);
        let next = b.ins().iadd_imm_s(i, 16);
        let more = b.ins().icmp(IntCC::SignedLessThan, next, n);
        b.ins().brif(more, body, &[BlockArg::Value(next)], exit, &[]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(host().frontend_config());
        (func, body)
    }

    #[test]
    fn cut_loops_pass_shared_values_as_parameters_and_read_invariants_from_memory() {
        let (mut func, body) = a_loop();
        let blocks = cut_after_shared_values(&mut func, body);
        verify_function(&func, &*host()).unwrap_or_else(|e| panic!("{e}\n{}", func.display()));
        assert!(blocks.len() > 1, "{}", func.display());
        // Within the loop, a value used more than once is a block parameter (or a
        // constant or a compare, which lowering fuses where they are used).
        let mut uses: HashMap<Value, usize> = HashMap::new();
        for &b in &blocks {
            for inst in func.layout.block_insts(b) {
                for v in func.dfg.inst_values(inst) {
                    *uses.entry(v).or_default() += 1;
                }
            }
        }
        for (&v, &n) in &uses {
            if let ValueDef::Result(def, _) = func.dfg.value_def(v) {
                let op = func.dfg.insts[def].opcode();
                let in_loop = func.layout.inst_block(def).is_some_and(|b| blocks.contains(&b));
                assert!(
                    n == 1 || !in_loop || matches!(op, Opcode::Iconst | Opcode::Icmp),
                    "{v} used {n} times\n{}",
                    func.display()
                );
            }
        }

        invariants_from_memory(&mut func, &blocks);
        verify_function(&func, &*host()).unwrap_or_else(|e| panic!("{e}\n{}", func.display()));
        // No loop instruction reads a vector defined outside the loop any more.
        for &b in &blocks {
            for inst in func.layout.block_insts(b) {
                for &v in func.dfg.inst_args(inst) {
                    if let ValueDef::Result(def, _) = func.dfg.value_def(v) {
                        let outside = !func.layout.inst_block(def).is_some_and(|b| blocks.contains(&b));
                        assert!(!(outside && func.dfg.value_type(v) == F32X4), "{v}\n{}", func.display());
                    }
                }
            }
        }
        // And lowering folds the constants into the instructions that use them.
        let mut ctx = cranelift_codegen::Context::for_function(func);
        ctx.compute_cfg();
        ctx.compute_domtree();
        let isa = host();
        let code = isa
            .compile_function(&ctx.func, &ctx.domtree, &mut regalloc2::Ctx::default(), true, &mut Default::default())
            .expect("lowers");
        let text = code.vcode.expect("a disassembly");
        let folded = text.lines().filter(|l| l.contains("ps ") && l.contains('(') && !l.contains("movups")).count();
        assert!(folded >= 2, "{text}");
        // The max's compare and select share their reload of 0.25: one `maxps`, no blend.
        assert!(text.contains("maxps") && !text.contains("blendv"), "{text}");
    }
}
