//! The Rust API: compile a loss once, evaluate it many times.
//!
//! `Program` is a parsed source (parse once, compile with different
//! hyperparameters without re-parsing); `Loss` is one compiled loss with its
//! gradient graph, ready to evaluate.

use std::collections::HashMap;

use crate::backend::interp;
use crate::check::{self, Entry, Env, InputSpec};
use crate::diag::{Diagnostic, Diagnostics, FileId, SourceFile};
use crate::error::Error;
use crate::ir::{print_graph, Graph, NodeId, Op};
use crate::runtime::{self, Backend};
use crate::stdlib::stdlib;
use crate::syntax;
use crate::syntax::ast::{Expr, ExprKind, SourceItem};
use crate::tensor::{Tensor, View};

/// A parsed source: a stdlib name, a bare expression, or loss definitions.
pub struct Program {
    /// The user's source (file 0) followed by the stdlib files.
    files: Vec<SourceFile>,
    item: Option<SourceItem>,
    /// The entry's name: the stdlib loss, the last definition, or `expr` for a bare expression.
    name: String,
}

impl Program {
    /// Parses `text`; `file_name` is how diagnostics refer to it.
    /// A text that is exactly a stdlib loss's name selects that loss.
    pub fn parse(file_name: &str, text: &str) -> Result<Program, Error> {
        let mut files = vec![SourceFile::new(file_name, text)];
        files.extend(stdlib().files.iter().cloned());
        let fail = |d: Diagnostic, files: Vec<SourceFile>| Error::Source(Diagnostics { items: vec![d], files });
        let trimmed = text.trim();
        if stdlib().get(trimmed).is_some() {
            return Ok(Program { files, item: None, name: trimmed.to_string() });
        }
        let item = match syntax::parse(text, FileId(0)) {
            Ok(item) => item,
            Err(d) => return Err(fail(d, files)),
        };
        if let SourceItem::Expr(Expr { kind: ExprKind::Name(name), span, .. }) = &item {
            // As an expression a lone name is an input, never a scalar: it meant a stdlib loss.
            let mut d = Diagnostic::new(
                "check::unknown_loss",
                *span,
                format!("`{name}` is not a loss in the standard library"),
            )
            .label("not a stdlib loss");
            d = match check::closest(name, stdlib().defs.iter().map(|d| d.name.name.as_str())) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help("`lossc list` shows the standard losses"),
            };
            return Err(fail(d, files));
        }
        let name = match &item {
            SourceItem::Expr(_) => "expr".to_string(),
            SourceItem::Defs(defs) => {
                let mut seen = HashMap::new();
                for d in defs {
                    if seen.insert(d.name.name.as_str(), ()).is_some() {
                        let diag = Diagnostic::new(
                            "check::duplicate_definition",
                            d.name.span,
                            format!("`{}` is defined twice", d.name.name),
                        )
                        .label("second definition");
                        return Err(fail(diag, files));
                    }
                }
                defs.last().expect("invariant: the grammar requires one definition").name.name.clone()
            }
        };
        Ok(Program { files, item: Some(item), name })
    }

    /// The entry loss's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compiles with hyperparameter overrides: check, simplify, differentiate.
    pub fn compile(&self, params: &[(String, f64)]) -> Result<Loss, Error> {
        let mut env =
            Env { user: HashMap::new(), stdlib: stdlib().defs.iter().map(|d| (d.name.name.as_str(), d)).collect() };
        let entry = match &self.item {
            None => Entry::Def(stdlib().get(&self.name).expect("invariant: the name was looked up")),
            Some(SourceItem::Expr(e)) => Entry::Expr(e),
            Some(SourceItem::Defs(defs)) => {
                for d in defs {
                    env.user.insert(d.name.name.as_str(), d);
                }
                Entry::Def(defs.last().expect("invariant: one definition at least"))
            }
        };
        let known: Vec<String> = match &entry {
            Entry::Def(d) => d.hypers.iter().map(|h| h.name.name.clone()).collect(),
            Entry::Expr(_) => vec![],
        };
        let mut overrides = HashMap::new();
        for (k, v) in params {
            if !v.is_finite() {
                return Err(Error::Params(format!("parameter `{k}` must be finite, found {v}")));
            }
            if !known.contains(k) {
                let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                let hint = check::closest(k, known.iter().map(String::as_str))
                    .map_or(String::new(), |s| format!(" (did you mean `{s}`?)"));
                return Err(Error::Params(format!(
                    "unknown parameter `{k}` for `{}`{hint}; its hyperparameters are: {list}",
                    self.name
                )));
            }
            if overrides.insert(k.clone(), *v).is_some() {
                return Err(Error::Params(format!("parameter `{k}` is given twice")));
            }
        }
        let lowered = check::lower(&env, entry, &overrides)
            .map_err(|d| Error::Source(Diagnostics { items: vec![d], files: self.files.clone() }))?;
        Ok(Loss::from_lowered(&self.name, lowered))
    }
}

/// The most broadcast elements the reference evaluator takes: it holds several f64
/// arrays of this size at once.
pub const MAX_REFERENCE_ELEMENTS: usize = 1 << 30;

/// One compiled loss: its graph, the gradient of each input, and how to run them.
/// Immutable after compilation, so it can be shared across threads.
#[derive(Clone, Debug)]
pub struct Loss {
    name: String,
    graph: Graph,
    root: NodeId,
    /// d loss / d input, `None` where the loss does not depend on the input.
    grads: Vec<Option<NodeId>>,
    inputs: Vec<InputSpec>,
    hypers: Vec<(String, f64)>,
    /// Native kernels compiled so far, by shape.
    native: runtime::native::Cache,
    gpu: runtime::gpu::Cache,
}

impl Loss {
    /// Compiles a stdlib name, bare expression or loss definitions, with
    /// hyperparameters given as `"alpha=0.3,beta=0.7"` (or `""`).
    pub fn compile(source: &str, params: &str) -> Result<Loss, Error> {
        Program::parse("<source>", source)?.compile(&parse_params(params)?)
    }

    fn from_lowered(name: &str, lowered: check::Lowered) -> Loss {
        let (mut g, roots) = lowered.graph.rebuild(&[lowered.root], true);
        let root = roots[0];
        let mut input_nodes = vec![None; lowered.inputs.len()];
        for id in g.reachable(&[root]) {
            if let Op::Input { index, .. } = g.node(id).op {
                input_nodes[index as usize] = Some(id);
            }
        }
        let present: Vec<NodeId> = input_nodes.iter().flatten().copied().collect();
        let mut grads_present = crate::autodiff::differentiate(&mut g, root, &present).into_iter();
        let grads: Vec<Option<NodeId>> = input_nodes
            .iter()
            .map(|n| n.and_then(|_| grads_present.next().expect("invariant: one per input")))
            .collect();
        // Drop what the differentiator built but nothing uses.
        let mut all = vec![root];
        all.extend(grads.iter().flatten());
        let (graph, new) = g.rebuild(&all, true);
        let mut new = new.into_iter();
        let root = new.next().expect("invariant: root");
        let grads = grads.iter().map(|g| g.map(|_| new.next().expect("invariant: one per gradient"))).collect();
        Loss {
            name: name.to_string(),
            graph,
            root,
            grads,
            inputs: lowered.inputs,
            hypers: lowered.hypers,
            native: runtime::native::Cache::default(),
            gpu: runtime::gpu::Cache::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }
    pub fn hyperparameters(&self) -> &[(String, f64)] {
        &self.hypers
    }
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    pub fn root(&self) -> NodeId {
        self.root
    }
    pub fn gradient_nodes(&self) -> &[Option<NodeId>] {
        &self.grads
    }
    pub(crate) fn gpu_cache(&self) -> &runtime::gpu::Cache {
        &self.gpu
    }
    pub(crate) fn native_cache(&self) -> &runtime::native::Cache {
        &self.native
    }

    fn header(&self) -> String {
        let inputs: Vec<String> = self.inputs.iter().map(|i| i.name.clone()).collect();
        let hypers: Vec<String> =
            self.hypers.iter().map(|(k, v)| format!("{k} = {}", crate::ir::format_number(*v))).collect();
        if hypers.is_empty() {
            format!("loss {}({})\n", self.name, inputs.join(", "))
        } else {
            format!("loss {}({}; {})\n", self.name, inputs.join(", "), hypers.join(", "))
        }
    }

    fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|i| i.name.clone()).collect()
    }

    /// The canonical printed form of the loss.
    pub fn show(&self) -> String {
        self.header() + &print_graph(&self.graph, &[("loss", self.root)], &self.input_names()).body
    }

    /// The canonical form of the loss and its gradient with respect to each input.
    pub fn show_grad(&self) -> String {
        let labels: Vec<String> = self.inputs.iter().map(|i| format!("d/d{}", i.name)).collect();
        let mut roots = vec![("loss", self.root)];
        let mut zero = Vec::new();
        for (label, g) in labels.iter().zip(&self.grads) {
            match g {
                Some(g) => roots.push((label.as_str(), *g)),
                None => zero.push(format!("  {label} = 0\n")),
            }
        }
        self.header() + &print_graph(&self.graph, &roots, &self.input_names()).body + &zero.concat()
    }

    /// The terms of the loss's top-level sum, each compiled as a loss of its own over the
    /// same inputs (in the same order): `0.5*dice(sigmoid(x), y) + bce_logits(x, y)` has two,
    /// whose values add up to the loss. A loss that is not a sum is its own single term.
    /// The terms are those of the simplified graph, as `show` prints them.
    pub fn terms(&self) -> Vec<Loss> {
        // (node, subtracted): `a - b` has the terms `a` and `-b`, exactly (a - b = a + -b),
        // but a difference with a constant stays whole: Dice's `1 - ratio` is one term.
        let mut roots = Vec::new();
        let mut stack = vec![(self.root, false)];
        while let Some((id, negated)) = stack.pop() {
            let node = self.graph.node(id);
            let constant = node.args.iter().any(|&a| self.graph.constant_value(a).is_some());
            match node.op {
                Op::Add => stack.extend([(node.args[1], negated), (node.args[0], negated)]),
                Op::Sub if !constant => stack.extend([(node.args[1], !negated), (node.args[0], negated)]),
                _ => roots.push((id, negated)),
            }
        }
        if roots.len() == 1 {
            return vec![self.clone()];
        }
        let term = |(i, (root, negated)): (usize, (NodeId, bool))| {
            let mut graph = self.graph.clone();
            let root = if negated { graph.add(Op::Neg, &[root]) } else { root };
            let lowered = check::Lowered {
                graph,
                root,
                inputs: self.inputs.clone(),
                input_nodes: vec![],
                hypers: self.hypers.clone(),
            };
            Loss::from_lowered(&format!("{}[{i}]", self.name), lowered)
        };
        roots.into_iter().enumerate().map(term).collect()
    }

    /// The broadcast `[batch, class, spatial]` extents of these input shapes,
    /// or an error that names the input, both shapes and the rule.
    pub fn extents(&self, shapes: &[[usize; 3]]) -> Result<[usize; 3], Error> {
        if shapes.len() != self.inputs.len() {
            let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::Shape(format!(
                "`{}` takes {} inputs ({}), but {} given",
                self.name,
                self.inputs.len(),
                names.join(", "),
                crate::check::builtins::given(shapes.len())
            )));
        }
        let mut ext = [1usize; 3];
        for (spec, shape) in self.inputs.iter().zip(shapes) {
            if shape.contains(&0) {
                return Err(Error::Shape(format!("input `{}` is empty: shape {shape:?}", spec.name)));
            }
            for (axis, (e, &n)) in ext.iter_mut().zip(shape).enumerate() {
                if n > 1 && !spec.axes.has_index(axis) {
                    return Err(Error::Shape(format!(
                        "input `{}` has shape {shape:?} ([batch, class, spatial]), but it may vary only over {}: its {} extent must be 1",
                        spec.name,
                        spec.axes,
                        crate::ir::AXES[axis].1
                    )));
                }
                *e = (*e).max(n);
            }
        }
        for (spec, shape) in self.inputs.iter().zip(shapes) {
            for axis in 0..3 {
                if shape[axis] != 1 && shape[axis] != ext[axis] {
                    let other = self
                        .inputs
                        .iter()
                        .zip(shapes)
                        .find(|(_, s)| s[axis] == ext[axis])
                        .map_or("?", |(i, _)| i.name.as_str());
                    return Err(Error::Shape(format!(
                        "input `{}` has shape {shape:?} but `{other}` has {} along {} ({:?} expected): each axis of [batch, class, spatial] must match across inputs or be 1 (broadcast)",
                        spec.name,
                        ext[axis],
                        crate::ir::AXES[axis].1,
                        expected_shape(ext, spec.axes),
                    )));
                }
            }
        }
        // Inputs broadcast against the largest of them (class weights against scores, a
        // mask shared by the classes). A broadcast larger than every input, each within
        // the axes it may vary over, is an outer product, as with logits of shape [N] and
        // targets of shape [N, 1]: refused. (Inputs that declare fewer axes, `t[batch,
        // spatial]` with `w[class]`, fill the broadcast between them.)
        let full = |(spec, s): (&InputSpec, &[usize; 3])| *s == expected_shape(ext, spec.axes);
        if !shapes.is_empty() && !self.inputs.iter().zip(shapes).any(full) {
            let each: Vec<String> =
                self.inputs.iter().zip(shapes).map(|(spec, s)| format!("`{}` {s:?}", spec.name)).collect();
            return Err(Error::Shape(format!(
                "the inputs broadcast to {ext:?} ([batch, class, spatial]), larger than each of them ({}): \
                 one input must have the full shape; give the others the same shape or extents of 1 \
                 (for example targets of shape [N] for logits of shape [N], not [N, 1])",
                each.join(", ")
            )));
        }
        Ok(ext)
    }

    /// Extents for evaluating on `inputs`, after checking their data and size.
    pub(crate) fn checked_extents(&self, inputs: &[&Tensor]) -> Result<[usize; 3], Error> {
        let ext = self.extents(&inputs.iter().map(|t| t.shape).collect::<Vec<_>>())?;
        for (spec, t) in self.inputs.iter().zip(inputs) {
            let want = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if want != Some(t.data.len()) {
                return Err(Error::Shape(format!(
                    "input `{}` has shape {:?} but holds {} values",
                    spec.name,
                    t.shape,
                    t.data.len()
                )));
            }
        }
        let total = ext.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match total {
            Some(n) if n <= MAX_REFERENCE_ELEMENTS => Ok(ext),
            _ => Err(Error::Shape(format!(
                "the broadcast shape {ext:?} has more than {MAX_REFERENCE_ELEMENTS} elements, \
                 too many for the f64 reference evaluator"
            ))),
        }
    }

    /// The loss value on float32 inputs, by the native runtime; the gradient with respect to
    /// input `i` goes into `grads[i]` where that is `Some` (a buffer shaped like the input).
    /// Pass an empty `grads` for the value only. `&self` is shared freely across threads;
    /// kernels are compiled on the first call for each shape pattern and reused.
    ///
    /// ```
    /// use lossc::{Loss, View};
    ///
    /// let loss = Loss::compile("tversky", "alpha=0.3,beta=0.7")?;
    /// // [batch, class, spatial]: 2 images of 3 pixels.
    /// let p = [0.9f32, 0.2, 0.6, 0.1, 0.8, 0.4];
    /// let y = [1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0];
    /// let inputs = [View::new([2, 1, 3], &p), View::new([2, 1, 3], &y)];
    /// let mut dp = [0.0f32; 6];
    /// let value = loss.evaluate(&inputs, &mut [Some(&mut dp), None])?;
    /// assert!(value > 0.0 && value < 1.0 && dp[0] < 0.0);
    /// # Ok::<(), lossc::Error>(())
    /// ```
    pub fn evaluate(&self, inputs: &[View], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
        runtime::evaluate(self, Backend::Jit, inputs, grads)
    }

    /// `evaluate` on the chosen backend.
    pub fn evaluate_on(
        &self,
        backend: Backend,
        inputs: &[View],
        grads: &mut [Option<&mut [f32]>],
    ) -> Result<f64, Error> {
        runtime::evaluate(self, backend, inputs, grads)
    }

    /// The loss and all its gradients as PTX for an NVIDIA GPU (`sm`: `"sm_70"`, `"sm_80"`
    /// or `"sm_90"`), for inputs of `classes` classes at full size: see
    /// `backend::ptx` for the kernels, their parameters and their launch order.
    pub fn emit_ptx(&self, sm: &str, classes: usize) -> Result<crate::backend::ptx::Program, Error> {
        use crate::backend::ptx;
        let target = ptx::Target::parse(sm).map_err(Error::Params)?;
        if classes == 0 {
            return Err(Error::Shape("the class count must be at least 1".into()));
        }
        ptx::emit(self, &ptx::Layout::full(self, classes), target)
    }

    /// The loss value, by the f64 reference evaluator.
    pub fn eval(&self, inputs: &[&Tensor]) -> Result<f64, Error> {
        let ext = self.checked_extents(inputs)?;
        self.reference_fits(ext, &[self.root])?;
        Ok(interp::evaluate(&self.graph, &[self.root], inputs, ext)[0].data[0])
    }

    /// Refuses a reference evaluation that cannot fit in memory: it may hold an f64 array
    /// of the broadcast size for every node that varies over the elements (it frees each
    /// after its last use, so this bounds the peak from above).
    fn reference_fits(&self, ext: [usize; 3], roots: &[NodeId]) -> Result<(), Error> {
        let g = &self.graph;
        let arrays = g.reachable(roots).iter().filter(|&&id| !g.axes(id).is_empty()).count().max(4);
        let bytes = 8.0 * arrays as f64 * ext.iter().product::<usize>() as f64;
        runtime::ensure_memory(ext, bytes, "the f64 reference evaluator")
    }

    /// The loss value and the gradient for every input (shaped like the input),
    /// by the f64 reference evaluator.
    pub fn eval_grad(&self, inputs: &[&Tensor]) -> Result<(f64, Vec<Tensor>), Error> {
        let ext = self.checked_extents(inputs)?;
        let mut roots = vec![self.root];
        roots.extend(self.grads.iter().flatten());
        self.reference_fits(ext, &roots)?;
        let values = interp::evaluate(&self.graph, &roots, inputs, ext);
        let mut values = values.into_iter();
        let loss = values.next().expect("invariant: root value").data[0];
        let grads = self
            .grads
            .iter()
            .zip(inputs)
            .zip(&self.inputs)
            .map(|((g, input), spec)| match g {
                // An input given with extent 1 along an axis it may vary over is used once per
                // element there: its gradient is the sum over those copies.
                Some(_) => {
                    let used = expected_shape(ext, spec.axes);
                    values.next().expect("invariant: one per gradient").broadcast_to(used).fit_to(input.shape)
                }
                None => Tensor::filled(input.shape, 0.0),
            })
            .collect();
        Ok((loss, grads))
    }
}

fn expected_shape(ext: [usize; 3], axes: crate::ir::AxisSet) -> [usize; 3] {
    std::array::from_fn(|i| if axes.has_index(i) { ext[i] } else { 1 })
}

/// `"alpha=0.3, beta=0.7"` as pairs.
pub fn parse_params(text: &str) -> Result<Vec<(String, f64)>, Error> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(Error::Params(format!("expected `name=value` in the parameter list, found `{item}`")));
        };
        let (k, text) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(Error::Params(format!("a parameter's name is missing in `{item}`")));
        }
        let v: f64 = text.parse().map_err(|_| Error::Params(format!("`{text}` is not a number (in `{item}`)")))?;
        if !v.is_finite() {
            return Err(Error::Params(format!("parameter `{k}` must be finite, found {v}")));
        }
        // `1e-400` parses as 0: a value the user wrote as non-zero must not silently be one.
        if v == 0.0 && !zero_digits(text) {
            return Err(Error::Params(format!("parameter `{k}` = {text} is too small for a double (it would be 0)")));
        }
        out.push((k.to_string(), v));
    }
    Ok(out)
}

/// Whether the digits of a number's significand (before any exponent) are all zeros.
fn zero_digits(number: &str) -> bool {
    let significand = number.split(['e', 'E']).next().unwrap_or(number);
    significand.bytes().filter(u8::is_ascii_digit).all(|b| b == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_expression_takes_its_inputs_in_the_order_written() {
        let names = |source: &str| -> Vec<String> {
            Loss::compile(source, "").expect("compiles").inputs().iter().map(|i| i.name.clone()).collect()
        };
        assert_eq!(names("dice(y = a, p = b)"), ["a", "b"]);
        // Hyperparameters given as scalars of inputs count where they are written, not
        // in the callee's declaration order (alpha before beta).
        assert_eq!(names("tversky(p, y, beta = mean(q), alpha = mean(r))"), ["p", "y", "q", "r"]);
        assert_eq!(names("tversky(beta = mean(q), y = t, p = s)"), ["q", "t", "s"]);
    }

    #[test]
    fn parameter_lists_refuse_missing_names_and_values_that_round_to_zero() {
        assert_eq!(
            parse_params(" smooth = 0.5 ,, gamma=2,").expect("parses"),
            [("smooth".into(), 0.5), ("gamma".into(), 2.0)]
        );
        assert_eq!(parse_params("a=0e5, b=0.000, c=-0").expect("zeros").len(), 3);
        for (text, says) in [("=3", "name is missing"), ("smooth=1e-400", "too small"), ("a=x", "not a number")] {
            let err = parse_params(text).err().expect(text).to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_lone_name_that_is_no_stdlib_loss_gets_a_suggestion() {
        let err = Loss::compile("dcie", "").err().expect("no such loss").render();
        assert!(err.contains("`dcie` is not a loss in the standard library"), "{err}");
        assert!(err.contains("did you mean `dice`?"), "{err}");
        let err = Loss::compile(" zzzqqq\n", "").err().expect("no such loss").render();
        assert!(err.contains("`lossc list` shows the standard losses"), "{err}");
        assert!(Loss::compile(" dice\n", "").is_ok());
    }

    #[test]
    fn terms_of_a_sum_add_up_to_the_loss() {
        let loss =
            Loss::compile("0.5*dice(sigmoid(x), y) + bce_logits(x, y) + 0.1*iou(sigmoid(x), y)", "").expect("compiles");
        let terms = loss.terms();
        assert_eq!(terms.len(), 3);
        let mut rng = crate::synth::Rng::new(3);
        let inputs = crate::synth::inputs(loss.inputs(), [2, 1, 50], &mut rng);
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let sum: f64 = terms.iter().map(|t| t.eval(&refs).expect("a term")).sum();
        let total = loss.eval(&refs).expect("the loss");
        assert!((sum - total).abs() < 1e-12, "{sum} vs {total}");
        for (term, alone) in terms.iter().zip(["0.5*dice(sigmoid(x), y)", "bce_logits(x, y)", "0.1*iou(sigmoid(x), y)"])
        {
            let alone = Loss::compile(alone, "").expect("compiles").eval(&refs).expect("evaluates");
            assert_eq!(term.eval(&refs).expect("a term"), alone);
        }
        assert!(terms[1].show().starts_with("loss expr[1](x, y)"), "{}", terms[1].show());
        assert_eq!(Loss::compile("dice", "").expect("dice").terms().len(), 1);
        // A subtracted term is a term, negated; the terms still add up to the loss.
        let loss = Loss::compile("dice(sigmoid(x), y) + bce_logits(x, y) - 0.1*mean(x)", "").expect("compiles");
        let terms = loss.terms();
        assert_eq!(terms.len(), 3);
        let minus = Loss::compile("-0.1*mean(x)", "").expect("compiles");
        let x = [refs[0]];
        assert_eq!(terms[2].eval(&refs).expect("a term"), minus.eval(&x).expect("evaluates"));
        let sum: f64 = terms.iter().map(|t| t.eval(&refs).expect("a term")).sum();
        assert!((sum - loss.eval(&refs).expect("the loss")).abs() < 1e-12);
        // An added constant is a term, as it was before subtraction split terms.
        let loss = Loss::compile("dice(sigmoid(x), y) + bce_logits(x, y) + 1", "").expect("compiles");
        assert_eq!(loss.terms().len(), 3);
    }
}
