//! `warren-ipam`: warren's IPAM as a standalone, host-local-compatible IPAM plugin.

fn main() -> std::process::ExitCode {
    cni_bin::process_main(cni_bin::Plugin::Ipam)
}
