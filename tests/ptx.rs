//! The PTX backend without a GPU: `ptxas` assembles the kernels of every stdlib loss for
//! each supported architecture, the PTX of a few losses is pinned by snapshots, losses the
//! GPU cannot run are refused with a clear error, and the CUDA path reports that this
//! machine has no device.
//!
//! `ptxas` is `$LOSSC_PTXAS`, else `ptxas` on `PATH`; `.ci/run` installs it from PyPI. A
//! missing ptxas skips the assembly test with a message, unless `LOSSC_REQUIRE_TOOLS=1`
//! (set by `.ci/run`), which makes it a failure.

use std::path::PathBuf;
use std::process::Command;

use lossc::backend::ptx::{self, Layout, Target};
use lossc::runtime::has_sort;
use lossc::Loss;

fn ptxas() -> Option<PathBuf> {
    let candidate = std::env::var_os("LOSSC_PTXAS").map(PathBuf::from).unwrap_or_else(|| "ptxas".into());
    if Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(candidate);
    }
    if std::env::var("LOSSC_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("LOSSC_REQUIRE_TOOLS=1 but ptxas is not available ({candidate:?}; set LOSSC_PTXAS)");
    }
    eprintln!("SKIPPED: ptxas not found (set LOSSC_PTXAS, or LOSSC_REQUIRE_TOOLS=1 to make this a failure)");
    None
}

/// Every stdlib entry loss, compiled with its defaults.
fn stdlib_losses() -> Vec<Loss> {
    lossc::stdlib::stdlib().defs.iter().filter_map(|d| Loss::compile(&d.name.name, "").ok()).collect()
}

#[test]
fn ptxas_assembles_every_stdlib_loss_for_every_target() {
    let Some(ptxas) = ptxas() else { return };
    let dir = std::env::temp_dir().join(format!("lossc-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let losses = stdlib_losses();
    assert!(losses.len() >= 30, "{}", losses.len());
    let mut jobs = Vec::new();
    for loss in losses.iter().filter(|l| !has_sort(l)) {
        for sm in Target::SUPPORTED {
            // Binary and multiclass: the class loop is unrolled, so 4 classes is other code.
            for classes in [1, 4] {
                let program =
                    loss.emit_ptx(&format!("sm_{sm}"), classes).unwrap_or_else(|e| panic!("{}: {e}", loss.name()));
                let file = dir.join(format!("{}_{sm}_{classes}.ptx", loss.name()));
                std::fs::write(&file, &program.text).expect("write ptx");
                jobs.push((format!("{} sm_{sm} C={classes}", loss.name()), sm, file));
            }
        }
    }
    let assembled = jobs.len();
    let mut failures = Vec::new();
    // A few assemblers at a time: most of the time is process start-up.
    for chunk in jobs.chunks(8) {
        let children: Vec<_> = chunk
            .iter()
            .map(|(_, sm, file)| {
                Command::new(&ptxas)
                    .args([format!("-arch=sm_{sm}").as_str(), "-o", "/dev/null"])
                    .arg(file)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("run ptxas")
            })
            .collect();
        for ((what, _, _), child) in chunk.iter().zip(children) {
            let out = child.wait_with_output().expect("ptxas runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() || stderr.contains("error") {
                failures.push(format!("{what}: {}\n{stderr}", out.status));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "ptxas rejected:\n{}", failures.join("\n"));
    assert!(assembled >= 6 * 27, "{assembled}");
}

#[test]
fn sort_based_losses_are_refused_with_a_reason() {
    for loss in stdlib_losses().iter().filter(|l| has_sort(l)) {
        let e = loss.emit_ptx("sm_80", 1).expect_err(loss.name()).to_string();
        assert!(e.contains("do not run on the GPU") && e.contains("Lovász"), "{}: {e}", loss.name());
    }
    let e = Loss::compile("dice", "").expect("compiles").emit_ptx("sm_75", 1).expect_err("sm_75").to_string();
    assert!(e.contains("sm_70, sm_80 or sm_90"), "{e}");
}

#[test]
fn every_kernel_is_described_and_launched_in_order() {
    let loss = Loss::compile("dice", "").expect("compiles");
    let program = loss.emit_ptx("sm_90", 1).expect("emits");
    let names: Vec<&str> = program.launches.iter().map(|l| l.kernel.as_str()).collect();
    assert_eq!(names, ["lossc_tail_0", "lossc_sweep_1", "lossc_tail_1", "lossc_sweep_2", "lossc_tail_2"]);
    for name in names {
        assert!(program.text.contains(&format!(".visible .entry {name}(")), "{name}");
        assert!(program.text.contains(&format!("//   {name}  grid")), "{name} is described");
    }
    assert!(program.text.contains(".target sm_90") && program.text.contains(".version 7.8"));
    // A one-sweep loss: value and gradient together.
    let focal = Loss::compile("focal", "").expect("compiles").emit_ptx("sm_70", 1).expect("emits");
    assert_eq!(focal.launches.len(), 3);
    assert!(focal.text.contains(".version 7.0"));
    // The workspace holds the loss, the tables and the block partials.
    assert!(program.workspace_len(2, 10) > program.workspace_len(2, 1));
    assert!(program.workspace_len(4, 10) > program.workspace_len(2, 10));
}

#[test]
fn ptx_snapshots() {
    for (name, classes) in [("dice", 1), ("tversky", 1), ("dice_multiclass", 4)] {
        let loss = Loss::compile(name, "").expect("compiles");
        let program =
            ptx::emit(&loss, &Layout::full(&loss, classes), Target::parse("sm_80").expect("target")).expect("emits");
        insta::assert_snapshot!(format!("ptx_{name}"), program.text);
    }
}
