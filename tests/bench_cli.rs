//! `lossc bench` as scripts use it: JSON lines with sane fields. Speed is never
//! asserted; only that the measurements exist and agree with each other.

use std::process::{Command, Output};

use serde_json::Value;

fn lossc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lossc")).args(args).output().expect("runs lossc")
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x}: {v}");
    x
}

#[test]
fn bench_json_has_time_traffic_probe_and_baseline() {
    let o = lossc(&["bench", "dice", "--sizes", "64K", "--runs", "2", "--threads", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1, "one loss, one size, one thread count");
    let r = &lines[0];
    assert_eq!(r["loss"], "dice");
    assert_eq!(r["shape"], serde_json::json!([1, 1, 65536]));
    assert_eq!(r["elements"], 65536);
    assert_eq!(r["threads"], 1);
    assert_eq!(r["runs"], 2);
    // Sweep 1 reads p and y; sweep 2 reads y and writes dp (dp needs only y and the sums).
    assert_eq!(r["sweeps"], 2);
    assert_eq!(r["bytes"], 4 * 4 * 65536);
    let (ms, probe) = (positive(r, "median_ms"), positive(r, "probe_ms"));
    assert!((positive(r, "probe_ratio") - ms / probe).abs() < 1e-9 * (ms / probe));
    assert!((positive(r, "gbps") - 4.0 * 4.0 * 65536.0 / ms / 1e6).abs() < 1e-9 * r["gbps"].as_f64().unwrap_or(0.0));
    assert!(r["sort_ms"].is_null(), "dice does not sort");
    assert_eq!(r["baseline"], "interp_f64");
    positive(r, "baseline_ms");
    let (value, reference) = (positive(r, "value"), positive(r, "baseline_value"));
    assert!((value - reference).abs() <= 1e-5 * reference, "{value} vs the interpreter's {reference}");
}

#[test]
fn bench_counts_become_multiclass_shapes_and_threads_are_rows() {
    let o = lossc(&[
        "bench",
        "dice_multiclass",
        "--sizes",
        "20K,2x3x100",
        "--threads",
        "1,2",
        "--runs",
        "1",
        "--no-baseline",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    let got: Vec<(Value, Value)> = lines.iter().map(|r| (r["shape"].clone(), r["threads"].clone())).collect();
    let want = [([4, 5, 1024], 1), ([4, 5, 1024], 2), ([2, 3, 100], 1), ([2, 3, 100], 2)];
    assert_eq!(got, want.map(|(s, t)| (serde_json::json!(s), serde_json::json!(t))));
    for r in &lines {
        assert_eq!(r["baseline"], "none");
        assert!(r["baseline_ms"].is_null());
        positive(r, "median_ms");
    }
}

/// A sorting loss also reports the same-run sort.
#[test]
fn bench_sort_losses_time_a_parallel_sort() {
    let o = lossc(&["bench", "lovasz_hinge", "--sizes", "4K", "--runs", "1", "--threads", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    positive(r, "median_ms");
    positive(r, "sort_ms");
    positive(r, "sort_ratio");
}

#[test]
fn bench_prints_a_table_and_rejects_bad_sizes() {
    let o = lossc(&["bench", "bce_logits", "--sizes", "4K", "--runs", "1", "--threads", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.lines().any(|l| l.starts_with("loss") && l.contains("x probe")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("bce_logits") && l.contains("1x1x4096")), "{text}");
    let o = lossc(&["bench", "dice", "--sizes", "4x5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("BxCxS"));
    // A size no machine can hold is refused in its row, not an aborted allocation (where
    // the available memory is known: Linux); one 64-bit indexing cannot reach, always.
    let sizes = if cfg!(target_os = "linux") { &["1000000M", "2000x1x1000000000"][..] } else { &[] };
    for &size in sizes {
        let o = lossc(&["bench", "dice", "--sizes", size, "--threads", "1", "--json"]);
        assert_eq!(o.status.code(), Some(1), "{size}: {}", String::from_utf8_lossy(&o.stderr));
        let lines = json_lines(&o);
        let error = lines[0]["error"].as_str().unwrap_or_else(|| panic!("{size}: no error in {}", lines[0]));
        assert!(error.contains("GB of working memory"), "{size}: {error}");
    }
    let o = lossc(&["bench", "dice", "--sizes", "1Gx1Gx1G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("64-bit indexing"));
}

#[test]
fn bench_compile_reports_latency_per_loss() {
    let o = lossc(&["bench", "--compile", "--json", "--runs", "2", "dice", "dice_multiclass"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    assert_eq!(lines.iter().map(|r| r["loss"].clone()).collect::<Vec<_>>(), ["dice", "dice_multiclass"]);
    assert_eq!(lines[1]["shape"], serde_json::json!([1, 4, 8]), "multiclass losses compile on 4 classes");
    for r in &lines {
        let total = positive(r, "median_ms");
        // Each run's compile is part of its total, so the medians are ordered too.
        assert!(positive(r, "compile_ms") <= total, "{r}");
        positive(r, "first_eval_ms");
    }
    let o = lossc(&["bench", "--compile", "dise"]);
    assert_eq!(o.status.code(), Some(1));
}
