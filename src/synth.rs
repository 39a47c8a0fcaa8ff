//! Synthetic inputs for a loss, chosen by the input's name: logits `x`,
//! probabilities `p`, targets `y`, index labels `t`, class weights `w`, masks `m`,
//! distance maps `dist`. Used by `lossc demo` and by the tests.

use crate::check::InputSpec;
use crate::ir::AxisSet;
use crate::tensor::Tensor;

/// A small, fast, seedable generator (SplitMix64): good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// The shape an input gets for a `[batch, class, spatial]` problem: masks and index
/// labels are `[B, 1, S]`, class weights `[1, C, 1]`, declared axes are respected.
pub fn input_shape(spec: &InputSpec, ext: [usize; 3]) -> [usize; 3] {
    let mut axes = spec.axes;
    if spec.name == "m" {
        axes = axes.minus(AxisSet::CLASS);
    }
    std::array::from_fn(|i| if axes.has_index(i) { ext[i] } else { 1 })
}

/// Values for one input, by its name.
pub fn input(spec: &InputSpec, ext: [usize; 3], rng: &mut Rng) -> Tensor {
    let shape = input_shape(spec, ext);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = match spec.name.as_str() {
        "x" => (0..n).map(|_| 1.5 * rng.normal()).collect(),
        "p" => (0..n).map(|_| rng.range(0.02, 0.98)).collect(),
        "y" if shape[1] > 1 => {
            // One-hot over the class axis.
            let [b, c, s] = shape;
            let mut d = vec![0.0; n];
            for bi in 0..b {
                for si in 0..s {
                    d[(bi * c + rng.below(c)) * s + si] = 1.0;
                }
            }
            d
        }
        "y" => (0..n).map(|_| f64::from(u8::from(rng.uniform() < 0.4))).collect(),
        "t" => (0..n).map(|_| if rng.uniform() < 0.1 { -100.0 } else { rng.below(ext[1]) as f64 }).collect(),
        "w" => (0..n).map(|_| rng.range(0.5, 2.0)).collect(),
        "m" => (0..n).map(|_| f64::from(u8::from(rng.uniform() < 0.8))).collect(),
        "dist" => (0..n).map(|_| rng.range(-3.0, 3.0)).collect(),
        _ => (0..n).map(|_| rng.uniform()).collect(),
    };
    Tensor::new(shape, data)
}

/// Values for every input of a loss.
pub fn inputs(specs: &[InputSpec], ext: [usize; 3], rng: &mut Rng) -> Vec<Tensor> {
    specs.iter().map(|s| input(s, ext, rng)).collect()
}
