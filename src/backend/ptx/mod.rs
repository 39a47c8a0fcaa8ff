//! PTX for NVIDIA GPUs: the plan's sweeps as kernels, and the tail between them too,
//! so that a whole forward+backward is a fixed sequence of launches with no trip back
//! to the host.
//!
//! A loss with K sweeps becomes 2K + 1 kernels, launched in this order on one stream:
//! `lossc_tail_0`, then for each sweep k = 1..K `lossc_sweep_k` and `lossc_tail_k`.
//! - A **sweep** kernel runs a grid of `G x Y` blocks of 256 threads: block x strides
//!   over the spatial positions of the batch items `y, y + Y, ...`, one thread per
//!   position. Each thread sums its positions in f64; the block adds its threads with
//!   warp shuffles and then its 8 warps in shared memory, in a fixed order, and writes
//!   one partial per (batch item, block x, sum) into the workspace. It also writes the
//!   gradients the plan gives that sweep.
//!
//! - A **tail** kernel runs one block: its threads add the partials of each (batch item,
//!   sum) over the G blocks in block order, then thread 0 evaluates in f64 the small
//!   values the next sweep needs (the sums' functions, per batch item and class) and,
//!   after the last sweep, the loss value.
//!
//! No float atomics anywhere: for a given `G` the result is bitwise the same run to run
//! (and independent of `Y`).
//!
//! Every kernel takes the same parameters (all `.u64`): one device pointer per input
//! (`in0..`), one per gradient (`grad0..`, 0 where not wanted), the f64 workspace `ws`,
//! the batch extent `B`, the spatial extent `S` and the sweep grid width `G`. The
//! workspace holds `1 + T*B*C + B*G*P` doubles (`Program::workspace_len`); `ws[0]` is the
//! loss value after the last kernel. The kernels are specialised to a `Layout`: the class
//! count `C` (the class loop is unrolled) and which inputs are broadcast.

mod asm;
mod math;

use std::collections::HashMap;

use asm::{f32_imm, f64_imm, Asm, Kind};

use crate::backend::cranelift::sweep::{Shape, SweepSpec};
use crate::error::Error;
use crate::ir::{AxisSet, Graph, NodeId, Op};
use crate::loss::Loss;
use crate::runtime::native::{self, Key, PlanOptions, SweepPlan, MAX_CLASSES};
use crate::schedule::{crosses_elements, streamed};

/// Threads per block of every kernel.
pub const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// A GPU architecture lossc emits PTX for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    sm: u32,
}

impl Target {
    /// The architectures with a tested PTX: Volta, Ampere and Hopper.
    pub const SUPPORTED: [u32; 3] = [70, 80, 90];

    /// `"sm_80"` (or `"80"`).
    pub fn parse(text: &str) -> Result<Target, String> {
        let digits = text.trim().trim_start_matches("sm_");
        match digits.parse::<u32>() {
            Ok(sm) if Self::SUPPORTED.contains(&sm) => Ok(Target { sm }),
            _ => Err(format!("unknown GPU target `{text}`: expected sm_70, sm_80 or sm_90")),
        }
    }

    /// The target for a device of compute capability `major.minor`: the newest supported
    /// one it runs (PTX for sm_80 runs on sm_86 and sm_89 through the driver's JIT).
    pub fn for_device(major: u32, minor: u32) -> Option<Target> {
        let cc = major * 10 + minor;
        Self::SUPPORTED.iter().rev().find(|&&sm| sm <= cc).map(|&sm| Target { sm })
    }

    pub fn sm(&self) -> u32 {
        self.sm
    }

    /// The PTX ISA version: 7.0 (CUDA 11.0) has everything used here for sm_70 and sm_80;
    /// sm_90 needs 7.8.
    fn isa(&self) -> &'static str {
        if self.sm >= 90 {
            "7.8"
        } else {
            "7.0"
        }
    }
}

/// What the kernels are specialised to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The class extent `C`.
    pub classes: usize,
    /// Per input: given with batch extent 1 (the same for every batch item).
    pub batch_one: Vec<bool>,
    /// Per input: given with one class row.
    pub class_one: Vec<bool>,
    /// Per input: given with one spatial position for S > 1 (the same at every position).
    pub spatial_one: Vec<bool>,
    /// Per input: its gradient is written.
    pub want: Vec<bool>,
}

impl Layout {
    /// Every input at full size, `[B, C, S]` (one class row, or batch item, where it is
    /// declared without that axis), every gradient wanted.
    pub fn full(loss: &Loss, classes: usize) -> Layout {
        let axes: Vec<AxisSet> = loss.inputs().iter().map(|i| i.axes).collect();
        Layout {
            classes,
            batch_one: axes.iter().map(|a| !a.has_index(0)).collect(),
            class_one: axes.iter().map(|a| !a.has_index(1) || classes == 1).collect(),
            spatial_one: vec![false; axes.len()],
            want: vec![true; axes.len()],
        }
    }

    /// The layout of inputs of these (checked) shapes, with these gradients wanted.
    pub fn of(shapes: &[[usize; 3]], ext: [usize; 3], want: &[bool]) -> Layout {
        Layout {
            classes: ext[1],
            batch_one: shapes.iter().map(|s| s[0] == 1 && ext[0] > 1).collect(),
            class_one: shapes.iter().map(|s| s[1] == 1).collect(),
            spatial_one: shapes.iter().map(|s| s[2] == 1 && ext[2] > 1).collect(),
            want: want.to_vec(),
        }
    }
}

/// How a kernel is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    /// `G x Y` blocks (`Y` at most 65535; any value works) of `THREADS` threads.
    Sweep,
    /// One block of `THREADS` threads.
    Single,
}

/// One kernel to launch, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: String,
    pub grid: Grid,
}

/// A loss's kernels as one PTX module.
#[derive(Clone, Debug)]
pub struct Program {
    pub text: String,
    /// The kernels in launch order.
    pub launches: Vec<Launch>,
    tables: usize,
    cells: usize,
    classes: usize,
}

impl Program {
    /// Doubles of workspace for `batch` items and a sweep grid `blocks` wide.
    pub fn workspace_len(&self, batch: usize, blocks: usize) -> usize {
        1 + self.tables * batch * self.classes + batch * blocks * self.cells
    }
}

/// Why the GPU cannot run this loss in this layout, or `None`.
pub fn unsupported(loss: &Loss, layout: &Layout) -> Option<String> {
    if layout.classes > MAX_CLASSES {
        return Some(format!("more than {MAX_CLASSES} classes"));
    }
    let g = loss.graph();
    for id in g.reachable(&roots(loss, &layout.want)) {
        let n = g.node(id);
        match n.op {
            Op::Sort { .. } | Op::Gather | Op::Scatter | Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => {
                return Some(
                    "sort-based losses (Lovász, `sorted` blocks) do not run on the GPU: lossc has no \
                     device sort yet; evaluate them on the CPU"
                        .into(),
                )
            }
            Op::LogSumExp(_) if crosses_elements(g, id) => {
                return Some("a logsumexp across positions does not run on the GPU".into())
            }
            _ => {}
        }
    }
    for (i, spec) in loss.inputs().iter().enumerate() {
        if !layout.want[i] || !spec.axes.has_index(2) {
            continue;
        }
        if layout.spatial_one[i] {
            return Some(format!(
                "the gradient of `{}`, broadcast along positions, on the GPU (pass it at full size)",
                spec.name
            ));
        }
        if spec.axes.has_index(0) && layout.batch_one[i] {
            return Some(format!(
                "the gradient of `{}`, broadcast over the batch but not over positions, on the GPU",
                spec.name
            ));
        }
    }
    None
}

fn roots(loss: &Loss, want: &[bool]) -> Vec<NodeId> {
    let mut roots = vec![loss.root()];
    roots.extend(loss.gradient_nodes().iter().zip(want).filter(|(_, &w)| w).filter_map(|(g, _)| *g));
    roots
}

/// The PTX of `loss` for `layout` on `target`.
pub fn emit(loss: &Loss, layout: &Layout, target: Target) -> Result<Program, Error> {
    if let Some(why) = unsupported(loss, layout) {
        return Err(Error::Unsupported(why));
    }
    let n = loss.inputs().len();
    if [layout.batch_one.len(), layout.class_one.len(), layout.spatial_one.len(), layout.want.len()] != [n; 4] {
        return Err(Error::Shape(format!("a layout for {n} inputs is needed")));
    }
    let key = Key {
        shape: Shape { classes: layout.classes, spatial_broadcast: vec![false; n] },
        one_row: layout.class_one.clone(),
        want: layout.want.clone(),
    };
    let plan = native::plan(loss, &key, PlanOptions { stash: false, write_uniform: true });
    let g = loss.graph();
    let mut tables = HashMap::new();
    for &id in &plan.order {
        if !streamed(g, id) && g.constant_value(id).is_none() {
            let t = tables.len();
            tables.insert(id, t);
        }
    }
    let e = Emitter { loss, g, layout, plan: &plan, tables };
    let specs: Vec<Option<&SweepSpec>> = plan.sweeps.iter().map(|s| s.as_ref().map(|s| &s.spec)).collect();
    let cells: Vec<usize> = specs.iter().map(|s| s.map_or(0, |s| s.cells(g, layout.classes).iter().sum())).collect();
    // Inputs whose gradient is identically zero: the last sweep writes the zeros.
    let zeros: Vec<usize> = (0..n)
        .filter(|&i| layout.want[i] && loss.gradient_nodes()[i].is_none() && loss.inputs()[i].axes.has_index(2))
        .collect();
    if !zeros.is_empty() && specs.last().is_none_or(|s| s.is_none()) {
        return Err(Error::Unsupported("a zero gradient with no sweep to write it".into()));
    }

    let mut launches = vec![Launch { kernel: "lossc_tail_0".into(), grid: Grid::Single }];
    let mut kernels = vec![e.tail(0, 0)];
    for (k, spec) in specs.iter().enumerate() {
        if let Some(spec) = spec {
            let last = k + 1 == specs.len();
            kernels.push(e.sweep(k + 1, spec, cells[k], if last { &zeros } else { &[] }));
            launches.push(Launch { kernel: format!("lossc_sweep_{}", k + 1), grid: Grid::Sweep });
        }
        kernels.push(e.tail(k + 1, cells[k]));
        launches.push(Launch { kernel: format!("lossc_tail_{}", k + 1), grid: Grid::Single });
    }
    let program = Program {
        text: String::new(),
        launches,
        tables: e.tables.len(),
        cells: cells.iter().copied().max().unwrap_or(0),
        classes: layout.classes,
    };
    let text = header(loss, layout, target, &program) + &kernels.concat();
    Ok(Program { text, ..program })
}

/// The module's header: what it is for and how to launch it, as comments.
fn header(loss: &Loss, layout: &Layout, target: Target, p: &Program) -> String {
    let mut out = format!("// lossc {}: `{}`\n", env!("CARGO_PKG_VERSION"), loss.name());
    let plural = if layout.classes == 1 { "" } else { "es" };
    out += &format!("// Specialised to C = {} class{plural}; inputs, in parameter order:\n", layout.classes);
    for (i, spec) in loss.inputs().iter().enumerate() {
        let b = if layout.batch_one[i] { "1" } else { "B" };
        let c = if layout.class_one[i] { "1".to_string() } else { "C".to_string() };
        let s = if spec.axes.has_index(2) && !layout.spatial_one[i] { "S" } else { "1" };
        let grad = if layout.want[i] { "gradient written to grad" } else { "no gradient" };
        out += &format!(
            "//   in{i} = {}: float[{b}][{c}][{s}], {grad}{}\n",
            spec.name,
            if layout.want[i] { i.to_string() } else { String::new() }
        );
    }
    out += "// Every kernel takes (.u64 each): in0.., grad0.. (one per input; 0 where not wanted), ws, B, S, G.\n";
    out += &format!(
        "// ws: double[1 + {t}*B*C + {p}*B*G] on the device (T = {t} tables, P = {p} partial sums); ws[0] is the loss.\n",
        t = p.tables,
        p = p.cells
    );
    out += &format!("// Launch on one stream, in this order, with {THREADS} threads per block:\n");
    for l in &p.launches {
        let grid = match l.grid {
            Grid::Sweep => "grid (G, Y): G blocks along positions (at most ceil(S/256) do work; G fixes the result), Y <= 65535 along the batch",
            Grid::Single => "grid (1, 1)",
        };
        out += &format!("//   {}  {grid}\n", l.kernel);
    }
    out += &format!(".version {}\n.target sm_{}\n.address_size 64\n", target.isa(), target.sm);
    out
}

/// A sweep's row addresses for the current batch item: inputs by (input, class), the
/// gradient rows of each write, and the rows of gradients that are zero.
struct Rows<'a> {
    inputs: &'a HashMap<(usize, usize), String>,
    writes: &'a [Vec<String>],
    zeros: &'a [Vec<String>],
}

/// The kernel parameters, loaded (pointers converted to the global window).
struct Params {
    inputs: Vec<String>,
    grads: Vec<String>,
    ws: String,
    b: String,
    s: String,
    g: String,
}

/// f32 in the sweeps, f64 in the tail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ty {
    F32,
    F64,
}

impl Ty {
    fn kind(self) -> Kind {
        match self {
            Ty::F32 => Kind::F32,
            Ty::F64 => Kind::F64,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::F64 => "f64",
        }
    }
    fn imm(self, v: f64) -> String {
        match self {
            Ty::F32 => f32_imm(v as f32),
            Ty::F64 => f64_imm(v),
        }
    }
}

struct Emitter<'a> {
    loss: &'a Loss,
    g: &'a Graph,
    layout: &'a Layout,
    plan: &'a SweepPlan,
    /// Each small value (not varying over positions, not a constant): its table in the
    /// workspace, `B x C` doubles.
    tables: HashMap<NodeId, usize>,
}

impl Emitter<'_> {
    fn classes(&self, id: NodeId) -> usize {
        if self.g.axes(id).contains(AxisSet::CLASS) {
            self.layout.classes
        } else {
            1
        }
    }

    fn signature(&self, name: &str) -> String {
        let n = self.loss.inputs().len();
        let mut p: Vec<String> = (0..n).map(|i| format!("in{i}")).collect();
        p.extend((0..n).map(|i| format!("grad{i}")));
        p.extend(["ws", "B", "S", "G"].map(String::from));
        let list: Vec<String> = p.iter().map(|x| format!("\t.param .u64 {x}")).collect();
        format!("\n.visible .entry {name}(\n{}\n)\n.reqntid {THREADS}, 1, 1\n{{\n", list.join(",\n"))
    }

    fn params(&self, a: &mut Asm) -> Params {
        let n = self.loss.inputs().len();
        let pointer = |a: &mut Asm, name: &str| {
            let raw = a.def(Kind::B64, "ld.param.u64", &format!("[{name}]"));
            a.def(Kind::B64, "cvta.to.global.u64", &raw)
        };
        let inputs = (0..n).map(|i| pointer(a, &format!("in{i}"))).collect();
        let grads = (0..n).map(|i| pointer(a, &format!("grad{i}"))).collect();
        let ws = pointer(a, "ws");
        let [b, s, g] = ["B", "S", "G"].map(|x| a.def(Kind::B64, "ld.param.u64", &format!("[{x}]")));
        Params { inputs, grads, ws, b, s, g }
    }

    /// The address of a table cell: `ws + 8 (1 + t B C + b C + c)`.
    fn table_addr(&self, a: &mut Asm, p: &Params, t: usize, b: &str, c: usize) -> String {
        let cc = self.layout.classes;
        let tb = a.def(Kind::B64, "mul.lo.u64", &format!("{}, {t}", p.b));
        let row = a.def(Kind::B64, "add.u64", &format!("{tb}, {b}"));
        let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{row}, {cc}, {}", 1 + c));
        a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 8, {}", p.ws))
    }

    /// The first double of the partials: `1 + T B C`.
    fn partials_base(&self, a: &mut Asm, p: &Params) -> String {
        let per = self.tables.len() * self.layout.classes;
        let tb = a.def(Kind::B64, "mul.lo.u64", &format!("{}, {per}", p.b));
        a.def(Kind::B64, "add.u64", &format!("{tb}, 1"))
    }

    /// A loop over `0..end` with a fresh counter; `body` emits the iteration.
    fn count(&self, a: &mut Asm, end: &str, body: impl FnOnce(&mut Asm, &str)) {
        let i = a.def(Kind::B64, "mov.u64", "0");
        let top = a.label("loop");
        let out = a.label("end");
        a.place(&top);
        let p = a.def(Kind::Pred, "setp.ge.u64", &format!("{i}, {end}"));
        a.op(format!("@{p} bra {out}"));
        body(a, &i);
        a.op(format!("add.u64 {i}, {i}, 1"));
        a.op(format!("bra {top}"));
        a.place(&out);
    }

    /// `lossc_sweep_k`: one pass over the positions.
    fn sweep(&self, k: usize, spec: &SweepSpec, cells: usize, zeros: &[usize]) -> String {
        let g = self.g;
        let cc = self.layout.classes;
        let mut a = Asm::default();
        let p = self.params(&mut a);
        let body = spec.body(g);
        a.note(format!("sweep {k}: blocks strided over positions and batch items"));
        let tid32 = a.def(Kind::B32, "mov.u32", "%tid.x");
        let tid = a.def(Kind::B64, "cvt.u64.u32", &tid32);
        let bx = {
            let r = a.def(Kind::B32, "mov.u32", "%ctaid.x");
            a.def(Kind::B64, "cvt.u64.u32", &r)
        };
        let by = {
            let r = a.def(Kind::B32, "mov.u32", "%ctaid.y");
            a.def(Kind::B64, "cvt.u64.u32", &r)
        };
        let ny = {
            let r = a.def(Kind::B32, "mov.u32", "%nctaid.y");
            a.def(Kind::B64, "cvt.u64.u32", &r)
        };
        let done = a.label("done");
        let outside = a.def(Kind::Pred, "setp.ge.u64", &format!("{bx}, {}", p.g));
        a.op(format!("@{outside} bra {done}"));
        let base = self.partials_base(&mut a, &p);
        let first = a.def(Kind::B64, "mad.lo.u64", &format!("{bx}, {THREADS}, {tid}"));
        let step = a.def(Kind::B64, "mul.lo.u64", &format!("{}, {THREADS}", p.g));
        let zero = a.def(Kind::B64, "mov.u64", "0");
        let aligned = self.aligned(&mut a, &p, spec, &body, zeros);
        let b = a.def(Kind::B64, "mov.u64", &by);
        let items = a.label("items");
        a.place(&items);
        let end = a.def(Kind::Pred, "setp.ge.u64", &format!("{b}, {}", p.b));
        a.op(format!("@{end} bra {done}"));

        // Per batch item: the small values the sweep reads, and the rows' addresses.
        let mut values: HashMap<(NodeId, usize), String> = HashMap::new();
        for &id in &spec.slots {
            let at = if g.axes(id).contains(AxisSet::BATCH) { b.clone() } else { zero.clone() };
            for c in 0..self.classes(id) {
                let addr = self.table_addr(&mut a, &p, self.tables[&id], &at, c);
                let d = a.def(Kind::F64, "ld.global.f64", &format!("[{addr}]"));
                values.insert((id, c), a.def(Kind::F32, "cvt.rn.f32.f64", &d));
            }
        }
        let mut rows: HashMap<(usize, usize), String> = HashMap::new();
        for &id in &body {
            if let Op::Input { index, .. } = g.node(id).op {
                let i = index as usize;
                for c in 0..self.classes(id) {
                    let r = self.row(&mut a, &p.inputs[i], &p, &b, i, c);
                    rows.insert((i, c), r);
                }
            }
        }
        let mut write_rows: Vec<Vec<String>> = Vec::new();
        for w in &spec.writes {
            let list = (0..w.rows).map(|r| self.row(&mut a, &p.grads[w.input], &p, &b, w.input, r)).collect();
            write_rows.push(list);
        }
        let zero_rows: Vec<Vec<String>> = zeros
            .iter()
            .map(|&i| {
                let n = if self.layout.class_one[i] { 1 } else { cc };
                (0..n).map(|r| self.row(&mut a, &p.grads[i], &p, &b, i, r)).collect()
            })
            .collect();
        let acc: Vec<String> = (0..cells).map(|_| a.f64(0.0)).collect();

        // Four positions per thread with vector loads where every row is 16-byte aligned
        // (S a multiple of 4 and aligned buffers), else one position per thread.
        let reduce = a.label("reduce");
        let scalar = a.label("scalar");
        a.op(format!("@!{aligned} bra {scalar}"));
        let rows_view = Rows { inputs: &rows, writes: &write_rows, zeros: &zero_rows };
        let groups = a.def(Kind::B64, "shr.u64", &format!("{}, 2", p.s));
        self.position_loop(&mut a, spec, &body, &values, &rows_view, &acc, &first, &step, &groups, 4, &reduce);
        a.place(&scalar);
        self.position_loop(&mut a, spec, &body, &values, &rows_view, &acc, &first, &step, &p.s, 1, &reduce);

        a.place(&reduce);
        if cells > 0 {
            self.block_sums(&mut a, &acc, &tid32, |a, i| {
                // partials[(b G + bx) P + i]
                let blk = a.def(Kind::B64, "mad.lo.u64", &format!("{b}, {}, {bx}", p.g));
                let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{blk}, {cells}, {base}"));
                let idx = a.def(Kind::B64, "add.u64", &format!("{idx}, {i}"));
                a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 8, {}", p.ws))
            });
        }
        a.op(format!("add.u64 {b}, {b}, {ny}"));
        a.op(format!("bra {items}"));
        a.place(&done);
        a.op("ret");
        format!("{}{}{}}}\n", self.signature(&format!("lossc_sweep_{k}")), shared_decl(cells), a.finish())
    }

    /// Whether the vector path applies: S is a multiple of 4 and every buffer the sweep
    /// streams starts on 16 bytes (then so does every row).
    fn aligned(&self, a: &mut Asm, p: &Params, spec: &SweepSpec, body: &[NodeId], zeros: &[usize]) -> String {
        let mut bits = a.def(Kind::B64, "and.b64", &format!("{}, 3", p.s));
        let mut merge = |a: &mut Asm, ptr: &str| {
            let low = a.def(Kind::B64, "and.b64", &format!("{ptr}, 15"));
            bits = a.def(Kind::B64, "or.b64", &format!("{bits}, {low}"));
        };
        for &id in body {
            if let Op::Input { index, .. } = self.g.node(id).op {
                if !self.layout.spatial_one[index as usize] {
                    merge(a, &p.inputs[index as usize]);
                }
            }
        }
        for i in spec.writes.iter().map(|w| w.input).chain(zeros.iter().copied()) {
            merge(a, &p.grads[i]);
        }
        a.def(Kind::Pred, "setp.eq.u64", &format!("{bits}, 0"))
    }

    /// The loop over this thread's positions of one batch item, `lanes` (1 or 4)
    /// consecutive positions per step: group `first`, then every `step` groups, while below
    /// `groups`. Computes the body per position, adds the sums to `acc` in position order
    /// and stores the gradients; then jumps to `done`.
    #[allow(clippy::too_many_arguments)]
    fn position_loop(
        &self,
        a: &mut Asm,
        spec: &SweepSpec,
        body: &[NodeId],
        hoisted: &HashMap<(NodeId, usize), String>,
        rows: &Rows,
        acc: &[String],
        first: &str,
        step: &str,
        groups: &str,
        lanes: usize,
        done: &str,
    ) {
        let g = self.g;
        let cc = self.layout.classes;
        let (load, store) = if lanes == 4 {
            ("ld.global.nc.v4.f32", "st.global.v4.f32")
        } else {
            ("ld.global.nc.f32", "st.global.f32")
        };
        let at_group = a.def(Kind::B64, "mov.u64", first);
        let top = a.label(if lanes == 4 { "groups" } else { "positions" });
        a.place(&top);
        let past = a.def(Kind::Pred, "setp.ge.u64", &format!("{at_group}, {groups}"));
        a.op(format!("@{past} bra {done}"));
        let off = a.def(Kind::B64, "shl.b64", &format!("{at_group}, {}", if lanes == 4 { 4 } else { 2 }));
        let at = |a: &mut Asm, row: &str| a.def(Kind::B64, "add.u64", &format!("{row}, {off}"));
        // A vector of `lanes` registers, as PTX writes it.
        let vector =
            |regs: &[String]| if regs.len() == 1 { regs[0].clone() } else { format!("{{{}}}", regs.join(", ")) };
        let mut per_lane: Vec<HashMap<(NodeId, usize), String>> = vec![hoisted.clone(); lanes];
        for &id in body {
            let node = g.node(id);
            let n = self.classes(id);
            if let Op::Input { index, .. } = node.op {
                for c in 0..n {
                    let row = &rows.inputs[&(index as usize, c)];
                    if self.layout.spatial_one[index as usize] {
                        // One value for every position.
                        let v = a.def(Kind::F32, "ld.global.nc.f32", &format!("[{row}]"));
                        for values in per_lane.iter_mut() {
                            values.insert((id, c), v.clone());
                        }
                        continue;
                    }
                    let addr = at(a, row);
                    let regs: Vec<String> = (0..lanes).map(|_| a.reg(Kind::F32)).collect();
                    a.op(format!("{load} {}, [{addr}]", vector(&regs)));
                    for (values, r) in per_lane.iter_mut().zip(regs) {
                        values.insert((id, c), r);
                    }
                }
                continue;
            }
            for values in per_lane.iter_mut() {
                match node.op {
                    Op::Sum(over) if over == AxisSet::CLASS => {
                        let v = self.class_sum(a, Ty::F32, values, node.args[0]);
                        values.insert((id, 0), v);
                    }
                    Op::LogSumExp(over) if over == AxisSet::CLASS => {
                        let x = node.args[0];
                        let xs: Vec<String> =
                            (0..self.classes(x)).map(|c| self.value(a, Ty::F32, values, x, c)).collect();
                        let v = log_sum_exp(a, Ty::F32, &xs, if xs.len() == 1 { cc } else { 1 });
                        values.insert((id, 0), v);
                    }
                    op => {
                        for c in 0..n {
                            let args: Vec<String> =
                                node.args.iter().map(|&x| self.value(a, Ty::F32, values, x, c)).collect();
                            let v = elementwise(a, Ty::F32, g, op, &node.args, &args);
                            values.insert((id, c), v);
                        }
                    }
                }
            }
        }
        for values in &per_lane {
            let mut cell = 0;
            for &x in &spec.sums {
                for c in 0..self.classes(x) {
                    let v = self.value(a, Ty::F32, values, x, c);
                    let d = a.def(Kind::F64, "cvt.f64.f32", &v);
                    a.op(format!("add.rn.f64 {0}, {0}, {d}", acc[cell]));
                    cell += 1;
                }
            }
        }
        for (w, list) in spec.writes.iter().zip(rows.writes) {
            for (r, row) in list.iter().enumerate() {
                let regs: Vec<String> = per_lane
                    .iter()
                    .map(|values| {
                        if !w.sum_classes {
                            self.value(a, Ty::F32, values, w.node, r)
                        } else if self.classes(w.node) == 1 {
                            let x = self.value(a, Ty::F32, values, w.node, 0);
                            a.def(Kind::F32, "mul.rn.f32", &format!("{x}, {}", f32_imm(cc as f32)))
                        } else {
                            self.class_sum(a, Ty::F32, values, w.node)
                        }
                    })
                    .collect();
                let addr = at(a, row);
                a.op(format!("{store} [{addr}], {}", vector(&regs)));
            }
        }
        for row in rows.zeros.iter().flatten() {
            let addr = at(a, row);
            let zero = a.f32(0.0);
            a.op(format!("{store} [{addr}], {}", vector(&vec![zero; lanes])));
        }
        a.op(format!("add.u64 {at_group}, {at_group}, {step}"));
        a.op(format!("bra {top}"));
    }

    /// The address of row (batch item `b`, class `c`) of input `i`'s layout in `ptr`.
    fn row(&self, a: &mut Asm, ptr: &str, p: &Params, b: &str, i: usize, c: usize) -> String {
        let rows = if self.layout.class_one[i] { 1 } else { self.layout.classes };
        let c = if self.layout.class_one[i] { 0 } else { c };
        let item = if self.layout.batch_one[i] { "0".to_string() } else { b.to_string() };
        let r = a.def(Kind::B64, "mad.lo.u64", &format!("{item}, {rows}, {c}"));
        let elems =
            if self.layout.spatial_one[i] { r } else { a.def(Kind::B64, "mul.lo.u64", &format!("{r}, {}", p.s)) };
        a.def(Kind::B64, "mad.lo.u64", &format!("{elems}, 4, {ptr}"))
    }

    /// Adds each thread's `acc` across the block (warp shuffles, then the warps in order
    /// in shared memory) and has thread 0 store cell `i` at `dest(i)`.
    fn block_sums(&self, a: &mut Asm, acc: &[String], tid: &str, dest: impl Fn(&mut Asm, usize) -> String) {
        let n = acc.len();
        a.note("block reduction: shuffles within each warp, then warps in order");
        for v in acc {
            for off in [16, 8, 4, 2, 1] {
                let (lo, hi) = (a.reg(Kind::B32), a.reg(Kind::B32));
                a.op(format!("mov.b64 {{{lo}, {hi}}}, {v}"));
                let lo2 = a.def(Kind::B32, "shfl.sync.down.b32", &format!("{lo}, {off}, 31, -1"));
                let hi2 = a.def(Kind::B32, "shfl.sync.down.b32", &format!("{hi}, {off}, 31, -1"));
                let other = a.reg(Kind::F64);
                a.op(format!("mov.b64 {other}, {{{lo2}, {hi2}}}"));
                a.op(format!("add.rn.f64 {v}, {v}, {other}"));
            }
        }
        let lane = a.def(Kind::B32, "and.b32", &format!("{tid}, 31"));
        let warp = a.def(Kind::B32, "shr.u32", &format!("{tid}, 5"));
        let smem = a.def(Kind::B64, "mov.u64", "lossc_partials");
        let skip = a.label("not_lane0");
        let not_first = a.def(Kind::Pred, "setp.ne.u32", &format!("{lane}, 0"));
        a.op(format!("@{not_first} bra {skip}"));
        let w64 = a.def(Kind::B64, "cvt.u64.u32", &warp);
        let row = a.def(Kind::B64, "mul.lo.u64", &format!("{w64}, {}", 8 * n));
        let row = a.def(Kind::B64, "add.u64", &format!("{row}, {smem}"));
        for (i, v) in acc.iter().enumerate() {
            a.op(format!("st.shared.f64 [{row}+{}], {v}", 8 * i));
        }
        a.place(&skip);
        a.op("bar.sync 0");
        let skip = a.label("not_thread0");
        let not_zero = a.def(Kind::Pred, "setp.ne.u32", &format!("{tid}, 0"));
        a.op(format!("@{not_zero} bra {skip}"));
        for i in 0..n {
            let total = a.def(Kind::F64, "ld.shared.f64", &format!("[{smem}+{}]", 8 * i));
            for w in 1..WARPS {
                let x = a.def(Kind::F64, "ld.shared.f64", &format!("[{smem}+{}]", 8 * (w * n + i)));
                a.op(format!("add.rn.f64 {total}, {total}, {x}"));
            }
            let addr = dest(a, i);
            a.op(format!("st.global.f64 [{addr}], {total}"));
        }
        a.place(&skip);
        a.op("bar.sync 0");
    }

    /// A value at class `c` (class 0 where it does not vary over class): computed, a
    /// table value, or a constant.
    fn value(&self, a: &mut Asm, ty: Ty, values: &HashMap<(NodeId, usize), String>, id: NodeId, c: usize) -> String {
        let c = if self.g.axes(id).contains(AxisSet::CLASS) { c } else { 0 };
        if let Some(v) = self.g.constant_value(id) {
            return a.def(ty.kind(), &format!("mov.{}", ty.name()), &ty.imm(v));
        }
        values.get(&(id, c)).cloned().unwrap_or_else(|| panic!("invariant: {id:?} class {c} is computed before use"))
    }

    /// A class-varying value summed over classes in order, or C times a class-free one.
    fn class_sum(&self, a: &mut Asm, ty: Ty, values: &HashMap<(NodeId, usize), String>, x: NodeId) -> String {
        let n = self.classes(x);
        let t = ty.name();
        let mut s = self.value(a, ty, values, x, 0);
        if n == 1 {
            return a.def(ty.kind(), &format!("mul.rn.{t}"), &format!("{s}, {}", ty.imm(self.layout.classes as f64)));
        }
        for c in 1..n {
            let v = self.value(a, ty, values, x, c);
            s = a.def(ty.kind(), &format!("add.rn.{t}"), &format!("{s}, {v}"));
        }
        s
    }

    /// `lossc_tail_k`: combines sweep k's partials (k >= 1), then evaluates the small
    /// values of level k; the last one also the loss and the small gradients.
    fn tail(&self, k: usize, cells: usize) -> String {
        let g = self.g;
        let mut a = Asm::default();
        let p = self.params(&mut a);
        let tid32 = a.def(Kind::B32, "mov.u32", "%tid.x");
        let tid = a.def(Kind::B64, "cvt.u64.u32", &tid32);
        let base = self.partials_base(&mut a, &p);
        let last = k == self.plan.sweeps.len();
        if cells > 0 {
            a.note(format!("the {cells} sums of sweep {k} per batch item: each over the G blocks, in block order"));
            let total = a.def(Kind::B64, "mul.lo.u64", &format!("{}, {cells}", p.b));
            let i = a.def(Kind::B64, "mov.u64", &tid);
            let top = a.label("combine");
            let out = a.label("combined");
            a.place(&top);
            let end = a.def(Kind::Pred, "setp.ge.u64", &format!("{i}, {total}"));
            a.op(format!("@{end} bra {out}"));
            let b = a.def(Kind::B64, "div.u64", &format!("{i}, {cells}"));
            let cell = a.def(Kind::B64, "rem.u64", &format!("{i}, {cells}"));
            let row = a.def(Kind::B64, "mul.lo.u64", &format!("{b}, {}", p.g));
            let sum = a.f64(0.0);
            let first = a.reg(Kind::B64);
            let g_ = p.g.clone();
            self.count(&mut a, &g_, |a, j| {
                let blk = a.def(Kind::B64, "add.u64", &format!("{row}, {j}"));
                let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{blk}, {cells}, {base}"));
                let idx = a.def(Kind::B64, "add.u64", &format!("{idx}, {cell}"));
                let addr = a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 8, {}", p.ws));
                let x = a.def(Kind::F64, "ld.global.f64", &format!("[{addr}]"));
                a.op(format!("add.rn.f64 {sum}, {sum}, {x}"));
            });
            let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{row}, {cells}, {base}"));
            let idx = a.def(Kind::B64, "add.u64", &format!("{idx}, {cell}"));
            a.op(format!("mad.lo.u64 {first}, {idx}, 8, {}", p.ws));
            a.op(format!("st.global.f64 [{first}], {sum}"));
            a.op(format!("add.u64 {i}, {i}, {THREADS}"));
            a.op(format!("bra {top}"));
            a.place(&out);
            a.op("bar.sync 0");
        }
        let done = a.label("done");
        let others = a.def(Kind::Pred, "setp.ne.u64", &format!("{tid}, 0"));
        a.op(format!("@{others} bra {done}"));
        let zero = a.def(Kind::B64, "mov.u64", "0");
        // Sweep k's reductions from the combined sums.
        if let Some(Some(sweep)) = k.checked_sub(1).map(|k| &self.plan.sweeps[k]) {
            let mut offset = 0;
            for (&r, &x) in sweep.reductions.iter().zip(&sweep.spec.sums) {
                let n = self.classes(x);
                self.reduction(&mut a, &p, &base, cells, r, offset, n, &zero);
                offset += n;
            }
        }
        for &id in &self.plan.order {
            let own_level = self.plan.level[&id] == k;
            if own_level && self.tables.contains_key(&id) && !crosses_elements(g, id) {
                self.table(&mut a, &p, id, &zero);
            }
        }
        if last {
            self.finish(&mut a, &p, &zero);
        }
        a.place(&done);
        a.op("ret");
        format!("{}{}}}\n", self.signature(&format!("lossc_tail_{k}")), a.finish())
    }

    /// The product of the extents of the axes `pick` takes (by index), as an f64.
    fn extent(&self, a: &mut Asm, p: &Params, pick: impl Fn(usize) -> bool) -> String {
        let mut v = a.f64(if pick(1) { self.layout.classes as f64 } else { 1.0 });
        for (i, e) in [(0, &p.b), (2, &p.s)] {
            if pick(i) {
                let x = a.def(Kind::F64, "cvt.rn.f64.u64", e);
                v = a.def(Kind::F64, "mul.rn.f64", &format!("{v}, {x}"));
            }
        }
        v
    }

    /// Combined sum `offset + c` of batch item `b`.
    fn combined(&self, a: &mut Asm, p: &Params, base: &str, cells: usize, b: &str, cell: usize) -> String {
        let row = a.def(Kind::B64, "mul.lo.u64", &format!("{b}, {}", p.g));
        let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{row}, {cells}, {base}"));
        let addr = a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 8, {}", p.ws));
        a.def(Kind::F64, "ld.global.f64", &format!("[{addr}+{}]", 8 * cell))
    }

    /// Reduction `r`'s table from its operand's `n` combined sums from `offset`.
    #[allow(clippy::too_many_arguments)]
    fn reduction(
        &self,
        a: &mut Asm,
        p: &Params,
        base: &str,
        cells: usize,
        r: NodeId,
        offset: usize,
        n: usize,
        zero: &str,
    ) {
        let g = self.g;
        let Op::Sum(over) = g.node(r).op else { unreachable!("GPU reductions are sums") };
        let t = self.tables[&r];
        let cc = self.layout.classes;
        a.note(format!("reduction {r:?}"));
        // Over classes too: in class order, or C copies of a class-free operand.
        let finish = |a: &mut Asm, sums: &[String]| -> Vec<String> {
            if !over.contains(AxisSet::CLASS) {
                return sums.to_vec();
            }
            if n == 1 {
                return vec![a.def(Kind::F64, "mul.rn.f64", &format!("{}, {}", sums[0], f64_imm(cc as f64)))];
            }
            let mut s = sums[0].clone();
            for x in &sums[1..] {
                s = a.def(Kind::F64, "add.rn.f64", &format!("{s}, {x}"));
            }
            vec![s]
        };
        if g.axes(r).contains(AxisSet::BATCH) {
            self.count(a, &p.b.clone(), |a, b| {
                let sums: Vec<String> = (0..n).map(|c| self.combined(a, p, base, cells, b, offset + c)).collect();
                for (c, v) in finish(a, &sums).iter().enumerate() {
                    let addr = self.table_addr(a, p, t, b, c);
                    a.op(format!("st.global.f64 [{addr}], {v}"));
                }
            });
            return;
        }
        let sums: Vec<String> = (0..n).map(|_| a.f64(0.0)).collect();
        // An operand without a batch axis is the same in every batch item: count it once
        // unless the sum is over the batch.
        let items = if over.contains(AxisSet::BATCH) { p.b.clone() } else { "1".to_string() };
        self.count(a, &items, |a, b| {
            for (c, s) in sums.iter().enumerate() {
                let x = self.combined(a, p, base, cells, b, offset + c);
                a.op(format!("add.rn.f64 {s}, {s}, {x}"));
            }
        });
        for (c, v) in finish(a, &sums).iter().enumerate() {
            let addr = self.table_addr(a, p, t, zero, c);
            a.op(format!("st.global.f64 [{addr}], {v}"));
        }
    }

    /// Loads of a small value's table cells at batch item `b`: by class.
    fn load_table(&self, a: &mut Asm, p: &Params, id: NodeId, b: &str, zero: &str) -> Vec<String> {
        let at = if self.g.axes(id).contains(AxisSet::BATCH) { b } else { zero };
        (0..self.classes(id))
            .map(|c| match self.g.constant_value(id) {
                Some(v) => a.f64(v),
                None => {
                    let addr = self.table_addr(a, p, self.tables[&id], at, c);
                    a.def(Kind::F64, "ld.global.f64", &format!("[{addr}]"))
                }
            })
            .collect()
    }

    /// Evaluates small value `id` into its table, for every batch item and class it has.
    fn table(&self, a: &mut Asm, p: &Params, id: NodeId, zero: &str) {
        let g = self.g;
        let t = self.tables[&id];
        let n = self.classes(id);
        let cc = self.layout.classes;
        let node = g.node(id);
        let per_item = |a: &mut Asm, b: &str| {
            let values: Vec<String> = match node.op {
                Op::Input { index, .. } => {
                    let i = index as usize;
                    (0..n)
                        .map(|c| {
                            let row = if self.layout.class_one[i] { 0 } else { c };
                            let rows = if self.layout.class_one[i] { 1 } else { cc };
                            let item = if self.layout.batch_one[i] { zero } else { b };
                            let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{item}, {rows}, {row}"));
                            let addr = a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 4, {}", p.inputs[i]));
                            let x = a.def(Kind::F32, "ld.global.f32", &format!("[{addr}]"));
                            a.def(Kind::F64, "cvt.f64.f32", &x)
                        })
                        .collect()
                }
                Op::ClassIndex => (0..n).map(|c| a.f64(c as f64)).collect(),
                Op::Extent(axes) => {
                    vec![self.extent(a, p, |i| axes.has_index(i))]
                }
                Op::Sum(over) | Op::LogSumExp(over) => self.small_reduction(a, p, node.op, over, node.args[0], b, zero),
                op => {
                    let args: Vec<Vec<String>> = node.args.iter().map(|&x| self.load_table(a, p, x, b, zero)).collect();
                    (0..n)
                        .map(|c| {
                            let at: Vec<String> = args.iter().map(|v| v[c.min(v.len() - 1)].clone()).collect();
                            elementwise(a, Ty::F64, g, op, &node.args, &at)
                        })
                        .collect()
                }
            };
            for (c, v) in values.iter().enumerate() {
                let addr = self.table_addr(a, p, t, b, c);
                a.op(format!("st.global.f64 [{addr}], {v}"));
            }
        };
        if g.axes(id).contains(AxisSet::BATCH) {
            self.count(a, &p.b.clone(), per_item);
        } else {
            per_item(a, zero);
        }
    }

    /// A sum or logsumexp of a small value over batch and/or class (other axes count as
    /// copies, as in the reference: a sum over positions of a value without them is S
    /// times the value).
    #[allow(clippy::too_many_arguments)]
    fn small_reduction(
        &self,
        a: &mut Asm,
        p: &Params,
        op: Op,
        over: AxisSet,
        x: NodeId,
        b: &str,
        zero: &str,
    ) -> Vec<String> {
        let g = self.g;
        let cc = self.layout.classes;
        let axes = g.axes(x);
        let copies = self.extent(a, p, |i| over.has_index(i) && !axes.has_index(i));
        let over_items = over.contains(AxisSet::BATCH) && axes.contains(AxisSet::BATCH);
        let over_classes = over.contains(AxisSet::CLASS) && axes.contains(AxisSet::CLASS);
        let out_classes = if axes.contains(AxisSet::CLASS) && !over.contains(AxisSet::CLASS) { cc } else { 1 };
        let lse = matches!(op, Op::LogSumExp(_));
        // The values reduced into output class c at item `item`.
        let gather = |a: &mut Asm, item: &str, c: usize| -> Vec<String> {
            let v = self.load_table(a, p, x, item, zero);
            if over_classes {
                v
            } else {
                vec![v[c.min(v.len() - 1)].clone()]
            }
        };
        (0..out_classes)
            .map(|c| {
                if !over_items {
                    let xs = gather(a, b, c);
                    return reduce_values(a, &xs, lse, &copies);
                }
                // Over the batch: two passes for logsumexp (the maximum, then the sum).
                let m = a.f64(if lse { f64::NEG_INFINITY } else { 0.0 });
                let never = a.def(Kind::B32, "mov.u32", "0");
                let nan = a.def(Kind::Pred, "setp.ne.u32", &format!("{never}, {never}"));
                if lse {
                    self.count(a, &p.b.clone(), |a, item| {
                        for v in gather(a, item, c) {
                            let isnan = a.def(Kind::Pred, "testp.notanumber.f64", &v);
                            a.op(format!("or.pred {nan}, {nan}, {isnan}"));
                            a.op(format!("max.f64 {m}, {m}, {v}"));
                        }
                    });
                }
                let s = a.f64(0.0);
                self.count(a, &p.b.clone(), |a, item| {
                    for v in gather(a, item, c) {
                        let term = if lse {
                            let d = a.def(Kind::F64, "sub.rn.f64", &format!("{v}, {m}"));
                            exp64(a, &d)
                        } else {
                            v
                        };
                        a.op(format!("add.rn.f64 {s}, {s}, {term}"));
                    }
                });
                if !lse {
                    return a.def(Kind::F64, "mul.rn.f64", &format!("{s}, {copies}"));
                }
                finish_log_sum_exp(a, &m, &s, &copies, &nan)
            })
            .collect()
    }

    /// After the last sweep: the loss into `ws[0]`, and the gradients of inputs without a
    /// spatial axis (class weights) into their buffers.
    fn finish(&self, a: &mut Asm, p: &Params, zero: &str) {
        let g = self.g;
        let cc = self.layout.classes;
        let root = self.load_table(a, p, self.loss.root(), zero, zero);
        a.op(format!("st.global.f64 [{}], {}", p.ws, root[0]));
        for (i, spec) in self.loss.inputs().iter().enumerate() {
            if !self.layout.want[i] || spec.axes.has_index(2) {
                continue;
            }
            a.note(format!("the gradient of {}", spec.name));
            let rows = if self.layout.class_one[i] { 1 } else { cc };
            let node = self.loss.gradient_nodes()[i];
            let write = |a: &mut Asm, item: &str| {
                for r in 0..rows {
                    let v = match node {
                        None => a.f64(0.0),
                        Some(n) => {
                            // Summed over what the input stands for and the value varies along.
                            let over_items = self.layout.batch_one[i] && spec.axes.has_index(0);
                            let over_classes = self.layout.class_one[i] && spec.axes.has_index(1);
                            let s = a.f64(0.0);
                            let add = |a: &mut Asm, b: &str| {
                                let v = self.load_table(a, p, n, b, zero);
                                let cs: Vec<usize> = if over_classes { (0..cc).collect() } else { vec![r] };
                                for c in cs {
                                    let x = &v[c.min(v.len() - 1)];
                                    a.op(format!("add.rn.f64 {s}, {s}, {x}"));
                                }
                            };
                            if over_items {
                                self.count(a, &p.b.clone(), add);
                            } else {
                                add(a, item);
                            }
                            s
                        }
                    };
                    let f = a.def(Kind::F32, "cvt.rn.f32.f64", &v);
                    let idx = a.def(Kind::B64, "mad.lo.u64", &format!("{item}, {rows}, {r}"));
                    let addr = a.def(Kind::B64, "mad.lo.u64", &format!("{idx}, 4, {}", p.grads[i]));
                    a.op(format!("st.global.f32 [{addr}], {f}"));
                }
            };
            if self.layout.batch_one[i] {
                write(a, zero);
            } else {
                self.count(a, &p.b.clone(), write);
            }
        }
        let _ = g;
    }
}

/// The shared memory of a sweep's block reduction: one f64 per (warp, sum).
fn shared_decl(cells: usize) -> String {
    if cells == 0 {
        return String::new();
    }
    format!("\t.shared .align 8 .f64 lossc_partials[{}];\n", WARPS * cells)
}

/// Sum (times `copies`) or logsumexp (of `copies` copies) of a few f64 values.
fn reduce_values(a: &mut Asm, xs: &[String], lse: bool, copies: &str) -> String {
    if !lse {
        let mut s = xs[0].clone();
        for x in &xs[1..] {
            s = a.def(Kind::F64, "add.rn.f64", &format!("{s}, {x}"));
        }
        return a.def(Kind::F64, "mul.rn.f64", &format!("{s}, {copies}"));
    }
    let mut m = xs[0].clone();
    for x in &xs[1..] {
        m = a.def(Kind::F64, "max.f64", &format!("{m}, {x}"));
    }
    let mut s = a.f64(0.0);
    for x in xs {
        let d = a.def(Kind::F64, "sub.rn.f64", &format!("{x}, {m}"));
        let e = exp64(a, &d);
        s = a.def(Kind::F64, "add.rn.f64", &format!("{s}, {e}"));
    }
    // max.f64 drops NaN; the sum keeps it.
    let nan = a.def(Kind::Pred, "testp.notanumber.f64", &s);
    finish_log_sum_exp(a, &m, &s, copies, &nan)
}

/// m + log(copies * s), the logsumexp of values with maximum `m` and shifted exponentials
/// summing to `s`: `m` itself where it is infinite, NaN where `nan` (a NaN was seen).
fn finish_log_sum_exp(a: &mut Asm, m: &str, s: &str, copies: &str, nan: &str) -> String {
    let scaled = a.def(Kind::F64, "mul.rn.f64", &format!("{s}, {copies}"));
    let l = log64(a, &scaled);
    let r = a.def(Kind::F64, "add.rn.f64", &format!("{m}, {l}"));
    let am = a.def(Kind::F64, "abs.f64", m);
    let inf = a.def(Kind::Pred, "setp.eq.f64", &format!("{am}, {}", f64_imm(f64::INFINITY)));
    let r = a.def(Kind::F64, "selp.f64", &format!("{m}, {r}, {inf}"));
    a.def(Kind::F64, "selp.f64", &format!("{}, {r}, {nan}", f64_imm(f64::NAN)))
}

/// log(sum(exp(x))) over f32 class values, shifted by their maximum; `copies` is the
/// class count when one class-free value stands for every class.
fn log_sum_exp(a: &mut Asm, ty: Ty, xs: &[String], copies: usize) -> String {
    debug_assert!(ty == Ty::F32);
    if xs.len() == 1 {
        return a.def(Kind::F32, "add.rn.f32", &format!("{}, {}", xs[0], f32_imm((copies as f32).ln())));
    }
    let mut m = xs[0].clone();
    let mut nan = a.def(Kind::Pred, "testp.notanumber.f32", &xs[0]);
    for x in &xs[1..] {
        m = a.def(Kind::F32, "max.f32", &format!("{m}, {x}"));
        let n = a.def(Kind::Pred, "testp.notanumber.f32", x);
        nan = a.def(Kind::Pred, "or.pred", &format!("{nan}, {n}"));
    }
    let mut s = a.f32(0.0);
    for x in xs {
        let d = a.def(Kind::F32, "sub.rn.f32", &format!("{x}, {m}"));
        let e = a.exp(&d);
        s = a.def(Kind::F32, "add.rn.f32", &format!("{s}, {e}"));
    }
    let l = a.log(&s);
    let r = a.def(Kind::F32, "add.rn.f32", &format!("{m}, {l}"));
    let am = a.def(Kind::F32, "abs.f32", &m);
    let inf = a.test("eq", &am, &f32_imm(f32::INFINITY));
    let r = a.def(Kind::F32, "selp.f32", &format!("{m}, {r}, {inf}"));
    a.def(Kind::F32, "selp.f32", &format!("{}, {r}, {nan}", f32_imm(f32::NAN)))
}

fn exp64(a: &mut Asm, x: &str) -> String {
    a.exp64(x)
}

fn log64(a: &mut Asm, x: &str) -> String {
    a.log64(x)
}

/// One elementwise op; `ids` are the argument nodes (for constant exponents).
fn elementwise(a: &mut Asm, ty: Ty, g: &Graph, op: Op, ids: &[NodeId], x: &[String]) -> String {
    let t = ty.name();
    let k = ty.kind();
    let un = |a: &mut Asm, name: &str| a.def(k, &format!("{name}.{t}"), &x[0]);
    let bin = |a: &mut Asm, name: &str| a.def(k, &format!("{name}.{t}"), &format!("{}, {}", x[0], x[1]));
    // The f32 function in the sweeps, the f64 one in the tail.
    let math = |a: &mut Asm, f32: fn(&mut Asm, &str) -> String, f64: fn(&mut Asm, &str) -> String| match ty {
        Ty::F32 => f32(a, &x[0]),
        Ty::F64 => f64(a, &x[0]),
    };
    let flag = |a: &mut Asm, cc: &str| {
        let p = a.def(Kind::Pred, &format!("setp.{cc}.{t}"), &format!("{}, {}", x[0], x[1]));
        a.def(k, &format!("selp.{t}"), &format!("{}, {}, {p}", ty.imm(1.0), ty.imm(0.0)))
    };
    // min and max that return NaN when either argument is NaN, like the reference.
    let nan_aware = |a: &mut Asm, name: &str| {
        let m = a.def(k, &format!("{name}.{t}"), &format!("{}, {}", x[0], x[1]));
        let nan = a.def(Kind::Pred, &format!("setp.nan.{t}"), &format!("{}, {}", x[0], x[1]));
        let sum = a.def(k, &format!("add.rn.{t}"), &format!("{}, {}", x[0], x[1]));
        a.def(k, &format!("selp.{t}"), &format!("{sum}, {m}, {nan}"))
    };
    match op {
        Op::Neg => un(a, "neg"),
        Op::Abs => un(a, "abs"),
        Op::Sqrt => un(a, "sqrt.rn"),
        Op::Exp => math(a, |a, x| a.exp(x), |a, x| a.exp64(x)),
        Op::Log => math(a, |a, x| a.log(x), |a, x| a.log64(x)),
        Op::Log1p => math(a, |a, x| a.log1p(x), |a, x| a.log1p64(x)),
        Op::Sigmoid => math(a, |a, x| a.sigmoid(x), |a, x| a.sigmoid64(x)),
        Op::Softplus => math(a, |a, x| a.softplus(x), |a, x| a.softplus64(x)),
        Op::Tanh => math(a, |a, x| a.tanh(x), |a, x| a.tanh64(x)),
        Op::Sign => {
            let z = ty.imm(0.0);
            let zero_or_nan = a.def(k, &format!("mul.rn.{t}"), &format!("{}, {z}", x[0]));
            let lt = a.def(Kind::Pred, &format!("setp.lt.{t}"), &format!("{}, {z}", x[0]));
            let r = a.def(k, &format!("selp.{t}"), &format!("{}, {zero_or_nan}, {lt}", ty.imm(-1.0)));
            let gt = a.def(Kind::Pred, &format!("setp.gt.{t}"), &format!("{}, {z}", x[0]));
            a.def(k, &format!("selp.{t}"), &format!("{}, {r}, {gt}", ty.imm(1.0)))
        }
        Op::Relu => {
            let keep = a.def(Kind::Pred, &format!("setp.gtu.{t}"), &format!("{}, {}", x[0], ty.imm(0.0)));
            a.def(k, &format!("selp.{t}"), &format!("{}, {}, {keep}", x[0], ty.imm(0.0)))
        }
        Op::Add => bin(a, "add.rn"),
        Op::Sub => bin(a, "sub.rn"),
        Op::Mul => bin(a, "mul.rn"),
        Op::Div => bin(a, "div.rn"),
        Op::Pow => match g.constant_value(ids[1]) {
            Some(1.0) => x[0].clone(),
            Some(2.0) => a.def(k, &format!("mul.rn.{t}"), &format!("{}, {}", x[0], x[0])),
            Some(3.0) => {
                let sq = a.def(k, &format!("mul.rn.{t}"), &format!("{}, {}", x[0], x[0]));
                a.def(k, &format!("mul.rn.{t}"), &format!("{sq}, {}", x[0]))
            }
            _ => match ty {
                Ty::F32 => a.pow(&x[0], &x[1]),
                Ty::F64 => a.pow64(&x[0], &x[1]),
            },
        },
        Op::Min => nan_aware(a, "min"),
        Op::Max => nan_aware(a, "max"),
        Op::Lt => flag(a, "lt"),
        Op::Le => flag(a, "le"),
        Op::Gt => flag(a, "gt"),
        Op::Ge => flag(a, "ge"),
        Op::Eq => flag(a, "eq"),
        Op::Ne => flag(a, "neu"),
        Op::Select => {
            let pick = a.def(Kind::Pred, &format!("setp.neu.{t}"), &format!("{}, {}", x[0], ty.imm(0.0)));
            a.def(k, &format!("selp.{t}"), &format!("{}, {}, {pick}", x[1], x[2]))
        }
        other => unreachable!("`{}` is not elementwise (checked by `unsupported`)", other.name()),
    }
}
