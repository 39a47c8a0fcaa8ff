//! Runs a compiled loss on float32 inputs: the layer under the CLI and the C ABI.
//!
//! `evaluate` checks the inputs and the gradient buffers, then picks the fastest
//! engine that can run the loss:
//! - `native`: the plan's sweeps as Cranelift kernels over blocks, in parallel;
//! - `sorted`: losses with a `sorted` block (Lovász), sort and scans on whole tensors;
//! - `blocked`: the plan's sweeps with the f64 interpreter per block, for what the
//!   other two do not cover.
//!
//! Every engine combines partial results in a fixed order, so the value and the
//! gradients are bitwise the same for any number of threads.

pub mod blocked;
pub mod cache;
pub mod cuda;
pub mod gpu;
pub mod native;
pub mod sorted;

use std::path::Path;

use crate::error::Error;
use crate::ir::Op;
use crate::loss::Loss;
use crate::tensor::{Tensor, View};

/// Which evaluator runs a loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// Native kernels (the default).
    #[default]
    Jit,
    /// The f64 reference evaluator: slow, obviously correct.
    Interp,
}

/// The loss value on `inputs`; the gradient with respect to input `i` is written
/// into `grads[i]` where that is `Some` (a buffer shaped like the input).
/// `grads` is empty (value only) or has one entry per input.
pub fn evaluate(
    loss: &Loss,
    backend: Backend,
    inputs: &[View],
    grads: &mut [Option<&mut [f32]>],
) -> Result<f64, Error> {
    let ext = check(loss, inputs, grads)?;
    cap_threads();
    // Asked on every call, the interpreter's too, so that the first process is known
    // before a fork whatever ran first.
    let forked = forked_pool();
    if backend == Backend::Interp {
        return reference(loss, inputs, grads);
    }
    if let Some(pool) = forked {
        return pool.install(|| jit(loss, inputs, ext, grads));
    }
    let elements = ext.iter().product::<usize>();
    // Called from outside the thread pool (a trainer's thread, the C ABI), each parallel
    // loop wakes the pool's threads and waits for them, about 0.1 ms here: moving the
    // whole evaluation into the pool pays that once rather than once per sweep. A small
    // one stays on the caller's thread, where the native engine runs it alone.
    if elements > SERIAL_ELEMENTS && rayon::current_thread_index().is_none() {
        return rayon::scope(|_| jit(loss, inputs, ext, grads));
    }
    jit(loss, inputs, ext, grads)
}

/// The most threads lossc runs on: far more than cores only costs (each thread a stack
/// and a share of every parallel step); with RAYON_NUM_THREADS=10000 an evaluation of a
/// few thousand elements took minutes.
pub const MAX_THREADS: usize = 1024;

/// The thread count the environment asks rayon's global pool for, with the variable that
/// asks: read as rayon reads it (RAYON_NUM_THREADS, else the older RAYON_RS_NUM_CPUS; 0
/// or no number is "one per core", `None` here).
pub fn threads_from_environment() -> Option<(&'static str, usize)> {
    let read = |name: &'static str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).map(|n| (name, n));
    match read("RAYON_NUM_THREADS") {
        Some((_, 0)) => None,
        Some(asked) => Some(asked),
        None => read("RAYON_RS_NUM_CPUS").filter(|&(_, n)| n > 0),
    }
}

/// In a process forked from one where lossc ran (a `multiprocessing` or DataLoader
/// worker), a pool of its own: rayon's global pool keeps the parent's state but none of
/// its threads, so work sent there would wait forever. `None` in the process that first
/// ran lossc, which uses the global pool. (A host that started rayon's global pool itself
/// before its first lossc call, and forks then, is not recognised.)
fn forked_pool() -> Option<&'static rayon::ThreadPool> {
    static FIRST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static OWN: std::sync::Mutex<Option<(u32, &'static rayon::ThreadPool)>> = std::sync::Mutex::new(None);
    let pid = std::process::id();
    if *FIRST.get_or_init(|| pid) == pid {
        return None;
    }
    let mut own = OWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match *own {
        Some((owner, pool)) if owner == pid => Some(pool),
        _ => {
            let threads = threads_from_environment().map_or(0, |(_, n)| n.min(MAX_THREADS));
            // Leaked: one per forked process, and a pool copied from a parent cannot be dropped.
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok()?;
            let pool: &'static rayon::ThreadPool = Box::leak(Box::new(pool));
            *own = Some((pid, pool));
            Some(pool)
        }
    }
}

/// Holds rayon's global pool to [`MAX_THREADS`] where the environment asks for more.
/// Leaves it alone otherwise, and where the host program has already started it.
fn cap_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if threads_from_environment().is_some_and(|(_, n)| n > MAX_THREADS) {
            // An error means the pool already runs, sized by whoever started it.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(MAX_THREADS).build_global();
        }
    });
}

/// Broadcast elements up to which the native engine runs an evaluation on the calling
/// thread alone (no parallel loop): about 0.1-0.2 ms of work on one thread, what waking
/// the pool costs.
pub(crate) const SERIAL_ELEMENTS: usize = 1 << 15;

/// `evaluate` on the compiled engines, once the shapes are checked.
fn jit(loss: &Loss, inputs: &[View], ext: [usize; 3], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let want: Vec<bool> = (0..inputs.len()).map(|i| grads.get(i).is_some_and(Option::is_some)).collect();
    let n = ext.iter().product::<usize>() as f64;
    match engine(loss, inputs, ext, &want) {
        Engine::Native => {
            ensure_memory(ext, native_bytes(ext), "the native engine's block partials")?;
            // `Unsupported` comes only from compiling, before any gradient is written.
            match native::evaluate(loss, inputs, ext, grads) {
                Err(Error::Unsupported(_)) => blocked_or_reference(loss, inputs, ext, grads),
                done => done,
            }
        }
        Engine::Sorted => {
            ensure_memory(ext, SORTED_BYTES_PER_ELEMENT * n, "the sort and its scans")?;
            sorted::evaluate(loss, inputs, ext, grads)
        }
        Engine::Blocked(_) => blocked_or_reference(loss, inputs, ext, grads),
    }
}

/// The per-block interpreter, or the whole-tensor one for what it cannot run (a reduction
/// across the batch that keeps positions).
fn blocked_or_reference(
    loss: &Loss,
    inputs: &[View],
    ext: [usize; 3],
    grads: &mut [Option<&mut [f32]>],
) -> Result<f64, Error> {
    ensure_memory(ext, native_bytes(ext), "the per-block evaluator's partials")?;
    match reference_blocked(loss, inputs, grads) {
        Err(Error::Unsupported(_)) => {
            // Its inputs in f64 and a few whole-tensor values at a time.
            let n = ext.iter().map(|&e| e as f64).product::<f64>();
            ensure_memory(ext, 8.0 * n * (inputs.len() as f64 + 4.0), "the whole-tensor interpreter")?;
            reference(loss, inputs, grads)
        }
        done => done,
    }
}

/// Working memory per broadcast element of the `sorted` engine, roughly: the sort's
/// records twice over (radix passes), the permutation, and the scans' stored columns.
const SORTED_BYTES_PER_ELEMENT: f64 = 64.0;

/// Working memory of the block-parallel engines, roughly: per block (one batch item, up to
/// `native::BLOCK` positions) its description and a few f64 partial sums per class.
fn native_bytes(ext: [usize; 3]) -> f64 {
    let blocks = ext[0] as f64 * ext[2].div_ceil(native::BLOCK) as f64;
    blocks * (32.0 + 64.0 * ext[1] as f64)
}

/// Refuses an evaluation whose working memory (`bytes`, an estimate) exceeds the memory
/// this machine has available. The engines' working memory is a multiple of the largest
/// input (the sort behind Lovász takes some 64 bytes an element), and a failed allocation
/// aborts the process, the caller's included: a clear error instead.
/// Where the available memory is unknown (not Linux), nothing is refused here.
pub fn ensure_memory(ext: [usize; 3], bytes: f64, what: &str) -> Result<(), Error> {
    // Below this, not worth reading /proc on every call (small evaluations are microseconds).
    const ALWAYS_FITS: f64 = 256e6;
    if bytes <= ALWAYS_FITS {
        return Ok(());
    }
    let Some(available) = available_memory() else { return Ok(()) };
    if bytes <= available as f64 {
        return Ok(());
    }
    let gb = |b: f64| b / 1e9;
    Err(Error::Shape(format!(
        "[batch, class, spatial] = {ext:?} ({:.0} elements) needs about {:.1} GB of working memory for {what}, \
         more than the {:.1} GB this machine has available",
        ext.iter().map(|&e| e as f64).product::<f64>(),
        gb(bytes),
        gb(available as f64)
    )))
}

/// Bytes of memory available to a new allocation: free RAM that can be reclaimed plus free
/// swap (/proc/meminfo), or less where the process's address-space limit (`ulimit -v`) or
/// its control group's memory limit (a container's) leaves less; `None` where
/// /proc/meminfo is not readable.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    let free = field("MemAvailable:")? + field("SwapFree:").unwrap_or(0);
    // "Max address space   <soft>   <hard>   bytes", the soft limit a number or "unlimited".
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
        line["Max address space".len()..].split_whitespace().next()?.parse::<u64>().ok()
    });
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = cgroup_headroom(Path::new("/sys/fs/cgroup"), &membership);
    Some([limit, cgroup].into_iter().flatten().fold(free, u64::min))
}

/// The memory left under the limits of the control groups in `membership` (the text of
/// /proc/self/cgroup) and of every group above them, the smallest headroom of all: cgroup
/// v2's `memory.max - memory.current` and v1's `memory.limit_in_bytes -
/// memory.usage_in_bytes`, under `root`, counting the group's inactive file cache as free
/// (the kernel reclaims it before it fails an allocation; MemAvailable counts it too).
/// `None` where no group sets a limit (v2 writes "max", v1 a number near 2^63).
fn cgroup_headroom(root: &Path, membership: &str) -> Option<u64> {
    let mut headroom: Option<u64> = None;
    for line in membership.lines() {
        // "0::/path" (v2, no controller names) or "4:memory:/path" (v1).
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (base, limit_file, usage_file, cache_stat) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
            let number = |file: &str| read(file)?.trim().parse::<u64>().ok();
            if let (Some(limit), Some(usage)) = (number(limit_file), number(usage_file)) {
                if limit < 1 << 62 {
                    // memory.stat: one "name value" per line.
                    let cache = read("memory.stat")
                        .and_then(|stat| {
                            let line = stat.lines().find(|l| l.split_whitespace().next() == Some(cache_stat))?;
                            line.split_whitespace().nth(1)?.parse::<u64>().ok()
                        })
                        .unwrap_or(0);
                    let left = limit.saturating_sub(usage.saturating_sub(cache));
                    headroom = Some(headroom.map_or(left, |h| h.min(left)));
                }
            }
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    headroom
}

/// The engine that runs a loss natively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Cranelift kernels per sweep.
    Native,
    /// Sort and scans on whole tensors.
    Sorted,
    /// The f64 interpreter per block (or on whole tensors, for what it cannot run), and why.
    Blocked(String),
}

/// Which engine `evaluate` picks for these inputs and wanted gradients (`want[i]`: the
/// gradient of input `i`). The inputs must have passed `check`.
pub fn engine(loss: &Loss, inputs: &[View], ext: [usize; 3], want: &[bool]) -> Engine {
    if has_sort(loss) {
        return Engine::Sorted;
    }
    match native::unsupported(loss, inputs, ext, want) {
        None => Engine::Native,
        Some(why) => Engine::Blocked(why),
    }
}

/// Checks the inputs (count, shapes, sizes) and the gradient buffers; returns the extents.
pub fn check(loss: &Loss, inputs: &[View], grads: &[Option<&mut [f32]>]) -> Result<[usize; 3], Error> {
    let ext = loss.extents(&inputs.iter().map(|v| v.shape).collect::<Vec<_>>())?;
    for (spec, v) in loss.inputs().iter().zip(inputs) {
        let want = v.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if want != Some(v.data.len()) {
            return Err(Error::Shape(format!(
                "input `{}` has shape {:?} but holds {} values",
                spec.name,
                v.shape,
                v.data.len()
            )));
        }
    }
    if ext.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
        return Err(Error::Shape(format!("the broadcast shape {ext:?} has too many elements to index")));
    }
    if !grads.is_empty() && grads.len() != inputs.len() {
        return Err(Error::Shape(format!(
            "{} gradient buffers given for {} inputs: give none, or one (possibly absent) per input",
            grads.len(),
            inputs.len()
        )));
    }
    for ((spec, v), g) in loss.inputs().iter().zip(inputs).zip(grads) {
        if let Some(g) = g {
            if g.len() != v.data.len() {
                return Err(Error::Shape(format!(
                    "the gradient buffer for `{}` holds {} values, but the input has shape {:?} ({} values)",
                    spec.name,
                    g.len(),
                    v.shape,
                    v.data.len()
                )));
            }
        }
    }
    Ok(ext)
}

/// Whether the loss sorts (Lovász): those run on the `sorted` engine.
pub fn has_sort(loss: &Loss) -> bool {
    let mut roots = vec![loss.root()];
    roots.extend(loss.gradient_nodes().iter().flatten());
    let g = loss.graph();
    g.reachable(&roots).iter().any(|&id| matches!(g.node(id).op, Op::Sort { .. }))
}

fn tensors(inputs: &[View]) -> Vec<Tensor> {
    inputs.iter().map(View::to_tensor).collect()
}

/// Copies f64 gradients into the caller's f32 buffers.
fn write_back(grads: &mut [Option<&mut [f32]>], values: &[Tensor]) {
    for (out, g) in grads.iter_mut().zip(values) {
        if let Some(out) = out {
            for (o, v) in out.iter_mut().zip(&g.data) {
                *o = *v as f32;
            }
        }
    }
}

/// The f64 reference evaluator on copies of the inputs.
fn reference(loss: &Loss, inputs: &[View], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let owned = tensors(inputs);
    let refs: Vec<&Tensor> = owned.iter().collect();
    if grads.iter().all(Option::is_none) {
        return loss.eval(&refs);
    }
    let (value, values) = loss.eval_grad(&refs)?;
    write_back(grads, &values);
    Ok(value)
}

/// The plan's sweeps with the f64 interpreter per block.
fn reference_blocked(loss: &Loss, inputs: &[View], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let owned = tensors(inputs);
    let refs: Vec<&Tensor> = owned.iter().collect();
    let want = grads.iter().any(Option::is_some);
    let (value, values) = blocked::evaluate(loss, &refs, want)?;
    write_back(grads, &values);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::{cgroup_headroom, ensure_memory};
    use std::path::Path;

    /// Where the available memory is known (Linux), working memory beyond it is refused
    /// with a shape error that says how much was needed; small amounts always pass.
    #[cfg(target_os = "linux")]
    #[test]
    fn working_memory_beyond_the_machine_is_refused() {
        let err = ensure_memory([1 << 20, 1, 1 << 20], 1e16, "the sort").expect_err("10 PB");
        let message = err.to_string();
        assert!(matches!(err, crate::Error::Shape(_)), "{message}");
        assert!(message.contains("10000000.0 GB of working memory for the sort"), "{message}");
        assert!(ensure_memory([1, 1, 1 << 20], 1e6, "the sort").is_ok());
    }

    fn write(root: &Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("folders");
        std::fs::write(path, text).expect("a file");
    }

    #[test]
    fn a_control_groups_memory_limit_bounds_the_available_memory() {
        let root = std::env::temp_dir().join(format!("lossc-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v2: the limit is set on the parent; the process's own group says "max".
        write(&root, "v2/box/memory.max", "1000000\n");
        write(&root, "v2/box/memory.current", "400000\n");
        write(&root, "v2/box/job/memory.max", "max\n");
        write(&root, "v2/box/job/memory.current", "300000\n");
        assert_eq!(cgroup_headroom(&root.join("v2"), "0::/box/job\n"), Some(600000));
        // Inactive file cache counts as free: 250000 of the box's 400000 in use.
        write(&root, "v2/box/memory.stat", "anon 100000\ninactive_file 250000\nactive_file 50000\n");
        assert_eq!(cgroup_headroom(&root.join("v2"), "0::/box/job\n"), Some(850000));
        assert_eq!(cgroup_headroom(&root.join("v2"), "0::/elsewhere\n"), None);
        // v1: only the memory controller's line counts; "unlimited" is a number near 2^63.
        write(&root, "v1/memory/job/memory.limit_in_bytes", "5000000\n");
        write(&root, "v1/memory/job/memory.usage_in_bytes", "1000000\n");
        write(&root, "v1/memory/free/memory.limit_in_bytes", "9223372036854771712\n");
        write(&root, "v1/memory/free/memory.usage_in_bytes", "1000000\n");
        let v1 = root.join("v1");
        assert_eq!(cgroup_headroom(&v1, "5:cpu:/job\n4:memory:/job\n0::/\n"), Some(4000000));
        write(&root, "v1/memory/job/memory.stat", "inactive_file 7\ntotal_inactive_file 600000\n");
        assert_eq!(cgroup_headroom(&v1, "4:memory:/job\n"), Some(4600000));
        assert_eq!(cgroup_headroom(&v1, "4:memory:/free\n"), None);
        assert_eq!(cgroup_headroom(&v1, "garbage\n4:memory\n"), None);
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
