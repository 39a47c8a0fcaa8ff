//! Output of `lossc bench`: one JSON object per line, or an aligned table.
//! JSON is written by hand: flat objects of strings, numbers and one array need
//! no serialisation framework.

use std::fmt::Write;

/// A flat JSON object, built field by field in order.
#[derive(Default)]
pub struct Json(String);

impl Json {
    pub fn str(mut self, key: &str, value: &str) -> Json {
        self.key(key);
        quote(&mut self.0, value);
        self
    }

    /// A number; NaN and infinities become `null` (JSON has no spelling for them).
    pub fn num(mut self, key: &str, value: f64) -> Json {
        self.key(key);
        if value.is_finite() {
            write!(self.0, "{value}").expect("invariant: writing to a String");
        } else {
            self.0.push_str("null");
        }
        self
    }

    pub fn opt(self, key: &str, value: Option<f64>) -> Json {
        match value {
            Some(v) => self.num(key, v),
            None => self.null(key),
        }
    }

    pub fn int(mut self, key: &str, value: usize) -> Json {
        self.key(key);
        write!(self.0, "{value}").expect("invariant: writing to a String");
        self
    }

    pub fn ints(mut self, key: &str, values: &[usize]) -> Json {
        self.key(key);
        let items: Vec<String> = values.iter().map(usize::to_string).collect();
        write!(self.0, "[{}]", items.join(",")).expect("invariant: writing to a String");
        self
    }

    pub fn null(mut self, key: &str) -> Json {
        self.key(key);
        self.0.push_str("null");
        self
    }

    fn key(&mut self, key: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        quote(&mut self.0, key);
        self.0.push(':');
    }

    /// The object as one line.
    pub fn line(self) -> String {
        if self.0.is_empty() {
            "{}".into()
        } else {
            self.0 + "}"
        }
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).expect("invariant: writing to a String"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A table column: header, width, and whether the text is right-aligned (numbers).
pub struct Column {
    pub name: &'static str,
    pub width: usize,
    pub right: bool,
}

/// One row of cells, padded to the columns (a cell wider than its column pushes the rest).
pub fn row(columns: &[Column], cells: &[String]) -> String {
    let mut out = String::new();
    for (c, cell) in columns.iter().zip(cells) {
        if !out.is_empty() {
            out.push_str("  ");
        }
        if c.right {
            write!(out, "{cell:>w$}", w = c.width).expect("invariant: writing to a String");
        } else {
            write!(out, "{cell:<w$}", w = c.width).expect("invariant: writing to a String");
        }
    }
    out.trim_end().to_string()
}

pub fn header(columns: &[Column]) -> String {
    row(columns, &columns.iter().map(|c| c.name.to_string()).collect::<Vec<_>>())
}

/// A time in milliseconds with three significant digits or more.
pub fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_flat_objects() {
        let line = Json::default()
            .str("loss", "a \"b\"\n")
            .num("ms", 1.5)
            .num("bad", f64::NAN)
            .ints("shape", &[1, 2])
            .opt("x", None)
            .line();
        assert_eq!(line, r#"{"loss":"a \"b\"\n","ms":1.5,"bad":null,"shape":[1,2],"x":null}"#);
    }
}
