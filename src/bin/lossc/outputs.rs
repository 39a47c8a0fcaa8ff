//! The gradient files `lossc eval` writes, all or none.
//!
//! Each gradient goes first to a temporary file beside its target, created before the
//! evaluation (so that an unwritable directory fails before anything is computed), and
//! is renamed over the target only once every gradient is written: a run that fails
//! leaves every target as it was. A target that exists but is not a regular file
//! (`/dev/null`, a pipe) is written in place, after the evaluation.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Where one gradient goes.
pub struct Output {
    /// The input it is the gradient of.
    pub input: usize,
    target: PathBuf,
    /// `None` for a target written in place.
    temp: Option<PathBuf>,
}

/// The outputs of one run; dropping them without `commit` removes their temporary files.
pub struct Outputs {
    pub list: Vec<Output>,
}

impl Outputs {
    /// Prepares `(input, path)` targets, refusing a target that is also one of `reads` (an
    /// input or the source file: a failed run would otherwise lose it) or that two
    /// gradients share.
    pub fn prepare(wanted: &[(usize, String)], reads: &[&Path]) -> Result<Outputs, String> {
        for (k, (_, file)) in wanted.iter().enumerate() {
            let path = Path::new(file);
            if reads.iter().any(|r| same_file(path, r)) {
                return Err(format!("--grad {file} would overwrite a file this run reads"));
            }
            if wanted[..k].iter().any(|(_, other)| same_target(path, Path::new(other))) {
                return Err(format!("two gradients would be written to {file}"));
            }
        }
        let mut outputs = Outputs { list: Vec::new() };
        for (input, file) in wanted {
            let target = PathBuf::from(file);
            let in_place = std::fs::metadata(&target).is_ok_and(|m| !m.is_file());
            let temp = if in_place {
                None
            } else {
                let temp = temp_path(&target);
                File::create_new(&temp).map_err(|e| format!("cannot write {file}: {e}"))?;
                Some(temp)
            };
            outputs.list.push(Output { input: *input, target, temp });
        }
        Ok(outputs)
    }

    /// Writes every output with `write`, then moves them into place.
    pub fn commit(mut self, write: impl Fn(&Output, File) -> Result<(), String>) -> Result<(), String> {
        for out in &self.list {
            let shown = out.target.display();
            let file = match &out.temp {
                Some(temp) => File::create(temp),
                None => File::options().write(true).open(&out.target),
            }
            .map_err(|e| format!("cannot write {shown}: {e}"))?;
            write(out, file).map_err(|e| format!("cannot write {shown}: {e}"))?;
        }
        for out in &mut self.list {
            if let Some(temp) = &out.temp {
                std::fs::rename(temp, &out.target)
                    .map_err(|e| format!("cannot write {}: {e}", out.target.display()))?;
                out.temp = None;
            }
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for temp in self.list.iter().filter_map(|o| o.temp.as_ref()) {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// `.NAME.lossc-PID.tmp` beside `target`.
fn temp_path(target: &Path) -> PathBuf {
    let name = target.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    target.with_file_name(format!(".{name}.lossc-{}.tmp", std::process::id()))
}

/// Whether two paths name one existing file (hard links and symlinks included).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            x.dev() == y.dev() && x.ino() == y.ino()
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok(),
        _ => false,
    }
}

/// Whether two output paths would be one file: the same existing file, or the same path.
fn same_target(a: &Path, b: &Path) -> bool {
    same_file(a, b) || std::path::absolute(a).ok() == std::path::absolute(b).ok()
}
