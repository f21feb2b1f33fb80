//! The one door to the iptables/ipset binaries, so that the writer can be driven by a fake kernel
//! in unit tests and by the real binaries (optionally inside a named netns) everywhere else.

use std::io::Write;
use std::process::{Command, Stdio};

/// A failed command, with what it printed so that the log says why.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
}

/// Runs a program with arguments and optional stdin, returning its stdout.
pub trait CommandRunner: Send + Sync {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError>;
}

/// Runs the real binaries, in the current netns or (for tests and the lab) in a named one through
/// `ip netns exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecRunner {
    netns: Option<String>,
}

impl ExecRunner {
    pub fn new() -> Self {
        Self { netns: None }
    }

    pub fn in_netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
        }
    }
}

/// `WARREN_IPSET_NETLINK=0` makes warren write ipsets with the `ipset` binary.
pub const IPSET_NETLINK_ENV: &str = "WARREN_IPSET_NETLINK";

impl ExecRunner {
    /// `ipset restore -exist` over netlink (see [`super::ipset_nl`]); `None` when it cannot be
    /// done that way before anything was sent, so that the binary does it.
    fn ipset_restore_netlink(&self, text: &str) -> Option<Result<String, CmdError>> {
        use super::ipset_nl::{parse, IpsetError, IpsetSocket};
        let fallback = |e: IpsetError| {
            tracing::debug!(error = %e, "ipset over netlink unavailable; using the ipset binary");
            None
        };
        // The escape hatch, should a kernel ever answer differently from the binary.
        if std::env::var_os(IPSET_NETLINK_ENV).is_some_and(|v| v == "0") {
            return None;
        }
        let mut sock = match IpsetSocket::open(self.netns.as_deref()) {
            Ok(s) => s,
            Err(e) => return fallback(e),
        };
        let ops = match parse(text, &mut |name| sock.kind_of(name)) {
            Ok(ops) => ops,
            Err(e @ IpsetError::Kernel { .. }) => return Some(Err(restore_failed(e))),
            Err(e) => return fallback(e),
        };
        Some(sock.run(&ops).map(|()| String::new()).map_err(restore_failed))
    }
}

fn restore_failed(e: super::ipset_nl::IpsetError) -> CmdError {
    CmdError::Failed {
        program: "ipset".into(),
        args: "restore -exist (netlink)".into(),
        status: "refused".into(),
        stderr: e.to_string(),
    }
}

impl CommandRunner for ExecRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
        if let (Some(text), "ipset", ["restore", "-exist"]) = (stdin, program, args) {
            if let Some(r) = self.ipset_restore_netlink(text) {
                return r;
            }
        }
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| CmdError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A restore that rejects its input early closes the pipe; the exit status says why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(CmdError::Failed {
                program: program.to_string(),
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
