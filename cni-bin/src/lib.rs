//! warren's CNI plugin: `warren` (interface + in-process IPAM) and `warren-ipam` (IPAM only).
//!
//! [`handle`] is the whole plugin behind a function: environment and stdin in, exactly one JSON
//! document (or nothing) and a success flag out. The binaries are thin wrappers around it, and
//! tests call it in-process with injected faults.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use conf::cni::{NetConf, LATEST_VERSION, SUPPORTED_VERSIONS};
use conf::{CniError, ErrorCode};
use serde_json::Value;

pub mod cmd;
pub mod env;
pub mod faults;
pub mod ipam_backend;
pub mod netlink;
pub mod netns;
pub mod pod_net;

pub use env::{CmdArgs, Command};
pub use faults::{FailAt, Faults, NoFaults, Step};

/// What a plugin invocation prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The one JSON document for stdout (a result, a version answer or an error), if any.
    pub stdout: Option<Value>,
    pub success: bool,
}

impl Reply {
    fn ok(v: Option<Value>) -> Self {
        Self {
            stdout: v,
            success: true,
        }
    }
    fn err(e: &CniError, version: &str) -> Self {
        Self {
            stdout: Some(e.to_json(version)),
            success: false,
        }
    }
}

/// Which plugin is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    /// `warren`: interfaces, routes, and IPAM.
    Warren,
    /// `warren-ipam`: the standalone IPAM plugin.
    Ipam,
}

/// The version to write errors in: the request's, if it is one we speak.
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

/// Runs one plugin invocation; never panics (a panic becomes a CNI error).
pub fn handle(plugin: Plugin, env: &HashMap<String, String>, stdin: &[u8], faults: &dyn Faults) -> Reply {
    let version = reply_version(stdin);
    let outcome = catch_unwind(AssertUnwindSafe(|| dispatch(plugin, env, stdin, faults)));
    match outcome {
        Ok(Ok(v)) => Reply::ok(v),
        Ok(Err(e)) => {
            tracing::warn!(code = e.code as u32, msg = %e.msg, details = %e.details, "CNI call failed");
            Reply::err(&e, &version)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(panic = %what, "plugin panicked");
            Reply::err(
                &CniError::new(ErrorCode::Internal, "internal error (panic)").with_details(what),
                &version,
            )
        }
    }
}

fn dispatch(
    plugin: Plugin,
    env: &HashMap<String, String>,
    stdin: &[u8],
    faults: &dyn Faults,
) -> Result<Option<Value>, CniError> {
    let args = CmdArgs::from_env(env)?;
    if args.command == Command::Version {
        return Ok(Some(conf::cni::version_info(&reply_version(stdin))));
    }
    let conf = parse_conf(plugin, stdin)?;
    tracing::debug!(command = args.command.as_str(), container = %args.container_id, "CNI call");
    match (plugin, args.command) {
        (_, Command::Version) => Ok(Some(conf::cni::version_info(&conf.cni_version))),
        (Plugin::Warren, Command::Add) => cmd::add::add(&args, &conf, env, stdin, faults).map(Some),
        (Plugin::Warren, Command::Del) => cmd::del::del(&args, &conf, env, stdin).map(|_| None),
        (Plugin::Warren, Command::Check) => cmd::check::check(&args, &conf, env, stdin).map(|_| None),
        (Plugin::Warren, Command::Gc) => cmd::gc::gc(&args, &conf, env, stdin).map(|_| None),
        (_, Command::Status) => cmd::status(&args, &conf, env, stdin).map(|_| None),
        (Plugin::Ipam, cmd) => cmd::ipam_only::run(cmd, &args, &conf, env, stdin),
    }
}

/// Parses and validates the configuration (decode → 6, invalid → 7, unknown version → 1).
fn parse_conf(plugin: Plugin, stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf = NetConf::parse(stdin)?;
    let ipam_type = conf.ipam.as_ref().map(|s| s.ipam_type.as_str()).unwrap_or_default();
    if plugin == Plugin::Warren && ipam_type.is_empty() {
        return Err(CniError::new(ErrorCode::InvalidConfig, "\"ipam\" has no \"type\""));
    }
    Ok(conf)
}

/// Sets up logging to stderr (and the configured file), never stdout. Safe to call twice.
pub fn init_logging(stdin: &[u8]) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let v: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    let level = v
        .get("logLevel")
        .or_else(|| v.get("log_level"))
        .and_then(Value::as_str)
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let file = v
        .get("logFile")
        .or_else(|| v.get("log_file_path"))
        .and_then(Value::as_str)
        .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(level)
        .with_target(false);
    let _ = match file {
        Some(f) => builder
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The whole life of a plugin process, shared by `warren` and `warren-ipam`: stdin and the CNI
/// environment in, exactly one JSON document on stdout, the exit code out.
pub fn process_main(plugin: Plugin) -> std::process::ExitCode {
    use std::io::{Read, Write};
    let mut stdin = Vec::new();
    // A runtime that gives no stdin (VERSION) gives an empty one; a read error is a decode error below.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    init_logging(&stdin);
    let env: HashMap<String, String> = std::env::vars().collect();
    #[cfg(feature = "fault-injection")]
    let reply = match faults::from_env(&env) {
        Some(f) => handle(plugin, &env, &stdin, &f),
        None => handle(plugin, &env, &stdin, &NoFaults),
    };
    #[cfg(not(feature = "fault-injection"))]
    let reply = handle(plugin, &env, &stdin, &NoFaults);
    if let Some(v) = &reply.stdout {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, v);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    if reply.success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn should_answer_version_in_the_requested_version() {
        let r = handle(
            Plugin::Warren,
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
            &NoFaults,
        );
        assert!(r.success);
        let v = r.stdout.unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["supportedVersions"].as_array().unwrap().contains(&"1.1.0".into()));
    }

    #[test]
    fn should_map_bad_input_to_spec_codes() {
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let r = handle(Plugin::Warren, &del, b"{garbage", &NoFaults);
        assert!(!r.success);
        let v = r.stdout.unwrap();
        assert_eq!(v["code"], 6);
        assert_eq!(v["cniVersion"], LATEST_VERSION);

        let r = handle(Plugin::Warren, &env(&[]), b"{}", &NoFaults);
        assert_eq!(r.stdout.unwrap()["code"], 4);

        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"warren","ipam":{"type":""}}"#;
        let r = handle(Plugin::Warren, &del, conf, &NoFaults);
        let v = r.stdout.unwrap();
        assert_eq!((v["code"].clone(), v["cniVersion"].clone()), (7.into(), "1.0.0".into()));
    }
}
