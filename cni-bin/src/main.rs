//! `warren`: the CNI plugin a container runtime runs for every pod.

fn main() -> std::process::ExitCode {
    cni_bin::process_main(cni_bin::Plugin::Warren)
}
