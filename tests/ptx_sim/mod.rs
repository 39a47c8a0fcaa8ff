//! A PTX interpreter for tests: exactly the subset of PTX that `lossc::backend::ptx`
//! emits, run on the CPU, so that the kernels' logic (indexing, reductions, the tail,
//! gradients) is checked on a machine without a GPU.
//!
//! - `Module::parse` reads a module and pre-decodes every instruction into an enum with
//!   register indices. An instruction, directive, operand type or register this file does
//!   not know is an error naming the line, never a silent no-op: a new instruction in the
//!   emitter shows up here first.
//! - `Module::launch` runs a grid of blocks one after another. The threads of a block run
//!   cooperatively: each runs until it reaches `bar.sync`, `shfl.sync` or `ret`; a
//!   `shfl.sync` is performed when all 32 lanes of the warp wait at it, a `bar.sync` when
//!   every thread of the block that has not exited waits at it.
//! - `Memory` is global memory made of allocations 4 GiB apart, with bounds checks: an
//!   access past an allocation is an error naming it, however far past; so is an access
//!   at null or one misaligned for its size (a `v4.f32` needs 16 bytes). Memory is
//!   NaN-filled on allocation, and reading a word that nothing ever wrote is an error.
//!   Two checks catch races: within one launch a word written by one block and read or
//!   written by another, and within one block a word written by one thread and read or
//!   written by another between the same two barriers. Shared memory gets the same checks.
//!   `ld.global.nc` of a word the same launch wrote is an error too.
//!
//! Arithmetic: f32 operations round to f32 (Rust's f32 arithmetic, `fma` as `mul_add`);
//! `ex2.approx.f32` and `lg2.approx.f32` are `exp2` and `log2` (the hardware's are within
//! 2 ulp); integers wrap; `min`/`max` return the other operand when one is NaN.

use std::collections::HashMap;

/// How many instructions one launch may execute before it counts as an endless loop.
const STEP_LIMIT: u64 = 1 << 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pred,
    B32,
    B64,
    F32,
    F64,
}

/// An operand: a register (its index in the register file of its kind) or an immediate.
#[derive(Clone, Copy, Debug)]
enum Src<T> {
    R(u32),
    I(T),
}

impl<T: Copy> Src<T> {
    #[inline(always)]
    fn get(self, regs: &[T]) -> T {
        match self {
            Src::R(i) => regs[i as usize],
            Src::I(v) => v,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum FBin {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug)]
enum FUn {
    Neg,
    Abs,
    Sqrt,
    Rcp,
    Ex2,
    Lg2,
    /// `cvt.rzi`: round toward zero to an integer value.
    Trunc,
    /// `cvt.rni`: round to the nearest integer value, ties to even.
    Round,
}

#[derive(Clone, Copy, Debug)]
enum IBin {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    And,
    Or,
    Xor,
}

/// Float comparisons: ordered ones are false when either operand is NaN, the `u` ones
/// true; `num` is true when neither is NaN, `nan` when either is.
#[derive(Clone, Copy, Debug)]
enum FCmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// Unsigned integer comparisons (`lo`, `ls`, `hi`, `hs` are `lt`, `le`, `gt`, `ge`).
#[derive(Clone, Copy, Debug)]
enum UCmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug)]
enum PBin {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    Global,
    /// `ld.global.nc`: through the non-coherent cache, for data no thread writes during
    /// the launch.
    GlobalNc,
    Shared,
}

#[derive(Clone, Copy, Debug)]
enum Special {
    Tid(usize),
    Ntid(usize),
    Ctaid(usize),
    Nctaid(usize),
    LaneId,
}

/// A 64-bit register split into or joined from two 32-bit halves.
#[derive(Clone, Copy, Debug)]
enum Wide {
    B64(u32),
    F64(u32),
}

#[derive(Clone, Copy, Debug)]
enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    LdParam {
        d: u32,
        param: u32,
    },
    Special {
        d: u32,
        s: Special,
    },
    MovP {
        d: u32,
        s: u32,
    },
    MovU32 {
        d: u32,
        s: Src<u32>,
    },
    MovU64 {
        d: u32,
        s: Src<u64>,
    },
    MovF32 {
        d: u32,
        s: Src<f32>,
    },
    MovF64 {
        d: u32,
        s: Src<f64>,
    },
    CvtU64U32 {
        d: u32,
        s: Src<u32>,
    },
    CvtU32U64 {
        d: u32,
        s: Src<u64>,
    },
    CvtF64F32 {
        d: u32,
        s: Src<f32>,
    },
    CvtF32F64 {
        d: u32,
        s: Src<f64>,
    },
    CvtF64U64 {
        d: u32,
        s: Src<u64>,
    },
    /// `cvt.rn.f64.s64`.
    CvtF64S64 {
        d: u32,
        s: Src<u64>,
    },
    /// `cvt.rni.s64.f64`: to the nearest integer, saturating, NaN to 0.
    CvtS64F64 {
        d: u32,
        s: Src<f64>,
    },
    /// `mov.b64` from a b64 register into an f64 one: the same bits.
    BitsToF64 {
        d: u32,
        s: Src<u64>,
    },
    /// `mov.b64` from an f64 register into a b64 one.
    F64ToBits {
        d: u32,
        s: Src<f64>,
    },
    F32Bin {
        op: FBin,
        d: u32,
        a: Src<f32>,
        b: Src<f32>,
    },
    F64Bin {
        op: FBin,
        d: u32,
        a: Src<f64>,
        b: Src<f64>,
    },
    F32Un {
        op: FUn,
        d: u32,
        a: Src<f32>,
    },
    F64Un {
        op: FUn,
        d: u32,
        a: Src<f64>,
    },
    Fma32 {
        d: u32,
        a: Src<f32>,
        b: Src<f32>,
        c: Src<f32>,
    },
    Fma64 {
        d: u32,
        a: Src<f64>,
        b: Src<f64>,
        c: Src<f64>,
    },
    SelpF32 {
        d: u32,
        a: Src<f32>,
        b: Src<f32>,
        p: u32,
    },
    SelpF64 {
        d: u32,
        a: Src<f64>,
        b: Src<f64>,
        p: u32,
    },
    SelpU32 {
        d: u32,
        a: Src<u32>,
        b: Src<u32>,
        p: u32,
    },
    SelpU64 {
        d: u32,
        a: Src<u64>,
        b: Src<u64>,
        p: u32,
    },
    SetpF32 {
        c: FCmp,
        d: u32,
        a: Src<f32>,
        b: Src<f32>,
    },
    SetpF64 {
        c: FCmp,
        d: u32,
        a: Src<f64>,
        b: Src<f64>,
    },
    SetpU32 {
        c: UCmp,
        d: u32,
        a: Src<u32>,
        b: Src<u32>,
    },
    SetpU64 {
        c: UCmp,
        d: u32,
        a: Src<u64>,
        b: Src<u64>,
    },
    NanF32 {
        d: u32,
        a: Src<f32>,
    },
    NanF64 {
        d: u32,
        a: Src<f64>,
    },
    Pred {
        op: PBin,
        d: u32,
        a: u32,
        b: u32,
    },
    NotP {
        d: u32,
        a: u32,
    },
    I32 {
        op: IBin,
        d: u32,
        a: Src<u32>,
        b: Src<u32>,
    },
    I64 {
        op: IBin,
        d: u32,
        a: Src<u64>,
        b: Src<u64>,
    },
    Shift32 {
        left: bool,
        d: u32,
        a: Src<u32>,
        b: Src<u32>,
    },
    Shift64 {
        left: bool,
        d: u32,
        a: Src<u64>,
        b: Src<u32>,
    },
    /// `shr.s64`: the sign bit shifted in.
    Sar64 {
        d: u32,
        a: Src<u64>,
        b: Src<u32>,
    },
    Mad64 {
        d: u32,
        a: Src<u64>,
        b: Src<u64>,
        c: Src<u64>,
    },
    LdF32 {
        space: Space,
        d: u32,
        addr: Src<u64>,
        off: i64,
    },
    LdF64 {
        space: Space,
        d: u32,
        addr: Src<u64>,
        off: i64,
    },
    StF32 {
        space: Space,
        addr: Src<u64>,
        off: i64,
        v: Src<f32>,
    },
    StF64 {
        space: Space,
        addr: Src<u64>,
        off: i64,
        v: Src<f64>,
    },
    /// `ld.v2.f32` and `ld.v4.f32`: `n` registers from `n` consecutive floats, aligned to all of them.
    LdVF32 {
        space: Space,
        n: u8,
        d: [u32; 4],
        addr: Src<u64>,
        off: i64,
    },
    LdVF64 {
        space: Space,
        d: [u32; 2],
        addr: Src<u64>,
        off: i64,
    },
    StVF32 {
        space: Space,
        n: u8,
        v: [Src<f32>; 4],
        addr: Src<u64>,
        off: i64,
    },
    StVF64 {
        space: Space,
        v: [Src<f64>; 2],
        addr: Src<u64>,
        off: i64,
    },
    Split {
        lo: u32,
        hi: u32,
        s: Wide,
    },
    Join {
        d: Wide,
        lo: Src<u32>,
        hi: Src<u32>,
    },
    Shfl {
        mode: ShflMode,
        d: u32,
        a: Src<u32>,
        b: Src<u32>,
        c: Src<u32>,
    },
    Bar,
    Bra {
        target: u32,
    },
    Ret,
}

#[derive(Clone, Copy, Debug)]
struct Inst {
    /// `@%p` (true) or `@!%p` (false).
    guard: Option<(u32, bool)>,
    op: Op,
}

struct Kernel {
    name: String,
    params: Vec<String>,
    threads: u32,
    /// Register file sizes by kind (the declared `<N>`).
    regs: [usize; 5],
    /// Shared variables in order (each at `SHARED_BASE + (index << SHARED_SHIFT)`): name, bytes.
    shared: Vec<(String, u64)>,
    code: Vec<Inst>,
    /// Per instruction: its line number in the module and its text.
    source: Vec<(usize, String)>,
}

/// A parsed PTX module.
pub struct Module {
    kernels: HashMap<String, Kernel>,
}

/// Where shared variables live in the shared window (nonzero, so a null or global
/// address used with `ld.shared` is caught), 1 MiB apart.
const SHARED_BASE: u64 = 0x100_0000;
const SHARED_SHIFT: u32 = 20;
/// Where global allocations start, 4 GiB apart.
const GLOBAL_BASE: u64 = 0x7f00_0000_0000;
const GLOBAL_SHIFT: u32 = 32;

fn kind_of_type(ty: &str) -> Option<Kind> {
    Some(match ty {
        "pred" => Kind::Pred,
        "b32" | "u32" | "s32" => Kind::B32,
        "b64" | "u64" | "s64" => Kind::B64,
        "f32" => Kind::F32,
        "f64" => Kind::F64,
        _ => return None,
    })
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Pred => 0,
        Kind::B32 => 1,
        Kind::B64 => 2,
        Kind::F32 => 3,
        Kind::F64 => 4,
    }
}

/// Splits operands at the commas outside braces and brackets.
fn split_operands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for ch in text.chars() {
        match ch {
            '{' | '[' => {
                depth += 1;
                cur.push(ch)
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(ch)
            }
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
            }
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() || !out.is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn parse_int(text: &str) -> Option<i128> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let v = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i128::from_str_radix(hex, 16).ok()?
    } else {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// Decoding context of one kernel: its register declarations, parameters, shared symbols.
struct Decoder<'a> {
    /// Register prefix (`%rd`) to its kind and count.
    regs: &'a HashMap<String, (Kind, usize)>,
    params: &'a [String],
    shared: &'a HashMap<String, u64>,
}

impl Decoder<'_> {
    fn reg(&self, tok: &str, want: Kind) -> Result<u32, String> {
        let tok = tok.trim();
        if !tok.starts_with('%') {
            return Err(format!("expected a {want:?} register, found `{tok}`"));
        }
        let digits = tok.len() - tok.bytes().rev().take_while(|b| b.is_ascii_digit()).count();
        let (prefix, num) = tok.split_at(digits);
        let Some(&(kind, count)) = self.regs.get(prefix) else {
            return Err(format!("register `{tok}` is not declared"));
        };
        let n: usize = num.parse().map_err(|_| format!("bad register `{tok}`"))?;
        if kind != want {
            return Err(format!("register `{tok}` is {kind:?}, the instruction needs {want:?}"));
        }
        if n >= count {
            return Err(format!("register `{tok}` is beyond its declaration `{prefix}<{count}>`"));
        }
        Ok(n as u32)
    }

    fn is_reg(tok: &str) -> bool {
        tok.trim().starts_with('%')
    }

    fn u32(&self, tok: &str) -> Result<Src<u32>, String> {
        if Self::is_reg(tok) {
            return Ok(Src::R(self.reg(tok, Kind::B32)?));
        }
        match parse_int(tok) {
            Some(v) if v >= i32::MIN as i128 && v <= u32::MAX as i128 => Ok(Src::I(v as u32)),
            _ => Err(format!("expected a 32-bit register or integer, found `{tok}`")),
        }
    }

    fn u64(&self, tok: &str) -> Result<Src<u64>, String> {
        if Self::is_reg(tok) {
            return Ok(Src::R(self.reg(tok, Kind::B64)?));
        }
        if let Some(&addr) = self.shared.get(tok.trim()) {
            return Ok(Src::I(addr));
        }
        match parse_int(tok) {
            Some(v) if v >= i64::MIN as i128 && v <= u64::MAX as i128 => Ok(Src::I(v as u64)),
            _ => Err(format!("expected a 64-bit register, integer or shared symbol, found `{tok}`")),
        }
    }

    fn f32(&self, tok: &str) -> Result<Src<f32>, String> {
        if Self::is_reg(tok) {
            return Ok(Src::R(self.reg(tok, Kind::F32)?));
        }
        let t = tok.trim();
        match t.strip_prefix("0f").or_else(|| t.strip_prefix("0F")) {
            Some(hex) if hex.len() == 8 => u32::from_str_radix(hex, 16)
                .map(|b| Src::I(f32::from_bits(b)))
                .map_err(|_| format!("bad f32 immediate `{t}`")),
            _ => Err(format!("expected an f32 register or `0f` immediate, found `{t}`")),
        }
    }

    fn f64(&self, tok: &str) -> Result<Src<f64>, String> {
        if Self::is_reg(tok) {
            return Ok(Src::R(self.reg(tok, Kind::F64)?));
        }
        let t = tok.trim();
        match t.strip_prefix("0d").or_else(|| t.strip_prefix("0D")) {
            Some(hex) if hex.len() == 16 => u64::from_str_radix(hex, 16)
                .map(|b| Src::I(f64::from_bits(b)))
                .map_err(|_| format!("bad f64 immediate `{t}`")),
            _ => Err(format!("expected an f64 register or `0d` immediate, found `{t}`")),
        }
    }

    fn pred(&self, tok: &str) -> Result<u32, String> {
        self.reg(tok, Kind::Pred)
    }

    /// `[reg]`, `[reg+off]`, `[reg+-off]`, `[symbol+off]` or `[imm]`.
    fn address(&self, tok: &str) -> Result<(Src<u64>, i64), String> {
        let t = tok.trim();
        let inner = t
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| format!("expected an address `[...]`, found `{t}`"))?
            .trim();
        let (base, off) = match inner.find('+') {
            Some(i) => {
                let off = parse_int(&inner[i + 1..]).ok_or_else(|| format!("bad address offset in `{t}`"))?;
                (&inner[..i], off as i64)
            }
            None => (inner, 0),
        };
        Ok((self.u64(base)?, off))
    }

    /// `{a, b}`.
    fn pair<'t>(&self, tok: &'t str) -> Result<(&'t str, &'t str), String> {
        let t = tok.trim();
        let inner = t
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(|| format!("expected `{{lo, hi}}`, found `{t}`"))?;
        let mut it = inner.split(',');
        match (it.next(), it.next(), it.next()) {
            (Some(a), Some(b), None) => Ok((a.trim(), b.trim())),
            _ => Err(format!("expected two registers in `{t}`")),
        }
    }

    /// `{a, b, ...}` with exactly `n` elements.
    fn vector(&self, tok: &str, n: usize) -> Result<Vec<String>, String> {
        let t = tok.trim();
        let inner = t
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(|| format!("expected a vector `{{...}}`, found `{t}`"))?;
        let items: Vec<String> = inner.split(',').map(|x| x.trim().to_string()).collect();
        if items.len() != n {
            return Err(format!("expected {n} elements in `{t}`"));
        }
        Ok(items)
    }

    fn wide(&self, tok: &str) -> Result<Wide, String> {
        match self.reg(tok, Kind::F64) {
            Ok(r) => Ok(Wide::F64(r)),
            Err(_) => Ok(Wide::B64(self.reg(tok, Kind::B64)?)),
        }
    }

    fn special(tok: &str) -> Option<Special> {
        let dim = |s: &str| match s {
            "x" => Some(0),
            "y" => Some(1),
            "z" => Some(2),
            _ => None,
        };
        let t = tok.trim();
        if t == "%laneid" {
            return Some(Special::LaneId);
        }
        let (name, d) = t.rsplit_once('.')?;
        let d = dim(d)?;
        Some(match name {
            "%tid" => Special::Tid(d),
            "%ntid" => Special::Ntid(d),
            "%ctaid" => Special::Ctaid(d),
            "%nctaid" => Special::Nctaid(d),
            _ => return None,
        })
    }

    fn fcmp(c: &str) -> Option<FCmp> {
        Some(match c {
            "eq" => FCmp::Eq,
            "ne" => FCmp::Ne,
            "lt" => FCmp::Lt,
            "le" => FCmp::Le,
            "gt" => FCmp::Gt,
            "ge" => FCmp::Ge,
            "equ" => FCmp::Equ,
            "neu" => FCmp::Neu,
            "ltu" => FCmp::Ltu,
            "leu" => FCmp::Leu,
            "gtu" => FCmp::Gtu,
            "geu" => FCmp::Geu,
            "num" => FCmp::Num,
            "nan" => FCmp::Nan,
            _ => return None,
        })
    }

    fn ucmp(c: &str) -> Option<UCmp> {
        Some(match c {
            "eq" => UCmp::Eq,
            "ne" => UCmp::Ne,
            "lt" | "lo" => UCmp::Lt,
            "le" | "ls" => UCmp::Le,
            "gt" | "hi" => UCmp::Gt,
            "ge" | "hs" => UCmp::Ge,
            _ => return None,
        })
    }

    /// One instruction (without guard and `;`); branch targets are left to the caller.
    fn decode(&self, opcode: &str, args: &[String], labels: &mut Vec<String>) -> Result<Op, String> {
        let parts: Vec<&str> = opcode.split('.').collect();
        let n = |want: usize| -> Result<(), String> {
            if args.len() == want {
                Ok(())
            } else {
                Err(format!("`{opcode}` takes {want} operands, found {}", args.len()))
            }
        };
        let a = |i: usize| args[i].as_str();
        let fbin = |name: &str| match name {
            "add" => Some(FBin::Add),
            "sub" => Some(FBin::Sub),
            "mul" => Some(FBin::Mul),
            "div" => Some(FBin::Div),
            "min" => Some(FBin::Min),
            "max" => Some(FBin::Max),
            _ => None,
        };
        let ibin = |name: &str| match name {
            "add" => Some(IBin::Add),
            "sub" => Some(IBin::Sub),
            "mul" => Some(IBin::Mul),
            "div" => Some(IBin::Div),
            "rem" => Some(IBin::Rem),
            "and" => Some(IBin::And),
            "or" => Some(IBin::Or),
            "xor" => Some(IBin::Xor),
            _ => None,
        };
        let float_bin = |op: FBin, t: &str| -> Result<Op, String> {
            n(3)?;
            match t {
                "f32" => Ok(Op::F32Bin { op, d: self.reg(a(0), Kind::F32)?, a: self.f32(a(1))?, b: self.f32(a(2))? }),
                _ => Ok(Op::F64Bin { op, d: self.reg(a(0), Kind::F64)?, a: self.f64(a(1))?, b: self.f64(a(2))? }),
            }
        };
        let float_un = |op: FUn, t: &str| -> Result<Op, String> {
            n(2)?;
            match t {
                "f32" => Ok(Op::F32Un { op, d: self.reg(a(0), Kind::F32)?, a: self.f32(a(1))? }),
                _ => Ok(Op::F64Un { op, d: self.reg(a(0), Kind::F64)?, a: self.f64(a(1))? }),
            }
        };
        let int_bin = |op: IBin, t: &str| -> Result<Op, String> {
            n(3)?;
            match t {
                "32" => Ok(Op::I32 { op, d: self.reg(a(0), Kind::B32)?, a: self.u32(a(1))?, b: self.u32(a(2))? }),
                _ => Ok(Op::I64 { op, d: self.reg(a(0), Kind::B64)?, a: self.u64(a(1))?, b: self.u64(a(2))? }),
            }
        };
        let is_float = |t: &str| t == "f32" || t == "f64";
        let width = |t: &str| match t {
            "u32" | "s32" | "b32" => Some("32"),
            "u64" | "s64" | "b64" => Some("64"),
            _ => None,
        };
        let op = match parts.as_slice() {
            ["ld", "param", "u64" | "b64"] => {
                n(2)?;
                let name = a(1).trim().trim_start_matches('[').trim_end_matches(']').trim();
                let param =
                    self.params.iter().position(|p| p == name).ok_or_else(|| format!("`{name}` is not a parameter"))?;
                Op::LdParam { d: self.reg(a(0), Kind::B64)?, param: param as u32 }
            }
            ["cvta", "to", "global", "u64"] => {
                n(2)?;
                Op::MovU64 { d: self.reg(a(0), Kind::B64)?, s: self.u64(a(1))? }
            }
            ["mov", "pred"] => {
                n(2)?;
                Op::MovP { d: self.pred(a(0))?, s: self.pred(a(1))? }
            }
            ["mov", "u32" | "b32" | "s32"] => {
                n(2)?;
                let d = self.reg(a(0), Kind::B32)?;
                match Self::special(a(1)) {
                    Some(s) => Op::Special { d, s },
                    None => Op::MovU32 { d, s: self.u32(a(1))? },
                }
            }
            ["mov", "b64"] if args.first().is_some_and(|x| x.starts_with('{')) => {
                n(2)?;
                let (lo, hi) = self.pair(a(0))?;
                Op::Split { lo: self.reg(lo, Kind::B32)?, hi: self.reg(hi, Kind::B32)?, s: self.wide(a(1))? }
            }
            ["mov", "b64"] if args.get(1).is_some_and(|x| x.starts_with('{')) => {
                n(2)?;
                let (lo, hi) = self.pair(a(1))?;
                Op::Join { d: self.wide(a(0))?, lo: self.u32(lo)?, hi: self.u32(hi)? }
            }
            ["mov", "b64"] if args.first().is_some_and(|x| x.trim().starts_with("%fd")) => {
                n(2)?;
                Op::BitsToF64 { d: self.reg(a(0), Kind::F64)?, s: self.u64(a(1))? }
            }
            ["mov", "b64"] if args.get(1).is_some_and(|x| x.trim().starts_with("%fd")) => {
                n(2)?;
                Op::F64ToBits { d: self.reg(a(0), Kind::B64)?, s: self.f64(a(1))? }
            }
            ["mov", "u64" | "b64" | "s64"] => {
                n(2)?;
                Op::MovU64 { d: self.reg(a(0), Kind::B64)?, s: self.u64(a(1))? }
            }
            ["mov", "f32"] => {
                n(2)?;
                Op::MovF32 { d: self.reg(a(0), Kind::F32)?, s: self.f32(a(1))? }
            }
            ["mov", "f64"] => {
                n(2)?;
                Op::MovF64 { d: self.reg(a(0), Kind::F64)?, s: self.f64(a(1))? }
            }
            ["cvt", "u64", "u32"] => {
                n(2)?;
                Op::CvtU64U32 { d: self.reg(a(0), Kind::B64)?, s: self.u32(a(1))? }
            }
            ["cvt", "u32", "u64"] => {
                n(2)?;
                Op::CvtU32U64 { d: self.reg(a(0), Kind::B32)?, s: self.u64(a(1))? }
            }
            ["cvt", "f64", "f32"] => {
                n(2)?;
                Op::CvtF64F32 { d: self.reg(a(0), Kind::F64)?, s: self.f32(a(1))? }
            }
            ["cvt", "rn", "f32", "f64"] => {
                n(2)?;
                Op::CvtF32F64 { d: self.reg(a(0), Kind::F32)?, s: self.f64(a(1))? }
            }
            ["cvt", "rn", "f64", "u64"] => {
                n(2)?;
                Op::CvtF64U64 { d: self.reg(a(0), Kind::F64)?, s: self.u64(a(1))? }
            }
            ["cvt", "rn", "f64", "s64"] => {
                n(2)?;
                Op::CvtF64S64 { d: self.reg(a(0), Kind::F64)?, s: self.u64(a(1))? }
            }
            ["cvt", "rni", "s64", "f64"] => {
                n(2)?;
                Op::CvtS64F64 { d: self.reg(a(0), Kind::B64)?, s: self.f64(a(1))? }
            }
            ["cvt", "rni", t @ ("f32" | "f64"), u] if t == u => float_un(FUn::Round, t)?,
            ["shr", "s64"] => {
                n(3)?;
                Op::Sar64 { d: self.reg(a(0), Kind::B64)?, a: self.u64(a(1))?, b: self.u32(a(2))? }
            }
            ["cvt", "rzi", "f32", "f32"] => float_un(FUn::Trunc, "f32")?,
            ["cvt", "rzi", "f64", "f64"] => float_un(FUn::Trunc, "f64")?,
            [name @ ("add" | "sub" | "mul" | "div"), "rn", t] if is_float(t) => float_bin(fbin(name).unwrap(), t)?,
            [name @ ("min" | "max"), t] if is_float(t) => float_bin(fbin(name).unwrap(), t)?,
            ["fma", "rn", t] if is_float(t) => {
                n(4)?;
                if *t == "f32" {
                    Op::Fma32 {
                        d: self.reg(a(0), Kind::F32)?,
                        a: self.f32(a(1))?,
                        b: self.f32(a(2))?,
                        c: self.f32(a(3))?,
                    }
                } else {
                    Op::Fma64 {
                        d: self.reg(a(0), Kind::F64)?,
                        a: self.f64(a(1))?,
                        b: self.f64(a(2))?,
                        c: self.f64(a(3))?,
                    }
                }
            }
            ["rcp", "rn", t] if is_float(t) => float_un(FUn::Rcp, t)?,
            ["sqrt", "rn", t] if is_float(t) => float_un(FUn::Sqrt, t)?,
            ["neg", t] if is_float(t) => float_un(FUn::Neg, t)?,
            ["abs", t] if is_float(t) => float_un(FUn::Abs, t)?,
            ["ex2", "approx", "f32"] => float_un(FUn::Ex2, "f32")?,
            ["lg2", "approx", "f32"] => float_un(FUn::Lg2, "f32")?,
            ["selp", t] => {
                n(4)?;
                let p = self.pred(a(3))?;
                match *t {
                    "f32" => Op::SelpF32 { d: self.reg(a(0), Kind::F32)?, a: self.f32(a(1))?, b: self.f32(a(2))?, p },
                    "f64" => Op::SelpF64 { d: self.reg(a(0), Kind::F64)?, a: self.f64(a(1))?, b: self.f64(a(2))?, p },
                    "u32" | "b32" | "s32" => {
                        Op::SelpU32 { d: self.reg(a(0), Kind::B32)?, a: self.u32(a(1))?, b: self.u32(a(2))?, p }
                    }
                    "u64" | "b64" | "s64" => {
                        Op::SelpU64 { d: self.reg(a(0), Kind::B64)?, a: self.u64(a(1))?, b: self.u64(a(2))?, p }
                    }
                    _ => return Err(format!("unknown instruction `{opcode}`")),
                }
            }
            ["setp", c, t] => {
                n(3)?;
                if args[0].contains('|') {
                    return Err(format!("`{opcode}` with two destination predicates is not simulated"));
                }
                let d = self.pred(a(0))?;
                match *t {
                    "f32" | "f64" => {
                        let c = Self::fcmp(c).ok_or_else(|| format!("unknown instruction `{opcode}`"))?;
                        if *t == "f32" {
                            Op::SetpF32 { c, d, a: self.f32(a(1))?, b: self.f32(a(2))? }
                        } else {
                            Op::SetpF64 { c, d, a: self.f64(a(1))?, b: self.f64(a(2))? }
                        }
                    }
                    "u32" | "u64" | "b32" | "b64" => {
                        let c = Self::ucmp(c).ok_or_else(|| format!("unknown instruction `{opcode}`"))?;
                        if matches!(c, UCmp::Lt | UCmp::Le | UCmp::Gt | UCmp::Ge) && t.starts_with('b') {
                            return Err(format!("unknown instruction `{opcode}` (ordering on bit types)"));
                        }
                        if t.ends_with("32") {
                            Op::SetpU32 { c, d, a: self.u32(a(1))?, b: self.u32(a(2))? }
                        } else {
                            Op::SetpU64 { c, d, a: self.u64(a(1))?, b: self.u64(a(2))? }
                        }
                    }
                    _ => return Err(format!("unknown instruction `{opcode}` (signed comparisons are not simulated)")),
                }
            }
            ["testp", "notanumber", t] if is_float(t) => {
                n(2)?;
                let d = self.pred(a(0))?;
                if *t == "f32" {
                    Op::NanF32 { d, a: self.f32(a(1))? }
                } else {
                    Op::NanF64 { d, a: self.f64(a(1))? }
                }
            }
            [name @ ("and" | "or" | "xor"), "pred"] => {
                n(3)?;
                if args.iter().any(|x| x.contains('!')) {
                    return Err(format!("negated predicate operands of `{opcode}` are not simulated"));
                }
                let op = match *name {
                    "and" => PBin::And,
                    "or" => PBin::Or,
                    _ => PBin::Xor,
                };
                Op::Pred { op, d: self.pred(a(0))?, a: self.pred(a(1))?, b: self.pred(a(2))? }
            }
            ["not", "pred"] => {
                n(2)?;
                Op::NotP { d: self.pred(a(0))?, a: self.pred(a(1))? }
            }
            [name @ ("add" | "sub"), t] if width(t).is_some() && !t.starts_with('b') => {
                int_bin(ibin(name).unwrap(), width(t).unwrap())?
            }
            ["mul", "lo", t] if width(t).is_some() && !t.starts_with('b') => int_bin(IBin::Mul, width(t).unwrap())?,
            [name @ ("div" | "rem"), t @ ("u32" | "u64")] => int_bin(ibin(name).unwrap(), width(t).unwrap())?,
            [name @ ("and" | "or" | "xor"), t @ ("b32" | "b64")] => int_bin(ibin(name).unwrap(), width(t).unwrap())?,
            ["mad", "lo", "u64" | "s64"] => {
                n(4)?;
                Op::Mad64 { d: self.reg(a(0), Kind::B64)?, a: self.u64(a(1))?, b: self.u64(a(2))?, c: self.u64(a(3))? }
            }
            [dir @ ("shl" | "shr"), t @ ("b32" | "u32" | "b64" | "u64")] => {
                n(3)?;
                let left = *dir == "shl";
                if *dir == "shl" && t.starts_with('u') {
                    return Err(format!("unknown instruction `{opcode}`"));
                }
                if t.ends_with("32") {
                    Op::Shift32 { left, d: self.reg(a(0), Kind::B32)?, a: self.u32(a(1))?, b: self.u32(a(2))? }
                } else {
                    Op::Shift64 { left, d: self.reg(a(0), Kind::B64)?, a: self.u64(a(1))?, b: self.u32(a(2))? }
                }
            }
            ["ld", space @ ("global" | "shared"), rest @ ..] => {
                n(2)?;
                let space = if *space == "global" { Space::Global } else { Space::Shared };
                let (space, rest) = match rest {
                    ["nc", rest @ ..] if space == Space::Global => (Space::GlobalNc, rest),
                    _ => (space, rest),
                };
                let (addr, off) = self.address(a(1))?;
                match rest {
                    ["f32"] => Op::LdF32 { space, d: self.reg(a(0), Kind::F32)?, addr, off },
                    ["f64"] => Op::LdF64 { space, d: self.reg(a(0), Kind::F64)?, addr, off },
                    [v @ ("v2" | "v4"), t @ ("f32" | "f64")] if (*v, *t) != ("v4", "f64") => {
                        let kind = if *t == "f32" { Kind::F32 } else { Kind::F64 };
                        let regs = self.vector(a(0), if *v == "v2" { 2 } else { 4 })?;
                        let mut d = [0; 4];
                        for (slot, r) in d.iter_mut().zip(&regs) {
                            *slot = self.reg(r, kind)?;
                        }
                        let n = regs.len() as u8;
                        if kind == Kind::F32 {
                            Op::LdVF32 { space, n, d, addr, off }
                        } else {
                            Op::LdVF64 { space, d: [d[0], d[1]], addr, off }
                        }
                    }
                    _ => return Err(format!("unknown instruction `{opcode}`")),
                }
            }
            ["st", space @ ("global" | "shared"), rest @ ..] => {
                n(2)?;
                let space = if *space == "global" { Space::Global } else { Space::Shared };
                let (addr, off) = self.address(a(0))?;
                match rest {
                    ["f32"] => Op::StF32 { space, addr, off, v: self.f32(a(1))? },
                    ["f64"] => Op::StF64 { space, addr, off, v: self.f64(a(1))? },
                    [v @ ("v2" | "v4"), "f32"] => {
                        let regs = self.vector(a(1), if *v == "v2" { 2 } else { 4 })?;
                        let mut vs = [Src::I(0.0); 4];
                        for (slot, r) in vs.iter_mut().zip(&regs) {
                            *slot = self.f32(r)?;
                        }
                        Op::StVF32 { space, n: regs.len() as u8, v: vs, addr, off }
                    }
                    ["v2", "f64"] => {
                        let regs = self.vector(a(1), 2)?;
                        Op::StVF64 { space, v: [self.f64(&regs[0])?, self.f64(&regs[1])?], addr, off }
                    }
                    _ => return Err(format!("unknown instruction `{opcode}`")),
                }
            }
            ["shfl", "sync", mode, "b32"] => {
                if args.len() != 5 || args[0].contains('|') {
                    return Err(format!("`{opcode}` takes `d, a, b, c, membermask`"));
                }
                if parse_int(a(4)).map(|m| m as u32) != Some(u32::MAX) {
                    return Err(format!("`{opcode}` with a membermask other than -1 is not simulated"));
                }
                let mode = match *mode {
                    "up" => ShflMode::Up,
                    "down" => ShflMode::Down,
                    "bfly" => ShflMode::Bfly,
                    "idx" => ShflMode::Idx,
                    _ => return Err(format!("unknown instruction `{opcode}`")),
                };
                Op::Shfl {
                    mode,
                    d: self.reg(a(0), Kind::B32)?,
                    a: self.u32(a(1))?,
                    b: self.u32(a(2))?,
                    c: self.u32(a(3))?,
                }
            }
            ["bar", "sync"] | ["barrier", "sync"] => {
                n(1)?;
                if parse_int(a(0)) != Some(0) {
                    return Err(format!("`{opcode}` with a barrier other than 0 is not simulated"));
                }
                Op::Bar
            }
            ["bra"] | ["bra", "uni"] => {
                n(1)?;
                labels.push(a(0).trim().to_string());
                Op::Bra { target: u32::MAX }
            }
            ["ret"] | ["exit"] => {
                n(0)?;
                Op::Ret
            }
            _ => return Err(format!("unknown instruction `{opcode}`")),
        };
        Ok(op)
    }
}

impl Module {
    /// Parses a module; an unknown directive or instruction is an error naming its line.
    pub fn parse(text: &str) -> Result<Module, String> {
        let lines: Vec<&str> = text.lines().collect();
        let mut kernels = HashMap::new();
        let mut i = 0;
        while i < lines.len() {
            let line = strip_comment(lines[i]).trim();
            if line.is_empty() {
                i += 1;
                continue;
            }
            if line.starts_with(".version") || line.starts_with(".target") || line.starts_with(".address_size") {
                i += 1;
                continue;
            }
            if line.starts_with(".visible .entry") || line.starts_with(".entry") {
                let (kernel, next) = parse_kernel(&lines, i)?;
                if kernels.contains_key(&kernel.name) {
                    return Err(format!("line {}: kernel `{}` defined twice", i + 1, kernel.name));
                }
                kernels.insert(kernel.name.clone(), kernel);
                i = next;
                continue;
            }
            return Err(format!("line {}: unknown module-level text `{line}`", i + 1));
        }
        Ok(Module { kernels })
    }

    /// The kernels' names.
    #[allow(dead_code)]
    pub fn kernels(&self) -> Vec<&str> {
        self.kernels.keys().map(String::as_str).collect()
    }

    /// Runs `kernel` on a grid of `grid[0] x grid[1]` blocks with these parameter values.
    pub fn launch(&self, kernel: &str, grid: [u32; 2], params: &[u64], mem: &mut Memory) -> Result<(), String> {
        let k = self.kernels.get(kernel).ok_or_else(|| format!("no kernel `{kernel}` in the module"))?;
        if params.len() != k.params.len() {
            return Err(format!("`{kernel}` takes {} parameters, {} given", k.params.len(), params.len()));
        }
        if grid[0] == 0 || grid[1] == 0 {
            return Err(format!("`{kernel}`: empty grid {grid:?}"));
        }
        mem.epoch += 1;
        let launch = mem.epoch;
        let mut steps = 0u64;
        let n = k.threads as usize;
        let mut threads: Vec<Thread> = (0..n).map(|_| Thread::new(k)).collect();
        let mut block_id = 0u32;
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for t in threads.iter_mut() {
                    t.reset();
                }
                let mut shared = Arena::new(SHARED_BASE, SHARED_SHIFT);
                for (name, bytes) in &k.shared {
                    shared.add(*bytes, name.clone());
                }
                let mut ctx = Ctx {
                    block: [bx, by],
                    grid,
                    params,
                    who: Who { launch, block: block_id, thread: 0, phase: 0 },
                    threads: k.threads,
                };
                run_block(k, &mut threads, &mut ctx, mem, &mut shared, &mut steps)
                    .map_err(|e| format!("`{kernel}` block ({bx}, {by}) of {grid:?}: {e}"))?;
                block_id += 1;
            }
        }
        Ok(())
    }
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Parses `.entry NAME( params ) directives { body }` from line `start`; returns the
/// kernel and the line after its closing brace.
fn parse_kernel(lines: &[&str], start: usize) -> Result<(Kernel, usize), String> {
    // The header, up to the opening brace.
    let mut header = String::new();
    let mut i = start;
    loop {
        let Some(l) = lines.get(i) else {
            return Err(format!("line {}: kernel without a body", start + 1));
        };
        let l = strip_comment(l).trim();
        i += 1;
        if l == "{" {
            break;
        }
        header.push_str(l);
        header.push(' ');
    }
    let open = header.find('(').ok_or_else(|| format!("line {}: no parameter list", start + 1))?;
    let close = header.rfind(')').ok_or_else(|| format!("line {}: unclosed parameter list", start + 1))?;
    let name = header[..open].split_whitespace().last().unwrap_or("").to_string();
    let mut params = Vec::new();
    for p in header[open + 1..close].split(',') {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let words: Vec<&str> = p.split_whitespace().collect();
        match words.as_slice() {
            [".param", ".u64" | ".b64", name] => params.push(name.to_string()),
            _ => return Err(format!("line {}: parameter `{p}` is not simulated (only .param .u64)", start + 1)),
        }
    }
    let mut threads = None;
    for d in header[close + 1..].split('.').map(str::trim).filter(|d| !d.is_empty()) {
        let (dir, rest) = d.split_once(char::is_whitespace).unwrap_or((d, ""));
        match dir {
            "reqntid" | "maxntid" => {
                let dims: Vec<Option<i128>> = rest.split(',').map(parse_int).collect();
                match dims.as_slice() {
                    [Some(x)] | [Some(x), Some(1)] | [Some(x), Some(1), Some(1)] if *x > 0 && *x <= 1024 => {
                        threads = Some(*x as u32)
                    }
                    _ => return Err(format!("line {}: `.{d}` is not simulated (one-dimensional blocks)", start + 1)),
                }
            }
            _ => return Err(format!("line {}: unknown kernel directive `.{d}`", start + 1)),
        }
    }
    let threads = threads.ok_or_else(|| format!("line {}: `{name}` has no .reqntid", start + 1))?;

    // The body: declarations, labels, instructions.
    let mut regs: HashMap<String, (Kind, usize)> = HashMap::new();
    let mut shared: HashMap<String, u64> = HashMap::new();
    let mut shared_list = Vec::new();
    let mut labels: HashMap<String, u32> = HashMap::new();
    let mut body: Vec<(usize, String)> = Vec::new();
    let end;
    loop {
        let Some(l) = lines.get(i) else {
            return Err(format!("line {}: `{name}` has no closing brace", start + 1));
        };
        let line = strip_comment(l).trim();
        i += 1;
        if line == "}" {
            end = i;
            break;
        }
        if line.is_empty() {
            continue;
        }
        let at = i; // 1-based line number
        if let Some(label) = line.strip_suffix(':') {
            if labels.insert(label.trim().to_string(), body.len() as u32).is_some() {
                return Err(format!("line {at}: label `{label}` placed twice"));
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(".reg") {
            let decl = decl.trim().trim_end_matches(';');
            let (ty, rest) = decl.split_once(char::is_whitespace).ok_or_else(|| format!("line {at}: bad `{line}`"))?;
            let kind = kind_of_type(ty.trim_start_matches('.'))
                .ok_or_else(|| format!("line {at}: register type `{ty}` is not simulated"))?;
            let rest = rest.trim();
            let (prefix, count) = rest
                .strip_suffix('>')
                .and_then(|r| r.split_once('<'))
                .ok_or_else(|| format!("line {at}: only `%name<N>` register declarations are simulated: `{line}`"))?;
            let count: usize = count.parse().map_err(|_| format!("line {at}: bad count in `{line}`"))?;
            if regs.insert(prefix.to_string(), (kind, count)).is_some() {
                return Err(format!("line {at}: registers `{prefix}` declared twice"));
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(".shared") {
            // `.shared .align A .TYPE NAME[N];`
            let words: Vec<&str> = decl.trim().trim_end_matches(';').split_whitespace().collect();
            let (align, ty, var) = match words.as_slice() {
                [".align", a, ty, var] => (parse_int(a).unwrap_or(0) as u64, *ty, *var),
                [ty, var] => (0, *ty, *var),
                _ => return Err(format!("line {at}: shared declaration not simulated: `{line}`")),
            };
            let size = match ty {
                ".f64" | ".b64" | ".u64" => 8,
                ".f32" | ".b32" | ".u32" => 4,
                _ => return Err(format!("line {at}: shared type `{ty}` not simulated")),
            };
            let (vname, count) = var
                .strip_suffix(']')
                .and_then(|r| r.split_once('['))
                .ok_or_else(|| format!("line {at}: only shared arrays are simulated: `{line}`"))?;
            let count: u64 = count.parse().map_err(|_| format!("line {at}: bad array size in `{line}`"))?;
            if align > 256 || (align != 0 && align < size) {
                return Err(format!("line {at}: alignment not simulated: `{line}`"));
            }
            if count * size >= 1 << SHARED_SHIFT {
                return Err(format!("line {at}: too much shared memory: `{line}`"));
            }
            shared.insert(vname.to_string(), SHARED_BASE + ((shared_list.len() as u64) << SHARED_SHIFT));
            shared_list.push((vname.to_string(), count * size));
            continue;
        }
        if line.starts_with('.') {
            return Err(format!("line {at}: unknown directive `{line}` in `{name}`"));
        }
        body.push((at, line.to_string()));
    }

    let decoder = Decoder { regs: &regs, params: &params, shared: &shared };
    let mut code = Vec::new();
    let mut source = Vec::new();
    for (at, line) in body {
        let text = line
            .strip_suffix(';')
            .ok_or_else(|| format!("line {at}: an instruction must end with `;`: `{line}`"))?
            .trim();
        let (guard, rest) = match text.strip_prefix('@') {
            Some(g) => {
                let (p, rest) = g.split_once(char::is_whitespace).ok_or_else(|| format!("line {at}: bad guard"))?;
                let (p, positive) = match p.strip_prefix('!') {
                    Some(p) => (p, false),
                    None => (p, true),
                };
                (Some((decoder.pred(p).map_err(|e| format!("line {at}: {e}"))?, positive)), rest.trim())
            }
            None => (None, text),
        };
        let (opcode, operands) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let args = split_operands(operands);
        let mut targets = Vec::new();
        let mut op = decoder.decode(opcode, &args, &mut targets).map_err(|e| format!("line {at}: `{line}`: {e}"))?;
        if let Op::Bra { target } = &mut op {
            let l = &targets[0];
            *target = *labels.get(l).ok_or_else(|| format!("line {at}: no label `{l}`"))?;
        }
        if guard.is_some() && matches!(op, Op::Bar | Op::Shfl { .. }) {
            return Err(format!("line {at}: a predicated `{opcode}` is not simulated"));
        }
        code.push(Inst { guard, op });
        source.push((at, line));
    }
    // Falling off the end of the body is an exit.
    code.push(Inst { guard: None, op: Op::Ret });
    source.push((end, "}".to_string()));
    let mut counts = [0usize; 5];
    for (kind, count) in regs.values() {
        counts[kind_index(*kind)] = counts[kind_index(*kind)].max(*count);
    }
    // Registers of one kind under two prefixes would share a file: not emitted, refuse.
    let mut seen = [0; 5];
    for (kind, _) in regs.values() {
        seen[kind_index(*kind)] += 1;
        if seen[kind_index(*kind)] > 1 {
            return Err(format!("line {}: two register prefixes of kind {kind:?} are not simulated", start + 1));
        }
    }
    Ok((Kernel { name, params, threads, regs: counts, shared: shared_list, code, source }, end))
}

// ---------------------------------------------------------------------------------------
// Memory.

/// Who touches memory: for the race and uninitialised-read checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Who {
    /// 0: never written; 1: written by the host; 2..: the launch.
    launch: u32,
    block: u32,
    thread: u32,
    /// Barriers the block has passed.
    phase: u32,
}

const NEVER: Who = Who { launch: 0, block: 0, thread: 0, phase: 0 };
const HOST: Who = Who { launch: 1, block: 0, thread: 0, phase: 0 };

/// One allocation: its bytes and the last writer of each 4-byte word.
struct Alloc {
    name: String,
    start: u64,
    data: Vec<u8>,
    writer: Vec<Who>,
}

/// Allocations `1 << shift` bytes apart from `base`: an access past the end of one falls in
/// the gap after it (and names it), however far it goes.
struct Arena {
    base: u64,
    shift: u32,
    allocs: Vec<Alloc>,
}

impl Arena {
    fn new(base: u64, shift: u32) -> Arena {
        Arena { base, shift, allocs: Vec::new() }
    }

    /// A fresh NaN-filled allocation (all bits set: a NaN as f32 and as f64), unwritten.
    fn add(&mut self, bytes: u64, name: String) -> u64 {
        assert!(bytes < 1 << self.shift, "{bytes} bytes is too much for the simulator");
        let start = self.base + ((self.allocs.len() as u64) << self.shift);
        self.allocs.push(Alloc {
            name,
            start,
            data: vec![0xFF; bytes as usize],
            writer: vec![NEVER; bytes.div_ceil(4) as usize],
        });
        start
    }

    /// The allocation holding `[addr, addr + size)`, and the offset in it.
    fn find(&self, addr: u64, size: u64) -> Result<(usize, usize), String> {
        if !addr.is_multiple_of(size) {
            return Err(format!("misaligned {size}-byte access at {addr:#x}"));
        }
        let i = (addr.wrapping_sub(self.base) >> self.shift) as usize;
        if addr < self.base || i >= self.allocs.len() {
            return Err(format!("{size}-byte access at {addr:#x} is not in any allocation"));
        }
        let a = &self.allocs[i];
        let off = addr - a.start;
        if off + size > a.data.len() as u64 {
            return Err(format!(
                "{size}-byte access at {addr:#x} is outside `{}` of {} bytes (bytes {off}..{})",
                a.name,
                a.data.len(),
                off + size,
            ));
        }
        Ok((i, off as usize))
    }

    fn check(&self, i: usize, off: usize, size: usize, who: Who, write: bool) -> Result<(), String> {
        let a = &self.allocs[i];
        for w in off / 4..(off + size) / 4 {
            let last = a.writer[w];
            let at = || format!("`{}` at byte {off} (element {})", a.name, off / size);
            if !write && last.launch == 0 {
                return Err(format!("reads {} that was never written", at()));
            }
            if last.launch == who.launch {
                let what = if write { "writes" } else { "reads" };
                if last.block != who.block {
                    return Err(format!("race: {what} {} that block #{} wrote in the same launch", at(), last.block));
                }
                if last.thread != who.thread && last.phase == who.phase {
                    return Err(format!(
                        "race: {what} {} that thread {} wrote with no barrier in between",
                        at(),
                        last.thread
                    ));
                }
            }
        }
        Ok(())
    }

    #[inline]
    fn load<const N: usize>(&self, addr: u64, who: Who, read_only: bool) -> Result<[u8; N], String> {
        let (i, off) = self.find(addr, N as u64)?;
        self.check(i, off, N, who, false)?;
        if read_only && self.allocs[i].writer[off / 4].launch == who.launch {
            return Err(format!(
                "`ld.global.nc` of `{}` at byte {off}, which this launch wrote: the non-coherent cache may \
                 return the old value",
                self.allocs[i].name
            ));
        }
        Ok(self.allocs[i].data[off..off + N].try_into().expect("N bytes"))
    }

    #[inline]
    fn store<const N: usize>(&mut self, addr: u64, bytes: [u8; N], who: Who) -> Result<(), String> {
        let (i, off) = self.find(addr, N as u64)?;
        self.check(i, off, N, who, true)?;
        let a = &mut self.allocs[i];
        a.data[off..off + N].copy_from_slice(&bytes);
        a.writer[off / 4..(off + N) / 4].fill(who);
        Ok(())
    }

    /// Where `[addr, addr + bytes)` is for the host: allocation and offset; panics where
    /// that is not inside one allocation.
    fn host(&self, addr: u64, bytes: usize, align: u64) -> (usize, usize) {
        let (i, off) = self.find(addr, align).unwrap_or_else(|e| panic!("host access: {e}"));
        let a = &self.allocs[i];
        assert!(off + bytes <= a.data.len(), "host access of {bytes} bytes past the end of `{}`", a.name);
        (i, off)
    }

    fn host_write(&mut self, addr: u64, bytes: &[u8], align: u64) {
        let (i, off) = self.host(addr, bytes.len(), align);
        let a = &mut self.allocs[i];
        a.data[off..off + bytes.len()].copy_from_slice(bytes);
        a.writer[off / 4..(off + bytes.len()) / 4].fill(HOST);
    }

    fn host_read(&self, addr: u64, bytes: usize, align: u64) -> &[u8] {
        let (i, off) = self.host(addr, bytes, align);
        &self.allocs[i].data[off..off + bytes]
    }
}

/// Simulated global memory: NaN-filled allocations with bounds checks.
pub struct Memory {
    arena: Arena,
    /// The last launch (2, 3, ...); 1 stands for the host.
    epoch: u32,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

#[allow(dead_code)]
impl Memory {
    pub fn new() -> Memory {
        Memory { arena: Arena::new(GLOBAL_BASE, GLOBAL_SHIFT), epoch: 1 }
    }

    /// A fresh allocation of `bytes`, NaN-filled; reading a word of it before something
    /// writes it is an error.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        let name = format!("allocation #{}", self.arena.allocs.len());
        self.arena.add(bytes as u64, name)
    }

    /// `alloc` with a name for error messages.
    pub fn alloc_named(&mut self, bytes: usize, name: &str) -> u64 {
        self.arena.add(bytes as u64, name.to_string())
    }

    pub fn write_f32s(&mut self, addr: u64, values: &[f32]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.arena.host_write(addr, &bytes, 4);
    }

    pub fn write_f64s(&mut self, addr: u64, values: &[f64]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.arena.host_write(addr, &bytes, 8);
    }

    pub fn read_f32s(&self, addr: u64, n: usize) -> Vec<f32> {
        let data = self.arena.host_read(addr, 4 * n, 4);
        data.chunks_exact(4).map(|d| f32::from_le_bytes(d.try_into().expect("4 bytes"))).collect()
    }

    pub fn read_f64s(&self, addr: u64, n: usize) -> Vec<f64> {
        let data = self.arena.host_read(addr, 8 * n, 8);
        data.chunks_exact(8).map(|d| f64::from_le_bytes(d.try_into().expect("8 bytes"))).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Execution.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Run,
    Bar,
    Shfl,
    Done,
}

struct Thread {
    pc: usize,
    state: State,
    p: Vec<bool>,
    r: Vec<u32>,
    rd: Vec<u64>,
    f: Vec<f32>,
    fd: Vec<f64>,
}

/// Uninitialised registers: NaN floats, integers that make an out-of-range address.
const POISON32: u32 = 0xDEAD_BEEF;
const POISON64: u64 = 0xDEAD_BEEF_DEAD_BEEF;

impl Thread {
    fn new(k: &Kernel) -> Thread {
        Thread {
            pc: 0,
            state: State::Run,
            p: vec![false; k.regs[0]],
            r: vec![POISON32; k.regs[1]],
            rd: vec![POISON64; k.regs[2]],
            f: vec![f32::NAN; k.regs[3]],
            fd: vec![f64::NAN; k.regs[4]],
        }
    }

    fn reset(&mut self) {
        self.pc = 0;
        self.state = State::Run;
        self.p.fill(false);
        self.r.fill(POISON32);
        self.rd.fill(POISON64);
        self.f.fill(f32::NAN);
        self.fd.fill(f64::NAN);
    }
}

struct Ctx<'a> {
    block: [u32; 2],
    grid: [u32; 2],
    params: &'a [u64],
    /// The current thread and phase are filled in per thread.
    who: Who,
    threads: u32,
}

fn run_block(
    k: &Kernel,
    threads: &mut [Thread],
    ctx: &mut Ctx,
    mem: &mut Memory,
    shared: &mut Arena,
    steps: &mut u64,
) -> Result<(), String> {
    let n = threads.len();
    let at = |pc: usize| {
        let (line, text) = &k.source[pc];
        format!("line {line} `{text}`")
    };
    loop {
        for (t, th) in threads.iter_mut().enumerate() {
            if th.state == State::Run {
                ctx.who.thread = t as u32;
                run_thread(k, th, ctx, mem, shared, steps).map_err(|e| format!("thread {t}, {}: {e}", at(th.pc)))?;
            }
        }
        if threads.iter().all(|t| t.state == State::Done) {
            return Ok(());
        }
        // Warps whose lanes wait at a shuffle.
        let mut progressed = false;
        for w in 0..n.div_ceil(32) {
            let lanes = w * 32..(w * 32 + 32).min(n);
            let Some(first) = lanes.clone().find(|&t| threads[t].state == State::Shfl) else {
                continue;
            };
            let pc = threads[first].pc;
            if lanes.len() < 32 {
                return Err(format!("warp {w} has {} lanes, the shuffle at {} names 32", lanes.len(), at(pc)));
            }
            for t in lanes.clone() {
                let th = &threads[t];
                if th.state != State::Shfl || th.pc != pc {
                    let other = match th.state {
                        State::Done => "has exited".to_string(),
                        State::Bar => format!("waits at a barrier at {}", at(th.pc)),
                        _ => format!("waits at {}", at(th.pc)),
                    };
                    return Err(format!(
                        "thread {first} waits at the full-warp shuffle at {}, but thread {t} {other}",
                        at(pc)
                    ));
                }
            }
            let Op::Shfl { mode, d, a, b, c } = k.code[pc].op else { unreachable!("a shuffle") };
            let values: Vec<u32> = lanes.clone().map(|t| a.get(&threads[t].r)).collect();
            for (lane, t) in lanes.enumerate() {
                let th = &mut threads[t];
                let lane = lane as u32;
                let bval = b.get(&th.r) & 31;
                let cv = c.get(&th.r);
                let mask = (cv >> 8) & 31;
                let clamp = cv & 31;
                let max_lane = (lane & mask) | (clamp & !mask);
                let min_lane = lane & mask;
                let (j, ok) = match mode {
                    ShflMode::Up => {
                        let j = lane.wrapping_sub(bval);
                        (j, lane >= bval && j >= min_lane)
                    }
                    ShflMode::Down => {
                        let j = lane + bval;
                        (j, j <= max_lane)
                    }
                    ShflMode::Bfly => {
                        let j = lane ^ bval;
                        (j, j <= max_lane)
                    }
                    ShflMode::Idx => {
                        let j = min_lane | (bval & !mask);
                        (j, j <= max_lane)
                    }
                };
                th.r[d as usize] = values[if ok { j as usize } else { lane as usize }];
                th.pc += 1;
                th.state = State::Run;
            }
            progressed = true;
        }
        if progressed {
            continue;
        }
        // Every thread that has not exited waits at a barrier.
        let first = threads.iter().position(|t| t.state == State::Bar).expect("a waiting thread");
        let pc = threads[first].pc;
        for (t, th) in threads.iter().enumerate() {
            if th.state == State::Bar && th.pc != pc {
                return Err(format!(
                    "threads wait at different barriers: thread {first} at {}, thread {t} at {}",
                    at(pc),
                    at(th.pc)
                ));
            }
        }
        for th in threads.iter_mut().filter(|t| t.state == State::Bar) {
            th.pc += 1;
            th.state = State::Run;
        }
        ctx.who.phase += 1;
    }
}

fn fmin<T: PartialOrd + Copy>(a: T, b: T, a_nan: bool, b_nan: bool, a_neg: bool) -> T {
    if a_nan {
        b
    } else if b_nan || a < b {
        a
    } else if b < a {
        b
    } else if a_neg {
        // Equal: -0 is the smaller zero.
        a
    } else {
        b
    }
}

fn fmax<T: PartialOrd + Copy>(a: T, b: T, a_nan: bool, b_nan: bool, a_neg: bool) -> T {
    if a_nan {
        b
    } else if b_nan || a > b {
        a
    } else if b > a || a_neg {
        // Equal: +0 is the larger zero.
        b
    } else {
        a
    }
}

fn f32_bin(op: FBin, a: f32, b: f32) -> f32 {
    match op {
        FBin::Add => a + b,
        FBin::Sub => a - b,
        FBin::Mul => a * b,
        FBin::Div => a / b,
        FBin::Min => fmin(a, b, a.is_nan(), b.is_nan(), a.is_sign_negative()),
        FBin::Max => fmax(a, b, a.is_nan(), b.is_nan(), a.is_sign_negative()),
    }
}

fn f64_bin(op: FBin, a: f64, b: f64) -> f64 {
    match op {
        FBin::Add => a + b,
        FBin::Sub => a - b,
        FBin::Mul => a * b,
        FBin::Div => a / b,
        FBin::Min => fmin(a, b, a.is_nan(), b.is_nan(), a.is_sign_negative()),
        FBin::Max => fmax(a, b, a.is_nan(), b.is_nan(), a.is_sign_negative()),
    }
}

fn f32_un(op: FUn, a: f32) -> f32 {
    match op {
        FUn::Neg => -a,
        FUn::Abs => a.abs(),
        FUn::Sqrt => a.sqrt(),
        FUn::Rcp => 1.0 / a,
        FUn::Ex2 => a.exp2(),
        FUn::Lg2 => a.log2(),
        FUn::Trunc => a.trunc(),
        FUn::Round => a.round_ties_even(),
    }
}

fn f64_un(op: FUn, a: f64) -> Result<f64, String> {
    Ok(match op {
        FUn::Neg => -a,
        FUn::Abs => a.abs(),
        FUn::Sqrt => a.sqrt(),
        FUn::Rcp => 1.0 / a,
        FUn::Trunc => a.trunc(),
        FUn::Round => a.round_ties_even(),
        FUn::Ex2 | FUn::Lg2 => return Err("ex2/lg2 on f64 do not exist".into()),
    })
}

/// f32 operands compare exactly as their f64 widenings.
fn fcmp(c: FCmp, a: f64, b: f64) -> bool {
    let nan = a.is_nan() || b.is_nan();
    match c {
        FCmp::Eq => a == b,
        FCmp::Ne => !nan && a != b,
        FCmp::Lt => a < b,
        FCmp::Le => a <= b,
        FCmp::Gt => a > b,
        FCmp::Ge => a >= b,
        FCmp::Equ => nan || a == b,
        FCmp::Neu => nan || a != b,
        FCmp::Ltu => nan || a < b,
        FCmp::Leu => nan || a <= b,
        FCmp::Gtu => nan || a > b,
        FCmp::Geu => nan || a >= b,
        FCmp::Num => !nan,
        FCmp::Nan => nan,
    }
}

fn ucmp(c: UCmp, a: u64, b: u64) -> bool {
    match c {
        UCmp::Eq => a == b,
        UCmp::Ne => a != b,
        UCmp::Lt => a < b,
        UCmp::Le => a <= b,
        UCmp::Gt => a > b,
        UCmp::Ge => a >= b,
    }
}

fn ibin64(op: IBin, a: u64, b: u64) -> Result<u64, String> {
    Ok(match op {
        IBin::Add => a.wrapping_add(b),
        IBin::Sub => a.wrapping_sub(b),
        IBin::Mul => a.wrapping_mul(b),
        IBin::Div => a.checked_div(b).ok_or("integer division by zero")?,
        IBin::Rem => a.checked_rem(b).ok_or("integer remainder by zero")?,
        IBin::And => a & b,
        IBin::Or => a | b,
        IBin::Xor => a ^ b,
    })
}

fn ibin32(op: IBin, a: u32, b: u32) -> Result<u32, String> {
    Ok(match op {
        IBin::Add => a.wrapping_add(b),
        IBin::Sub => a.wrapping_sub(b),
        IBin::Mul => a.wrapping_mul(b),
        IBin::Div => a.checked_div(b).ok_or("integer division by zero")?,
        IBin::Rem => a.checked_rem(b).ok_or("integer remainder by zero")?,
        IBin::And => a & b,
        IBin::Or => a | b,
        IBin::Xor => a ^ b,
    })
}

/// Runs one thread until it waits at a barrier or shuffle, or exits.
fn run_thread(
    k: &Kernel,
    th: &mut Thread,
    ctx: &Ctx,
    mem: &mut Memory,
    shared: &mut Arena,
    steps: &mut u64,
) -> Result<(), String> {
    let who = ctx.who;
    let tid = who.thread;
    loop {
        *steps += 1;
        if *steps > STEP_LIMIT {
            return Err(format!("more than {STEP_LIMIT} instructions in one launch: an endless loop?"));
        }
        let inst = &k.code[th.pc];
        if let Some((p, positive)) = inst.guard {
            if th.p[p as usize] != positive {
                th.pc += 1;
                continue;
            }
        }
        let mut next = th.pc + 1;
        match inst.op {
            Op::LdParam { d, param } => th.rd[d as usize] = ctx.params[param as usize],
            Op::Special { d, s } => {
                th.r[d as usize] = match s {
                    Special::Tid(0) => tid,
                    Special::Tid(_) => 0,
                    Special::Ntid(0) => ctx.threads,
                    Special::Ntid(_) => 1,
                    Special::Ctaid(i) => ctx.block.get(i).copied().unwrap_or(0),
                    Special::Nctaid(i) => ctx.grid.get(i).copied().unwrap_or(1),
                    Special::LaneId => tid % 32,
                }
            }
            Op::MovP { d, s } => th.p[d as usize] = th.p[s as usize],
            Op::MovU32 { d, s } => th.r[d as usize] = s.get(&th.r),
            Op::MovU64 { d, s } => th.rd[d as usize] = s.get(&th.rd),
            Op::MovF32 { d, s } => th.f[d as usize] = s.get(&th.f),
            Op::MovF64 { d, s } => th.fd[d as usize] = s.get(&th.fd),
            Op::CvtU64U32 { d, s } => th.rd[d as usize] = u64::from(s.get(&th.r)),
            Op::CvtU32U64 { d, s } => th.r[d as usize] = s.get(&th.rd) as u32,
            Op::CvtF64F32 { d, s } => th.fd[d as usize] = f64::from(s.get(&th.f)),
            Op::CvtF32F64 { d, s } => th.f[d as usize] = s.get(&th.fd) as f32,
            Op::CvtF64U64 { d, s } => th.fd[d as usize] = s.get(&th.rd) as f64,
            Op::CvtF64S64 { d, s } => th.fd[d as usize] = s.get(&th.rd) as i64 as f64,
            // Rust's float-to-int `as` saturates and sends NaN to 0, as PTX does.
            Op::CvtS64F64 { d, s } => th.rd[d as usize] = s.get(&th.fd).round_ties_even() as i64 as u64,
            Op::BitsToF64 { d, s } => th.fd[d as usize] = f64::from_bits(s.get(&th.rd)),
            Op::F64ToBits { d, s } => th.rd[d as usize] = s.get(&th.fd).to_bits(),
            Op::Sar64 { d, a, b } => {
                th.rd[d as usize] = ((a.get(&th.rd) as i64) >> b.get(&th.r).min(63)) as u64;
            }
            Op::F32Bin { op, d, a, b } => th.f[d as usize] = f32_bin(op, a.get(&th.f), b.get(&th.f)),
            Op::F64Bin { op, d, a, b } => th.fd[d as usize] = f64_bin(op, a.get(&th.fd), b.get(&th.fd)),
            Op::F32Un { op, d, a } => th.f[d as usize] = f32_un(op, a.get(&th.f)),
            Op::F64Un { op, d, a } => th.fd[d as usize] = f64_un(op, a.get(&th.fd))?,
            Op::Fma32 { d, a, b, c } => th.f[d as usize] = a.get(&th.f).mul_add(b.get(&th.f), c.get(&th.f)),
            Op::Fma64 { d, a, b, c } => th.fd[d as usize] = a.get(&th.fd).mul_add(b.get(&th.fd), c.get(&th.fd)),
            Op::SelpF32 { d, a, b, p } => th.f[d as usize] = if th.p[p as usize] { a.get(&th.f) } else { b.get(&th.f) },
            Op::SelpF64 { d, a, b, p } => {
                th.fd[d as usize] = if th.p[p as usize] { a.get(&th.fd) } else { b.get(&th.fd) }
            }
            Op::SelpU32 { d, a, b, p } => th.r[d as usize] = if th.p[p as usize] { a.get(&th.r) } else { b.get(&th.r) },
            Op::SelpU64 { d, a, b, p } => {
                th.rd[d as usize] = if th.p[p as usize] { a.get(&th.rd) } else { b.get(&th.rd) }
            }
            Op::SetpF32 { c, d, a, b } => th.p[d as usize] = fcmp(c, f64::from(a.get(&th.f)), f64::from(b.get(&th.f))),
            Op::SetpF64 { c, d, a, b } => th.p[d as usize] = fcmp(c, a.get(&th.fd), b.get(&th.fd)),
            Op::SetpU32 { c, d, a, b } => th.p[d as usize] = ucmp(c, u64::from(a.get(&th.r)), u64::from(b.get(&th.r))),
            Op::SetpU64 { c, d, a, b } => th.p[d as usize] = ucmp(c, a.get(&th.rd), b.get(&th.rd)),
            Op::NanF32 { d, a } => th.p[d as usize] = a.get(&th.f).is_nan(),
            Op::NanF64 { d, a } => th.p[d as usize] = a.get(&th.fd).is_nan(),
            Op::Pred { op, d, a, b } => {
                let (a, b) = (th.p[a as usize], th.p[b as usize]);
                th.p[d as usize] = match op {
                    PBin::And => a & b,
                    PBin::Or => a | b,
                    PBin::Xor => a ^ b,
                }
            }
            Op::NotP { d, a } => th.p[d as usize] = !th.p[a as usize],
            Op::I32 { op, d, a, b } => th.r[d as usize] = ibin32(op, a.get(&th.r), b.get(&th.r))?,
            Op::I64 { op, d, a, b } => th.rd[d as usize] = ibin64(op, a.get(&th.rd), b.get(&th.rd))?,
            Op::Shift32 { left, d, a, b } => {
                let (a, b) = (a.get(&th.r), b.get(&th.r));
                th.r[d as usize] = match (left, b < 32) {
                    (_, false) => 0,
                    (true, true) => a << b,
                    (false, true) => a >> b,
                }
            }
            Op::Shift64 { left, d, a, b } => {
                let (a, b) = (a.get(&th.rd), b.get(&th.r));
                th.rd[d as usize] = match (left, b < 64) {
                    (_, false) => 0,
                    (true, true) => a << b,
                    (false, true) => a >> b,
                }
            }
            Op::Mad64 { d, a, b, c } => {
                th.rd[d as usize] = a.get(&th.rd).wrapping_mul(b.get(&th.rd)).wrapping_add(c.get(&th.rd))
            }
            Op::LdF32 { space, d, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Shared { &*shared } else { &mem.arena };
                th.f[d as usize] = f32::from_le_bytes(arena.load::<4>(addr, who, space == Space::GlobalNc)?);
            }
            Op::LdF64 { space, d, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Shared { &*shared } else { &mem.arena };
                th.fd[d as usize] = f64::from_le_bytes(arena.load::<8>(addr, who, space == Space::GlobalNc)?);
            }
            Op::StF32 { space, addr, off, v } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Global { &mut mem.arena } else { &mut *shared };
                arena.store::<4>(addr, v.get(&th.f).to_le_bytes(), who)?;
            }
            Op::StF64 { space, addr, off, v } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Global { &mut mem.arena } else { &mut *shared };
                arena.store::<8>(addr, v.get(&th.fd).to_le_bytes(), who)?;
            }
            Op::LdVF32 { space, n, d, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Shared { &*shared } else { &mem.arena };
                let nc = space == Space::GlobalNc;
                let bytes: Vec<u8> = if n == 2 {
                    arena.load::<8>(addr, who, nc)?.to_vec()
                } else {
                    arena.load::<16>(addr, who, nc)?.to_vec()
                };
                for (r, b) in d.iter().zip(bytes.chunks_exact(4)) {
                    th.f[*r as usize] = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
            Op::LdVF64 { space, d, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Shared { &*shared } else { &mem.arena };
                let bytes = arena.load::<16>(addr, who, space == Space::GlobalNc)?;
                for (r, b) in d.iter().zip(bytes.chunks_exact(8)) {
                    th.fd[*r as usize] = f64::from_le_bytes(b.try_into().expect("8 bytes"));
                }
            }
            Op::StVF32 { space, n, v, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Global { &mut mem.arena } else { &mut *shared };
                let mut bytes = [0u8; 16];
                for (b, x) in bytes.chunks_exact_mut(4).zip(&v) {
                    b.copy_from_slice(&x.get(&th.f).to_le_bytes());
                }
                if n == 2 {
                    arena.store::<8>(addr, bytes[..8].try_into().expect("8 bytes"), who)?;
                } else {
                    arena.store::<16>(addr, bytes, who)?;
                }
            }
            Op::StVF64 { space, v, addr, off } => {
                let addr = addr.get(&th.rd).wrapping_add(off as u64);
                let arena = if space == Space::Global { &mut mem.arena } else { &mut *shared };
                let mut bytes = [0u8; 16];
                for (b, x) in bytes.chunks_exact_mut(8).zip(&v) {
                    b.copy_from_slice(&x.get(&th.fd).to_le_bytes());
                }
                arena.store::<16>(addr, bytes, who)?;
            }
            Op::Split { lo, hi, s } => {
                let bits = match s {
                    Wide::B64(r) => th.rd[r as usize],
                    Wide::F64(r) => th.fd[r as usize].to_bits(),
                };
                th.r[lo as usize] = bits as u32;
                th.r[hi as usize] = (bits >> 32) as u32;
            }
            Op::Join { d, lo, hi } => {
                let bits = u64::from(lo.get(&th.r)) | (u64::from(hi.get(&th.r)) << 32);
                match d {
                    Wide::B64(r) => th.rd[r as usize] = bits,
                    Wide::F64(r) => th.fd[r as usize] = f64::from_bits(bits),
                }
            }
            Op::Shfl { .. } => {
                th.state = State::Shfl;
                return Ok(());
            }
            Op::Bar => {
                th.state = State::Bar;
                return Ok(());
            }
            Op::Bra { target } => next = target as usize,
            Op::Ret => {
                th.state = State::Done;
                return Ok(());
            }
        }
        th.pc = next;
    }
}
