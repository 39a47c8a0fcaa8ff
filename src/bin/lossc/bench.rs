//! `lossc bench`: forward+backward throughput against a same-run bandwidth probe.

/// Options of `lossc bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Losses to time (stdlib names or expressions).
    pub losses: Vec<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let _ = &args.losses;
    Err("error: lossc bench is not written yet\n".into())
}
