//! Losses with a `sorted` block (Lovász): the sort, the scans and the gradient
//! scatter on whole tensors.

use crate::error::Error;
use crate::loss::Loss;
use crate::tensor::View;

/// The loss value (and the requested gradients) of a loss that sorts.
/// The caller (`runtime::evaluate`) has checked inputs and buffers; `ext` is the
/// broadcast `[batch, class, spatial]`.
pub fn evaluate(loss: &Loss, inputs: &[View], ext: [usize; 3], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let _ = (loss, inputs, ext, grads);
    Err(Error::Unsupported("sorting on the native runtime".into()))
}
