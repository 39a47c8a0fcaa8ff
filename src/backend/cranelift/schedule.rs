//! Instruction order for the kernel's loop: a list scheduler over one block.
//!
//! The transcendental kernels are bound by latency: each step is a few long dependency
//! chains (exp, the division, log), and Cranelift's optimiser lays out each chain whole,
//! one after the other, in the order the stores and sums need them. The core then finds
//! only one chain's next instruction ready at a time, its schedulers fill with waiting
//! instructions, and it issues two instructions a cycle where it could issue four. This
//! pass reorders the block by the classic critical-path list schedule (longest remaining
//! latency first, a few instructions a cycle), which interleaves the independent chains
//! so that their latencies overlap.
//!
//! The caller reorders only kernels over one class: the unrolled many-class kernels have
//! independent chains enough (one per class), measured 0-20% slower reordered (more live
//! values, more spills), and their register allocation takes longer, which counts in
//! compile latency. For the same reason blocks over [`LARGEST`] instructions keep their
//! order. Memory accesses keep their relative order; the terminator stays last.
//!
//! It runs after the optimiser and before lowering with no further optimisation, so the
//! order it picks is the order of the machine code.

use std::cmp::Reverse;
use std::collections::HashMap;

use cranelift_codegen::ir::{Block, Function, Inst, Opcode, ValueDef};

/// Instructions issued per modelled cycle (Zen 3 and recent Intel cores issue four to six
/// vector instructions a cycle).
const WIDTH: usize = 4;

/// The largest block reordered.
const LARGEST: usize = 256;

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
    let mut waiting: Vec<usize> = preds.iter().map(Vec::len).collect();
    let mut ready_at = vec![0u32; insts.len()];
    let mut ready: Vec<usize> = (0..insts.len()).filter(|&k| waiting[k] == 0).collect();
    let mut order: Vec<usize> = Vec::with_capacity(insts.len());
    let mut cycle = 0u32;
    while order.len() < insts.len() {
        let mut issued = 0;
        while issued < WIDTH {
            let pick =
                ready.iter().copied().filter(|&k| ready_at[k] <= cycle).max_by_key(|&k| (priority[k], Reverse(k)));
            let Some(k) = pick else { break };
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
}
