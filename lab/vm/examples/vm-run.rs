//! Runs one command in the micro-VM and prints its output: `cargo run -p lab-vm --example vm-run -- [--no-modules] CMD ARGS...`.
//! The shared dir (console log, outputs) is `$WARREN_VM_SHARED` or a fresh dir under /tmp that is kept afterwards.

use std::path::PathBuf;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let mut command: Vec<String> = std::env::args().skip(1).collect();
    let no_modules = command.first().is_some_and(|a| a == "--no-modules");
    if no_modules {
        command.remove(0);
    }
    anyhow::ensure!(!command.is_empty(), "usage: vm-run CMD [ARGS...]");
    let cache = std::env::var_os("WARREN_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or("/var/cache/warren-lab".into());
    let assets = lab_vm::ensure_assets(&cache).context("kernel assets")?;
    let shared = match std::env::var_os("WARREN_VM_SHARED") {
        Some(p) => PathBuf::from(p),
        None => tempfile::Builder::new().prefix("warren-vm-run-").tempdir()?.keep(),
    };
    std::fs::create_dir_all(&shared)?;
    let mut cfg = lab_vm::VmConfig::new(assets, &shared, command);
    if no_modules {
        cfg.modules.clear();
    }
    let began = Instant::now();
    let out = lab_vm::run_once(&cfg).context("running the VM")?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    eprintln!(
        "[vm-run] status {} after {:?}; shared dir {}",
        out.status,
        began.elapsed(),
        shared.display()
    );
    std::process::exit(out.status);
}
