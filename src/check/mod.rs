//! Name resolution, argument checks, inlining of calls, and axis inference:
//! the syntax tree of the entry loss becomes one IR graph.
//!
//! Calls to other losses are inlined, so every body is checked with the
//! actual axes of its arguments. Errors carry the span of the offending text.

pub(crate) mod builtins;

use std::collections::HashMap;

use crate::diag::{Diagnostic, Span};
use crate::ir::{AxisSet, Graph, NodeId, Op, Space, TypeError};
use crate::syntax::ast::*;

type R<T> = Result<T, Diagnostic>;

/// How deeply loss calls may nest: inlining recurses once per level.
const MAX_CALL_DEPTH: usize = 32;

/// Calls to loss definitions inlined into one graph, at most. Distinct calls each inline a
/// fresh copy of the callee, so a chain of losses that each call the one before twice with
/// other arguments doubles the graph per level: a few lines could ask for gigabytes.
/// The stdlib's losses inline fewer than 100 calls each.
pub const MAX_INLINED_CALLS: usize = 20_000;

/// Operations in one graph, at most: with its derivatives and the later stages, a few KB
/// each (a chain of 100,000 `let`s of about 300,000 operations took 10 s and 720 MB to
/// check, on 2026-11-30).
pub const MAX_GRAPH_NODES: usize = 500_000;

/// A tensor input of the entry loss.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    pub name: String,
    /// The axes it may vary over; along the others its extent must be 1.
    pub axes: AxisSet,
}

/// The entry loss as one graph, before differentiation.
pub struct Lowered {
    pub graph: Graph,
    pub root: NodeId,
    pub inputs: Vec<InputSpec>,
    pub input_nodes: Vec<NodeId>,
    /// Hyperparameters with the values used.
    pub hypers: Vec<(String, f64)>,
}

/// What a source defines: its own losses, the stdlib, and which is the entry.
pub struct Env<'a> {
    /// The losses of the user's source (file 0).
    pub user: HashMap<&'a str, &'a LossDef>,
    /// The stdlib's losses. Calls from the stdlib resolve here only, so a user
    /// definition named like a stdlib loss never changes another stdlib loss.
    pub stdlib: HashMap<&'a str, &'a LossDef>,
}

impl<'a> Env<'a> {
    /// The loss a call written in `file` refers to.
    fn lookup(&self, name: &str, file: crate::diag::FileId) -> Option<&'a LossDef> {
        let own = if file == crate::diag::FileId(0) { self.user.get(name) } else { None };
        own.or_else(|| self.stdlib.get(name)).copied()
    }

    fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.user.keys().chain(self.stdlib.keys()).copied()
    }
}

/// A parameter of a called loss, as its arguments are lowered.
enum Param<'a> {
    Tensor(&'a TensorParam),
    Hyper(&'a HyperParam),
}

/// The loss to lower: a definition, or a bare expression whose free names are inputs.
pub enum Entry<'a> {
    Def(&'a LossDef),
    Expr(&'a Expr),
}

/// Lowers the entry with hyperparameter overrides `params` (already checked to exist).
pub fn lower(env: &Env, entry: Entry, params: &HashMap<String, f64>) -> R<Lowered> {
    let mut lw = Lowerer {
        g: Graph::new(false),
        env,
        inputs: vec![],
        input_nodes: vec![],
        free: false,
        stack: vec![],
        inlined: HashMap::new(),
        calls: 0,
    };
    let mut scope = Scope::default();
    let mut hypers = Vec::new();
    let (root, result_span) = match entry {
        Entry::Expr(e) => {
            lw.free = true;
            (lw.expr(e, &scope)?, e.span)
        }
        Entry::Def(def) => {
            lw.stack.push(def.name.name.clone());
            check_params(def)?;
            for t in &def.tensors {
                let axes = declared_axes(t)?;
                let id = lw.new_input(&t.name.name, axes);
                scope.vars.insert(t.name.name.clone(), id);
            }
            for h in &def.hypers {
                let v = match params.get(&h.name.name) {
                    Some(&v) => v,
                    None => {
                        let d = lw.expr(&h.default, &scope)?;
                        let v = lw.g.fold(d).ok_or_else(|| {
                            Diagnostic::new(
                                "check::default_not_constant",
                                h.default.span,
                                "a default must be a constant",
                            )
                            .label("this does not reduce to a number")
                        })?;
                        // As for a value given with the parameters.
                        if !v.is_finite() {
                            return Err(Diagnostic::new(
                                "check::default_not_finite",
                                h.default.span,
                                format!("the default of `{}` must be finite", h.name.name),
                            )
                            .label(format!("this is {v}")));
                        }
                        v
                    }
                };
                hypers.push((h.name.name.clone(), v));
                let c = lw.g.constant(v);
                scope.vars.insert(h.name.name.clone(), c);
            }
            (lw.block(&def.body, &scope)?, def.body.result.span)
        }
    };
    if lw.g.space(root) != Space::Elements || !lw.g.axes(root).is_empty() {
        return Err(Diagnostic::new(
            "check::non_scalar_entry",
            result_span,
            format!("the loss must reduce to a scalar, but this varies over {}", lw.g.axes(root)),
        )
        .label("not a scalar")
        .help("reduce it, for example with mean(...) or sum(...)"));
    }
    Ok(Lowered { graph: lw.g, root, inputs: lw.inputs, input_nodes: lw.input_nodes, hypers })
}

/// Parameter names are unique; axis lists name known axes.
pub fn check_params(def: &LossDef) -> R<()> {
    let mut seen: HashMap<&str, Span> = HashMap::new();
    let names = def.tensors.iter().map(|t| &t.name).chain(def.hypers.iter().map(|h| &h.name));
    for name in names {
        if seen.insert(&name.name, name.span).is_some() {
            return Err(Diagnostic::new(
                "check::duplicate_parameter",
                name.span,
                format!("parameter `{}` is declared twice in `{}`", name.name, def.name.name),
            )
            .label("second declaration")
            .help("rename one of them"));
        }
    }
    for t in &def.tensors {
        declared_axes(t)?;
    }
    Ok(())
}

fn declared_axes(t: &TensorParam) -> R<AxisSet> {
    let Some(list) = &t.axes else {
        return Ok(AxisSet::ALL);
    };
    let mut axes = AxisSet::NONE;
    for a in list {
        axes = axes.union(axis_by_name(a)?);
    }
    Ok(axes)
}

fn axis_by_name(a: &Ident) -> R<AxisSet> {
    AxisSet::from_name(&a.name).ok_or_else(|| {
        let mut d = Diagnostic::new("check::unknown_axis", a.span, format!("unknown axis `{}`", a.name))
            .label("not an axis")
            .note("the axes are batch, class and spatial");
        if let Some(s) = closest(&a.name, ["batch", "class", "spatial"]) {
            d = d.help(format!("did you mean `{s}`?"));
        }
        d
    })
}

/// "the value is a scalar" or "the value varies only over (batch, class)".
pub fn varies_over(axes: AxisSet) -> String {
    if axes.is_empty() {
        "the value is a scalar".into()
    } else {
        format!("the value varies only over {axes}")
    }
}

/// The closest candidate by edit distance, if it is close enough to be a likely typo.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

#[derive(Clone, Default)]
struct Scope {
    vars: HashMap<String, NodeId>,
    /// The `Sort` node of the innermost `sorted` block, if inside one.
    sorted: Option<NodeId>,
}

struct Lowerer<'a> {
    g: Graph,
    env: &'a Env<'a>,
    inputs: Vec<InputSpec>,
    input_nodes: Vec<NodeId>,
    /// In a bare expression, unknown names become inputs.
    free: bool,
    /// Losses being inlined, to reject recursion.
    stack: Vec<String>,
    /// Inlined calls by loss, arguments and sort scope: the same call is one subgraph,
    /// and repeated calls cost nothing (no blow-up for `f(x) + f(x)` chains).
    inlined: HashMap<(String, Vec<NodeId>, Option<NodeId>), NodeId>,
    /// Distinct calls inlined so far (not those `inlined` already held), against
    /// [`MAX_INLINED_CALLS`].
    calls: usize,
}

impl Lowerer<'_> {
    fn new_input(&mut self, name: &str, axes: AxisSet) -> NodeId {
        let index = u32::try_from(self.inputs.len()).expect("invariant: few inputs");
        let id = self.g.add(Op::Input { index, axes }, &[]);
        self.inputs.push(InputSpec { name: name.to_string(), axes });
        self.input_nodes.push(id);
        id
    }

    fn build(&mut self, op: Op, args: &[NodeId], span: Span) -> R<NodeId> {
        if self.g.len() > MAX_GRAPH_NODES {
            return Err(Diagnostic::new(
                "check::too_large",
                span,
                format!("the loss has more than {MAX_GRAPH_NODES} operations"),
            )
            .label("the limit is reached here"));
        }
        self.g.try_add(op, args).map_err(|e| type_error(e, span))
    }

    fn block(&mut self, b: &Block, outer: &Scope) -> R<NodeId> {
        let mut scope = outer.clone();
        let mut own: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for (name, value) in &b.lets {
            if !own.insert(&name.name) {
                return Err(Diagnostic::new(
                    "check::duplicate_binding",
                    name.span,
                    format!("`{}` is already defined in this block", name.name),
                )
                .label("defined again here")
                .help("use a new name"));
            }
            let v = self.expr(value, &scope)?;
            scope.vars.insert(name.name.clone(), v);
        }
        self.expr(&b.result, &scope)
    }

    fn expr(&mut self, e: &Expr, scope: &Scope) -> R<NodeId> {
        match &e.kind {
            ExprKind::Number(v) => Ok(self.g.constant(*v)),
            ExprKind::BadNumber(text) => {
                Err(Diagnostic::new("parse::bad_number", e.span, format!("malformed number `{text}`"))
                    .label("not a number")
                    .help("numbers look like 3, 0.5, .5 or 1e-7"))
            }
            ExprKind::Name(name) => self.name(name, e.span, scope, AxisSet::ALL),
            ExprKind::Neg(a) => {
                let a = self.expr(a, scope)?;
                self.build(Op::Neg, &[a], e.span)
            }
            ExprKind::Binary(op, a, b) => {
                let (a, b) = (self.expr(a, scope)?, self.expr(b, scope)?);
                let op = match op {
                    BinOp::Add => Op::Add,
                    BinOp::Sub => Op::Sub,
                    BinOp::Mul => Op::Mul,
                    BinOp::Div => Op::Div,
                    BinOp::Pow => Op::Pow,
                    BinOp::Lt => Op::Lt,
                    BinOp::Le => Op::Le,
                    BinOp::Gt => Op::Gt,
                    BinOp::Ge => Op::Ge,
                    BinOp::Eq => Op::Eq,
                    BinOp::Ne => Op::Ne,
                };
                self.build(op, &[a, b], e.span)
            }
            ExprKind::Tuple(_) => Err(Diagnostic::new("check::misplaced_tuple", e.span, "a tuple is not a value")
                .label("tuple used as a value")
                .help("`(a, b)` is only allowed as the axes of `by = (batch, class)`")),
            ExprKind::Call { func, args } => self.call(func, args, e.span, scope),
            ExprKind::Sorted(s) => self.sorted(s, e.span, scope),
        }
    }

    /// A name as a value: a binding, or in a bare expression a new input with `axes`.
    fn name(&mut self, name: &str, span: Span, scope: &Scope, axes: AxisSet) -> R<NodeId> {
        if let Some(&id) = scope.vars.get(name) {
            return Ok(id);
        }
        if let Some(i) = self.inputs.iter().position(|i| i.name == name).filter(|_| self.free) {
            return Ok(self.input_nodes[i]);
        }
        if self.env.lookup(name, span.file).is_some() || builtins::is_builtin(name) {
            return Err(Diagnostic::new(
                "check::function_as_value",
                span,
                format!("`{name}` is a function, not a value"),
            )
            .label("used as a value")
            .help(format!("call it: `{name}(...)`")));
        }
        if AxisSet::from_name(name).is_some() {
            return Err(Diagnostic::new("check::axis_as_value", span, format!("`{name}` is an axis, not a value"))
                .label("used as a value")
                .help(format!("axes are only used to name reductions, as in `sum(e, by = {name})`")));
        }
        if self.free {
            return Ok(self.new_input(name, axes));
        }
        let mut d = Diagnostic::new("check::unknown_name", span, format!("unknown name `{name}`")).label("not defined");
        if let Some(s) = closest(name, scope.vars.keys().map(String::as_str)) {
            d = d.help(format!("did you mean `{s}`?"));
        }
        Err(d)
    }

    fn call(&mut self, func: &Ident, args: &[Arg], span: Span, scope: &Scope) -> R<NodeId> {
        if let Some(def) = self.env.lookup(&func.name, func.span.file) {
            return self.call_loss(def, args, span, scope);
        }
        if let Some(result) = self.builtin(func, args, span, scope) {
            return result;
        }
        let candidates = self.env.names().chain(builtins::NAMES.iter().copied());
        let mut d = Diagnostic::new("check::unknown_function", func.span, format!("unknown function `{}`", func.name))
            .label("no loss or builtin has this name");
        if let Some(s) = closest(&func.name, candidates) {
            d = d.help(format!("did you mean `{s}`?"));
        } else {
            d = d.help("`lossc list` shows the standard losses");
        }
        Err(d)
    }

    /// Inlines a call to a loss definition.
    fn call_loss(&mut self, def: &LossDef, args: &[Arg], span: Span, scope: &Scope) -> R<NodeId> {
        let name = &def.name.name;
        if self.stack.len() >= MAX_CALL_DEPTH {
            return Err(Diagnostic::new(
                "check::calls_too_deep",
                span,
                format!("calls nest more than {MAX_CALL_DEPTH} deep"),
            )
            .label(format!("call of `{name}`"))
            .note("losses are inlined; a chain of calls this long is almost certainly a mistake"));
        }
        if let Some(first) = self.stack.iter().position(|n| n == name) {
            let mut cycle = self.stack[first..].to_vec();
            cycle.push(name.clone());
            let how = if cycle.len() == 2 { String::new() } else { format!(" through {}", cycle.join(" -> ")) };
            return Err(Diagnostic::new("check::recursive_call", span, format!("`{name}` calls itself{how}"))
                .label("recursive call")
                .note("losses are inlined, so they cannot be recursive"));
        }
        check_params(def)?;
        let bound = bind_arguments(def, args, span)?;
        let mut callee = Scope { vars: HashMap::new(), sorted: scope.sorted };
        // Lower the arguments in the order they are written, tensors and hyperparameters
        // alike, so that a bare expression's inputs come in order of first appearance
        // even with named arguments; then the defaults, in declaration order.
        let mut written: Vec<(&Expr, Param)> = def
            .tensors
            .iter()
            .zip(&bound.tensors)
            .map(|(t, a)| (a.expect("invariant: bind_arguments fills every tensor"), Param::Tensor(t)))
            .collect();
        written.extend(def.hypers.iter().zip(&bound.hypers).filter_map(|(h, a)| Some(((*a)?, Param::Hyper(h)))));
        written.sort_by_key(|(a, _)| a.span.start);
        for (arg, param) in written {
            let (param_name, v) = match param {
                Param::Tensor(t) => (&t.name.name, self.tensor_argument(name, t, arg, scope)?),
                Param::Hyper(h) => {
                    let v = self.expr(arg, scope)?;
                    if !self.g.axes(v).is_empty() || self.g.space(v) != Space::Elements {
                        return Err(Diagnostic::new(
                            "check::hyperparameter_not_scalar",
                            arg.span,
                            format!("hyperparameter `{}` of `{name}` must be a scalar", h.name.name),
                        )
                        .label(format!("this varies over {}", self.g.axes(v))));
                    }
                    (&h.name.name, v)
                }
            };
            callee.vars.insert(param_name.clone(), v);
        }
        for (h, arg) in def.hypers.iter().zip(&bound.hypers) {
            if arg.is_some() {
                continue;
            }
            // A callee's default may use its earlier hyperparameters (`b = 1 - a`), which
            // may be any scalar here; it must not depend on a tensor.
            let v = self.in_callee(name, span, |lw| {
                let v = lw.expr(&h.default, &callee)?;
                if lw.g.axes(v).is_empty() && lw.g.space(v) == Space::Elements {
                    Ok(v)
                } else {
                    Err(Diagnostic::new("check::default_not_scalar", h.default.span, "a default must be a scalar")
                        .label(format!("this varies over {}", lw.g.axes(v))))
                }
            })?;
            callee.vars.insert(h.name.name.clone(), v);
        }
        let mut key: Vec<NodeId> = def.tensors.iter().map(|t| callee.vars[&t.name.name]).collect();
        key.extend(def.hypers.iter().map(|h| callee.vars[&h.name.name]));
        let key = (name.clone(), key, scope.sorted);
        if let Some(&done) = self.inlined.get(&key) {
            return Ok(done);
        }
        self.calls += 1;
        if self.calls > MAX_INLINED_CALLS {
            return Err(Diagnostic::new(
                "check::too_large",
                span,
                format!("the loss inlines more than {MAX_INLINED_CALLS} calls"),
            )
            .label(format!("call of `{name}`"))
            .note(
                "calls are inlined, one copy per distinct set of arguments: a chain of losses \
                 that each call the one before twice doubles the graph at every level",
            ));
        }
        self.stack.push(name.clone());
        let result = self.in_callee(name, span, |lw| lw.block(&def.body, &callee));
        self.stack.pop();
        if let Ok(id) = result {
            self.inlined.insert(key, id);
        }
        result
    }

    /// A tensor argument of a call of `callee`, checked against the axes its parameter
    /// declares.
    fn tensor_argument(&mut self, callee: &str, t: &TensorParam, arg: &Expr, scope: &Scope) -> R<NodeId> {
        let axes = declared_axes(t)?;
        let v = match &arg.kind {
            ExprKind::Name(n) => self.name(n, arg.span, scope, axes)?,
            _ => self.expr(arg, scope)?,
        };
        // Values in sorted order span every axis; a helper called inside a `sorted`
        // block takes them and scans in the block's order.
        if !axes.contains(self.g.axes(v)) {
            return Err(Diagnostic::new(
                "shape::argument_axes",
                arg.span,
                format!(
                    "argument `{}` of `{callee}` may vary only over {axes}, but this varies over {}",
                    t.name.name,
                    self.g.axes(v)
                ),
            )
            .label(format!("expected {axes}")));
        }
        Ok(v)
    }

    /// Runs `f` for the body of callee `name`; an error inside another file is
    /// reported at the call site, with the original message.
    fn in_callee(&mut self, name: &str, call: Span, f: impl FnOnce(&mut Self) -> R<NodeId>) -> R<NodeId> {
        f(self).map_err(|mut d| {
            if d.span.file == call.file {
                // The user's own callee: the error stays where it is, and the call that led
                // there is labelled too (the shapes and axes it passed caused it); only
                // the innermost, which a chain of calls would otherwise repeat per level.
                d.call.get_or_insert_with(|| (call, format!("in this call of `{name}`")));
                return d;
            }
            let mut out = Diagnostic::new(d.code, call, d.message.clone())
                .label(format!("inside this call of `{name}`"))
                .note(format!("in `{name}`: {}", d.label));
            out.notes.extend(d.notes);
            out.help = d.help;
            out
        })
    }

    fn sorted(&mut self, s: &SortedBlock, span: Span, scope: &Scope) -> R<NodeId> {
        let mut group = AxisSet::NONE;
        for (opt, value) in &s.options {
            if opt.name != "by" {
                return Err(Diagnostic::new(
                    "check::unknown_option",
                    opt.span,
                    format!("unknown option `{}`", opt.name),
                )
                .label("`sorted` only takes `by = axes`"));
            }
            group = axes_value(value)?;
        }
        if scope.sorted.is_some() {
            return Err(Diagnostic::new("check::nested_sorted", span, "`sorted` blocks cannot be nested")
                .label("inside another `sorted` block"));
        }
        let bound = |lw: &mut Self, name: &Ident, value: &Option<Expr>| -> R<(NodeId, Span)> {
            match value {
                Some(v) => Ok((lw.expr(v, scope)?, v.span)),
                None => Ok((lw.name(&name.name, name.span, scope, AxisSet::ALL)?, name.span)),
            }
        };
        let (key, key_span) = bound(self, &s.key, &s.key_value)?;
        let sort = self.build(Op::Sort { group, descending: s.descending }, &[key], key_span)?;
        let mut inner = scope.clone();
        inner.sorted = Some(sort);
        let sorted_key = self.build(Op::Gather, &[sort, key], key_span)?;
        inner.vars.insert(s.key.name.clone(), sorted_key);
        let mut header = vec![s.key.name.as_str()];
        for (name, value) in &s.binds {
            if header.contains(&name.name.as_str()) {
                return Err(Diagnostic::new(
                    "check::duplicate_binding",
                    name.span,
                    format!("`{}` is already bound in this `sorted` header", name.name),
                )
                .label("bound again here")
                .help("use a new name"));
            }
            header.push(&name.name);
            let (v, vspan) = bound(self, name, value)?;
            let sv = self.build(Op::Gather, &[sort, v], vspan)?;
            inner.vars.insert(name.name.clone(), sv);
        }
        let result = self.block(&s.body, &inner)?;
        if self.g.space(result) != Space::Elements {
            return Err(Diagnostic::new(
                "shape::unreduced_sorted",
                s.body.result.span,
                "a `sorted` block must end in a reduction over its groups",
            )
            .label("still in sorted order")
            .help("end the block with sum(...) or mean(...)"));
        }
        Ok(result)
    }
}

/// Arguments matched to parameters: positional first (tensors, then hyperparameters), then named.
struct Bound<'e> {
    tensors: Vec<Option<&'e Expr>>,
    hypers: Vec<Option<&'e Expr>>,
}

fn bind_arguments<'e>(def: &LossDef, args: &'e [Arg], span: Span) -> R<Bound<'e>> {
    let name = &def.name.name;
    let (nt, nh) = (def.tensors.len(), def.hypers.len());
    let mut slots: Vec<Option<&Expr>> = vec![None; nt + nh];
    let param_names: Vec<&str> = def
        .tensors
        .iter()
        .map(|t| t.name.name.as_str())
        .chain(def.hypers.iter().map(|h| h.name.name.as_str()))
        .collect();
    let mut positional = 0;
    let mut named_seen = false;
    for a in args {
        let slot = match &a.name {
            None => {
                if named_seen {
                    return Err(Diagnostic::new(
                        "check::positional_after_named",
                        a.value.span,
                        "a positional argument follows a named one",
                    )
                    .label("positional argument"));
                }
                positional += 1;
                if positional > nt + nh {
                    return Err(Diagnostic::new(
                        "check::too_many_arguments",
                        a.value.span,
                        format!(
                            "`{name}` takes at most {} arguments, but {} given",
                            nt + nh,
                            builtins::given(args.len())
                        ),
                    )
                    .label("extra argument")
                    .note(format!("signature: {}", signature(def))));
                }
                positional - 1
            }
            Some(n) => {
                named_seen = true;
                match param_names.iter().position(|p| *p == n.name) {
                    Some(i) => i,
                    None => {
                        let mut d = Diagnostic::new(
                            "check::unknown_argument",
                            n.span,
                            format!("`{name}` has no parameter `{}`", n.name),
                        )
                        .label("unknown parameter")
                        .note(format!("signature: {}", signature(def)));
                        if let Some(s) = closest(&n.name, param_names.iter().copied()) {
                            d = d.help(format!("did you mean `{s}`?"));
                        }
                        return Err(d);
                    }
                }
            }
        };
        if slots[slot].is_some() {
            let at = a.name.as_ref().map_or(a.value.span, |n| n.span);
            return Err(Diagnostic::new(
                "check::duplicate_argument",
                at,
                format!("parameter `{}` of `{name}` is given twice", param_names[slot]),
            )
            .label("given again here"));
        }
        slots[slot] = Some(&a.value);
    }
    if let Some(missing) = (0..nt).find(|&i| slots[i].is_none()) {
        return Err(Diagnostic::new(
            "check::missing_argument",
            span,
            format!("`{name}` needs the tensor `{}`, which is not given", param_names[missing]),
        )
        .label(format!("{} of {nt} tensors given", slots[..nt].iter().filter(|s| s.is_some()).count()))
        .note(format!("signature: {}", signature(def))));
    }
    let hypers = slots.split_off(nt);
    Ok(Bound { tensors: slots, hypers })
}

/// `name(p, y; smooth = 1)` as written.
pub fn signature(def: &LossDef) -> String {
    let tensors: Vec<String> = def
        .tensors
        .iter()
        .map(|t| match &t.axes {
            None => t.name.name.clone(),
            Some(a) => format!("{}[{}]", t.name.name, a.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")),
        })
        .collect();
    let hypers: Vec<String> =
        def.hypers.iter().map(|h| format!("{} = {}", h.name.name, expr_text(&h.default))).collect();
    if hypers.is_empty() {
        format!("{}({})", def.name.name, tensors.join(", "))
    } else {
        format!("{}({}; {})", def.name.name, tensors.join(", "), hypers.join(", "))
    }
}

fn expr_text(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Number(v) => crate::ir::format_number(*v),
        ExprKind::Neg(a) => format!("-{}", expr_text(a)),
        ExprKind::Name(n) => n.clone(),
        _ => "...".into(),
    }
}

/// The axes named by `by = class` or `by = (batch, class)`.
fn axes_value(e: &Expr) -> R<AxisSet> {
    let one = |e: &Expr| match &e.kind {
        ExprKind::Name(n) => axis_by_name(&Ident { name: n.clone(), span: e.span }),
        _ => Err(Diagnostic::new("check::expected_axes", e.span, "expected an axis name")
            .label("not an axis")
            .help("write `by = class` or `by = (batch, class)`")),
    };
    match &e.kind {
        ExprKind::Tuple(items) => items.iter().try_fold(AxisSet::NONE, |acc, i| Ok(acc.union(one(i)?))),
        _ => one(e),
    }
}

fn type_error(e: TypeError, span: Span) -> Diagnostic {
    let code = match e {
        TypeError::UnsortedInSorted { .. } => "shape::unsorted_in_sorted",
        TypeError::TwoSorts => "shape::two_sorts",
        TypeError::PartialSortedReduction { .. } => "shape::partial_sorted_reduction",
        TypeError::NeedsElements { .. } => "shape::needs_element_order",
        TypeError::NeedsSorted { .. } => "shape::needs_sorted_order",
    };
    let help = match e {
        TypeError::UnsortedInSorted { .. } => Some("bind it in the block's header, as in `sorted (e desc, g = y)`"),
        _ => None,
    };
    let mut d = Diagnostic::new(code, span, e.to_string()).label("here");
    if let Some(h) = help {
        d = d.help(h);
    }
    d
}
