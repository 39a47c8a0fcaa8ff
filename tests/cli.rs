//! The `lossc` binary as a user runs it: check, show, eval with .npy files, list, demo.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lossc::synth::{self, Rng};
use lossc::{Loss, Tensor};
use npyz::WriterBuilder;

fn lossc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lossc")).args(args).output().expect("runs lossc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lossc-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write_npy_f32(path: &Path, shape: &[u64], data: &[f64]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(file).begin_nd().expect("header");
    w.extend(data.iter().map(|&v| v as f32)).expect("data");
    w.finish().expect("finish");
}

fn write_npy_f64(path: &Path, shape: &[u64], data: &[f64]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(file).begin_nd().expect("header");
    w.extend(data.iter().copied()).expect("data");
    w.finish().expect("finish");
}

#[test]
fn check_reports_ok_and_errors_with_line_and_column() {
    let ok = lossc(&["check", "tversky"]);
    assert!(ok.status.success() && stdout(&ok).contains("tversky takes p, y"), "{}", stderr(&ok));
    let bad = lossc(&["check", "dice(p,\n  y"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("<expr>:2:4"), "{}", stderr(&bad));
    let typo = lossc(&["check", "dise(p, y)"]);
    assert!(stderr(&typo).contains("did you mean `dice`?"), "{}", stderr(&typo));
}

#[test]
fn check_reads_loss_files() {
    let dir = scratch("files");
    let path = dir.join("mine.loss");
    std::fs::write(&path, "/// Mine.\nloss mine(p, y; a = 2) {\n    let d = dice(p, y);\n    d ^ a\n}\n")
        .expect("write");
    let o = lossc(&["show", path.to_str().expect("utf-8"), "--params", "a=3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("loss mine(p, y; a = 3)"), "{}", stdout(&o));
    std::fs::write(&path, "loss mine(p, y) {\n    let d = dice(p, y)\n    d\n}\n").expect("write");
    let o = lossc(&["check", path.to_str().expect("utf-8")]);
    assert!(stderr(&o).contains("mine.loss:3:5"), "{}", stderr(&o));
}

#[test]
fn show_prints_the_canonical_form_and_gradient() {
    let o = lossc(&["show", "dice", "--grad"]);
    let text = stdout(&o);
    assert!(text.starts_with("loss dice(p, y; smooth = 1)\n"), "{text}");
    assert!(text.contains("  d/dp = ") && text.contains("  d/dy = "), "{text}");
    let o = lossc(&["show", "tversky", "--params", "alpha=0.3,beta=0.7"]);
    assert!(stdout(&o).starts_with("loss tversky(p, y; alpha = 0.3, beta = 0.7, smooth = 1)"));
    let o = lossc(&["show", "tversky", "--params", "gamma=2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown parameter `gamma`"), "{}", stderr(&o));
}

/// `eval` on float32 and float64 files agrees with the library's interpreter and
/// writes gradients in the input's dtype and shape.
#[test]
fn eval_with_npy_inputs_and_gradients() {
    let dir = scratch("eval");
    let loss = Loss::compile("dice_multiclass", "").expect("compiles");
    let ext = [2, 3, 20];
    let mut rng = Rng::new(rand::random());
    let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
    // NCHW: [2, 3, 4, 5] maps to [2, 3, 20].
    let shape = [2u64, 3, 4, 5];
    let (x, y) = (dir.join("x.npy"), dir.join("y.npy"));
    write_npy_f32(&x, &shape, &inputs[0].data);
    write_npy_f64(&y, &shape, &inputs[1].data);
    let gx = dir.join("gx.npy");
    let gy = dir.join("gy.npy");
    let arg = |k: &str, p: &Path| format!("{k}={}", p.display());
    let o = lossc(&[
        "eval",
        "dice_multiclass",
        "--backend",
        "interp",
        "--input",
        &arg("x", &x),
        "--input",
        &arg("y", &y),
        "--grad",
        &arg("x", &gx),
        "--grad",
        &arg("y", &gy),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed: f64 = stdout(&o).lines().last().expect("a value").parse().expect("a number");
    // The CLI read x as float32: evaluate the same rounded values here.
    let x32 = Tensor::new(ext, inputs[0].data.iter().map(|&v| f64::from(v as f32)).collect());
    let (want, grads) = loss.eval_grad(&[&x32, &inputs[1]]).expect("evaluates");
    assert_eq!(printed, want, "the value is printed with full precision");

    let gx_file = npyz::NpyFile::new(std::fs::File::open(&gx).expect("gx written")).expect("npy");
    assert_eq!(gx_file.shape(), &shape);
    assert_eq!(gx_file.dtype().descr(), "'<f4'", "float32 input, float32 gradient");
    let gx_data: Vec<f32> = gx_file.into_vec().expect("f32 data");
    for (a, b) in gx_data.iter().zip(&grads[0].data) {
        assert_eq!(*a, *b as f32);
    }
    let gy_file = npyz::NpyFile::new(std::fs::File::open(&gy).expect("gy written")).expect("npy");
    assert_eq!(gy_file.dtype().descr(), "'<f8'", "float64 input, float64 gradient");
    let gy_data: Vec<f64> = gy_file.into_vec().expect("f64 data");
    assert_eq!(gy_data, grads[1].data);

    // The default backend (native, float32) agrees to float32 accuracy.
    let o = lossc(&[
        "eval",
        "dice_multiclass",
        "--input",
        &arg("x", &x),
        "--input",
        &arg("y", &y),
        "--grad",
        &arg("x", &gx),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fast: f64 = stdout(&o).lines().last().expect("a value").parse().expect("a number");
    assert!((fast - want).abs() <= 1e-5 * want.abs(), "{fast} vs {want}");
    let gx_fast: Vec<f32> =
        npyz::NpyFile::new(std::fs::File::open(&gx).expect("gx")).expect("npy").into_vec().expect("f32");
    let scale = grads[0].data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (a, b) in gx_fast.iter().zip(&grads[0].data) {
        assert!((f64::from(*a) - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

#[test]
fn eval_reports_shape_and_input_errors() {
    let dir = scratch("errors");
    let (p, y) = (dir.join("p.npy"), dir.join("y.npy"));
    write_npy_f32(&p, &[2, 3, 4], &[0.5; 24]);
    write_npy_f32(&y, &[2, 2, 4], &[1.0; 16]);
    let arg = |k: &str, f: &Path| format!("{k}={}", f.display());
    let o = lossc(&["eval", "dice", "--input", &arg("p", &p), "--input", &arg("y", &y)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("broadcast") && stderr(&o).contains("`y`"), "{}", stderr(&o));
    let o = lossc(&["eval", "dice", "--input", &arg("p", &p)]);
    assert!(stderr(&o).contains("missing --input y="), "{}", stderr(&o));
    let o = lossc(&["eval", "dice", "--input", &arg("q", &p)]);
    assert!(stderr(&o).contains("no input `q`"), "{}", stderr(&o));
    let o = lossc(&["eval", "dice", "--input", "p=/nonexistent.npy", "--input", &arg("y", &y)]);
    assert!(stderr(&o).contains("/nonexistent.npy"), "{}", stderr(&o));
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // `lossc list | head -1`: the reader goes away before lossc writes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lossc"))
        .arg("list")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs lossc");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waits");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_ne!(out.status.code(), Some(101), "a panic's exit code");
}

#[test]
fn list_and_demo() {
    let o = lossc(&["list"]);
    let text = stdout(&o);
    assert!(text.lines().filter(|l| l.starts_with("lovasz")).count() >= 3, "{text}");
    let o = lossc(&["demo", "--stdlib"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).lines().filter(|l| l.contains('.')).count() >= 25, "{}", stdout(&o));
}

/// The README's first command: training with a loss given as text makes the loss
/// fall and the held-out IoU rise, for several losses.
#[test]
fn demo_trains() {
    for loss in [
        "0.5*dice(sigmoid(x), y) + bce_logits(x, y)",
        "lovasz_hinge(x, y)",
        "tversky(sigmoid(x), y, alpha = 0.3, beta = 0.7)",
    ] {
        let o = lossc(&["demo", "--loss", loss, "--steps", "120", "--seed", &rand::random::<u16>().to_string()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        let number_after = |key: &str| -> Vec<f64> {
            text.lines()
                .filter_map(|l| l.split(key).nth(1))
                .map(|rest| rest.split_whitespace().next().expect("a number").parse().expect("a number"))
                .collect()
        };
        let curve = number_after("] loss ");
        let (before, after) = (number_after("IoU before training: "), number_after("IoU after training: "));
        assert!(curve.len() >= 10 && curve.last() < curve.first(), "{loss}: the loss must fall\n{text}");
        assert!(after[0] > before[0] + 0.2, "{loss}: the IoU must rise\n{text}");
    }
    let o = lossc(&["demo", "--loss", "dice(p, y)"]);
    assert!(stderr(&o).contains("feeds logits `x`"), "{}", stderr(&o));
}

/// A header promising more than the file holds, and bool masks.
/// What would lose data or hang is refused with a message: a file with bytes past its data
/// or cut short, an input given twice, a gradient over an input file, an output that cannot
/// be written (and then no other output is left behind), an absurd thread count.
#[test]
fn eval_refuses_damaged_files_and_risky_requests() {
    let dir = scratch("risky");
    let (p, y) = (dir.join("p.npy"), dir.join("y.npy"));
    let mut rng = lossc::synth::Rng::new(rand::random());
    let values: Vec<f64> = (0..12).map(|_| rng.uniform()).collect();
    write_npy_f32(&p, &[1, 3, 4], &values);
    write_npy_f32(&y, &[1, 3, 4], &values.iter().map(|v| (v * 2.0).floor()).collect::<Vec<_>>());
    // `lossc eval dice` with these arguments: ("--input" or "--grad", name, file).
    let eval = |args: &[(&str, &str, &Path)]| {
        let mut all = vec!["eval".to_string(), "dice".to_string()];
        for (flag, name, file) in args {
            all.extend([flag.to_string(), format!("{name}={}", file.display())]);
        }
        lossc(&all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (i, g) = ("--input", "--grad");
    let bytes = std::fs::read(&p).expect("read");
    let (longer, shorter) = (dir.join("longer.npy"), dir.join("shorter.npy"));
    std::fs::write(&longer, [bytes.as_slice(), &[0u8; 8]].concat()).expect("write");
    std::fs::write(&shorter, &bytes[..bytes.len() - 6]).expect("write");
    let o = eval(&[(i, "p", &longer), (i, "y", &y)]);
    assert!(stderr(&o).contains("8 bytes follow the data"), "{}", stderr(&o));
    let o = eval(&[(i, "p", &shorter), (i, "y", &y)]);
    assert!(stderr(&o).contains("truncated") && stderr(&o).contains("48 bytes"), "{}", stderr(&o));
    let o = eval(&[(i, "p", &dir), (i, "y", &y)]);
    assert!(stderr(&o).contains("directory"), "{}", stderr(&o));
    let o = eval(&[(i, "p", &p), (i, "p", &y), (i, "y", &y)]);
    assert!(stderr(&o).contains("--input p is given twice"), "{}", stderr(&o));
    let o = eval(&[(i, "p", &p), (i, "y", &y), (g, "p", &p)]);
    assert!(stderr(&o).contains("would overwrite a file this run reads"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&p).expect("read"), bytes, "the input is intact");
    let o = eval(&[(i, "p", &p), (i, "y", &y), (g, "p", &longer)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = eval(&[(i, "p", &p), (i, "y", &y), (g, "p", &longer), (g, "y", &longer)]);
    assert!(stderr(&o).contains("two gradients would be written to"), "{}", stderr(&o));
    // A run that fails leaves an existing file as it was (and no temporary files).
    let before = std::fs::read(&longer).expect("read");
    let misshapen = dir.join("misshapen.npy");
    write_npy_f32(&misshapen, &[1, 1, 3], &values[..3]);
    let o = eval(&[(i, "p", &p), (i, "y", &misshapen), (g, "p", &longer)]);
    assert!(stderr(&o).contains("broadcast"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&longer).expect("read"), before, "an old gradient file survives a failed run");
    let dp = dir.join("dp.npy");
    let _ = std::fs::remove_file(&dp);
    let o = eval(&[(i, "p", &p), (i, "y", &y), (g, "p", &dp), (g, "y", Path::new("/nonexistent/dy.npy"))]);
    assert!(stderr(&o).contains("cannot write /nonexistent/dy.npy"), "{}", stderr(&o));
    assert!(!dp.exists(), "no gradient written when another cannot be");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".lossc-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let o = lossc(&[
        "eval",
        "dice",
        "--input",
        &format!("p={}", p.display()),
        "--input",
        &format!("y={}", y.display()),
        "--threads",
        "100000",
    ]);
    assert!(stderr(&o).contains("--threads must be between 1 and"), "{}", stderr(&o));
    // The environment variables rayon reads are held to the same bound (10000 took minutes).
    let with_env = |name: &str, value: &str| {
        Command::new(env!("CARGO_BIN_EXE_lossc"))
            .args(["eval", "dice", "--input", &format!("p={}", p.display()), "--input", &format!("y={}", y.display())])
            .env_remove("RAYON_NUM_THREADS")
            .env(name, value)
            .output()
            .expect("runs lossc")
    };
    let o = with_env("RAYON_NUM_THREADS", "10000");
    assert!(stderr(&o).contains("RAYON_NUM_THREADS=10000: at most 1024"), "{}", stderr(&o));
    let o = with_env("RAYON_RS_NUM_CPUS", "5000");
    assert!(stderr(&o).contains("RAYON_RS_NUM_CPUS=5000: at most 1024"), "{}", stderr(&o));
}

#[test]
fn npy_headers_are_validated_and_bools_read() {
    let dir = scratch("headers");
    // A header and 32 bytes of data; the error `lossc eval` gives for it.
    let refusal = |name: &str, header: &str| {
        let path = dir.join(name);
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let pad = 64 - (10 + header.len() + 1) % 64;
        let full = format!("{header}{}\n", " ".repeat(pad));
        bytes.extend((full.len() as u16).to_le_bytes());
        bytes.extend(full.as_bytes());
        bytes.extend([0u8; 32]);
        std::fs::write(&path, &bytes).expect("write");
        let o = lossc(&["eval", "mean(p)", "--input", &format!("p={}", path.display())]);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stderr(&o).contains(name) && !stderr(&o).contains("panicked"), "{}", stderr(&o));
        stderr(&o)
    };
    refusal("hostile.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }");
    // Nesting made npyz's parser take seconds per level beyond a dozen: refused at once.
    let deep = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': (8,), 'x': {}{}, }}",
        "[".repeat(40),
        "]".repeat(40)
    );
    assert!(refusal("deep.npy", &deep).contains("nests deeper"));
    // Nor can an escaped quote hide brackets from the check (npyz honours escapes).
    let escaped = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ['x\\' ', {}1{}, ' '], }}",
        "[".repeat(40),
        "]".repeat(40)
    );
    assert!(refusal("escaped.npy", &escaped).contains("backslash"));
    let extra = refusal("extra.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (8,), 'x': 1, }");
    assert!(extra.contains("exactly 'descr', 'fortran_order' and 'shape'"), "{extra}");
    let wide = refusal("wide.npy", "{'descr': '<u8', 'fortran_order': False, 'shape': (4,), }");
    assert!(wide.contains("unsupported dtype uint64; use float32"), "{wide}");

    let mask = dir.join("mask.npy");
    let file = std::io::BufWriter::new(std::fs::File::create(&mask).expect("create"));
    let mut w = npyz::WriteOptions::<bool>::new().default_dtype().shape(&[4]).writer(file).begin_nd().expect("header");
    w.extend([true, false, true, true]).expect("data");
    w.finish().expect("finish");
    let o = lossc(&["eval", "mean(m)", "--input", &format!("m={}", mask.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "0.75");
}

#[test]
fn emit_ptx() {
    let o = lossc(&["emit", "--ptx", "--sm", "90", "tversky"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(".target sm_90") && text.contains(".visible .entry lossc_sweep_2("), "{text}");
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let o = lossc(&["emit", "--ptx", "--classes", "3", "dice_multiclass"]);
    assert!(o.status.success() && stdout(&o).contains("C = 3 classes"), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // Without --classes a multiclass loss still gets its kernels, for one class, and a note.
    let o = lossc(&["emit", "--ptx", "dice_multiclass"]);
    assert!(o.status.success() && stdout(&o).contains("C = 1 class;"), "{}", stdout(&o));
    assert!(stderr(&o).contains("works over classes") && stderr(&o).contains("--classes N"), "{}", stderr(&o));
    let o = lossc(&["emit", "--ptx", "lovasz_hinge"]);
    assert!(!o.status.success() && stderr(&o).contains("do not run on the GPU"), "{}", stderr(&o));
    let o = lossc(&["emit", "--ptx", "--sm", "61", "dice"]);
    assert!(!o.status.success() && stderr(&o).contains("sm_70, sm_80 or sm_90"), "{}", stderr(&o));
}

#[test]
fn repeated_gradients_and_zero_demo_steps_are_refused() {
    let dir = scratch("repeats");
    let p = dir.join("p.npy");
    write_npy_f32(&p, &[1, 1, 4], &[0.2, 0.4, 0.6, 0.8]);
    let (a, b) = (dir.join("a.npy"), dir.join("b.npy"));
    let o = lossc(&[
        "eval",
        "mean(p * p)",
        "--input",
        &format!("p={}", p.display()),
        "--grad",
        &format!("p={}", a.display()),
        "--grad",
        &format!("p={}", b.display()),
    ]);
    assert!(stderr(&o).contains("--grad p is given twice"), "{}", stderr(&o));
    assert!(!a.exists() && !b.exists());
    let o = lossc(&["demo", "--steps", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("0 is not in 1.."), "{}", stderr(&o));
}
