//! No input makes lossc panic or hang: random sources go through parse, compile,
//! `show_grad` and `eval_grad` (or, on error, `render`), each inside `catch_unwind`
//! and under a time limit.
//!
//! Sources are (a) soups of the language's tokens, (b) mutations of the stdlib
//! files and (c) random well-formed-looking expressions and definitions. The seed
//! is fresh each run and printed on failure; `LOSSC_FUZZ_SEED=<n>` replays a run and
//! `LOSSC_FUZZ_CASES=<n>` changes the number of cases per kind.
//!
//! Deep nesting is tested separately, in child processes, since a stack overflow
//! aborts the whole process instead of panicking.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lossc::stdlib::stdlib;
use lossc::synth::{self, Rng};
use lossc::Program;

/// Cases per kind of source; three kinds.
const CASES_PER_KIND: usize = 3_400;
/// A case slower than this (debug build) counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(2);
/// `[batch, class, spatial]` extents of the evaluation inputs.
const EXTENTS: [usize; 3] = [2, 2, 3];

/// Whatever lossc does with `src`: every step that can run, with its output consumed.
/// Returns whether the source compiled.
fn run_source(src: &str, seed: u64) -> bool {
    let compiled = Program::parse("fuzz.loss", src).and_then(|p| p.compile(&[]));
    match compiled {
        Ok(loss) => {
            let shown = loss.show_grad();
            assert!(!shown.is_empty());
            let inputs = synth::inputs(loss.inputs(), EXTENTS, &mut Rng::new(seed));
            let refs: Vec<&lossc::Tensor> = inputs.iter().collect();
            let (_value, grads) = loss.eval_grad(&refs).expect("synthetic inputs fit the loss");
            assert_eq!(grads.len(), inputs.len());
            for (g, i) in grads.iter().zip(&inputs) {
                assert_eq!(g.shape, i.shape, "a gradient has its input's shape");
            }
            true
        }
        Err(e) => {
            // Rendering points into the source: it must cope with any span.
            let rendered = e.render();
            assert!(!rendered.is_empty());
            let _ = e.to_string();
            false
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// `Err(message)` if lossc panics on `src`.
fn try_source(src: &str, seed: u64) -> Result<bool, String> {
    catch_unwind(AssertUnwindSafe(|| run_source(src, seed))).map_err(|p| panic_message(&*p))
}

/// A shorter source that still panics, by deleting ranges of chars while it does.
fn shrink(src: &str, seed: u64) -> String {
    let mut best: Vec<char> = src.chars().collect();
    let mut chunk = best.len().max(1);
    while chunk >= 1 {
        let mut i = 0;
        let mut changed = false;
        while i < best.len() {
            let mut candidate = best.clone();
            candidate.drain(i..(i + chunk).min(best.len()));
            let text: String = candidate.iter().collect();
            if try_source(&text, seed).is_err() {
                best = candidate;
                changed = true;
            } else {
                i += chunk;
            }
        }
        if !changed {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    best.into_iter().collect()
}

// (a) Token soups.

#[rustfmt::skip]
const TOKENS: &[&str] = &[
    "p", "y", "x", "t", "w", "m", "q", "e", "g", "dice", "bce", "tversky", "lovasz_hinge", "lovasz_dot",
    "cross_entropy_index", "sum", "mean", "softmax", "log_softmax", "onehot", "exp", "log", "clamp", "where",
    "cumsum", "prev", "sorted", "desc", "asc", "let", "loss", "by", "mask", "smooth", "class", "batch", "spatial",
    "0", "1", "2", "0.5", ".5", "1e-7", "1e999", "1e", "1.2.3", "3x", "(", ")", "(", ")", "{", "}", "[", "]",
    ",", ",", ";", "=", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "^", "///", "//", "\n", "\n",
    " ", "\t", "\r\n", "_", "#", "é", "🙂", "\u{0}",
];

fn token_soup(rng: &mut Rng) -> String {
    let n = 1 + rng.below(40);
    let mut s = String::new();
    for _ in 0..n {
        s += TOKENS[rng.below(TOKENS.len())];
        if rng.uniform() < 0.6 {
            s.push(' ');
        }
    }
    s
}

// (b) Mutations of the stdlib.

/// A char boundary of `s` in `0..=s.len()`.
fn boundary(s: &str, rng: &mut Rng) -> usize {
    let mut i = rng.below(s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn range(s: &str, rng: &mut Rng) -> (usize, usize) {
    let a = boundary(s, rng);
    // Mostly short ranges, sometimes long ones.
    let len = if rng.uniform() < 0.8 { rng.below(12) } else { rng.below(s.len() + 1) };
    let mut b = (a + len).min(s.len());
    while !s.is_char_boundary(b) {
        b -= 1;
    }
    (a, b.max(a))
}

fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut s = text.to_string();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 => {
                let (a, b) = range(&s, rng);
                s.replace_range(a..b, "");
            }
            1 => {
                let (a, b) = range(&s, rng);
                let piece = s[a..b].to_string();
                let at = boundary(&s, rng);
                s.insert_str(at, &piece);
            }
            2 => {
                // Swap two ranges (taken in order, so they do not overlap).
                let (a, b) = range(&s, rng);
                let (c, d) = range(&s, rng);
                let ((a, b), (c, d)) = if a <= c { ((a, b), (c, d)) } else { ((c, d), (a, b)) };
                if b <= c {
                    s = format!("{}{}{}{}{}", &s[..a], &s[c..d], &s[b..c], &s[a..b], &s[d..]);
                }
            }
            3 | 4 => {
                let at = boundary(&s, rng);
                s.insert_str(at, TOKENS[rng.below(TOKENS.len())]);
            }
            _ => {
                let at = boundary(&s, rng);
                s.truncate(at);
            }
        }
    }
    s
}

fn stdlib_mutant(rng: &mut Rng) -> String {
    let files = &stdlib().files;
    let text = &files[rng.below(files.len())].text;
    mutate(text, rng)
}

// (c) Generated expressions.

const NAMES: &[&str] = &["p", "y", "x", "t", "w", "m"];
const NUMBERS: &[&str] = &["0", "1", "2", "0.5", ".5", "1e-7", "3.", "-1", "100", "1e300"];
const UNARY: &[&str] = &["exp", "log", "log1p", "sqrt", "abs", "sigmoid", "softplus", "log_sigmoid", "tanh", "relu"];
const BINARY: &[&str] = &["+", "-", "*", "/", "^", "<", "<=", ">", ">=", "==", "!="];
const AXES: &[&str] = &["batch", "class", "spatial", "(batch, spatial)", "(batch, class)", "(class, spatial)"];

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len())]
}

struct Gen<'r> {
    rng: &'r mut Rng,
    /// Names that may appear as values.
    names: Vec<String>,
}

impl Gen<'_> {
    fn leaf(&mut self) -> String {
        if self.rng.uniform() < 0.7 {
            let i = self.rng.below(self.names.len());
            self.names[i].clone()
        } else {
            pick(self.rng, NUMBERS).to_string()
        }
    }

    fn expr(&mut self, depth: u32) -> String {
        if depth == 0 || self.rng.uniform() < 0.15 {
            return self.leaf();
        }
        let d = depth - 1;
        match self.rng.below(12) {
            0 | 1 => format!("{}({})", pick(self.rng, UNARY), self.expr(d)),
            2 | 3 => {
                let op = pick(self.rng, BINARY);
                format!("({} {op} {})", self.expr(d), self.expr(d))
            }
            4 => format!("-{}", self.expr(d)),
            5 => {
                let f = if self.rng.uniform() < 0.5 { "sum" } else { "mean" };
                let mut s = format!("{f}({}", self.expr(d));
                if self.rng.uniform() < 0.5 {
                    s += &format!(", by = {}", pick(self.rng, AXES));
                }
                if self.rng.uniform() < 0.2 {
                    s += &format!(", mask = {}", self.expr(d));
                }
                s + ")"
            }
            6 => {
                let f = if self.rng.uniform() < 0.5 { "softmax" } else { "log_softmax" };
                format!("{f}({})", self.expr(d))
            }
            7 => match self.rng.below(4) {
                0 => format!("onehot({})", self.expr(d)),
                1 => format!("clamp({}, {}, {})", self.expr(d), self.leaf(), self.leaf()),
                2 => format!("where({}, {}, {})", self.expr(d), self.expr(d), self.expr(d)),
                _ => {
                    let f = if self.rng.uniform() < 0.5 { "min" } else { "max" };
                    format!("{f}({}, {})", self.expr(d), self.expr(d))
                }
            },
            8 | 9 => self.stdlib_call(d),
            10 => self.sorted(d),
            _ => self.leaf(),
        }
    }

    fn stdlib_call(&mut self, depth: u32) -> String {
        let defs = &stdlib().defs;
        let def = &defs[self.rng.below(defs.len())];
        let mut args: Vec<String> = def.tensors.iter().map(|_| self.expr(depth)).collect();
        // Sometimes one argument too few or too many.
        match self.rng.below(10) {
            0 => {
                args.pop();
            }
            1 => args.push(self.leaf()),
            _ => {}
        }
        for h in &def.hypers {
            if self.rng.uniform() < 0.3 {
                args.push(format!("{} = {}", h.name.name, pick(self.rng, NUMBERS)));
            }
        }
        format!("{}({})", def.name.name, args.join(", "))
    }

    fn sorted(&mut self, depth: u32) -> String {
        let key = self.expr(depth);
        let order = if self.rng.uniform() < 0.5 { "desc" } else { "asc" };
        let bound = self.expr(depth);
        let by = if self.rng.uniform() < 0.4 { format!("; by = {}", pick(self.rng, AXES)) } else { String::new() };
        let scan = match self.rng.below(10) {
            0 | 1 => "cumsum(g)".to_string(),
            2 => format!("prev(g, {})", pick(self.rng, NUMBERS)),
            3 => "lovasz_dot(relu(e), g)".to_string(),
            4 => "e * g".to_string(),
            5 => "g * cumsum(1 - g) / max(cumsum(g), 1)".to_string(),
            // Mistakes: a value from outside, a non-constant `prev`, `by`, nesting.
            6 => format!("g * {}", self.leaf()),
            7 => format!("prev(g, {})", self.leaf()),
            8 => format!("g, by = {}", pick(self.rng, AXES)),
            _ => format!("g * {}", self.sorted(depth.saturating_sub(1))),
        };
        let body = match self.rng.below(5) {
            0 => scan,
            1 => format!("let s = {scan};\n    mean(s)"),
            _ => format!("sum({scan})"),
        };
        let s = format!("sorted (e = {key} {order}, g = {bound}{by}) {{ {body} }}");
        if by.is_empty() {
            s
        } else {
            format!("mean({s})")
        }
    }

    /// A bare expression, or a definition with `let`s and hyperparameters.
    fn source(&mut self) -> String {
        let depth = 1 + self.rng.below(4) as u32;
        if self.rng.uniform() < 0.5 {
            let e = self.expr(depth);
            return if self.rng.uniform() < 0.8 { format!("mean({e})") } else { e };
        }
        let tensors: Vec<&str> = NAMES[..1 + self.rng.below(3)].to_vec();
        self.names = tensors.iter().map(|s| s.to_string()).collect();
        let mut s = format!("loss f({}", tensors.join(", "));
        if self.rng.uniform() < 0.5 {
            s += &format!("; a = {}", pick(self.rng, NUMBERS));
            self.names.push("a".into());
        }
        s += ") {\n";
        for i in 0..self.rng.below(3) {
            let v = self.expr(depth);
            s += &format!("    let v{i} = {v};\n");
            self.names.push(format!("v{i}"));
        }
        let result = self.expr(depth);
        s += &format!("    mean({result})\n}}\n");
        s
    }
}

fn generated(rng: &mut Rng) -> String {
    let mut g = Gen { rng, names: NAMES.iter().map(|s| s.to_string()).collect() };
    g.source()
}

fn fresh_seed() -> u64 {
    if let Ok(s) = std::env::var("LOSSC_FUZZ_SEED") {
        return s.parse().expect("LOSSC_FUZZ_SEED is a number");
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    Rng::new(nanos as u64 ^ u64::from(std::process::id())).next_u64()
}

/// Runs every case on a worker thread, so that a hang is reported instead of waited for.
#[test]
fn no_source_panics_or_hangs() {
    let seed = fresh_seed();
    let per_kind: usize = std::env::var("LOSSC_FUZZ_CASES").map_or(CASES_PER_KIND, |s| s.parse().expect("a number"));
    let mut rng = Rng::new(seed);
    let mut sources = Vec::with_capacity(3 * per_kind);
    for i in 0..3 * per_kind {
        sources.push(match i % 3 {
            0 => token_soup(&mut rng),
            1 => stdlib_mutant(&mut rng),
            _ => generated(&mut rng),
        });
    }
    // Every stdlib loss by name, and every stdlib file as it is.
    sources.extend(stdlib().defs.iter().map(|d| d.name.name.clone()));
    sources.extend(stdlib().files.iter().map(|f| f.text.to_string()));
    let total = sources.len();

    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<bool, String>, Duration)>();
    let cases = sources.clone();
    let start = Instant::now();
    std::thread::Builder::new()
        .name("fuzz-worker".into())
        .spawn(move || {
            for (i, src) in cases.iter().enumerate() {
                let t = Instant::now();
                let r = try_source(src, seed ^ i as u64);
                if done_tx.send((i, r, t.elapsed())).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the worker");

    let mut compiled = 0;
    let mut compiled_by_kind = [0usize; 3];
    let mut panics: Vec<(usize, String)> = Vec::new();
    let mut slowest = (Duration::ZERO, 0);
    for expected in 0..total {
        let (i, result, took) = match done_rx.recv_timeout(CASE_LIMIT) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "seed {seed}: case {expected} did not finish within {CASE_LIMIT:?} (a hang?). Source:\n{}",
                sources[expected]
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "seed {seed}: the worker died on case {expected} (a panic outside catch_unwind?). Source:\n{}",
                sources[expected]
            ),
        };
        assert_eq!(i, expected);
        assert!(
            took < CASE_LIMIT,
            "seed {seed}: case {i} took {took:?} (limit {CASE_LIMIT:?}). Source:\n{}",
            sources[i]
        );
        if took > slowest.0 {
            slowest = (took, i);
        }
        match result {
            Ok(true) => {
                compiled += 1;
                if i < 3 * per_kind {
                    compiled_by_kind[i % 3] += 1;
                }
            }
            Ok(false) => {}
            Err(message) => panics.push((i, message)),
        }
    }
    let elapsed = start.elapsed();
    eprintln!(
        "fuzz: seed {seed}, {total} sources, {compiled} compiled and evaluated (soups {}, mutants {}, \
         generated {}), {} panics, {elapsed:?} (slowest case {} took {:?})",
        compiled_by_kind[0],
        compiled_by_kind[1],
        compiled_by_kind[2],
        panics.len(),
        slowest.1,
        slowest.0
    );
    if !panics.is_empty() {
        let mut report =
            format!("seed {seed}: {} of {total} sources panic (LOSSC_FUZZ_SEED={seed} replays)\n", panics.len());
        for (i, message) in panics.iter().take(5) {
            let small = shrink(&sources[*i], seed ^ *i as u64);
            report += &format!("\n--- case {i}: {message}\nsource: {:?}\nshrunk: {small:?}\n", sources[*i]);
        }
        panic!("{report}");
    }
    // The generator is meant to reach evaluation often; if it stops doing so, it tests little.
    assert!(compiled * 20 >= total, "seed {seed}: only {compiled} of {total} sources compiled");
}

// Deep nesting: each case runs in a child process (this test binary, filtered to
// `deep_nesting_child`), so a stack overflow is a test failure, not an abort.

/// A source that nests `depth` levels of one kind of construct.
fn deep_source(kind: &str, depth: usize) -> String {
    match kind {
        "parens" => format!("sum({}p{})", "(".repeat(depth), ")".repeat(depth)),
        "calls" => format!("sum({}p{})", "exp(".repeat(depth), ")".repeat(depth)),
        "negation" => format!("sum({}p)", "-".repeat(depth)),
        "negated_parens" => format!("sum({}p{})", "-(".repeat(depth), ")".repeat(depth)),
        "power" => format!("sum(p{})", "^p".repeat(depth)),
        "sum_chain" => format!("sum(p{})", " + p".repeat(depth)),
        "stdlib_calls" => format!("{}p{}", "dice(sigmoid(".repeat(depth), "), y)".repeat(depth)),
        "sorted" => format!("{}sum(g){}", "sorted (p desc, g = y) { ".repeat(depth), " }".repeat(depth)),
        "let_chain" => {
            let mut s = String::from("loss f(p) {\n    let a0 = p;\n");
            for i in 1..=depth {
                s += &format!("    let a{i} = a{} * 0.5 + p;\n", i - 1);
            }
            s + &format!("    sum(a{depth})\n}}\n")
        }
        "loss_chain" => {
            let mut s = String::from("loss f0(p) = sum(p);\n");
            for i in 1..=depth {
                s += &format!("loss f{i}(p) = f{}(p) + 1;\n", i - 1);
            }
            s
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Kinds of nesting that are rejected or handled at any depth.
const DEEP_KINDS: &[&str] = &["parens", "calls", "negation", "negated_parens", "sum_chain", "stdlib_calls", "sorted"];

/// Kinds that overflow the stack of a 2 MiB test thread (debug build) at these depths:
/// `p^p^...^p` in the parser's Pratt recursion (~880), `show_grad` of a chain of `let`s in
/// `ir::print` (~376), and a chain of losses each calling the previous one in the
/// checker's inlining (~120).
const CHAIN_KINDS: &[&str] = &["power", "let_chain", "loss_chain"];

/// Every kind of nesting at small depths, in this process.
#[test]
fn shallow_nesting() {
    for kind in DEEP_KINDS.iter().chain(CHAIN_KINDS) {
        for depth in [1, 2, 10, 50] {
            let src = deep_source(kind, depth);
            if let Err(message) = try_source(&src, 1) {
                panic!("{kind} at depth {depth} panics: {message}\n{src}");
            }
        }
    }
}

/// Runs one deep case in a child process; `Err` describes how it died.
fn deep_in_child(kind: &str, depth: usize) -> Result<(), String> {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args(["deep_nesting_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("LOSSC_DEEP", format!("{kind}:{depth}"))
        .output()
        .expect("run the test binary");
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String =
        stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    Err(format!("{kind} at depth {depth}: the child exited with {} (a stack overflow aborts):\n{tail}", out.status))
}

fn deep_cases(kinds: &[&str], depths: &[usize]) {
    let mut failures = Vec::new();
    for kind in kinds {
        for &depth in depths {
            if let Err(e) = deep_in_child(kind, depth) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Each kind of nesting 200, 2,000 and 20,000 levels deep: an error is fine, a crash is not.
#[test]
fn deep_nesting() {
    deep_cases(DEEP_KINDS, &[200, 2_000, 20_000]);
}

/// As `deep_nesting`, for the kinds that once overflowed the stack: `^` chains,
/// `let` chains (printing) and chains of loss calls.
#[test]
fn deep_chains() {
    deep_cases(CHAIN_KINDS, &[200, 2_000, 20_000]);
}

/// The child side of `deep_nesting` and `deep_chains`: runs the case named by `LOSSC_DEEP=kind:depth`.
#[test]
#[ignore = "run by `deep_nesting` in a child process"]
fn deep_nesting_child() {
    let Ok(spec) = std::env::var("LOSSC_DEEP") else { return };
    let (kind, depth) = spec.split_once(':').expect("kind:depth");
    let src = deep_source(kind, depth.parse().expect("a depth"));
    let t = Instant::now();
    if let Err(message) = try_source(&src, 1) {
        panic!("{kind} at depth {depth} panics: {message}");
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{kind} at depth {depth} took {:?}", t.elapsed());
}
