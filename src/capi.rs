//! The C ABI of `liblossc`: the only `extern "C"` code in the crate.
//!
//! A thin layer over the Rust API (`Loss`). Every exported function runs its body
//! through `boundary`, which catches panics (they become `LOSSC_STATUS_INTERNAL`),
//! records the message of any failure for `lossc_last_error`, and returns. Pointers
//! are null-checked by the helpers below, and outputs are written only once the call
//! has succeeded. `include/lossc.h` is generated from this file by cbindgen
//! (`cbindgen.toml`); `tests/c_abi.rs` fails if the committed header is stale.
//!
//! Ownership, in one place: a `lossc_loss` is created by `lossc_compile` and freed by
//! `lossc_free`; a `char *` handed out through an out-parameter is the caller's and is
//! freed with `lossc_string_free`; a `const char *` returned directly is lossc's and
//! must not be freed (how long it lives is in each function's comment). Input and
//! gradient arrays always stay the caller's.
//!
//! `lossc_xla_ffi` is the one entry point for another caller than C: XLA, whose call
//! frame `xla` decodes.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::error::Error;
use crate::runtime::Backend;
use crate::tensor::{Tensor, View};

mod xla;

/// What a call did: `LOSSC_STATUS_OK` (0) is success; every kind of failure has its
/// own non-zero value, and `lossc_last_error()` then holds the message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The source does not parse (the message has `line:col` and the underlined line).
    Parse = 1,
    /// The source parses but is wrong: an unknown name, a bad argument, mismatched axes.
    Check = 2,
    /// The `params` string is malformed or names a hyperparameter the loss does not have.
    Params = 3,
    /// Inputs of the wrong number or shape: the message names the input, the expected
    /// and the received shapes, and the broadcast rule. Also a broadcast shape whose
    /// evaluation needs more working memory than the machine has available (small inputs
    /// can broadcast to a vast shape): refused up front, where a failed allocation would
    /// abort the process.
    Shape = 4,
    /// A required pointer argument is NULL: the message names it.
    NullArgument = 5,
    /// An argument is outside its domain: text that is not UTF-8, an index past the end,
    /// an output array of the wrong length.
    InvalidArgument = 6,
    /// The evaluator cannot run this loss on these inputs.
    Backend = 7,
    /// A bug in lossc (a caught panic); please report the message.
    Internal = 8,
    /// The GPU path cannot run here: no CUDA driver could be loaded, or it sees no device.
    NoDevice = 9,
    /// A CUDA driver call failed (the message names the call and the driver's error).
    Device = 10,
}

/// The extents of one input in the `[batch, class, spatial]` model: a contiguous
/// row-major float array of `batch * classes * spatial` values (spatial is the product
/// of all trailing dimensions, so NCHW and NCDHW both fit). An extent of 1 broadcasts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: i64,
    pub classes: i64,
    pub spatial: i64,
}

/// A compiled loss, opaque to C. Immutable once compiled: any number of threads may
/// evaluate the same loss at once.
pub struct Loss {
    loss: crate::Loss,
    name: CString,
    input_names: Vec<CString>,
    /// The terms of the top-level sum, built on first use.
    terms: OnceLock<Terms>,
}

struct Terms {
    losses: Vec<crate::Loss>,
    texts: Vec<CString>,
}

impl Loss {
    fn terms(&self) -> &Terms {
        self.terms.get_or_init(|| {
            let losses = self.loss.terms();
            let texts = losses.iter().map(|t| c_string(t.show())).collect();
            Terms { losses, texts }
        })
    }
}

// ---------------------------------------------------------------------------
// The boundary: panics, failures, the last error, pointer checks.
// ---------------------------------------------------------------------------

/// A failed call: its status and the message for `lossc_last_error`.
struct Failure {
    status: Status,
    message: String,
}

impl Failure {
    fn new(status: Status, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }
    fn null(what: &str) -> Failure {
        Failure::new(Status::NullArgument, format!("error: `{what}` is NULL\n"))
    }
    fn invalid(message: impl std::fmt::Display) -> Failure {
        Failure::new(Status::InvalidArgument, format!("error: {message}\n"))
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::Source(d) if d.items.iter().all(|i| i.code.starts_with("parse::")) => Status::Parse,
            Error::Source(_) => Status::Check,
            Error::Params(_) => Status::Params,
            Error::Shape(_) => Status::Shape,
            Error::Unsupported(_) => Status::Backend,
            Error::NoDevice(_) => Status::NoDevice,
            Error::Device(_) => Status::Device,
        };
        Failure { status, message: e.render() }
    }
}

/// What an exported function returns when it fails.
trait Outcome {
    fn failed(status: Status) -> Self;
}

impl Outcome for Status {
    fn failed(status: Status) -> Status {
        status
    }
}

impl Outcome for usize {
    fn failed(_: Status) -> usize {
        0
    }
}

impl Outcome for *const c_char {
    fn failed(_: Status) -> *const c_char {
        std::ptr::null()
    }
}

impl Outcome for () {
    fn failed(_: Status) {}
}

thread_local! {
    /// This thread's last failure message.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // During thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c_string(message));
}

/// Runs the body of every exported function: a panic becomes `Status::Internal`, a
/// failure's message becomes this thread's last error, and the function returns
/// `T::failed(status)` instead of the body's value.
fn boundary<T: Outcome>(body: impl FnOnce() -> Result<T, Failure>) -> T {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return value,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            Status::Internal,
            format!("error: internal error in lossc (a bug; please report it): {}\n", panic_message(&*payload)),
        ),
    };
    set_last_error(&failure.message);
    T::failed(failure.status)
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

/// `s` as a C string; an interior NUL (never produced by lossc itself) is spelled out.
fn c_string(s: impl Into<String>) -> CString {
    let s: String = s.into();
    CString::new(s.replace('\0', "\\0")).expect("invariant: no NUL left")
}

/// `p` as a reference, or a null-argument failure naming `what`.
///
/// # Safety
/// `p` is NULL or points to a valid `T` that outlives `'a`.
unsafe fn borrow<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller's contract; NULL is checked here.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// `p` checked for NULL (outputs are written through it only at the end of a
/// successful call).
fn non_null<P: Pointer>(p: P, what: &str) -> Result<P, Failure> {
    if p.is_null() {
        Err(Failure::null(what))
    } else {
        Ok(p)
    }
}

/// A raw pointer, const or mut.
trait Pointer: Copy {
    fn is_null(self) -> bool;
}

impl<T> Pointer for *const T {
    fn is_null(self) -> bool {
        <*const T>::is_null(self)
    }
}

impl<T> Pointer for *mut T {
    fn is_null(self) -> bool {
        <*mut T>::is_null(self)
    }
}

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| Failure::invalid(format!("`{what}` is not UTF-8: {e}")))
}

/// One of the caller's arrays: its `[batch, class, spatial]` extents and its values.
type Array<'a, T> = ([usize; 3], &'a [T]);

/// One of the caller's arrays before it is read: extents, length and pointer.
type Unread<T> = ([usize; 3], usize, *const T);

/// The caller's input arrays as `(shape, data)` pairs, checked for NULL and size.
/// A count that does not match the loss is left for the loss's own check, which names
/// the inputs.
///
/// # Safety
/// `inputs` and `shapes` point to `n` elements each (or are NULL with `n == 0`), and
/// `inputs[i]` to the `batch * classes * spatial` values that `shapes[i]` describes.
unsafe fn read_inputs<'a, T>(
    loss: &crate::Loss,
    inputs: *const *const T,
    shapes: *const Shape,
    n: usize,
) -> Result<Vec<Array<'a, T>>, Failure> {
    // SAFETY: the caller's contract, passed on.
    let pointers = unsafe { read_pointers(loss, inputs, shapes, n) }?;
    Ok(pointers
        .into_iter()
        .map(|(shape, len, data)| {
            // SAFETY: non-NULL, and holds `len` values by the caller's contract; `extents`
            // checked that `len` values fit in `isize::MAX` bytes.
            (shape, unsafe { std::slice::from_raw_parts(data, len) })
        })
        .collect())
}

/// The caller's input pointers with their extents and lengths, checked for NULL and size
/// (host or device pointers: nothing is read through them).
///
/// # Safety
/// `inputs` and `shapes` point to `n` elements each (or are NULL with `n == 0`).
unsafe fn read_pointers<T>(
    loss: &crate::Loss,
    inputs: *const *const T,
    shapes: *const Shape,
    n: usize,
) -> Result<Vec<Unread<T>>, Failure> {
    check_count(loss, n, None)?;
    if n == 0 {
        return Ok(vec![]);
    }
    let inputs = non_null(inputs, "inputs")?;
    let shapes = non_null(shapes, "shapes")?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let name = input_name(loss, i);
        // SAFETY: `i < n`, and both arrays hold `n` elements.
        let (data, shape) = unsafe { (*inputs.add(i), *shapes.add(i)) };
        let (shape, len) = extents::<T>(shape, &name)?;
        if data.is_null() {
            return Err(Failure::new(Status::NullArgument, format!("error: `inputs[{i}]` (input `{name}`) is NULL\n")));
        }
        aligned(data, || format!("`inputs[{i}]` (input `{name}`)"))?;
        out.push((shape, len, data));
    }
    Ok(out)
}

/// Checks `n` (the caller's count of arrays; the message names what was counted where it
/// is not the `n_inputs` argument: XLA's operands) against the loss before any array is read: it is
/// their length by the caller's contract, and a wrong count would read past them (or
/// reserve a vector of absurd size).
fn check_count(loss: &crate::Loss, n: usize, counted: Option<&str>) -> Result<(), Failure> {
    let specs = loss.inputs();
    if n == specs.len() {
        return Ok(());
    }
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    Err(Failure::new(
        Status::Shape,
        format!(
            "error: `{}` takes {} inputs ({}), but {} given{}\n",
            loss.name(),
            specs.len(),
            names.join(", "),
            crate::check::builtins::given(n),
            counted.map(|c| format!(" ({c})")).unwrap_or_default()
        ),
    ))
}

fn input_name(loss: &crate::Loss, i: usize) -> String {
    loss.inputs().get(i).map_or_else(|| format!("inputs[{i}]"), |s| s.name.clone())
}

/// A C shape as extents and a length, or a shape failure naming the input.
fn extents<T>(shape: Shape, name: &str) -> Result<([usize; 3], usize), Failure> {
    let bad = |why: &str| {
        Failure::new(
            Status::Shape,
            format!(
                "error: input `{name}` has shape [{}, {}, {}] ([batch, class, spatial]): {why}\n",
                shape.batch, shape.classes, shape.spatial
            ),
        )
    };
    let mut ext = [0usize; 3];
    for (e, v) in ext.iter_mut().zip([shape.batch, shape.classes, shape.spatial]) {
        *e = usize::try_from(v).map_err(|_| bad("an extent is negative"))?;
    }
    let len = ext.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match len {
        Some(len) if len.checked_mul(size_of::<T>()).is_some_and(|b| b <= isize::MAX as usize) => Ok((ext, len)),
        _ => Err(bad("too many values to address")),
    }
}

/// The caller's gradient buffers: empty when `grads` is NULL (value only), else one
/// entry per input, `None` where the pointer is NULL.
///
/// # Safety
/// `grads` is NULL or points to `arrays.len()` pointers, each NULL or to a writable
/// array as long as the matching input, overlapping no other array of the call.
unsafe fn read_grads<'a, T, U>(grads: *const *mut T, arrays: &[Array<U>]) -> Result<Vec<Option<&'a mut [T]>>, Failure> {
    if grads.is_null() {
        return Ok(vec![]);
    }
    (0..arrays.len())
        .map(|i| {
            // SAFETY: `grads` holds one pointer per input.
            let p = unsafe { *grads.add(i) };
            if p.is_null() {
                return Ok(None);
            }
            aligned(p.cast_const(), || format!("`grads[{i}]`"))?;
            // SAFETY: a writable array of the input's length, not aliased, aligned.
            Ok(Some(unsafe { std::slice::from_raw_parts_mut(p, arrays[i].1.len()) }))
        })
        .collect()
}

/// Refuses an array that does not start at a multiple of its element's size: Rust (and
/// the kernels) read floats only there. NumPy can make such views (`buf[1:].view(...)`).
fn aligned<T>(p: *const T, what: impl Fn() -> String) -> Result<(), Failure> {
    let align = std::mem::align_of::<T>();
    if (p as usize).is_multiple_of(align) {
        return Ok(());
    }
    Err(Failure::new(
        Status::InvalidArgument,
        format!("error: {} is not aligned: it must start at a multiple of {align} bytes\n", what()),
    ))
}

/// The loss on float32 views by the native runtime, or by the f64 reference evaluator
/// where the runtime cannot run it yet (`Error::Unsupported`).
fn evaluate(loss: &crate::Loss, views: &[View], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    match loss.evaluate(views, grads) {
        Err(Error::Unsupported(_)) => loss.evaluate_on(Backend::Interp, views, grads),
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Version, status names, the last error, strings.
// ---------------------------------------------------------------------------

/// The library's version, e.g. "0.1.0". A static string: never free it.
/// May be called from any thread at any time.
#[no_mangle]
pub extern "C" fn lossc_version() -> *const c_char {
    boundary(|| Ok(concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()))
}

/// A short name for a status ("ok", "parse", "check", "params", "shape",
/// "null_argument", "invalid_argument", "backend", "internal", "no_device", "device";
/// "unknown" for any other value). A static string: never free it. May be called from any thread at any time.
#[no_mangle]
pub extern "C" fn lossc_status_name(status: c_int) -> *const c_char {
    boundary(|| {
        let name: &'static CStr = match status {
            0 => c"ok",
            1 => c"parse",
            2 => c"check",
            3 => c"params",
            4 => c"shape",
            5 => c"null_argument",
            6 => c"invalid_argument",
            7 => c"backend",
            8 => c"internal",
            9 => c"no_device",
            10 => c"device",
            _ => c"unknown",
        };
        Ok(name.as_ptr())
    })
}

/// The message of the last call on this thread that failed ("" if none has): for
/// source errors it holds `file:line:col`, the underlined line and what was expected.
/// Owned by lossc and per thread: valid until the next failing lossc call on the same
/// thread; copy it to keep it. Never NULL. Any thread, any time: each sees its own.
#[no_mangle]
pub extern "C" fn lossc_last_error() -> *const c_char {
    boundary(|| Ok(LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())))
}

/// Frees a string that lossc handed to the caller through a `char **` out-parameter
/// (`lossc_show`, `lossc_show_grad`). NULL is ignored. Any thread may free a string,
/// once.
///
/// # Safety
/// `s` is NULL or a string from lossc's `char **` out-parameters, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn lossc_string_free(s: *mut c_char) {
    boundary(|| {
        if !s.is_null() {
            // SAFETY: made by `CString::into_raw` in this module and not freed yet.
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}

/// Hands `s` to the caller through `out` (freed with `lossc_string_free`).
///
/// # Safety
/// `out` is non-NULL and writable.
unsafe fn give_string(out: *mut *mut c_char, s: String) {
    // SAFETY: the caller checked `out`.
    unsafe { *out = c_string(s).into_raw() };
}

// ---------------------------------------------------------------------------
// Compiling, freeing, looking at a loss.
// ---------------------------------------------------------------------------

/// Compiles a loss. `source` is a stdlib loss name ("tversky"), a bare expression
/// ("0.5*dice(sigmoid(x), y) + bce_logits(x, y)"), or loss definitions (the last one
/// is the entry). `params` is NULL or "" for the defaults, or overrides such as
/// "alpha=0.3,beta=0.7". On success `*out` receives a new loss, owned by the caller
/// and freed with `lossc_free`; on failure `*out` is left untouched.
/// May run concurrently with any other call.
///
/// # Safety
/// `source` and `params` are NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lossc_compile(source: *const c_char, params: *const c_char, out: *mut *mut Loss) -> Status {
    boundary(|| {
        // SAFETY (both): the caller's contract.
        let source = unsafe { text(source, "source") }?;
        let params = if params.is_null() { "" } else { unsafe { text(params, "params") }? };
        let out = non_null(out, "out")?;
        let loss = crate::Program::parse("<source>", source)?.compile(&crate::parse_params(params)?)?;
        let handle = Loss {
            name: c_string(loss.name()),
            input_names: loss.inputs().iter().map(|i| c_string(i.name.as_str())).collect(),
            terms: OnceLock::new(),
            loss,
        };
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { *out = Box::into_raw(Box::new(handle)) };
        Ok(Status::Ok)
    })
}

/// Frees a loss from `lossc_compile`, and every string it owns (input names, term
/// texts). NULL is ignored. Must not run concurrently with any other call on the
/// same loss.
///
/// # Safety
/// `loss` is NULL or from `lossc_compile`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn lossc_free(loss: *mut Loss) {
    boundary(|| {
        if !loss.is_null() {
            // SAFETY: made by `Box::into_raw` in `lossc_compile` and not freed yet.
            drop(unsafe { Box::from_raw(loss) });
        }
        Ok(())
    })
}

/// The loss's name: the stdlib loss, the last definition, or "expr" for a bare
/// expression. Owned by the loss (valid until `lossc_free`); NULL if `loss` is NULL.
/// May run concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss.
#[no_mangle]
pub unsafe extern "C" fn lossc_loss_name(loss: *const Loss) -> *const c_char {
    // SAFETY: the caller's contract.
    boundary(|| Ok(unsafe { borrow(loss, "loss") }?.name.as_ptr()))
}

/// How many tensor inputs the loss takes (0 if `loss` is NULL).
/// May run concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss.
#[no_mangle]
pub unsafe extern "C" fn lossc_num_inputs(loss: *const Loss) -> usize {
    // SAFETY: the caller's contract.
    boundary(|| Ok(unsafe { borrow(loss, "loss") }?.input_names.len()))
}

/// The name of input `i` (declaration order, the order `lossc_eval` takes them).
/// Owned by the loss (valid until `lossc_free`); NULL if `loss` is NULL or `i` is
/// out of range. May run concurrently with any other call on the same loss except
/// `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss.
#[no_mangle]
pub unsafe extern "C" fn lossc_input_name(loss: *const Loss, i: usize) -> *const c_char {
    boundary(|| {
        // SAFETY: the caller's contract.
        let loss = unsafe { borrow(loss, "loss") }?;
        let n = loss.input_names.len();
        let name = loss.input_names.get(i).ok_or_else(|| Failure::invalid(format!("input {i} of {n}")))?;
        Ok(name.as_ptr())
    })
}

/// The canonical printed form of the loss (stable text, for snapshot tests): on
/// success `*text_out` receives a string the caller frees with `lossc_string_free`.
/// May run concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss; `text_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lossc_show(loss: *const Loss, text_out: *mut *mut c_char) -> Status {
    boundary(|| {
        // SAFETY: the caller's contract.
        let loss = unsafe { borrow(loss, "loss") }?;
        let out = non_null(text_out, "text_out")?;
        // SAFETY: checked non-NULL.
        unsafe { give_string(out, loss.loss.show()) };
        Ok(Status::Ok)
    })
}

/// The canonical printed form of the loss and of its gradient with respect to each
/// input (`d/dp = ...`); freed with `lossc_string_free`, as for `lossc_show`.
/// May run concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss; `text_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lossc_show_grad(loss: *const Loss, text_out: *mut *mut c_char) -> Status {
    boundary(|| {
        // SAFETY: the caller's contract.
        let loss = unsafe { borrow(loss, "loss") }?;
        let out = non_null(text_out, "text_out")?;
        // SAFETY: checked non-NULL.
        unsafe { give_string(out, loss.loss.show_grad()) };
        Ok(Status::Ok)
    })
}

// ---------------------------------------------------------------------------
// The standard library.
// ---------------------------------------------------------------------------

/// Name and signature of each stdlib loss (helpers that are not scalar losses left out).
fn stdlib_losses() -> &'static [(CString, CString)] {
    static LIST: OnceLock<Vec<(CString, CString)>> = OnceLock::new();
    LIST.get_or_init(|| {
        crate::stdlib::stdlib()
            .defs
            .iter()
            .filter(|d| crate::Loss::compile(&d.name.name, "").is_ok())
            .map(|d| (c_string(d.name.name.as_str()), c_string(crate::check::signature(d))))
            .collect()
    })
}

/// How many losses the standard library has (the ones `lossc list` prints).
/// May be called from any thread at any time.
#[no_mangle]
pub extern "C" fn lossc_stdlib_count() -> usize {
    boundary(|| Ok(stdlib_losses().len()))
}

/// The name of stdlib loss `i` ("dice"), usable as a `lossc_compile` source; NULL if
/// `i` is out of range. A static string: never free it. Any thread, any time.
#[no_mangle]
pub extern "C" fn lossc_stdlib_name(i: usize) -> *const c_char {
    boundary(|| {
        let list = stdlib_losses();
        let (name, _) = list.get(i).ok_or_else(|| Failure::invalid(format!("stdlib loss {i} of {}", list.len())))?;
        Ok(name.as_ptr())
    })
}

/// The signature of stdlib loss `i` ("dice(p, y; smooth = 1)"); NULL if `i` is out of
/// range. A static string: never free it. Any thread, any time.
#[no_mangle]
pub extern "C" fn lossc_stdlib_signature(i: usize) -> *const c_char {
    boundary(|| {
        let list = stdlib_losses();
        let (_, sig) = list.get(i).ok_or_else(|| Failure::invalid(format!("stdlib loss {i} of {}", list.len())))?;
        Ok(sig.as_ptr())
    })
}

// ---------------------------------------------------------------------------
// Evaluation.
// ---------------------------------------------------------------------------

/// Evaluates the loss on float32 inputs, and its gradients.
///
/// `inputs` and `shapes` hold `n_inputs` entries, one per input in declaration order
/// (`lossc_input_name`); `inputs[i]` is a contiguous row-major array of
/// `batch * classes * spatial` floats as `shapes[i]` says, aligned to its element (a
/// misaligned array is `LOSSC_STATUS_INVALID_ARGUMENT`). An extent of 1 broadcasts.
/// `grads` is NULL for the value only, or an array of `n_inputs` pointers: a non-NULL
/// `grads[i]` receives d loss / d input i, shaped like input i; NULL entries are
/// skipped. On success `*loss_out` receives the value; on failure it is untouched and
/// so are the gradient buffers (except after `LOSSC_STATUS_BACKEND` or
/// `LOSSC_STATUS_INTERNAL`, when they may hold partial results).
///
/// A NaN or infinity in an input gives a NaN (or infinite) loss, never a failure:
/// `lossc_count_nonfinite` tells which input holds how many. Lossc never keeps or
/// frees the arrays. The result is bitwise the same for any number of threads, and any
/// number of threads may evaluate the same loss at once (each with its own gradient
/// buffers); the work itself runs on lossc's thread pool, as native kernels, or on the
/// f64 reference evaluator for a loss those cannot run yet.
///
/// # Safety
/// `loss` is NULL or a live loss; `inputs`, `shapes` and `grads` as described, with
/// gradient buffers that overlap no input or other buffer; `loss_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lossc_eval(
    loss: *const Loss,
    inputs: *const *const f32,
    shapes: *const Shape,
    n_inputs: usize,
    loss_out: *mut f64,
    grads: *const *mut f32,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let loss_out = non_null(loss_out, "loss_out")?;
        let arrays = unsafe { read_inputs(&loss.loss, inputs, shapes, n_inputs) }?;
        let views: Vec<View> = arrays.iter().map(|&(shape, data)| View::new(shape, data)).collect();
        let mut grads = unsafe { read_grads(grads, &arrays) }?;
        let value = evaluate(&loss.loss, &views, &mut grads)?;
        unsafe { *loss_out = value };
        Ok(Status::Ok)
    })
}

/// An XLA FFI handler (`XLA_FFI_Handler` in XLA's `xla/ffi/api/c_api.h`) that evaluates
/// a loss and its gradients on XLA's own buffers, without copies: `lossc.jax` registers
/// it as the CPU custom call "lossc_eval" (`jax.ffi.register_ffi_target(name,
/// jax.ffi.pycapsule(lib.lossc_xla_ffi), platform="cpu")`). Operands: the loss's inputs,
/// float32, in declaration order, each laid out as `lossc eval` lays out a `.npy` array
/// (`[N, C, *spatial]`; 0-d and 1-d arrays are `[1, 1, n]`). Results: the value (a float32
/// scalar), then d loss / d input i, float32 and shaped as the input, for each bit i set
/// in `wrt`, in input order. Attributes: `source` and `params` (strings, as for
/// `lossc_compile`; each distinct pair is compiled on first use and kept for the life
/// of the process) and `wrt` (int64). A failure returns an XLA error with lossc's message.
///
/// # Safety
/// `call_frame` is an `XLA_FFI_CallFrame *` from XLA.
#[no_mangle]
pub unsafe extern "C" fn lossc_xla_ffi(call_frame: *mut c_void) -> *mut c_void {
    // SAFETY: the caller's contract.
    unsafe { xla::handle(call_frame.cast()) }
}

/// `lossc_eval` on float64 inputs and gradients, by the f64 reference evaluator:
/// exact to a few ulp of double precision and simple, but slow and limited to 2^30
/// broadcast elements. For checking results and for small problems. Same arguments,
/// ownership and concurrency as `lossc_eval`.
///
/// # Safety
/// As for `lossc_eval`, with arrays of doubles.
#[no_mangle]
pub unsafe extern "C" fn lossc_eval_f64(
    loss: *const Loss,
    inputs: *const *const f64,
    shapes: *const Shape,
    n_inputs: usize,
    loss_out: *mut f64,
    grads: *const *mut f64,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let loss_out = non_null(loss_out, "loss_out")?;
        let arrays = unsafe { read_inputs(&loss.loss, inputs, shapes, n_inputs) }?;
        let tensors: Vec<Tensor> = arrays.iter().map(|&(shape, data)| Tensor { shape, data: data.to_vec() }).collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let mut grads = unsafe { read_grads(grads, &arrays) }?;
        if grads.iter().all(Option::is_none) {
            let value = loss.loss.eval(&refs)?;
            unsafe { *loss_out = value };
            return Ok(Status::Ok);
        }
        let (value, values) = loss.loss.eval_grad(&refs)?;
        for (out, g) in grads.iter_mut().zip(&values) {
            if let Some(out) = out {
                out.copy_from_slice(&g.data);
            }
        }
        unsafe { *loss_out = value };
        Ok(Status::Ok)
    })
}

/// Counts the NaN and infinite values in each input: on success `counts_out[i]`
/// receives the count for input i. Takes the same inputs as `lossc_eval` and checks
/// them the same way, so `n_inputs` must match the loss. `counts_out` holds `n_inputs`
/// entries. May run concurrently with any other call on the same loss except
/// `lossc_free`.
///
/// # Safety
/// As for `lossc_eval`; `counts_out` NULL or writable for `n_inputs` values.
#[no_mangle]
pub unsafe extern "C" fn lossc_count_nonfinite(
    loss: *const Loss,
    inputs: *const *const f32,
    shapes: *const Shape,
    n_inputs: usize,
    counts_out: *mut u64,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let counts_out = non_null(counts_out, "counts_out")?;
        let arrays = unsafe { read_inputs(&loss.loss, inputs, shapes, n_inputs) }?;
        loss.loss.extents(&arrays.iter().map(|a| a.0).collect::<Vec<_>>())?;
        let counts: Vec<u64> =
            arrays.iter().map(|(_, data)| data.iter().filter(|v| !v.is_finite()).count() as u64).collect();
        unsafe { std::ptr::copy_nonoverlapping(counts.as_ptr(), counts_out, counts.len()) };
        Ok(Status::Ok)
    })
}

/// Checks input shapes as `lossc_eval` does, without the data: `LOSSC_STATUS_OK`, or
/// `LOSSC_STATUS_SHAPE` with the message `lossc_eval` would give (the input, the expected
/// and the received shapes, the broadcast rule). For callers that know the shapes before
/// the arrays exist, such as a JAX trace. It does not check memory: a vast broadcast is
/// refused by the evaluation itself. May run concurrently with any other call on the same
/// loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss; `shapes` NULL or holding `n_inputs` shapes.
#[no_mangle]
pub unsafe extern "C" fn lossc_check_shapes(loss: *const Loss, shapes: *const Shape, n_inputs: usize) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        check_count(&loss.loss, n_inputs, None)?;
        let mut all = Vec::with_capacity(n_inputs);
        if n_inputs > 0 {
            let shapes = non_null(shapes, "shapes")?;
            for i in 0..n_inputs {
                // SAFETY: `i < n_inputs`, the length of `shapes`.
                let (shape, _) = extents::<f32>(unsafe { *shapes.add(i) }, &input_name(&loss.loss, i))?;
                all.push(shape);
            }
        }
        loss.loss.extents(&all)?;
        Ok(Status::Ok)
    })
}

/// How many terms the loss's top-level sum has: 2 for
/// "0.5*dice(sigmoid(x), y) + bce_logits(x, y)", 3 for "a + b - c" (a subtracted term
/// counts, negated, but not one subtracted from a constant: Dice's 1 - ratio is one
/// term), 1 for a loss that is not a sum
/// (0 if `loss` is NULL). May run concurrently with any other call on the same loss
/// except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss.
#[no_mangle]
pub unsafe extern "C" fn lossc_num_terms(loss: *const Loss) -> usize {
    // SAFETY: the caller's contract.
    boundary(|| Ok(unsafe { borrow(loss, "loss") }?.terms().losses.len()))
}

/// The canonical printed form of term `i`, as a loss of its own over the same inputs
/// (a first line `loss NAME[i](inputs...)`, then its body). Owned by the loss (valid
/// until `lossc_free`); NULL if `loss` is NULL or `i` is out of range. May run
/// concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss.
#[no_mangle]
pub unsafe extern "C" fn lossc_term_text(loss: *const Loss, i: usize) -> *const c_char {
    boundary(|| {
        // SAFETY: the caller's contract.
        let texts = &unsafe { borrow(loss, "loss") }?.terms().texts;
        let text = texts.get(i).ok_or_else(|| Failure::invalid(format!("term {i} of {}", texts.len())))?;
        Ok(text.as_ptr())
    })
}

/// Evaluates each term of the loss's top-level sum and the total, on float32 inputs
/// given as for `lossc_eval` (values only). `terms_out` holds `n_terms` entries, which
/// must equal `lossc_num_terms(loss)`; on success they receive the terms' values and
/// `*loss_out` the loss (the sum of the terms, up to rounding). Concurrency as for
/// `lossc_eval`.
///
/// # Safety
/// As for `lossc_eval`; `terms_out` NULL or writable for `n_terms` values.
#[no_mangle]
pub unsafe extern "C" fn lossc_eval_terms(
    loss: *const Loss,
    inputs: *const *const f32,
    shapes: *const Shape,
    n_inputs: usize,
    terms_out: *mut f64,
    n_terms: usize,
    loss_out: *mut f64,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let terms_out = non_null(terms_out, "terms_out")?;
        let loss_out = non_null(loss_out, "loss_out")?;
        let terms = &loss.terms().losses;
        if n_terms != terms.len() {
            return Err(Failure::invalid(format!(
                "`{}` has {} term{}, but `n_terms` is {n_terms}",
                loss.loss.name(),
                terms.len(),
                if terms.len() == 1 { "" } else { "s" }
            )));
        }
        let arrays = unsafe { read_inputs(&loss.loss, inputs, shapes, n_inputs) }?;
        let views: Vec<View> = arrays.iter().map(|&(shape, data)| View::new(shape, data)).collect();
        let total = evaluate(&loss.loss, &views, &mut [])?;
        let values = terms.iter().map(|t| evaluate(t, &views, &mut [])).collect::<Result<Vec<f64>, Error>>()?;
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), terms_out, values.len()) };
        unsafe { *loss_out = total };
        Ok(Status::Ok)
    })
}

// ---------------------------------------------------------------------------
// NVIDIA GPUs: PTX for trainers that launch it themselves, and a CUDA path.
// ---------------------------------------------------------------------------

/// The loss and all its gradients as PTX for an NVIDIA GPU: `sm` is "sm_70", "sm_80" or
/// "sm_90". On success `*ptx_out` receives the module text (freed with
/// `lossc_string_free`), ready for `cuModuleLoadData`. Its leading comments say which
/// kernels to launch in which order, with which grid and parameters, and how large a
/// workspace they need (the same description as in docs/backend.md). The kernels are for
/// inputs with one class row (binary losses; `lossc_emit_ptx_classes` specialises them to
/// C classes). Sort-based losses (Lovász) fail with `LOSSC_STATUS_BACKEND`: lossc has no
/// GPU sort. May run concurrently with any other call on the same loss except `lossc_free`.
///
/// # Safety
/// `loss` is NULL or a live loss; `sm` NULL or a NUL-terminated string; `ptx_out` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn lossc_emit_ptx(loss: *const Loss, sm: *const c_char, ptx_out: *mut *mut c_char) -> Status {
    // SAFETY: the caller's contract, passed on.
    unsafe { lossc_emit_ptx_classes(loss, sm, 1, ptx_out) }
}

/// `lossc_emit_ptx` for inputs of `classes` class rows (the class loop is unrolled:
/// multiclass losses such as `dice_multiclass` need the count). `classes` is 1 to 64.
///
/// # Safety
/// As for `lossc_emit_ptx`.
#[no_mangle]
pub unsafe extern "C" fn lossc_emit_ptx_classes(
    loss: *const Loss,
    sm: *const c_char,
    classes: i64,
    ptx_out: *mut *mut c_char,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let sm = unsafe { text(sm, "sm") }?;
        let out = non_null(ptx_out, "ptx_out")?;
        crate::backend::ptx::Target::parse(sm).map_err(Failure::invalid)?;
        let classes = usize::try_from(classes)
            .ok()
            .filter(|c| (1..=crate::runtime::native::MAX_CLASSES).contains(c))
            .ok_or_else(|| Failure::invalid(format!("`classes` is {classes}; it must be 1 to 64")))?;
        let program = loss.loss.emit_ptx(sm, classes)?;
        unsafe { give_string(out, program.text) };
        Ok(Status::Ok)
    })
}

/// Evaluates the loss and its gradients on an NVIDIA GPU, through the CUDA driver, which
/// lossc loads at run time (`libcuda.so.1`; the library itself never links CUDA).
///
/// Arguments as for `lossc_eval`, except that `inputs[i]` and `grads[i]` are **device**
/// pointers (`CUdeviceptr` cast to a pointer) and `stream` is the `CUstream` to run on
/// (NULL: the default stream). `*loss_out` is written on the host once the kernels are done
/// (the call synchronises `stream`). The kernels run in the context current on the calling
/// thread (a PyTorch or CUDA-runtime trainer's), else in device 0's primary context; they
/// are compiled on first use per loss, layout and context, and cached in the loss. The
/// result is bitwise the same run to run on one device. Sort-based losses fail with
/// `LOSSC_STATUS_BACKEND`. Without a driver or a device: `LOSSC_STATUS_NO_DEVICE`, and a
/// failing driver call gives `LOSSC_STATUS_DEVICE` with the call and the driver's message.
///
/// # Safety
/// `loss` is NULL or a live loss; `shapes` holds `n_inputs` shapes; `inputs` (and `grads`
/// if not NULL) hold `n_inputs` device pointers to arrays of the sizes the shapes give, in
/// the current context; `loss_out` NULL or writable; `stream` NULL or a live stream of that
/// context.
#[no_mangle]
pub unsafe extern "C" fn lossc_eval_cuda(
    loss: *const Loss,
    inputs: *const *const f32,
    shapes: *const Shape,
    n_inputs: usize,
    loss_out: *mut f64,
    grads: *const *mut f32,
    stream: *mut std::ffi::c_void,
) -> Status {
    boundary(|| {
        // SAFETY (this block): the caller's contract, as documented above.
        let loss = unsafe { borrow(loss, "loss") }?;
        let loss_out = non_null(loss_out, "loss_out")?;
        let pointers = unsafe { read_pointers(&loss.loss, inputs, shapes, n_inputs) }?;
        let arrays: Vec<crate::runtime::gpu::DeviceArray> = pointers
            .into_iter()
            .enumerate()
            .map(|(i, (shape, _, data))| {
                let grad = if grads.is_null() { std::ptr::null_mut() } else { unsafe { *grads.add(i) } };
                crate::runtime::gpu::DeviceArray { shape, data: data as u64, grad: grad as u64 }
            })
            .collect();
        let value = crate::runtime::gpu::evaluate(&loss.loss, &arrays, stream as usize)?;
        unsafe { *loss_out = value };
        Ok(Status::Ok)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: lossc_last_error never returns NULL and its string lives until the next failure.
        unsafe { CStr::from_ptr(lossc_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn misaligned_arrays_are_refused() {
        let mut loss = std::ptr::null_mut();
        // SAFETY: a valid C string and out-pointer.
        assert_eq!(unsafe { lossc_compile(c"dice".as_ptr(), std::ptr::null(), &mut loss) }, Status::Ok);
        let storage = [0.5f32; 10];
        let y = [1.0f32; 8];
        // One byte past an aligned float: a view NumPy can make.
        let odd = storage.as_ptr().cast::<u8>().wrapping_add(1).cast::<f32>();
        let shapes = [Shape { batch: 1, classes: 1, spatial: 8 }; 2];
        let mut value = 0.0;
        // SAFETY: the pointers are valid for the calls' contract but for the misalignment,
        // which lossc must refuse before reading.
        let status =
            unsafe { lossc_eval(loss, [odd, y.as_ptr()].as_ptr(), shapes.as_ptr(), 2, &mut value, std::ptr::null()) };
        assert_eq!(status, Status::InvalidArgument);
        assert!(last_error().contains("`inputs[0]` (input `p`) is not aligned"), "{}", last_error());
        let mut grad = [0.0f32; 9];
        let odd_grad = grad.as_mut_ptr().cast::<u8>().wrapping_add(2).cast::<f32>();
        let grads = [odd_grad, std::ptr::null_mut()];
        let inputs = [storage.as_ptr(), y.as_ptr()];
        // SAFETY: as above.
        let status = unsafe { lossc_eval(loss, inputs.as_ptr(), shapes.as_ptr(), 2, &mut value, grads.as_ptr()) };
        assert_eq!(status, Status::InvalidArgument);
        assert!(last_error().contains("`grads[0]` is not aligned"), "{}", last_error());
        // SAFETY: `loss` came from lossc_compile.
        unsafe { lossc_free(loss) };
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let status: Status = boundary(|| panic!("boom"));
        assert_eq!(status, Status::Internal);
        assert!(last_error().contains("boom"), "{}", last_error());
        let name: *const c_char = boundary(|| panic!("again"));
        assert!(name.is_null());
    }

    #[test]
    fn failures_set_this_threads_message_only() {
        let _: Status = boundary(|| Err(Failure::invalid("mine")));
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            let _: Status = boundary(|| Err(Failure::invalid("theirs")));
        })
        .join()
        .expect("the thread runs");
        assert_eq!(last_error(), "error: mine\n");
    }

    #[test]
    fn errors_map_to_one_status_each() {
        let status = |source: &str, params: &str| match crate::Loss::compile(source, params) {
            Ok(_) => Status::Ok,
            Err(e) => Failure::from(e).status,
        };
        assert_eq!(status("dice", ""), Status::Ok);
        assert_eq!(status("dice(", ""), Status::Parse);
        assert_eq!(status("nosuch(x, y)", ""), Status::Check);
        assert_eq!(status("sigmoid(x)", ""), Status::Check);
        assert_eq!(status("dice", "nosuch=1"), Status::Params);
        assert_eq!(Failure::from(Error::Shape("s".into())).status, Status::Shape);
        assert_eq!(Failure::from(Error::Unsupported("u".into())).status, Status::Backend);
        assert_eq!(Failure::from(Error::NoDevice("n".into())).status, Status::NoDevice);
        assert_eq!(Failure::from(Error::Device("d".into())).status, Status::Device);
    }

    #[test]
    fn status_names_match_the_values() {
        for (status, name) in [
            (Status::Ok, "ok"),
            (Status::Parse, "parse"),
            (Status::Check, "check"),
            (Status::Params, "params"),
            (Status::Shape, "shape"),
            (Status::NullArgument, "null_argument"),
            (Status::InvalidArgument, "invalid_argument"),
            (Status::Backend, "backend"),
            (Status::Internal, "internal"),
        ] {
            // SAFETY: a static string.
            assert_eq!(unsafe { CStr::from_ptr(lossc_status_name(status as c_int)) }.to_str(), Ok(name));
        }
    }

    #[test]
    fn an_interior_nul_is_spelled_out() {
        assert_eq!(c_string("a\0b").to_str(), Ok("a\\0b"));
    }
}
