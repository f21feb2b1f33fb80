//! `warren`: the CNI plugin a container runtime runs for every pod.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    cni_bin_main(cni_bin::Plugin::Warren)
}

fn cni_bin_main(plugin: cni_bin::Plugin) -> ExitCode {
    let mut stdin = Vec::new();
    // A runtime that gives no stdin (VERSION) gives an empty one; a read error is a decode error below.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    cni_bin::init_logging(&stdin);
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    #[cfg(feature = "fault-injection")]
    let reply = match cni_bin::faults::from_env(&env) {
        Some(f) => cni_bin::handle(plugin, &env, &stdin, &f),
        None => cni_bin::handle(plugin, &env, &stdin, &cni_bin::NoFaults),
    };
    #[cfg(not(feature = "fault-injection"))]
    let reply = cni_bin::handle(plugin, &env, &stdin, &cni_bin::NoFaults);
    if let Some(v) = &reply.stdout {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, v);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    if reply.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
