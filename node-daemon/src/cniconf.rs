//! The CNI side of the node: the conflist for this node's block, written atomically, and the
//! plugin binaries installed into the CNI bin dir (copy to a temp file, then rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde_json::json;

/// Binaries `install-cni` copies.
pub const CNI_BINARIES: [&str; 2] = ["warren", "warren-ipam"];

#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CniConfError {
    let path = path.to_path_buf();
    move |source| CniConfError::Io { action, path, source }
}

/// The conflist of this node (pure).
pub fn render_conflist(block: Ipv4Net, mtu: u32) -> String {
    let v = json!({
        "cniVersion": "1.0.0",
        "name": conf::names::NETWORK_NAME,
        "plugins": [
            {
                "type": "warren",
                "mtu": mtu,
                "ipam": {
                    "type": "warren-ipam",
                    // The block's first addresses are the node's: tunl0's and its NodePort source.
                    "ranges": [[{
                        "subnet": block.to_string(),
                        "rangeStart": conf::names::first_pod_address(block).to_string()
                    }]]
                },
                "capabilities": { "ips": true }
            },
            {
                "type": "portmap",
                "snat": true,
                "capabilities": { "portMappings": true }
            }
        ]
    });
    // serde_json's pretty printer cannot fail on a Value.
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes `content` to `path` so readers see the old or the new file, never a partial one.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<bool, CniConfError> {
    use std::os::unix::fs::PermissionsExt;
    if fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".warren-tmp-")
        .tempfile_in(dir)
        .map_err(io("create temp file in", dir))?;
    tmp.write_all(content).map_err(io("write", tmp.path()))?;
    tmp.as_file().sync_all().map_err(io("sync", tmp.path()))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(io("chmod", tmp.path()))?;
    tmp.persist(path).map_err(|e| CniConfError::Io {
        action: "rename into",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(true)
}

/// Writes the conflist; returns whether it changed.
pub fn write_conflist(conf_dir: &Path, block: Ipv4Net, mtu: u32) -> Result<bool, CniConfError> {
    let path = conf_dir.join(conf::daemon::CONFLIST_FILE);
    write_atomic(&path, render_conflist(block, mtu).as_bytes(), 0o644)
}

/// Copies the CNI binaries from `source_dir` into `bin_dir`.
pub fn install_binaries(source_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, CniConfError> {
    let mut done = Vec::new();
    for name in CNI_BINARIES {
        let src = source_dir.join(name);
        let bytes = fs::read(&src).map_err(io("read", &src))?;
        let dst = bin_dir.join(name);
        write_atomic(&dst, &bytes, 0o755)?;
        done.push(dst);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_render_the_conflist_for_the_block() {
        let text = render_conflist("10.233.90.0/24".parse().unwrap(), 1480);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "k8s-pod-network");
        let p = &v["plugins"][0];
        assert_eq!(p["type"], "warren");
        assert_eq!(p["mtu"], 1480);
        assert_eq!(p["ipam"]["type"], "warren-ipam");
        assert_eq!(p["ipam"]["ranges"][0][0]["subnet"], "10.233.90.0/24");
        assert_eq!(
            p["ipam"]["ranges"][0][0]["rangeStart"], "10.233.90.2",
            "NodePort source kept out"
        );
        assert_eq!(p["capabilities"]["ips"], true);
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        // warren's own parser must accept what the daemon writes.
        // (the runtime injects name and cniVersion into each plugin's config).
        let mut first = v["plugins"][0].clone();
        first["name"] = v["name"].clone();
        first["cniVersion"] = v["cniVersion"].clone();
        let nc = conf::cni::NetConf::parse(first.to_string().as_bytes()).unwrap();
        nc.validate().unwrap();
        assert_eq!(nc.mtu(), 1480);
        nc.warren_ipam().unwrap();
    }

    #[test]
    fn should_write_atomically_and_report_changes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_conflist(dir.path(), "10.233.90.0/24".parse().unwrap(), 1480).unwrap());
        assert!(!write_conflist(dir.path(), "10.233.90.0/24".parse().unwrap(), 1480).unwrap());
        assert!(write_conflist(dir.path(), "10.233.91.0/24".parse().unwrap(), 1480).unwrap());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("10-warren.conflist")],
            "no temp file left"
        );
    }

    #[test]
    fn should_install_binaries_executable_and_fail_clearly_when_missing() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let err = install_binaries(src.path(), dst.path()).unwrap_err();
        assert!(err.to_string().contains("warren"), "{err}");
        for b in CNI_BINARIES {
            fs::write(src.path().join(b), b"#!/bin/sh\n").unwrap();
        }
        let out = install_binaries(src.path(), dst.path()).unwrap();
        assert_eq!(out.len(), 2);
        let mode = fs::metadata(dst.path().join("warren")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
