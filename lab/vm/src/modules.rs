//! Reading a kernel's `modules.dep` / `modules.builtin` to decide what goes into the initramfs (and in which
//! `insmod` order) and which requested modules the guest can load at all.

use std::collections::{BTreeMap, BTreeSet};

/// Module names use `-` and `_` interchangeably; the kernel treats them as the same.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path like `kernel/net/ipv4/ipip.ko` (or `.ko.xz`, `.ko.zst`).
pub fn name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next()?;
    if stem.is_empty() || stem.len() == file.len() {
        return None;
    }
    Some(normalize(stem))
}

/// What the kernel's module metadata says: each loadable module's file and direct dependencies, and the built-ins.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    files: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Availability {
    Loadable,
    Builtin,
    Missing,
}

impl ModuleIndex {
    /// `dep` is the text of `modules.dep`, `builtin` that of `modules.builtin` (may be empty).
    pub fn parse(dep: &str, builtin: &str) -> ModuleIndex {
        let mut index = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let Some(name) = name_of(path.trim()) else { continue };
            let deps = deps.split_whitespace().filter_map(name_of).collect();
            index.files.insert(name.clone(), path.trim().to_string());
            index.deps.insert(name, deps);
        }
        index.builtin = builtin.lines().filter_map(|l| name_of(l.trim())).collect();
        index
    }

    pub fn availability(&self, name: &str) -> Availability {
        let name = normalize(name);
        if self.files.contains_key(&name) {
            Availability::Loadable
        } else if self.builtin.contains(&name) {
            Availability::Builtin
        } else {
            Availability::Missing
        }
    }

    /// The path (relative to the modules directory) of a loadable module.
    pub fn file(&self, name: &str) -> Option<&str> {
        self.files.get(&normalize(name)).map(String::as_str)
    }

    /// Every loadable module needed for `wanted`, dependencies first, each once; built-ins are left out.
    /// Fails with the names that are neither loadable nor built in.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>, Vec<String>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for w in wanted {
            self.visit(&normalize(w), &mut seen, &mut order, &mut missing);
        }
        if missing.is_empty() {
            Ok(order)
        } else {
            Err(missing)
        }
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>, missing: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        match self.deps.get(name) {
            Some(deps) => {
                for d in deps {
                    self.visit(d, seen, order, missing);
                }
                order.push(name.to_string());
            }
            None if self.builtin.contains(name) => {}
            None => missing.push(name.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/sched/sch-weird.ko.xz:
";

    #[test]
    fn should_put_dependencies_before_dependents_each_once() {
        let idx = ModuleIndex::parse(DEP, "kernel/fs/overlayfs/overlay.ko\n");
        let order = idx.load_order(&["9pnet_virtio", "9p", "overlay"]).unwrap();
        assert_eq!(
            order.iter().collect::<BTreeSet<_>>().len(),
            order.len(),
            "no duplicates: {order:?}"
        );
        let pos = |n: &str| order.iter().position(|m| m == n).unwrap();
        assert!(pos("9pnet") < pos("9pnet_virtio"));
        assert!(pos("virtio") < pos("9pnet_virtio") && pos("virtio_ring") < pos("9pnet_virtio"));
        assert!(pos("netfs") < pos("fscache") && pos("fscache") < pos("9p"));
        assert!(!order.contains(&"overlay".to_string()), "built-ins are not insmod'ed");
    }

    #[test]
    fn should_report_modules_the_kernel_does_not_have() {
        let idx = ModuleIndex::parse(DEP, "");
        assert_eq!(
            idx.load_order(&["9p", "ipip", "nope"]).unwrap_err(),
            vec!["ipip", "nope"]
        );
        assert_eq!(idx.availability("ipip"), Availability::Missing);
    }

    #[test]
    fn should_treat_dashes_and_underscores_alike_and_strip_compression_suffixes() {
        let idx = ModuleIndex::parse(DEP, "");
        assert_eq!(idx.availability("sch_weird"), Availability::Loadable);
        assert_eq!(idx.file("sch-weird"), Some("kernel/net/sched/sch-weird.ko.xz"));
        assert_eq!(name_of("kernel/a/b.txt"), None);
    }
}
