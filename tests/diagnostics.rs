//! Snapshot tests of the rendered diagnostics: one malformed or ill-typed source
//! per kind of mistake, with its diagnostic code and the `line:col` it must point at.
//! Also `Error::Params` (hyperparameter lists) and `Error::Shape` (input shapes).
//!
//! Regenerate the snapshots with `INSTA_UPDATE=always cargo test --test diagnostics`,
//! then read every changed `.snap` file under `tests/snapshots/`.

use lossc::{Error, Loss, Program, Tensor};

/// Compiles `src` as `input.loss`; it must fail with `code`, pointing at `at` (`line:col`).
fn check(name: &str, src: &str, code: &str, at: &str) {
    let err = match Program::parse("input.loss", src).and_then(|p| p.compile(&[])) {
        Ok(loss) => panic!("{name}: expected error {code}, but this compiled as `{}`:\n{src}", loss.name()),
        Err(e) => e,
    };
    let got = match &err {
        Error::Source(d) => {
            assert_eq!(d.items.len(), 1, "{name}: one diagnostic expected");
            d.items[0].code
        }
        other => panic!("{name}: expected a source diagnostic, got {other:?}"),
    };
    let rendered = err.render();
    assert_eq!(got, code, "{name}: wrong code for:\n{src}\n{rendered}");
    let location = format!("input.loss:{at} ]");
    assert!(rendered.contains(&location), "{name}: expected the report at {at}:\n{rendered}");
    let summary = err.to_string();
    assert!(
        summary.starts_with(&format!("input.loss:{at}: error[{code}]: ")),
        "{name}: the one-line summary agrees on the location: {summary}"
    );
    assert!(rendered.contains(&format!("[{code}]")), "{name}: the report names its code:\n{rendered}");
    insta::with_settings!({ description => src, omit_expression => true }, {
        insta::assert_snapshot!(name, rendered);
    });
}

/// One test per case: `case!(name, source, code, "line:col")`.
macro_rules! case {
    ($name:ident, $src:expr, $code:expr, $at:expr) => {
        #[test]
        fn $name() {
            $crate::check(stringify!($name), $src, $code, $at);
        }
    };
}

/// The cases, one per line (so not formatted).
#[rustfmt::skip]
mod cases {
    // Syntax.
    case!(unbalanced_paren, "dice(p, y", "parse::unexpected_end", "1:10");
    case!(extra_close_paren, "sum(p))", "parse::unexpected_token", "1:7");
    case!(unbalanced_brace, "loss f(p) {\n    sum(p)", "parse::unexpected_end", "2:11");
    case!(unexpected_end_after_operator, "loss f(p) {\n    let a = sum(p);\n    a +", "parse::unexpected_end", "3:8");
    case!(unexpected_end_empty_source, "", "parse::unexpected_end", "1:1");
    case!(unexpected_token_operator, "a + * b", "parse::unexpected_token", "1:5");
    case!(unexpected_token_character, "sum(p) @ 2", "parse::unexpected_token", "1:8");
    case!(missing_body, "loss f(p, y)\nloss g(p) = sum(p)", "parse::unexpected_token", "2:1");
    case!(hyperparameter_without_default, "loss f(p; a) = sum(p)", "parse::unexpected_token", "1:11");
    case!(doc_comment_on_expression, "/// Doc.\nsum(p)", "parse::unexpected_token", "2:1");
    case!(bad_number_exponent, "sum(p) * 1e", "parse::bad_number", "1:10");
    case!(bad_number_two_points, "loss f(p) =\n    1.2.3 * sum(p);", "parse::bad_number", "2:5");
    case!(bad_number_suffix, "sum(p) * 2x", "parse::bad_number", "1:10");
    case!(number_out_of_range, "sum(p) * 1e999", "parse::number_out_of_range", "1:10");
    case!(keyword_as_loss_name, "loss let(x) = x", "parse::unexpected_token", "1:6");
    case!(keyword_as_let_name, "loss f(p) {\n    let sorted = p;\n    sum(sorted)\n}", "parse::unexpected_token", "2:9");
    case!(keyword_as_parameter, "loss f(p, desc) = sum(p * desc)", "parse::unexpected_token", "1:11");

    // Names and calls.
    case!(unknown_name, "loss f(p, y) {\n    let tp = sum(p * y);\n    tp / sum(q)\n}", "check::unknown_name", "3:14");
    case!(unknown_name_with_suggestion, "loss f(pred, y) = sum(prd * y)", "check::unknown_name", "1:23");
    case!(unknown_function, "dcie(p, y)", "check::unknown_function", "1:1");
    case!(unknown_function_no_suggestion, "loss f(p) = frobnicate(p)", "check::unknown_function", "1:13");
    case!(builtin_arity, "sum(exp(p, y))", "check::arity", "1:5");
    case!(builtin_too_few, "sum(clamp(p, 0))", "check::arity", "1:5");
    case!(too_many_arguments, "dice(p, y, 1, 2)", "check::too_many_arguments", "1:15");
    case!(missing_tensor, "loss f(p, y) =\n    dice(p) + sum(y);", "check::missing_argument", "2:5");
    case!(unknown_named_argument, "dice(p, y, smoth = 2)", "check::unknown_argument", "1:12");
    case!(unknown_builtin_argument, "sum(p, bye = class)", "check::unknown_argument", "1:8");
    case!(named_argument_to_unary, "sum(exp(p, by = class))", "check::unknown_argument", "1:12");
    case!(duplicate_argument, "dice(p, y, smooth = 1, smooth = 2)", "check::duplicate_argument", "1:24");
    case!(duplicate_positional_and_named, "dice(p, y, p = y)", "check::duplicate_argument", "1:12");
    case!(duplicate_builtin_argument, "sum(p, mask = y, mask = y)", "check::duplicate_argument", "1:18");
    case!(positional_after_named, "dice(p, y = y, 2)", "check::positional_after_named", "1:16");
    case!(duplicate_parameter, "loss f(p, y; p = 1) = sum(p * y)", "check::duplicate_parameter", "1:14");
    case!(duplicate_let, "loss f(p, y) {\n    let a = sum(p);\n    let a = sum(y);\n    a\n}", "check::duplicate_binding", "3:9");
    case!(duplicate_definition, "loss f(p) = sum(p);\nloss g(p) = f(p);\nloss f(p) = mean(p);", "check::duplicate_definition", "3:6");
    case!(sorted_header_duplicate, "sorted (x desc, g = y, g = x) { sum(g) }", "check::duplicate_binding", "1:24");
    case!(default_not_scalar, "loss g(p; s = sum(p, by = class)) = sum(p) * s;\nloss f(p) = g(p);", "check::default_not_scalar", "1:15");
    case!(calls_too_deep, "loss f0(p) = sum(p);\nloss f1(p) = f0(p);\nloss f2(p) = f1(p);\nloss f3(p) = f2(p);\nloss f4(p) = f3(p);\nloss f5(p) = f4(p);\nloss f6(p) = f5(p);\nloss f7(p) = f6(p);\nloss f8(p) = f7(p);\nloss f9(p) = f8(p);\nloss f10(p) = f9(p);\nloss f11(p) = f10(p);\nloss f12(p) = f11(p);\nloss f13(p) = f12(p);\nloss f14(p) = f13(p);\nloss f15(p) = f14(p);\nloss f16(p) = f15(p);\nloss f17(p) = f16(p);\nloss f18(p) = f17(p);\nloss f19(p) = f18(p);\nloss f20(p) = f19(p);\nloss f21(p) = f20(p);\nloss f22(p) = f21(p);\nloss f23(p) = f22(p);\nloss f24(p) = f23(p);\nloss f25(p) = f24(p);\nloss f26(p) = f25(p);\nloss f27(p) = f26(p);\nloss f28(p) = f27(p);\nloss f29(p) = f28(p);\nloss f30(p) = f29(p);\nloss f31(p) = f30(p);\nloss f32(p) = f31(p);\nloss f33(p) = f32(p);", "check::calls_too_deep", "3:14");
    case!(recursive_call, "loss f(p, y) =\n    f(p, y) + sum(p);", "check::recursive_call", "2:5");
    case!(mutually_recursive_call, "loss g(p) = sum(p) + h(p);\nloss h(p) = g(p);\nloss f(p) = h(p);", "check::recursive_call", "1:22");
    case!(non_constant_default, "loss f(p; a = sum(p)) = a * sum(p)", "check::default_not_constant", "1:15");
    case!(calls_double_per_level, "loss f0(x) = x;\nloss f1(x) = f0(x) + f0(x * 2);\nloss f2(x) = f1(x) + f1(x * 3);\nloss f3(x) = f2(x) + f2(x * 4);\nloss f4(x) = f3(x) + f3(x * 5);\nloss f5(x) = f4(x) + f4(x * 6);\nloss f6(x) = f5(x) + f5(x * 7);\nloss f7(x) = f6(x) + f6(x * 8);\nloss f8(x) = f7(x) + f7(x * 9);\nloss f9(x) = f8(x) + f8(x * 10);\nloss f10(x) = f9(x) + f9(x * 11);\nloss f11(x) = f10(x) + f10(x * 12);\nloss f12(x) = f11(x) + f11(x * 13);\nloss f13(x) = f12(x) + f12(x * 14);\nloss f14(x) = f13(x) + f13(x * 15);\nloss f15(x) = f14(x) + f14(x * 16);\nloss f16(x) = f15(x) + f15(x * 17);\nloss main(x) = mean(f16(x));", "check::too_large", "4:22");
    case!(error_in_own_callee, "loss f(a, b) = mean(softmax(a) * b);\nloss g(x[batch, spatial], y) = f(x, y);", "shape::missing_class_axis", "1:29");
    case!(non_finite_default, "loss f(p; a = 1, b = a / 0) = b * sum(p)", "check::default_not_finite", "1:22");
    case!(default_refers_to_later, "loss f(p; a = b, b = 1) = a * sum(p)", "check::unknown_name", "1:15");
    case!(hyperparameter_not_scalar, "dice(p, y, smooth = p)", "check::hyperparameter_not_scalar", "1:21");
    case!(hyperparameter_per_class, "loss f(p, y) = dice(p, y,\n    smooth = sum(p, by = class));", "check::hyperparameter_not_scalar", "2:14");

    // Values that are not values.
    case!(non_scalar_entry, "loss f(p, y) {\n    let d = p * y;\n    d\n}", "check::non_scalar_entry", "3:5");
    case!(non_scalar_entry_per_batch, "sum(p, by = batch)", "check::non_scalar_entry", "1:1");
    case!(axis_as_value, "sum(p * class)", "check::axis_as_value", "1:9");
    case!(function_as_value, "sum(p * dice)", "check::function_as_value", "1:9");
    case!(builtin_as_value, "loss f(p) = sum(mean)", "check::function_as_value", "1:17");
    case!(tuple_as_value, "sum((p, y))", "check::misplaced_tuple", "1:5");

    // Axes.
    case!(axis_mismatch, "sum(sum(p), by = class)", "shape::missing_axis", "1:18");
    case!(axis_mismatch_declared, "loss f(w[class]) = sum(sum(w, by = batch))", "shape::missing_axis", "1:36");
    case!(unknown_axis, "sum(p, by = clas)", "check::unknown_axis", "1:13");
    case!(unknown_axis_in_tuple, "sum(p, by = (batch, spacial))", "check::unknown_axis", "1:21");
    case!(unknown_axis_declared, "loss f(p[batch, clas]) = sum(p)", "check::unknown_axis", "1:17");
    case!(not_an_axis, "sum(p, by = 1)", "check::expected_axes", "1:13");
    case!(softmax_without_class_axis, "sum(softmax(sum(p, by = batch)))", "shape::missing_class_axis", "1:13");
    case!(softmax_inside_stdlib, "dice_multiclass(sum(x, by = batch), y)", "shape::missing_class_axis", "1:1");
    case!(onehot_of_classes, "loss f(x, t) = -sum(onehot(t) * log_softmax(x))", "shape::onehot_of_classes", "1:28");
    case!(argument_axes, "dice_multiclass_weighted(x, y, sum(w, by = batch) * x)", "shape::argument_axes", "1:32");
    case!(argument_axes_user_loss, "loss g(a[batch]) = sum(a);\nloss f(p) = g(p);", "shape::argument_axes", "2:15");

    // Sorted blocks and scans.
    case!(cumsum_outside_sorted, "sum(cumsum(p))", "check::scan_outside_sorted", "1:5");
    case!(prev_outside_sorted, "loss f(p) = sum(p * prev(p, 0))", "check::scan_outside_sorted", "1:21");
    case!(prev_non_constant_init, "sorted (p desc, g = y) {\n    sum(prev(g, sum(p)))\n}", "check::prev_init_not_constant", "2:17");
    case!(prev_arity, "sorted (p desc, g = y) { sum(prev(g)) }", "check::arity", "1:30");
    case!(by_inside_sorted, "sorted (p desc, g = y) { sum(g, by = batch) }", "check::by_inside_sorted", "1:38");
    case!(nested_sorted, "loss f(p, y) = sorted (p desc, g = y) {\n    sum(g) * sorted (p asc, h = y) { sum(h) }\n};", "check::nested_sorted", "2:14");
    case!(unreduced_sorted, "sum(sorted (p desc, g = y) { g * 2 })", "shape::unreduced_sorted", "1:30");
    case!(unsorted_in_sorted, "loss f(p, y) = sorted (p desc) {\n    sum(p * y)\n};", "shape::unsorted_in_sorted", "2:9");
    case!(softmax_inside_sorted, "sorted (x desc, g = x) { sum(softmax(g)) }", "shape::needs_element_order", "1:30");
    case!(unknown_sorted_option, "sorted (p desc, g = y; group = batch) { sum(g) }", "check::unknown_option", "1:24");
    case!(sorted_by_unknown_axis, "mean(sorted (p desc, g = y; by = bach) { sum(g) })", "check::unknown_axis", "1:34");
}

/// At the end of input, the location is just after the last token, even when a
/// trailing newline follows it (as without the newline, see `unbalanced_brace`).
#[test]
fn unexpected_end_after_trailing_newline() {
    let Err(err) = Program::parse("input.loss", "loss f(p) {\n    sum(p)\n") else {
        panic!("expected a parse error");
    };
    assert!(err.render().contains("input.loss:2:11 ]"), "{}", err.render());
    assert!(err.to_string().starts_with("input.loss:2:11:"), "{err}");
}

// Hyperparameter lists: `Error::Params`, which has no source to point into.

fn params_error(params: &str) -> String {
    match Loss::compile("tversky", params) {
        Err(Error::Params(m)) => m,
        Err(other) => panic!("`{params}`: expected Error::Params, got {other:?}"),
        Ok(_) => panic!("`{params}`: expected an error"),
    }
}

#[test]
fn params_unknown_name() {
    let m = params_error("alpah=0.3");
    assert!(m.contains("`alpah`"), "{m}");
    assert!(m.contains("tversky"), "{m}");
    assert!(m.contains("alpha, beta, smooth"), "lists the known ones: {m}");
}

#[test]
fn params_missing_value() {
    let m = params_error("alpha");
    assert!(m.contains("name=value"), "{m}");
    assert!(m.contains("`alpha`"), "{m}");
}

#[test]
fn params_not_a_number() {
    let m = params_error("alpha=abc");
    assert!(m.contains("`abc`") && m.contains("not a number"), "{m}");
}

#[test]
fn params_not_finite() {
    let m = params_error("beta=0.5, alpha=inf");
    assert!(m.contains("`alpha`") && m.contains("finite"), "{m}");
}

#[test]
fn params_on_a_bare_expression() {
    match Loss::compile("sum(p)", "alpha=1") {
        Err(Error::Params(m)) => assert!(m.contains("`alpha`") && m.contains("none"), "{m}"),
        other => panic!("expected Error::Params, got {:?}", other.map(|l| l.show())),
    }
    let e = Loss::compile("tversky", "alpah=0.3").unwrap_err();
    assert!(e.render().starts_with("error: "), "{}", e.render());
}

// Input shapes: `Error::Shape`.

fn filled(shape: [usize; 3]) -> Tensor {
    Tensor::new(shape, vec![0.5; shape.iter().product()])
}

fn shape_error(source: &str, inputs: &[&Tensor]) -> String {
    let loss = Loss::compile(source, "").expect("compiles");
    let eval = match loss.eval(inputs) {
        Err(Error::Shape(m)) => m,
        other => panic!("`{source}`: expected Error::Shape, got {other:?}"),
    };
    // eval_grad checks the same way.
    match loss.eval_grad(inputs) {
        Err(Error::Shape(m)) => assert_eq!(m, eval),
        other => panic!("`{source}`: expected Error::Shape, got {:?}", other.map(|r| r.0)),
    }
    eval
}

#[test]
fn shape_mismatch_names_input_shapes_and_rule() {
    let (p, y) = (filled([2, 3, 5]), filled([2, 4, 5]));
    let m = shape_error("dice", &[&p, &y]);
    assert!(m.contains("`p`"), "names the input: {m}");
    assert!(m.contains("`y`"), "names the other input: {m}");
    assert!(m.contains("[2, 3, 5]"), "shape given: {m}");
    assert!(m.contains("[2, 4, 5]"), "shape expected: {m}");
    assert!(m.contains("class"), "names the axis: {m}");
    assert!(m.contains("broadcast"), "says the rule: {m}");
}

#[test]
fn shape_mismatch_spatial() {
    let (p, y) = (filled([2, 3, 5]), filled([2, 3, 7]));
    let m = shape_error("bce", &[&p, &y]);
    assert!(m.contains("`p`") && m.contains("`y`"), "{m}");
    assert!(m.contains("[2, 3, 5]") && m.contains("[2, 3, 7]"), "{m}");
    assert!(m.contains("spatial") && m.contains("broadcast"), "{m}");
}

#[test]
fn shape_broadcast_is_accepted() {
    let loss = Loss::compile("dice", "").unwrap();
    let (p, y) = (filled([2, 3, 5]), filled([1, 3, 1]));
    assert!(loss.eval(&[&p, &y]).is_ok());
}

#[test]
fn shape_outer_product_is_refused() {
    // Logits [8] against targets [8, 1]: 8 positions against 8 batch items.
    let (x, y) = (filled([1, 1, 8]), filled([8, 1, 1]));
    let m = shape_error("bce_logits", &[&x, &y]);
    assert!(m.contains("[8, 1, 8]") && m.contains("`x` [1, 1, 8]") && m.contains("`y` [8, 1, 1]"), "{m}");
    assert!(m.contains("one input must have the full shape"), "{m}");
    // Broadcasting against the largest input stays: scores against a mask shared by the classes.
    let loss = Loss::compile("mean(x * m)", "").unwrap();
    assert!(loss.eval(&[&filled([2, 3, 5]), &filled([2, 1, 5])]).is_ok());
    // So do inputs whose declared axes split the broadcast between them.
    let loss = Loss::compile("loss g(t[batch, spatial], w[class]) = sum(onehot(t) * w) / sum(onehot(t));", "").unwrap();
    let t = Tensor::new([1, 1, 5], vec![0.0, 1.0, 2.0, 1.0, 0.0]);
    assert!(loss.eval(&[&t, &filled([1, 3, 1])]).is_ok());
    let loss = Loss::compile("loss f(x[batch, spatial], w[class]) = mean(x * w);", "").unwrap();
    assert!(loss.eval(&[&filled([2, 1, 5]), &filled([1, 3, 1])]).is_ok());
}

#[test]
fn shape_declared_axes() {
    let (x, y, w) = (filled([2, 3, 5]), filled([2, 3, 5]), filled([2, 3, 5]));
    let m = shape_error("dice_multiclass_weighted", &[&x, &y, &w]);
    assert!(m.contains("`w`") && m.contains("[2, 3, 5]"), "{m}");
    assert!(m.contains("class") && m.contains("batch"), "{m}");
}

#[test]
fn shape_wrong_number_of_inputs() {
    let p = filled([2, 3, 5]);
    let m = shape_error("dice", &[&p]);
    assert!(m.contains("dice") && m.contains("2 inputs"), "{m}");
    assert!(m.contains("p, y"), "names the inputs: {m}");
    let m = shape_error("dice", &[&p, &p, &p]);
    assert!(m.contains("3"), "{m}");
}

#[test]
fn shape_empty_input() {
    let (p, y) = (filled([2, 3, 5]), filled([2, 0, 5]));
    let m = shape_error("dice", &[&p, &y]);
    assert!(m.contains("`y`") && m.contains("empty"), "{m}");
}

/// Every diagnostic code the sources can emit is in docs/language.md's table of codes.
#[test]
fn every_code_is_documented() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/language.md")).expect("docs");
    let mut missing = Vec::new();
    let mut seen = 0;
    let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).expect("src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for piece in text.split('"').skip(1).step_by(2) {
                let code = piece.split_once("::").filter(|(kind, rest)| {
                    ["parse", "check", "shape"].contains(kind)
                        && !rest.is_empty()
                        && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
                if code.is_some() {
                    seen += 1;
                    if !docs.contains(&format!("| `{piece}` |")) {
                        missing.push(format!("{piece} ({})", path.display()));
                    }
                }
            }
        }
    }
    assert!(seen > 40, "found only {seen} codes: has the source layout changed?");
    assert!(missing.is_empty(), "codes missing from docs/language.md's table:\n{}", missing.join("\n"));
}
