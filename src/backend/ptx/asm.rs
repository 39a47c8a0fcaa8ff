//! A kernel body as PTX text: virtual registers by type, labels, and one line per
//! instruction. `ptxas` allocates the real registers.

/// The register classes a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pred,
    B32,
    B64,
    F32,
    F64,
}

const KINDS: [(Kind, &str, &str); 5] = [
    (Kind::Pred, "pred", "%p"),
    (Kind::B32, "b32", "%r"),
    (Kind::B64, "b64", "%rd"),
    (Kind::F32, "f32", "%f"),
    (Kind::F64, "f64", "%fd"),
];

/// One kernel's instructions, with the registers and labels they use.
#[derive(Default)]
pub struct Asm {
    lines: Vec<String>,
    counts: [usize; 5],
    labels: usize,
}

impl Asm {
    /// A fresh register of this kind.
    pub fn reg(&mut self, kind: Kind) -> String {
        let k = KINDS.iter().position(|(x, _, _)| *x == kind).expect("every kind is listed");
        self.counts[k] += 1;
        format!("{}{}", KINDS[k].2, self.counts[k])
    }

    /// One instruction (without the `;`).
    pub fn op(&mut self, text: impl AsRef<str>) {
        self.lines.push(format!("\t{};", text.as_ref()));
    }

    /// A comment line.
    pub fn note(&mut self, text: impl AsRef<str>) {
        self.lines.push(format!("\t// {}", text.as_ref()));
    }

    /// A label not used before, named after `stem`.
    pub fn label(&mut self, stem: &str) -> String {
        self.labels += 1;
        format!("$L_{stem}_{}", self.labels)
    }

    /// Places `label` here.
    pub fn place(&mut self, label: &str) {
        self.lines.push(format!("{label}:"));
    }

    /// An instruction with a fresh destination register: `{op} {dst}, {args}`.
    pub fn def(&mut self, kind: Kind, op: &str, args: &str) -> String {
        let d = self.reg(kind);
        self.op(format!("{op} {d}, {args}"));
        d
    }

    /// An f32 constant in a register.
    pub fn f32(&mut self, v: f32) -> String {
        self.def(Kind::F32, "mov.f32", &f32_imm(v))
    }

    /// An f64 constant in a register.
    pub fn f64(&mut self, v: f64) -> String {
        self.def(Kind::F64, "mov.f64", &f64_imm(v))
    }

    /// The register declarations and the body.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for (k, (_, ty, prefix)) in KINDS.iter().enumerate() {
            if self.counts[k] > 0 {
                out += &format!("\t.reg .{ty} {prefix}<{}>;\n", self.counts[k] + 1);
            }
        }
        for line in self.lines {
            out += &line;
            out.push('\n');
        }
        out
    }
}

/// An f32 immediate, exactly (PTX's `0f` + the bits).
pub fn f32_imm(v: f32) -> String {
    format!("0f{:08X}", v.to_bits())
}

/// An f64 immediate, exactly.
pub fn f64_imm(v: f64) -> String {
    format!("0d{:016X}", v.to_bits())
}
