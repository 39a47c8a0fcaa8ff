//! The C ABI from real clients: the committed header against a fresh cbindgen run,
//! a C11 program against `liblossc.so` (also under valgrind) and `liblossc.a`, eight
//! C threads on one loss, the README's minimal example (also through `lossc.pc`), the
//! C++ trainer, Python's ctypes, and the Python package (python/).
//!
//! The first test to need them builds the library's cdylib and staticlib next to this
//! test's binary (`target/<profile>/`, with `cargo build --lib`), so the clients link
//! against the code under test. The C and
//! C++ compilers, valgrind, pkg-config and python3 are found on `PATH`; a missing one
//! skips its test with a message, unless `LOSSC_REQUIRE_TOOLS=1` (set by `.ci/run`),
//! which turns it into a failure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"];
const CXX_FLAGS: &[&str] = &["-std=c++17", "-Wall", "-Wextra", "-Werror"];
/// What the Rust staticlib needs from the system when linked into a C program.
const STATIC_LIBS: &[&str] = &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn root(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

/// `target/<profile>`, holding `liblossc.so` and `liblossc.a` built from this source.
/// `cargo test` builds the library only as an rlib, so the first call builds the C
/// products with `cargo build --lib` for the same profile and target folder (quick
/// when they are up to date; never stale).
fn lib_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test binary's path");
            let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf();
            let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug").to_string();
            let target = dir.parent().expect("target/<profile>");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(ROOT).args(["build", "--lib", "--target-dir"]).arg(target);
            match profile.as_str() {
                "debug" => {}
                "release" => {
                    cmd.arg("--release");
                }
                other => {
                    cmd.args(["--profile", other]);
                }
            }
            run(&mut cmd);
            for lib in ["liblossc.so", "liblossc.a"] {
                assert!(dir.join(lib).exists(), "{} is missing after `cargo build --lib`", dir.join(lib).display());
            }
            dir
        })
        .clone()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = lib_dir().join("c_abi").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Whether every tool is on PATH; if not, skips (locally) or fails (CI).
fn tools(names: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> =
        names.iter().copied().filter(|n| !std::env::split_paths(&path).any(|d| d.join(n).is_file())).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("LOSSC_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("LOSSC_REQUIRE_TOOLS=1 but {} not on PATH", missing.join(", "));
    }
    eprintln!("SKIPPED: {} not on PATH (set LOSSC_REQUIRE_TOOLS=1 to make this a failure)", missing.join(", "));
    false
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{cmd:?}\nexit: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    eprintln!("{text}");
    out
}

/// Compiles C or C++ `sources` into `exe`, linked against liblossc (shared with an rpath,
/// or static).
fn build(compiler: &str, flags: &[&str], sources: &[&str], exe: &Path, link_static: bool) {
    let lib = lib_dir();
    let mut cmd = Command::new(compiler);
    cmd.args(flags)
        .arg("-I")
        .arg(root("include"))
        .arg(format!("-DLOSSC_TEST_VERSION=\"{}\"", env!("CARGO_PKG_VERSION")));
    cmd.args(sources.iter().map(|s| root(s))).arg("-o").arg(exe);
    if link_static {
        cmd.arg(lib.join("liblossc.a")).args(STATIC_LIBS);
    } else {
        cmd.arg("-L").arg(&lib).arg("-llossc").arg(format!("-Wl,-rpath,{}", lib.display())).arg("-lm");
    }
    run(&mut cmd);
}

// ---------------------------------------------------------------------------
// The header.
// ---------------------------------------------------------------------------

/// `include/lossc.h` is what cbindgen makes of `src/capi.rs` today.
/// `LOSSC_BLESS=1 cargo test --test c_abi header` rewrites it.
#[test]
fn header_is_current() {
    let config = cbindgen::Config::from_file(root("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root("src/capi.rs"))
        .generate()
        .expect("cbindgen reads src/capi.rs");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("the header is UTF-8");
    let path = root("include/lossc.h");
    if std::env::var("LOSSC_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/lossc.h");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/lossc.h is stale: regenerate it with `LOSSC_BLESS=1 cargo test --test c_abi header` \
         and commit it\n--- generated\n{fresh}"
    );
}

/// Every function the header declares is called by the C client.
#[test]
fn c_client_calls_every_function() {
    let header = std::fs::read_to_string(root("include/lossc.h")).expect("include/lossc.h");
    let client = std::fs::read_to_string(root("tests/c/capi_test.c")).expect("tests/c/capi_test.c");
    let declared: Vec<&str> = header
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#') && !l.starts_with('*') && l.contains('('))
        .filter_map(|l| l.split('(').next()?.rsplit([' ', '*']).next())
        .filter(|name| name.starts_with("lossc_"))
        .collect();
    assert!(declared.len() >= 20, "{declared:?}");
    let missing: Vec<&&str> = declared.iter().filter(|f| !client.contains(&format!("{f}("))).collect();
    assert!(missing.is_empty(), "tests/c/capi_test.c never calls {missing:?}");
}

// ---------------------------------------------------------------------------
// The C client and its fixture.
// ---------------------------------------------------------------------------

/// (source, params, [batch, class, spatial]): stdlib losses, overridden parameters,
/// broadcast class weights, a sorting loss and a combined expression. The first must
/// be `dice` on `[B, 1, S]`: the error checks use it.
const CASES: &[(&str, &str, [usize; 3])] = &[
    ("dice", "-", [2, 1, 64]),
    ("tversky", "alpha=0.3,beta=0.7", [2, 1, 64]),
    ("iou", "-", [2, 1, 64]),
    ("bce_logits", "pos_weight=2", [2, 1, 64]),
    ("focal", "-", [2, 1, 64]),
    ("lovasz_hinge", "-", [2, 1, 64]),
    ("dice_multiclass", "-", [2, 3, 32]),
    ("dice_multiclass_weighted", "-", [2, 3, 32]),
    ("0.5*dice(sigmoid(x),y)+bce_logits(x,y)", "-", [2, 1, 64]),
    ("dice_bce", "smooth=2", [2, 1, 64]),
];

fn numbers(out: &mut String, values: impl IntoIterator<Item = f64>) {
    for v in values {
        // `{:e}` is the shortest text that reads back as the same double.
        write!(out, " {v:e}").expect("write to a String");
    }
    out.push('\n');
}

/// The fixture `tests/c/capi_test.c` reads: inputs (float32 values, written as
/// doubles), the reference value, gradients and terms, and dice's canonical text.
fn fixture() -> String {
    let mut out = format!("cases {}\n", CASES.len());
    let mut rng = Rng::new(2024);
    for &(source, params, ext) in CASES {
        let loss = Loss::compile(source, if params == "-" { "" } else { params }).expect("a case compiles");
        let inputs: Vec<Tensor> = synth::inputs(loss.inputs(), ext, &mut rng)
            .into_iter()
            .map(|t| Tensor { shape: t.shape, data: t.data.iter().map(|&v| f64::from(v as f32)).collect() })
            .collect();
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let (value, grads) = loss.eval_grad(&refs).expect("the reference evaluates");
        let terms: Vec<f64> = loss.terms().iter().map(|t| t.eval(&refs).expect("a term evaluates")).collect();
        writeln!(out, "case {source} {params} {} {}", inputs.len(), terms.len()).expect("write");
        for (spec, t) in loss.inputs().iter().zip(&inputs) {
            write!(out, "input {} {} {} {}", spec.name, t.shape[0], t.shape[1], t.shape[2]).expect("write");
            numbers(&mut out, t.data.iter().copied());
        }
        writeln!(out, "value {value:e}").expect("write");
        for (spec, g) in loss.inputs().iter().zip(&grads) {
            write!(out, "grad {}", spec.name).expect("write");
            numbers(&mut out, g.data.iter().copied());
        }
        out.push_str("terms");
        numbers(&mut out, terms);
    }
    let dice = Loss::compile("dice", "").expect("dice");
    for (word, text) in [("show", dice.show()), ("show_grad", dice.show_grad())] {
        write!(out, "{word} {}\n{text}", text.len()).expect("write");
    }
    out
}

/// The C client, built against the header and `liblossc.so` or `liblossc.a`.
fn c_client(name: &str, link_static: bool) -> Option<(PathBuf, PathBuf)> {
    if !tools(&["cc"]) {
        return None;
    }
    let dir = scratch(name);
    let fixture_path = dir.join("fixture.txt");
    std::fs::write(&fixture_path, fixture()).expect("write the fixture");
    let exe = dir.join("capi_test");
    build("cc", C_FLAGS, &["tests/c/capi_test.c"], &exe, link_static);
    Some((exe, fixture_path))
}

#[test]
fn c_client_shared() {
    let Some((exe, fixture)) = c_client("shared", false) else { return };
    run(Command::new(exe).arg(fixture));
}

#[test]
fn c_client_static() {
    let Some((exe, fixture)) = c_client("static", true) else { return };
    run(Command::new(exe).arg(fixture));
}

/// The shared-library client under valgrind memcheck: no errors, no definite leaks.
#[test]
fn c_client_valgrind() {
    if !tools(&["valgrind"]) {
        return;
    }
    let Some((exe, fixture)) = c_client("valgrind", false) else { return };
    let out = run(Command::new("valgrind")
        .args(["--error-exitcode=1", "--leak-check=full", "--errors-for-leak-kinds=definite"])
        // JIT code is written to fresh pages; make valgrind notice any rewrite.
        .arg("--smc-check=all-non-file")
        .arg(exe)
        .arg(fixture));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "valgrind reported errors:\n{stderr}");
    assert!(
        stderr.contains("definitely lost: 0 bytes") || stderr.contains("All heap blocks were freed"),
        "valgrind reported a definite leak:\n{stderr}"
    );
}

/// Eight C threads share one loss; results equal the single-threaded ones bit for bit.
#[test]
fn c_threads_share_one_loss() {
    if !tools(&["cc"]) {
        return;
    }
    let exe = scratch("threads").join("threads");
    let flags: Vec<&str> = C_FLAGS.iter().copied().chain(["-pthread"]).collect();
    build("cc", &flags, &["tests/c/threads.c"], &exe, false);
    run(&mut Command::new(exe));
}

/// More than 2^31 elements through the C ABI: value and every gradient element right
/// (64-bit indexing in the runtime and the kernels). Needs 17 GiB of memory and about four
/// minutes (the C check is built without optimisation):
/// `cargo test --release --test c_abi -- --ignored past_two`.
#[test]
#[ignore = "needs 17 GiB of memory"]
fn c_client_past_two_to_the_31() {
    if !tools(&["cc"]) {
        return;
    }
    let exe = scratch("huge").join("huge");
    build("cc", C_FLAGS, &["tests/c/huge.c"], &exe, false);
    run(&mut Command::new(exe));
}

// ---------------------------------------------------------------------------
// The minimal example, pkg-config, the trainer, ctypes.
// ---------------------------------------------------------------------------

/// `examples/minimal.c` is the README's example, word for word, and it runs.
#[test]
fn readme_minimal_example() {
    let example = std::fs::read_to_string(root("examples/minimal.c")).expect("examples/minimal.c");
    let readme = std::fs::read_to_string(root("README.md")).expect("README.md");
    assert!(readme.contains(&format!("```c\n{example}```")), "README.md's C example differs from examples/minimal.c");
    if !tools(&["cc"]) {
        return;
    }
    let exe = scratch("minimal").join("minimal");
    build("cc", C_FLAGS, &["examples/minimal.c"], &exe, false);
    let out = run(&mut Command::new(exe));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = Loss::compile("dice(sigmoid(x), y)", "")
        .expect("compiles")
        .eval(&[&Tensor::new([1, 1, 4], vec![2.0, -1.0, 0.5, -3.0]), &Tensor::new([1, 1, 4], vec![1.0, 0.0, 1.0, 0.0])])
        .expect("evaluates");
    assert!(stdout.contains(&format!("expr = {want:.6}")), "{stdout}");
}

/// `pkgconfig/lossc.pc` after an install into a prefix: the flags it gives build the
/// minimal example, and its version is the crate's.
#[test]
fn pkg_config_file() {
    let pc = std::fs::read_to_string(root("pkgconfig/lossc.pc")).expect("pkgconfig/lossc.pc");
    assert!(pc.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))), "lossc.pc's version is stale");
    if !tools(&["cc", "pkg-config"]) {
        return;
    }
    let prefix = scratch("pkg-config");
    for (from, to) in [
        (root("include/lossc.h"), "include/lossc.h"),
        (lib_dir().join("liblossc.so"), "lib/liblossc.so"),
        (lib_dir().join("liblossc.a"), "lib/liblossc.a"),
        (root("pkgconfig/lossc.pc"), "lib/pkgconfig/lossc.pc"),
    ] {
        let to = prefix.join(to);
        std::fs::create_dir_all(to.parent().expect("a folder")).expect("mkdir");
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
    let flags = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .arg(format!("--define-variable=prefix={}", prefix.display()))
        .args(["--cflags", "--libs", "lossc"]));
    let flags = String::from_utf8(flags.stdout).expect("UTF-8");
    let exe = prefix.join("minimal");
    run(Command::new("cc")
        .args(C_FLAGS)
        .arg(root("examples/minimal.c"))
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&exe));
    run(&mut Command::new(exe));
}

/// Parses the trainer's `epoch N  loss L  iou I` lines.
fn curve(stdout: &str) -> Vec<(f64, f64)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("epoch"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[3].parse().expect("a loss"), w[5].parse().expect("an IoU"))
        })
        .collect()
}

/// The C++ trainer learns with each loss: the loss falls and the IoU rises.
#[test]
fn cpp_trainer_learns() {
    if !tools(&["c++"]) {
        return;
    }
    let exe = scratch("trainer").join("trainer");
    build("c++", CXX_FLAGS, &["examples/trainer.cpp"], &exe, false);
    for loss in ["dice", "tversky", "lovasz_hinge", "0.5*dice(sigmoid(x), y) + bce_logits(x, y)"] {
        let out = run(Command::new(&exe).args([loss, "30"]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let curve = curve(&stdout);
        assert_eq!(curve.len(), 31, "{loss}: one line per epoch\n{stdout}");
        let (first, last) = (curve[0], curve[curve.len() - 1]);
        assert!(last.0 < first.0, "{loss}: the loss did not fall\n{stdout}");
        assert!(last.1 > first.1 + 0.3 && last.1 > 0.6, "{loss}: the IoU did not rise enough\n{stdout}");
    }
}

/// Python loads liblossc.so with ctypes and calls compile, eval, last_error, free.
#[test]
fn python_ctypes() {
    if !tools(&["python3"]) {
        return;
    }
    let p = Tensor::new([1, 1, 4], [0.1f32, 0.9, 0.8, 0.3].iter().map(|&v| f64::from(v)).collect());
    let y = Tensor::new([1, 1, 4], vec![0.0, 1.0, 1.0, 0.0]);
    let (value, grads) = Loss::compile("dice", "").expect("dice").eval_grad(&[&p, &y]).expect("evaluates");
    let mut cmd = Command::new("python3");
    cmd.arg(root("tests/c/ctypes_smoke.py")).arg(lib_dir().join("liblossc.so")).arg(format!("{value:e}"));
    cmd.args(grads[0].data.iter().map(|g| format!("{g:e}")));
    run(&mut cmd);
}

/// The Python package (python/lossc: NumPy, PyTorch, JAX and Keras layers) on this
/// build of liblossc: its unittest suite, against formulas written in each framework.
/// With NumPy but not every framework, only the NumPy tests run (locally; CI has all).
#[test]
fn python_package() {
    if !tools(&["python3"]) {
        return;
    }
    let imports = |modules: &str| {
        let probe =
            Command::new("python3").args(["-c", &format!("import {modules}")]).env("KERAS_BACKEND", "jax").output();
        probe.is_ok_and(|o| o.status.success())
    };
    let require = std::env::var("LOSSC_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    let mut cmd = Command::new("python3");
    cmd.current_dir(root("python")).args(["-m", "unittest"]);
    if imports("numpy, torch, jax, keras") {
        cmd.args(["discover", "-s", "tests", "-v"]);
    } else {
        let message = "python3 cannot `import numpy, torch, jax, keras` (pip install numpy torch 'jax[cpu]' keras)";
        assert!(!require, "LOSSC_REQUIRE_TOOLS=1 but {message}");
        if !imports("numpy") {
            eprintln!("SKIPPED: {message}");
            return;
        }
        eprintln!("SKIPPED the framework tests: {message}");
        cmd.args(["-v", "tests/test_numpy.py"]);
    }
    cmd.env("LOSSC_LIBRARY", lib_dir().join("liblossc.so"))
        .env("PYTHONPATH", root("python"))
        .env("KERAS_BACKEND", "jax");
    run(&mut cmd);
}
