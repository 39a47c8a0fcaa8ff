//! Dense tensors in the `[batch, class, spatial]` model.

/// A row-major `[batch, class, spatial]` array of f64. An axis of extent 1 broadcasts.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: [usize; 3],
    pub data: Vec<f64>,
}

impl Tensor {
    /// # Panics
    /// If `data` does not hold `shape[0] * shape[1] * shape[2]` values.
    pub fn new(shape: [usize; 3], data: Vec<f64>) -> Tensor {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "tensor data does not match shape {shape:?}");
        Tensor { shape, data }
    }

    pub fn scalar(v: f64) -> Tensor {
        Tensor { shape: [1, 1, 1], data: vec![v] }
    }

    pub fn filled(shape: [usize; 3], v: f64) -> Tensor {
        Tensor { shape, data: vec![v; shape.iter().product()] }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Strides for reading this tensor as if it had shape `to`: 0 along broadcast axes.
    pub fn broadcast_strides(&self) -> [usize; 3] {
        let [_, c, s] = self.shape;
        let full = [c * s, s, 1];
        std::array::from_fn(|i| if self.shape[i] == 1 { 0 } else { full[i] })
    }

    /// The same values broadcast to `shape` (whose extents are 1 or match).
    pub fn broadcast_to(&self, shape: [usize; 3]) -> Tensor {
        if self.shape == shape {
            return self.clone();
        }
        let st = self.broadcast_strides();
        let mut data = Vec::with_capacity(shape.iter().product());
        for b in 0..shape[0] {
            for c in 0..shape[1] {
                for s in 0..shape[2] {
                    data.push(self.data[b * st[0] + c * st[1] + s * st[2]]);
                }
            }
        }
        Tensor { shape, data }
    }

    /// Sums over the axes where `self` is larger than `shape` (the adjoint of broadcasting),
    /// then broadcasts along the axes where `shape` is larger.
    pub fn fit_to(&self, shape: [usize; 3]) -> Tensor {
        let reduced: [usize; 3] = std::array::from_fn(|i| if shape[i] == 1 { 1 } else { self.shape[i] });
        let mut out = Tensor::filled(reduced, 0.0);
        let ost = out.broadcast_strides();
        let [_, c_n, s_n] = self.shape;
        for (i, v) in self.data.iter().enumerate() {
            let (b, c, s) = (i / (c_n * s_n), (i / s_n) % c_n, i % s_n);
            out.data[b * ost[0] + c * ost[1] + s * ost[2]] += v;
        }
        out.broadcast_to(shape)
    }
}

/// A borrowed row-major `[batch, class, spatial]` array of f32: how callers hand
/// inputs to the native runtime without copying them. An axis of extent 1 broadcasts.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub shape: [usize; 3],
    pub data: &'a [f32],
}

impl<'a> View<'a> {
    pub fn new(shape: [usize; 3], data: &'a [f32]) -> View<'a> {
        View { shape, data }
    }

    /// A copy in f64, for the reference evaluator.
    pub fn to_tensor(&self) -> Tensor {
        Tensor { shape: self.shape, data: self.data.iter().map(|&v| f64::from(v)).collect() }
    }
}
