//! Diagnostics: every user error carries a span and renders as
//! `file:line:col`, the line, an underline, and what was expected.

use std::fmt;
use std::sync::Arc;

/// Which source text a span points into: the user's, or a stdlib file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FileId(pub u16);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

/// One named source text.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: Arc<str>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> Self {
        SourceFile { name: name.into(), text: text.into() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A user error in a source: code, message, where, and what would fix it.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// A path naming the kind of mistake, e.g. `parse::unexpected_token`.
    pub code: &'static str,
    pub message: String,
    pub span: Span,
    /// Text shown under the underline.
    pub label: String,
    pub notes: Vec<String>,
    pub help: Option<String>,
    /// The call the error was found inside, labelled where it is in the same file (a
    /// user's loss calling another of their own).
    pub call: Option<(Span, String)>,
}

impl Diagnostic {
    pub fn new(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic { code, message: message.into(), span, label: String::new(), notes: vec![], help: None, call: None }
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Diagnostics together with the source files their spans point into,
/// so that they can be rendered anywhere (CLI, C ABI, tests).
#[derive(Clone, Debug)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    pub files: Vec<SourceFile>,
}

impl Diagnostics {
    fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    /// The name file `i` is shown under: unique, so that a user's file named like a
    /// built-in one (`stdlib/dice.loss`) is never rendered against the wrong text.
    fn display_name(&self, i: usize) -> String {
        let name = &self.files[i].name;
        if self.files[..i].iter().any(|f| &f.name == name) {
            format!("{name} (built-in)")
        } else {
            name.clone()
        }
    }

    /// `file:line:col: error[code]: message` for each diagnostic, one per line.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for d in &self.items {
            let f = self.file(d.span.file);
            let (line, col) = f.line_col(d.span.start);
            if !out.is_empty() {
                out.push('\n');
            }
            out += &format!("{}:{line}:{col}: error[{}]: {}", f.name, d.code, d.message);
        }
        out
    }

    /// The full report: location, the source line, an underline, notes and help.
    /// Plain ASCII and no colour, so it is stable text for snapshots and C callers.
    pub fn render(&self) -> String {
        use ariadne::{CharSet, Config, Label, Report, ReportKind};
        let mut out = Vec::new();
        for d in &self.items {
            let name = self.display_name(d.span.file.0 as usize);
            let text_len = self.file(d.span.file).text.len();
            let start = d.span.start.min(text_len);
            let end = d.span.end.clamp(start, text_len);
            let mut report = Report::build(ReportKind::Error, (name.clone(), start..end))
                .with_config(
                    Config::default()
                        .with_color(false)
                        .with_char_set(CharSet::Ascii)
                        .with_index_type(ariadne::IndexType::Byte),
                )
                .with_code(d.code)
                .with_message(&d.message)
                .with_label(Label::new((name.clone(), start..end)).with_message(&d.label));
            for (call, label) in d.call.iter().filter(|(call, _)| call.file == d.span.file) {
                let start = call.start.min(text_len);
                report = report
                    .with_label(Label::new((name.clone(), start..call.end.clamp(start, text_len))).with_message(label));
            }
            for n in &d.notes {
                report = report.with_note(n);
            }
            if let Some(h) = &d.help {
                report = report.with_help(h);
            }
            let cache = ariadne::sources(
                self.files.iter().enumerate().map(|(i, f)| (self.display_name(i), f.text.to_string())),
            );
            report.finish().write(cache, &mut out).expect("invariant: writing a report to a Vec cannot fail");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}
