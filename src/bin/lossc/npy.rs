//! .npy files to and from `[batch, class, spatial]` tensors.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;

use lossc::Tensor;
use npyz::{DType, NpyFile, TypeChar, WriterBuilder};

/// An array read from a file, with what is needed to write a gradient like it.
#[derive(Clone)]
pub struct Array {
    pub tensor: Tensor,
    pub shape: Vec<u64>,
    pub float64: bool,
}

/// ndim 0 and 1 are `[1, 1, n]`, ndim 2 `[d0, d1, 1]`, ndim >= 3 `[d0, d1, prod(rest)]`.
fn to_bcs(shape: &[u64]) -> Result<[usize; 3], String> {
    let n = |v: u64| usize::try_from(v).map_err(|_| format!("dimension {v} is too large"));
    Ok(match shape {
        [] => [1, 1, 1],
        [a] => [1, 1, n(*a)?],
        [a, b] => [n(*a)?, n(*b)?, 1],
        [a, b, rest @ ..] => {
            let s = rest.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or("shape overflows")?;
            [n(*a)?, n(*b)?, n(s)?]
        }
    })
}

/// Reads an array, refusing headers that do not fit the file (a shape whose size
/// overflows, or more values than the file holds) before anything is allocated.
pub fn read(path: &Path) -> Result<Array, String> {
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    // npyz does unchecked arithmetic on the header's shape: a hostile header must be an
    // error, not a crash (and not a panic message: the hook is silenced meanwhile).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| read_checked(path, file_len));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|_| Err("the .npy header is malformed (its shape does not fit in memory)".into()))
}

fn read_checked(path: &Path, file_len: u64) -> Result<Array, String> {
    check_header(path)?;
    let file = File::open(path).map_err(|e| e.to_string())?;
    let npy = NpyFile::new(BufReader::new(file)).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "truncated: the file ends inside its .npy header".to_string(),
        // npyz's own message is its parser's trace; its first line says what was wrong.
        _ => format!("the .npy header is malformed: {}", e.to_string().lines().next().unwrap_or_default()),
    })?;
    if npy.order() == npyz::Order::Fortran {
        return Err("Fortran-order arrays are not supported; save a C-order array".into());
    }
    let shape = npy.shape().to_vec();
    let DType::Plain(ts) = npy.dtype() else {
        return Err("only plain numeric dtypes are supported".into());
    };
    let size = ts.size_field();
    let supported = matches!(
        (ts.type_char(), size),
        (TypeChar::Float, 4 | 8) | (TypeChar::Int, 1 | 2 | 4 | 8) | (TypeChar::Uint, 1 | 4) | (TypeChar::Bool, 1)
    );
    if !supported {
        return Err(format!(
            "unsupported dtype {}; use float32, float64, int8, int16, int32, int64, uint8, uint32 or bool",
            numpy_name(ts.type_char(), size)
        ));
    }
    let bytes = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
    let start = data_offset(path)?;
    match bytes.and_then(|b| b.checked_add(start)) {
        Some(end) if end == file_len => {}
        Some(end) if end < file_len => {
            return Err(format!(
                "{} bytes follow the data its header describes (shape {shape:?}): a corrupt or \
                 concatenated file",
                file_len - end
            ))
        }
        _ => {
            return Err(format!(
                "truncated: its header promises shape {shape:?} ({} bytes of data), but the file \
                 holds {} bytes after the header",
                bytes.map_or_else(|| "too many".to_string(), |b| b.to_string()),
                file_len.saturating_sub(start)
            ))
        }
    }
    let bcs = to_bcs(&shape)?;
    let err = |e: std::io::Error| e.to_string();
    let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let (data, float64): (Vec<f64>, bool) = match (ts.type_char(), size) {
        (TypeChar::Float, 4) => (widen(npy.into_vec::<f32>().map_err(err)?), false),
        (TypeChar::Float, 8) => (npy.into_vec::<f64>().map_err(err)?, true),
        (TypeChar::Int, 1) => (npy.into_vec::<i8>().map_err(err)?.into_iter().map(f64::from).collect(), false),
        (TypeChar::Int, 2) => (npy.into_vec::<i16>().map_err(err)?.into_iter().map(f64::from).collect(), false),
        (TypeChar::Int, 4) => (npy.into_vec::<i32>().map_err(err)?.into_iter().map(f64::from).collect(), false),
        (TypeChar::Int, 8) => (npy.into_vec::<i64>().map_err(err)?.into_iter().map(|v| v as f64).collect(), false),
        (TypeChar::Uint, 1) => (npy.into_vec::<u8>().map_err(err)?.into_iter().map(f64::from).collect(), false),
        (TypeChar::Uint, 4) => (npy.into_vec::<u32>().map_err(err)?.into_iter().map(f64::from).collect(), false),
        (TypeChar::Bool, 1) => {
            (npy.into_vec::<bool>().map_err(err)?.into_iter().map(|b| f64::from(u8::from(b))).collect(), false)
        }
        _ => unreachable!("checked above"),
    };
    let need = bcs.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if need != Some(data.len()) {
        return Err(format!("holds {} values but its shape is {shape:?}", data.len()));
    }
    Ok(Array { tensor: Tensor::new(bcs, data), shape, float64 })
}

/// NumPy's name of a plain dtype, as a user wrote it (`float16`, `uint64`).
fn numpy_name(kind: TypeChar, size: u64) -> String {
    let bits = size * 8;
    match kind {
        TypeChar::Bool => "bool".into(),
        TypeChar::Int => format!("int{bits}"),
        TypeChar::Uint => format!("uint{bits}"),
        TypeChar::Float => format!("float{bits}"),
        TypeChar::Complex => format!("complex{bits}"),
        other => format!("{other:?}{size}"),
    }
}

/// The most header bytes read, as NumPy's own `max_header_size` for untrusted files.
const MAX_HEADER: u64 = 10_000;

/// Checks the header's dict before npyz parses it: its parser takes time exponential in
/// the nesting of brackets (a 136-byte header with 20 levels takes seconds), and a
/// plain array's header nests two deep (`{..., 'shape': (2, 3), }`). Also, as NumPy, it
/// refuses keys other than `descr`, `fortran_order` and `shape`.
fn check_header(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    file.read_exact(&mut head).map_err(short_header)?;
    if &head[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic string)".into());
    }
    let skip = if head[6] == 1 { 10 } else { 12 };
    let length = data_offset(path)? - skip;
    if length > MAX_HEADER {
        return Err(format!("the .npy header is {length} bytes, more than the {MAX_HEADER} a plain array needs"));
    }
    let mut text = head[skip as usize..].to_vec();
    file.take(length.saturating_sub(12 - skip)).read_to_end(&mut text).map_err(|e| e.to_string())?;
    if (text.len() as u64) < length {
        return Err("truncated: the file ends inside its .npy header".into());
    }
    text.truncate(length as usize);
    // npyz honours escapes, which could hide brackets inside what looks like a string;
    // no plain header has a backslash, and brackets count wherever they are.
    if text.contains(&b'\\') {
        return Err("the .npy header holds a backslash, which no plain array's header has".into());
    }
    let (mut depth, mut quote, mut keys, mut string) = (0usize, None, Vec::new(), Vec::new());
    for (i, &c) in text.iter().enumerate() {
        match c {
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > 2 {
            return Err("the .npy header nests deeper than a plain array's (a structured dtype?)".into());
        }
        match (quote, c) {
            (Some(q), _) if c == q => {
                quote = None;
                // A string at the dict's level followed by a colon is a key.
                let rest = text[i + 1..].iter().find(|c| !c.is_ascii_whitespace());
                if depth == 1 && rest == Some(&b':') {
                    keys.push(String::from_utf8_lossy(&string).into_owned());
                }
            }
            (Some(_), _) => string.push(c),
            (None, b'\'' | b'"') => {
                quote = Some(c);
                string.clear();
            }
            _ => {}
        }
    }
    keys.sort();
    if keys != ["descr", "fortran_order", "shape"] {
        return Err(format!(
            "the .npy header's keys are {keys:?}; a NumPy header has exactly 'descr', 'fortran_order' and 'shape'"
        ));
    }
    Ok(())
}

/// A failed read of the first bytes: too short, or not readable at all (a directory, say).
fn short_header(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "too short for a .npy header".into()
    } else {
        e.to_string()
    }
}

/// Where the data starts: after the magic string, the version, the header's length (two
/// bytes in version 1, four in versions 2 and 3) and the header.
fn data_offset(path: &Path) -> Result<u64, String> {
    let mut head = [0u8; 12];
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    file.read_exact(&mut head).map_err(short_header)?;
    Ok(match head[6] {
        1 => 10 + u64::from(u16::from_le_bytes([head[8], head[9]])),
        _ => 12 + u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
    })
}

/// Writes `grad` with the shape of `like`: float64 for a float64 input, float32 otherwise.
pub fn write(file: File, grad: &Tensor, like: &Array) -> Result<(), String> {
    let file = BufWriter::new(file);
    let err = |e: std::io::Error| e.to_string();
    if like.float64 {
        let mut w =
            npyz::WriteOptions::new().default_dtype().shape(&like.shape).writer(file).begin_nd().map_err(err)?;
        w.extend(grad.data.iter().copied()).map_err(err)?;
        w.finish().map_err(err)?;
    } else {
        let mut w =
            npyz::WriteOptions::new().default_dtype().shape(&like.shape).writer(file).begin_nd().map_err(err)?;
        w.extend(grad.data.iter().map(|&v| v as f32)).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(())
}
