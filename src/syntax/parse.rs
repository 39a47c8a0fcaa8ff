//! One `parse_x` function per grammar rule; precedence in a `PrattParser`.

use std::sync::OnceLock;

use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;
use pest_derive::Parser;

use super::ast::*;
use crate::diag::{Diagnostic, FileId, Span};

#[derive(Parser)]
#[grammar = "../grammar/lossc.pest"]
struct LosscParser;

/// Parses a whole source. `file` tags every span with where it came from.
pub fn parse(text: &str, file: FileId) -> Result<SourceItem, Diagnostic> {
    check_nesting(text, file)?;
    // Track literal tokens too, so errors can say "expected `,` or `)`".
    pest::set_error_detail(true);
    let mut pairs = LosscParser::parse(Rule::file, text).map_err(|e| parse_error(e, text, file))?;
    let file_pair = pairs.next().expect("invariant: the file rule matched");
    let cx = Cx { file };
    let mut defs = Vec::new();
    for pair in file_pair.into_inner() {
        match pair.as_rule() {
            Rule::loss_def => defs.push(cx.loss_def(pair)?),
            Rule::expr => return Ok(SourceItem::Expr(cx.expr(pair)?)),
            Rule::EOI => {}
            r => unreachable!("file holds loss_def or expr, not {r:?}"),
        }
    }
    Ok(SourceItem::Defs(defs))
}

/// How deeply brackets and prefix operators may nest. The parser and every pass
/// after it recurse over the tree, so a limit here keeps any input from
/// overflowing the stack; real losses nest a few levels.
pub const MAX_NESTING: usize = 200;

fn check_nesting(text: &str, file: FileId) -> Result<(), Diagnostic> {
    let mut depth = 0usize;
    let mut run = 0usize; // consecutive prefix minus signs, which nest
    let mut powers = 0usize; // `^` is right-associative: a chain of them nests
    let mut in_comment = false;
    for (i, c) in text.char_indices() {
        if in_comment || text[i..].starts_with("//") {
            in_comment = c != '\n';
            continue;
        }
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '-' => run += 1,
            '^' => powers += 1,
            c if c.is_whitespace() => {}
            _ => run = 0,
        }
        // Any other operator or bracket ends a chain of `^`.
        if "+*/<>=!,;()[]{}".contains(c) {
            powers = 0;
        }
        if depth > MAX_NESTING || run > MAX_NESTING || powers > MAX_NESTING {
            return Err(Diagnostic::new(
                "parse::too_deep",
                Span { file, start: i, end: i + c.len_utf8() },
                "the source nests too deeply",
            )
            .label(format!("more than {MAX_NESTING} levels deep here"))
            .help("split the expression with `let`"));
        }
    }
    Ok(())
}

/// The expression, unless its tree is deeper than `MAX_NESTING`.
fn bounded(e: Expr) -> Result<Expr, Diagnostic> {
    if e.depth as usize > MAX_NESTING {
        return Err(Diagnostic::new("parse::too_deep", e.span, "the expression nests too deeply")
            .label(format!("more than {MAX_NESTING} levels of operators and calls"))
            .help(
                "split it into smaller pieces with `let` (a chain a + b + c + ... nests one level per \
                 operator: sum long chains in parts, `let s1 = a1 + ... + a100;`, then `s1 + s2 + ...`)",
            ));
    }
    Ok(e)
}

fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: OnceLock<PrattParser<Rule>> = OnceLock::new();
    PRATT.get_or_init(|| {
        // Lowest precedence first. `^` binds tighter than unary minus: -x^2 is -(x^2).
        PrattParser::new()
            .op(Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left)
                | Op::infix(Rule::eq, Assoc::Left)
                | Op::infix(Rule::ne, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left))
            .op(Op::prefix(Rule::neg))
            .op(Op::infix(Rule::pow, Assoc::Right))
    })
}

struct Cx {
    file: FileId,
}

type R<T> = Result<T, Diagnostic>;

impl Cx {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        Span { file: self.file, start: s.start(), end: s.end() }
    }

    fn ident(&self, pair: Pair<Rule>) -> Ident {
        debug_assert_eq!(pair.as_rule(), Rule::ident);
        Ident { name: pair.as_str().to_string(), span: self.span(&pair) }
    }

    fn loss_def(&self, pair: Pair<Rule>) -> R<LossDef> {
        let span = self.span(&pair);
        let mut doc = Vec::new();
        let mut name = None;
        let mut tensors = Vec::new();
        let mut hypers = Vec::new();
        let mut body = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::doc => {
                    let text = p.into_inner().next().map_or("", |t| t.as_str());
                    doc.push(text.strip_prefix(' ').unwrap_or(text).trim_end().to_string());
                }
                Rule::kw_loss => {}
                Rule::ident => name = Some(self.ident(p)),
                Rule::params => (tensors, hypers) = self.params(p)?,
                Rule::block => body = Some(self.block(p)?),
                Rule::expr => body = Some(Block { lets: vec![], result: Box::new(self.expr(p)?) }),
                r => unreachable!("unexpected {r:?} in loss_def"),
            }
        }
        Ok(LossDef {
            name: name.expect("invariant: loss_def has a name"),
            doc,
            tensors,
            hypers,
            body: body.expect("invariant: loss_def has a body"),
            span,
        })
    }

    fn params(&self, pair: Pair<Rule>) -> R<(Vec<TensorParam>, Vec<HyperParam>)> {
        let mut tensors = Vec::new();
        let mut hypers = Vec::new();
        for list in pair.into_inner() {
            for p in list.into_inner() {
                let mut inner = p.clone().into_inner();
                let name = self.ident(inner.next().expect("invariant: param has a name"));
                match p.as_rule() {
                    Rule::tensor_param => {
                        let axes = inner.next().map(|a| a.into_inner().map(|i| self.ident(i)).collect());
                        tensors.push(TensorParam { name, axes });
                    }
                    Rule::hyper_param => {
                        let default = self.expr(inner.next().expect("invariant: hyper has a default"))?;
                        hypers.push(HyperParam { name, default });
                    }
                    r => unreachable!("unexpected {r:?} in params"),
                }
            }
        }
        Ok((tensors, hypers))
    }

    fn block(&self, pair: Pair<Rule>) -> R<Block> {
        let mut lets = Vec::new();
        let mut result = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::let_stmt => {
                    let mut inner = p.into_inner().skip(1); // kw_let
                    let name = self.ident(inner.next().expect("invariant: let has a name"));
                    let value = self.expr(inner.next().expect("invariant: let has a value"))?;
                    lets.push((name, value));
                }
                Rule::expr => result = Some(self.expr(p)?),
                r => unreachable!("unexpected {r:?} in block"),
            }
        }
        Ok(Block { lets, result: Box::new(result.expect("invariant: block ends in an expression")) })
    }

    fn expr(&self, pair: Pair<Rule>) -> R<Expr> {
        pratt()
            .map_primary(|p| self.primary(p))
            .map_prefix(|op, rhs| {
                let rhs = rhs?;
                let span = Span { file: self.file, start: op.as_span().start(), end: rhs.span.end };
                bounded(Expr::new(ExprKind::Neg(Box::new(rhs)), span))
            })
            .map_infix(|lhs, op, rhs| {
                let (lhs, rhs) = (lhs?, rhs?);
                let op = match op.as_rule() {
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::div => BinOp::Div,
                    Rule::pow => BinOp::Pow,
                    Rule::lt => BinOp::Lt,
                    Rule::le => BinOp::Le,
                    Rule::gt => BinOp::Gt,
                    Rule::ge => BinOp::Ge,
                    Rule::eq => BinOp::Eq,
                    Rule::ne => BinOp::Ne,
                    r => unreachable!("not an infix operator: {r:?}"),
                };
                let span = Span { file: self.file, start: lhs.span.start, end: rhs.span.end };
                bounded(Expr::new(ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span))
            })
            .parse(pair.into_inner())
    }

    fn primary(&self, pair: Pair<Rule>) -> R<Expr> {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::number => {
                let text = pair.as_str();
                let v: f64 = text.parse().expect("invariant: the grammar only admits valid numbers");
                if !v.is_finite() {
                    return Err(Diagnostic::new(
                        "parse::number_out_of_range",
                        span,
                        format!("number `{text}` is too large"),
                    )
                    .label("does not fit in a 64-bit float")
                    .help("numbers must be below 1.8e308 in magnitude"));
                }
                ExprKind::Number(v)
            }
            Rule::bad_number => ExprKind::BadNumber(pair.as_str().to_string()),
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            Rule::expr => return self.expr(pair),
            Rule::call => {
                let mut inner = pair.into_inner();
                let func = self.ident(inner.next().expect("invariant: call has a name"));
                let args = inner.map(|a| self.arg(a)).collect::<R<Vec<_>>>()?;
                ExprKind::Call { func, args }
            }
            Rule::tuple => ExprKind::Tuple(pair.into_inner().map(|p| self.expr(p)).collect::<R<_>>()?),
            Rule::sorted => ExprKind::Sorted(Box::new(self.sorted(pair)?)),
            r => unreachable!("unexpected primary {r:?}"),
        };
        bounded(Expr::new(kind, span))
    }

    fn arg(&self, pair: Pair<Rule>) -> R<Arg> {
        let mut name = None;
        let mut value = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => name = Some(self.ident(p)),
                _ => value = Some(self.primary(p)?),
            }
        }
        Ok(Arg { name, value: value.expect("invariant: arg has a value") })
    }

    fn sorted(&self, pair: Pair<Rule>) -> R<SortedBlock> {
        let mut key = None;
        let mut key_value = None;
        let mut descending = true;
        let mut binds = Vec::new();
        let mut options = Vec::new();
        let mut body = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::kw_sorted => {}
                Rule::sort_key => {
                    for q in p.into_inner() {
                        match q.as_rule() {
                            Rule::ident => key = Some(self.ident(q)),
                            Rule::expr => key_value = Some(self.expr(q)?),
                            Rule::order => descending = q.as_str() == "desc",
                            r => unreachable!("unexpected {r:?} in sort_key"),
                        }
                    }
                }
                Rule::sort_bind => {
                    let mut inner = p.into_inner();
                    let name = self.ident(inner.next().expect("invariant: bind has a name"));
                    let value = inner.next().map(|e| self.expr(e)).transpose()?;
                    binds.push((name, value));
                }
                Rule::sort_opt => {
                    let mut inner = p.into_inner();
                    let name = self.ident(inner.next().expect("invariant: option has a name"));
                    let value = self.primary(inner.next().expect("invariant: option has a value"))?;
                    options.push((name, value));
                }
                Rule::block => body = Some(self.block(p)?),
                r => unreachable!("unexpected {r:?} in sorted"),
            }
        }
        Ok(SortedBlock {
            key: key.expect("invariant: sorted has a key"),
            key_value,
            descending,
            binds,
            options,
            body: body.expect("invariant: sorted has a body"),
        })
    }
}

/// A human name for each rule, used in "expected ..." messages.
fn rule_name(rule: &Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of input",
        Rule::file => "`loss` definition or expression",
        Rule::loss_def => "`loss` definition",
        Rule::doc | Rule::doc_text => "doc comment",
        Rule::params | Rule::tensor_list | Rule::tensor_param => "parameter name",
        Rule::axis_list => "`[axes]`",
        Rule::hyper_list | Rule::hyper_param => "hyperparameter `name = default`",
        Rule::block => "`{`",
        Rule::let_stmt => "`let`",
        Rule::expr | Rule::primary => "expression",
        Rule::infix => "operator",
        Rule::prefix | Rule::neg | Rule::sub => "`-`",
        Rule::add => "`+`",
        Rule::mul => "`*`",
        Rule::div => "`/`",
        Rule::pow => "`^`",
        Rule::le => "`<=`",
        Rule::ge => "`>=`",
        Rule::lt => "`<`",
        Rule::gt => "`>`",
        Rule::eq => "`==`",
        Rule::ne => "`!=`",
        Rule::number | Rule::bad_number => "number",
        Rule::call => "call",
        Rule::arg => "argument",
        Rule::tuple => "`(a, b)`",
        Rule::sorted => "`sorted`",
        Rule::sort_key => "sort key `name desc`",
        Rule::order => "`desc` or `asc`",
        Rule::sort_bind => "`name = value`",
        Rule::sort_opt => "`by = axes`",
        Rule::keyword => "keyword",
        Rule::kw_loss => "`loss`",
        Rule::kw_let => "`let`",
        Rule::kw_sorted => "`sorted`",
        Rule::kw_desc => "`desc`",
        Rule::kw_asc => "`asc`",
        Rule::ident | Rule::ident_char => "name",
        Rule::WHITESPACE | Rule::COMMENT => "whitespace",
    }
}

fn parse_error(e: pest::error::Error<Rule>, text: &str, file: FileId) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, p),
        InputLocation::Span(s) => s,
    };
    // At the end of input, point just past the last token, not at a trailing newline.
    let (start, end) = if start >= text.trim_end().len() {
        let last = text.trim_end().len();
        (last, last)
    } else {
        (start, end)
    };
    // Underline the offending token (or the end of input).
    let end = if end > start {
        end
    } else {
        let rest = &text[start.min(text.len())..];
        let token = rest.chars().next().map_or(0, |c| {
            if c.is_alphanumeric() || c == '_' {
                rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len())
            } else {
                c.len_utf8()
            }
        });
        start + token
    };
    let span = Span { file, start, end };
    let found =
        if start >= text.trim_end().len() { "end of input".to_string() } else { format!("`{}`", &text[start..end]) };
    let attempts = e.parse_attempts();
    match e.variant {
        ErrorVariant::ParsingError { positives, negatives } => {
            // An empty file expects the file rule itself: name what it starts with, as a
            // file of only whitespace does.
            let positives: Vec<Rule> = positives
                .into_iter()
                .flat_map(|r| if r == Rule::file { vec![Rule::loss_def, Rule::expr] } else { vec![r] })
                .collect();
            let mut expected: Vec<String> = positives.iter().map(|r| rule_name(r).to_string()).collect();
            if let Some(attempts) = attempts {
                for t in attempts.expected_tokens() {
                    // Punctuation only: names, numbers and keywords come from the rule names.
                    let token = t.to_string();
                    if !matches!(token.as_str(), "" | "_" | ".")
                        && !token.starts_with("//")
                        && token.chars().all(|c| c.is_ascii_punctuation())
                    {
                        expected.push(format!("`{token}`"));
                    }
                }
            }
            let operators =
                ["`+`", "`-`", "`*`", "`/`", "`^`", "`<`", "`<=`", "`>`", "`>=`", "`==`", "`!=`", "operator"];
            if expected.iter().filter(|e| operators.contains(&e.as_str())).count() > 2 {
                expected.retain(|e| !operators.contains(&e.as_str()));
                expected.push("an operator".into());
            }
            expected.sort_unstable();
            expected.dedup();
            let what = match expected.len() {
                0 => String::new(),
                1 => expected[0].to_string(),
                n => format!("{} or {}", expected[..n - 1].join(", "), expected[n - 1]),
            };
            let code = if found == "end of input" { "parse::unexpected_end" } else { "parse::unexpected_token" };
            let mut d = Diagnostic::new(code, span, format!("unexpected {found}"));
            d = if what.is_empty() {
                let unwanted: Vec<&str> = negatives.iter().map(rule_name).collect();
                // (a keyword where a name was expected)
                d.label(format!("{} is not allowed here", unwanted.join(", ")))
            } else {
                d.label(format!("expected {what}"))
            };
            let word = &text[start..end];
            if ["loss", "let", "sorted", "desc", "asc"].contains(&word) && what.contains("name") {
                d = d.help(format!("`{word}` is a keyword and cannot be used as a name"));
            } else if found == "end of input" && text.matches('(').count() > text.matches(')').count() {
                d = d.help("a `(` is never closed");
            } else if found == "end of input" && text.matches('{').count() > text.matches('}').count() {
                d = d.help("a `{` is never closed");
            }
            d
        }
        ErrorVariant::CustomError { message } => Diagnostic::new("parse::error", span, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(src: &str) -> String {
        match parse(src, FileId(0)).unwrap() {
            SourceItem::Expr(e) => sexpr(&e),
            SourceItem::Defs(d) => format!("{} defs", d.len()),
        }
    }

    fn sexpr(e: &Expr) -> String {
        match &e.kind {
            ExprKind::Number(v) => format!("{v}"),
            ExprKind::Name(n) => n.clone(),
            ExprKind::Neg(a) => format!("(neg {})", sexpr(a)),
            ExprKind::Binary(op, a, b) => format!("({op:?} {} {})", sexpr(a), sexpr(b)),
            ExprKind::Call { func, args } => {
                let a: Vec<String> = args.iter().map(|a| sexpr(&a.value)).collect();
                format!("({} {})", func.name, a.join(" "))
            }
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        assert_eq!(show("\u{feff}mean(x)"), "(mean x)");
        assert_eq!(show("\u{feff}loss f(x) = x;"), "1 defs");
    }

    #[test]
    fn power_binds_tighter_than_unary_minus() {
        assert_eq!(show("-x^2"), "(neg (Pow x 2))");
    }

    #[test]
    fn power_is_right_associative() {
        assert_eq!(show("a^b^c"), "(Pow a (Pow b c))");
    }

    #[test]
    fn usual_precedence() {
        assert_eq!(show("a + b * c - d / e"), "(Sub (Add a (Mul b c)) (Div d e))");
        assert_eq!(show("-a * b"), "(Mul (neg a) b)");
        assert_eq!(show("a < b + 1"), "(Lt a (Add b 1))");
    }

    #[test]
    fn numbers_with_exponents() {
        assert_eq!(show("1e-7 + 2.5E3 + .5"), "(Add (Add 0.0000001 2500) 0.5)");
    }

    #[test]
    fn comments_and_doc_comments() {
        let src = "// a comment\n/// Doc line.\nloss f(p, y; a = 1) = sum(p * y) // trailing\n";
        match parse(src, FileId(0)).unwrap() {
            SourceItem::Defs(d) => assert_eq!(d[0].doc, vec!["Doc line."]),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let e = parse("dice(p,\n  y", FileId(0)).unwrap_err();
        assert_eq!(e.code, "parse::unexpected_end");
        let e = parse("a + * b", FileId(0)).unwrap_err();
        assert_eq!((e.span.start, e.code), (4, "parse::unexpected_token"));
    }
}
