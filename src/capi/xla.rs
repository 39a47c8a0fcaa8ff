//! `lossc_xla_ffi`: lossc as an XLA FFI custom call, so that JAX runs the kernels on its
//! own buffers. A host callback (`jax.pure_callback`) copies every input out of XLA and
//! every result back in, which at 16M elements costs more than the loss itself.
//!
//! The structs below mirror the parts of XLA's C API (`xla/ffi/api/c_api.h`) that the
//! handler reads; they are the same in every version from 0.1, the one the handler
//! reports (every jaxlib with `jax.ffi` accepts it). The call:
//! - operands: the loss's inputs, float32, in declaration order, laid out as for
//!   `lossc eval` (`[N, C, *spatial]`; a 0-d or 1-d array is `[1, 1, n]`);
//! - results: the value (a float32 scalar), then d loss / d input for each input in the
//!   `wrt` bit mask, in input order, float32 and shaped as the input;
//! - attributes: `source` and `params` (strings, as for `lossc_compile`) and `wrt` (int64).
//!
//! The loss travels as text, not as a pointer to a `lossc_loss`: a compiled XLA program
//! may outlive the Python object that built it (JAX caches executables, also on disk),
//! and text stays valid. Each distinct (source, params) is compiled once per process and
//! kept.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use super::{aligned, check_count, evaluate, extents, panic_message, Failure, Shape, Status};
use crate::tensor::View;

#[repr(C)]
struct ExtensionBase {
    struct_size: usize,
    kind: i32,
    next: *const ExtensionBase,
}

/// `XLA_FFI_Extension_Metadata`: XLA asks for the handler's API version and traits.
const EXTENSION_METADATA: i32 = 1;

#[repr(C)]
struct ApiVersion {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    major: i32,
    minor: i32,
}

#[repr(C)]
struct Metadata {
    struct_size: usize,
    api_version: ApiVersion,
    traits: u32,
}

#[repr(C)]
struct MetadataExtension {
    base: ExtensionBase,
    metadata: *mut Metadata,
}

#[repr(C)]
struct ErrorCreateArgs {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    message: *const c_char,
    code: i32,
}

/// The start of `XLA_FFI_Api`: the error constructor is the only entry used.
#[repr(C)]
struct Api {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    api_version: ApiVersion,
    internal_api: *const c_void,
    error_create: Option<unsafe extern "C" fn(*mut ErrorCreateArgs) -> *mut c_void>,
}

#[repr(C)]
struct Buffer {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    dtype: i32,
    data: *mut c_void,
    rank: i64,
    dims: *const i64,
}

/// `XLA_FFI_Args` and `XLA_FFI_Rets` (same layout): buffers, by index.
#[repr(C)]
struct Buffers {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    size: i64,
    types: *const i32,
    buffers: *const *const Buffer,
}

#[repr(C)]
struct ByteSpan {
    ptr: *const c_char,
    len: usize,
}

#[repr(C)]
struct Scalar {
    dtype: i32,
    value: *const c_void,
}

#[repr(C)]
struct Attrs {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    size: i64,
    types: *const i32,
    names: *const *const ByteSpan,
    attrs: *const *const c_void,
}

#[repr(C)]
pub(super) struct CallFrame {
    struct_size: usize,
    extension_start: *const ExtensionBase,
    api: *const Api,
    ctx: *mut c_void,
    stage: i32,
    args: Buffers,
    rets: Buffers,
    attrs: Attrs,
}

const STAGE_EXECUTE: i32 = 3;
const BUFFER: i32 = 1;
const ATTR_SCALAR: i32 = 3;
const ATTR_STRING: i32 = 4;
const DTYPE_S64: i32 = 5;
const DTYPE_F32: i32 = 11;
/// `XLA_FFI_Error_Code`s.
const INVALID_ARGUMENT: i32 = 3;
const UNIMPLEMENTED: i32 = 12;
const INTERNAL: i32 = 13;

/// Handles one call frame: the metadata query, or the evaluation. Never unwinds.
///
/// # Safety
/// `frame` is a call frame from XLA (or NULL).
pub(super) unsafe fn handle(frame: *mut CallFrame) -> *mut c_void {
    // SAFETY: XLA's frame, valid for the call.
    let Some(frame) = (unsafe { frame.as_ref() }) else { return std::ptr::null_mut() };
    // SAFETY: as above; the extension chain and metadata are XLA's.
    if unsafe { answer_metadata(frame) } {
        return std::ptr::null_mut();
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if frame.stage != STAGE_EXECUTE {
            return Ok(());
        }
        // SAFETY: XLA's buffers and attributes, valid for the call.
        unsafe { execute(frame) }
    }));
    let failure = match outcome {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            Status::Internal,
            format!("error: internal error in lossc (a bug; please report it): {}\n", panic_message(&*payload)),
        ),
    };
    // SAFETY: XLA's API table, valid for the call.
    unsafe { xla_error(frame, &failure) }
}

/// Fills in the metadata if XLA is asking for it (at registration): API 0.1, no traits.
///
/// # Safety
/// `frame`'s extension chain is XLA's.
unsafe fn answer_metadata(frame: &CallFrame) -> bool {
    let mut ext = frame.extension_start;
    // SAFETY (the loop): each node of XLA's chain, and the metadata it points to.
    while let Some(node) = unsafe { ext.as_ref() } {
        if node.kind == EXTENSION_METADATA && node.struct_size >= size_of::<MetadataExtension>() {
            let metadata = unsafe { (*ext.cast::<MetadataExtension>()).metadata };
            if let Some(m) = unsafe { metadata.as_mut() } {
                if m.struct_size >= std::mem::offset_of!(Metadata, traits) + size_of::<u32>() {
                    m.api_version = ApiVersion {
                        struct_size: size_of::<ApiVersion>(),
                        extension_start: std::ptr::null(),
                        major: 0,
                        minor: 1,
                    };
                    m.traits = 0;
                }
            }
            return true;
        }
        ext = node.next;
    }
    false
}

/// A failure as an XLA error, which XLA owns and JAX raises with lossc's message.
///
/// # Safety
/// `frame.api` is XLA's API table.
unsafe fn xla_error(frame: &CallFrame, failure: &Failure) -> *mut c_void {
    let code = match failure.status {
        Status::Backend => UNIMPLEMENTED,
        Status::Internal => INTERNAL,
        _ => INVALID_ARGUMENT,
    };
    let message = super::c_string(failure.message.trim_end());
    let mut args = ErrorCreateArgs {
        struct_size: size_of::<ErrorCreateArgs>(),
        extension_start: std::ptr::null(),
        message: message.as_ptr(),
        code,
    };
    // SAFETY: XLA's table; the constructor copies the message.
    match unsafe { frame.api.as_ref() }.and_then(|api| api.error_create) {
        Some(create) => unsafe { create(&mut args) },
        // No way to report it: say so where a person may see it.
        None => {
            eprintln!("lossc: XLA gave no error constructor; failure: {}", failure.message);
            std::ptr::null_mut()
        }
    }
}

/// The most losses `compiled` keeps.
const MAX_COMPILED: usize = 64;

/// The losses called through XLA, compiled once per (params, source).
fn compiled(source: &str, params: &str) -> Result<Arc<crate::Loss>, Failure> {
    type Compiled = HashMap<String, HashMap<String, Arc<crate::Loss>>>;
    static LOSSES: OnceLock<Mutex<Compiled>> = OnceLock::new();
    let losses = LOSSES.get_or_init(Default::default);
    let lock = || losses.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loss) = lock().get(params).and_then(|m| m.get(source)) {
        return Ok(Arc::clone(loss));
    }
    // Compiled without the lock held: another thread may compile the same loss meanwhile.
    let loss = Arc::new(crate::Loss::compile(source, params)?);
    let mut map = lock();
    // Bounded, for a program that changes hyperparameters every epoch: a loss dropped
    // here is compiled again from its text if an executable still calls it.
    if map.values().map(HashMap::len).sum::<usize>() >= MAX_COMPILED {
        map.clear();
    }
    let by_source = map.entry(params.to_string()).or_default();
    Ok(Arc::clone(by_source.entry(source.to_string()).or_insert(loss)))
}

/// The call's attributes by name.
struct Attributes<'a> {
    source: Option<&'a str>,
    params: Option<&'a str>,
    wrt: Option<i64>,
}

/// # Safety
/// `attrs` is XLA's, valid for `'a`.
unsafe fn attributes<'a>(attrs: &'a Attrs) -> Result<Attributes<'a>, Failure> {
    let mut out = Attributes { source: None, params: None, wrt: None };
    for i in 0..usize::try_from(attrs.size).unwrap_or(0) {
        // SAFETY (this block): `i < size`, the length of XLA's three arrays.
        let (kind, name, attr) = unsafe { (*attrs.types.add(i), &**attrs.names.add(i), *attrs.attrs.add(i)) };
        let name = unsafe { bytes(name) };
        let text = || -> Result<&'a str, Failure> {
            if kind != ATTR_STRING {
                return Err(Failure::invalid(format!(
                    "attribute `{}` must be a string",
                    String::from_utf8_lossy(name)
                )));
            }
            let span = unsafe { bytes(&*attr.cast::<ByteSpan>()) };
            std::str::from_utf8(span).map_err(|e| Failure::invalid(format!("an attribute is not UTF-8: {e}")))
        };
        match name {
            b"source" => out.source = Some(text()?),
            b"params" => out.params = Some(text()?),
            b"wrt" => {
                let not = || Failure::invalid("attribute `wrt` must be an int64 scalar");
                if kind != ATTR_SCALAR {
                    return Err(not());
                }
                let scalar = unsafe { &*attr.cast::<Scalar>() };
                if scalar.dtype != DTYPE_S64 {
                    return Err(not());
                }
                out.wrt = Some(unsafe { *scalar.value.cast::<i64>() });
            }
            other => {
                return Err(Failure::invalid(format!(
                    "lossc_xla_ffi takes the attributes source, params and wrt, not `{}`",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    Ok(out)
}

/// # Safety
/// `span` points to `len` bytes (or has length 0).
unsafe fn bytes(span: &ByteSpan) -> &[u8] {
    if span.len == 0 || span.ptr.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(span.ptr.cast(), span.len) }
}

/// Buffer `i` of `list`, checked to be float32.
///
/// # Safety
/// `list` is XLA's, valid for `'a`.
unsafe fn buffer<'a>(list: &'a Buffers, i: usize, what: &dyn Fn() -> String) -> Result<&'a Buffer, Failure> {
    // SAFETY: the caller checked `i < size`.
    let (kind, buffer) = unsafe { (*list.types.add(i), (*list.buffers.add(i)).as_ref()) };
    match buffer {
        Some(b) if kind == BUFFER && b.dtype == DTYPE_F32 => Ok(b),
        _ => Err(Failure::invalid(format!("{} must be a float32 array", what()))),
    }
}

/// A buffer's dimensions.
///
/// # Safety
/// `b` is XLA's.
unsafe fn dims(b: &Buffer) -> &[i64] {
    match usize::try_from(b.rank) {
        // SAFETY: XLA's `rank` dimensions.
        Ok(rank) if rank > 0 && !b.dims.is_null() => unsafe { std::slice::from_raw_parts(b.dims, rank) },
        _ => &[],
    }
}

/// The `[batch, class, spatial]` extents of an array of these dimensions (as the Python
/// package's `lossc.layout`).
fn layout(dims: &[i64]) -> Shape {
    match dims {
        [] => Shape { batch: 1, classes: 1, spatial: 1 },
        [n] => Shape { batch: 1, classes: 1, spatial: *n },
        [n, c] => Shape { batch: *n, classes: *c, spatial: 1 },
        [n, c, rest @ ..] => Shape { batch: *n, classes: *c, spatial: rest.iter().product() },
    }
}

/// The address of a buffer's `len` floats: checked for NULL and alignment where there are
/// any (XLA may give an empty array no storage).
fn floats(b: &Buffer, len: usize, what: &dyn Fn() -> String) -> Result<*mut f32, Failure> {
    let p = b.data.cast::<f32>();
    if len == 0 {
        return Ok(std::ptr::NonNull::dangling().as_ptr());
    }
    if p.is_null() {
        return Err(Failure::invalid(format!("{} is NULL", what())));
    }
    aligned(p.cast_const(), what)?;
    Ok(p)
}

/// Whether two arrays of floats share memory.
fn overlap((a, m): (*const f32, usize), (b, n): (*const f32, usize)) -> bool {
    let (a, b) = (a as usize, b as usize);
    m > 0 && n > 0 && a < b + 4 * n && b < a + 4 * m
}

/// # Safety
/// `frame` is XLA's, in the execute stage.
unsafe fn execute(frame: &CallFrame) -> Result<(), Failure> {
    // SAFETY (this function): XLA's frame and everything it points to, valid for the call.
    if frame.struct_size < size_of::<CallFrame>() {
        return Err(Failure::invalid("XLA's call frame is older than lossc_xla_ffi knows"));
    }
    let attrs = unsafe { attributes(&frame.attrs) }?;
    let (Some(source), Some(wrt)) = (attrs.source, attrs.wrt) else {
        return Err(Failure::invalid("lossc_xla_ffi needs the attributes `source` and `wrt`"));
    };
    let loss = compiled(source, attrs.params.unwrap_or(""))?;
    let names: Vec<&str> = loss.inputs().iter().map(|s| s.name.as_str()).collect();
    let n = names.len();
    check_count(&loss, usize::try_from(frame.args.size).unwrap_or(usize::MAX), Some("operands"))?;
    if wrt < 0 || (n < 64 && wrt >> n != 0) {
        return Err(Failure::invalid(format!("`wrt` = {wrt} names inputs that {} does not have", loss.name())));
    }
    let wanted: Vec<usize> = (0..n.min(63)).filter(|i| wrt >> i & 1 == 1).collect();
    if usize::try_from(frame.rets.size) != Ok(1 + wanted.len()) {
        return Err(Failure::invalid(format!(
            "lossc_xla_ffi returns the value and {} gradients, but XLA expects {} results",
            wanted.len(),
            frame.rets.size
        )));
    }
    let mut inputs = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate() {
        let what = || format!("input `{name}`");
        let b = unsafe { buffer(&frame.args, i, &what) }?;
        let dims = unsafe { dims(b) };
        let (shape, len) = extents::<f32>(layout(dims), name)?;
        inputs.push((shape, dims, floats(b, len, &what)?.cast_const(), len));
    }
    let value_what = || "the value".to_string();
    let value = unsafe { buffer(&frame.rets, 0, &value_what) }?;
    if unsafe { dims(value) }.iter().product::<i64>() != 1 {
        return Err(Failure::invalid("the value is one float32"));
    }
    let value = floats(value, 1, &value_what)?;
    let mut outputs: Vec<(usize, *mut f32, usize)> = Vec::with_capacity(wanted.len());
    for (k, &i) in wanted.iter().enumerate() {
        let what = || format!("the gradient of `{}`", names[i]);
        let b = unsafe { buffer(&frame.rets, k + 1, &what) }?;
        let (_, dims, _, len) = inputs[i];
        if unsafe { self::dims(b) } != dims {
            return Err(Failure::invalid(format!("{} is not shaped as its input", what())));
        }
        let p = floats(b, len, &what)?;
        // Distinct arrays, as for `lossc_eval`: XLA shares a result with an operand only
        // when asked to (`input_output_aliases`).
        let inputs_and_earlier =
            inputs.iter().map(|&(_, _, q, m)| (q, m)).chain(outputs.iter().map(|&(_, q, m)| (q.cast_const(), m)));
        if inputs_and_earlier.chain([(value.cast_const(), 1)]).any(|other| overlap((p.cast_const(), len), other)) {
            return Err(Failure::invalid(format!("{} shares memory with another array of the call", what())));
        }
        outputs.push((i, p, len));
    }
    let views: Vec<View> = inputs
        .iter()
        .map(|&(shape, _, p, len)| View::new(shape, unsafe { std::slice::from_raw_parts(p, len) }))
        .collect();
    let mut grads: Vec<Option<&mut [f32]>> = (0..n).map(|_| None).collect();
    for &(i, p, len) in &outputs {
        grads[i] = Some(unsafe { std::slice::from_raw_parts_mut(p, len) });
    }
    let result = evaluate(&loss, &views, &mut grads)?;
    // No slice of XLA's arrays is live when the value is written: it may share an input's
    // memory (a result aliased to a scalar operand), which has been read by now.
    drop((views, grads));
    unsafe { *value = result as f32 };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_follow_the_python_package() {
        let s = |b, c, s| Shape { batch: b, classes: c, spatial: s };
        assert_eq!(layout(&[]), s(1, 1, 1));
        assert_eq!(layout(&[7]), s(1, 1, 7));
        assert_eq!(layout(&[2, 3]), s(2, 3, 1));
        assert_eq!(layout(&[2, 3, 4, 5]), s(2, 3, 20));
    }

    #[test]
    fn struct_sizes_match_the_xla_header() {
        // XLA_FFI_*_STRUCT_SIZE from xla/ffi/api/c_api.h on LP64.
        assert_eq!(size_of::<ExtensionBase>(), 24);
        assert_eq!(size_of::<ApiVersion>(), 24);
        assert_eq!(std::mem::offset_of!(Metadata, traits), 32);
        assert_eq!(std::mem::offset_of!(ErrorCreateArgs, code), 24);
        assert_eq!(std::mem::offset_of!(Api, error_create), 48);
        assert_eq!(size_of::<Buffer>(), 48);
        assert_eq!(size_of::<Buffers>(), 40);
        assert_eq!(size_of::<Attrs>(), 48);
        assert_eq!(std::mem::offset_of!(CallFrame, args), 40);
        assert_eq!(std::mem::offset_of!(CallFrame, attrs), 120);
    }
}
