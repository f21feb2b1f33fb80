//! The kinds this server knows, and the discovery documents built from them.
//!
//! Every kind is stored generically as JSON; the table here only fixes names, scope and which
//! kinds have a `status` subresource, because that is what discovery and the REST paths need.

use serde_json::{json, Value};

/// One REST resource (a plural name in one group/version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// API group; `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: the path segment (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether `/status` exists; for those kinds a write to the main resource keeps the stored status.
    pub status: bool,
    pub short_names: &'static [&'static str],
    /// Member of the `all` category (`kubectl get all`).
    pub in_all: bool,
}

impl Resource {
    /// `v1` for core, `group/version` otherwise: the `apiVersion` of objects of this kind.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Key used in storage: objects of one resource share it whatever version is asked for.
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
}

// One row of the table below; positional so the table reads as a table.
#[allow(clippy::too_many_arguments)]
const fn r(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    short_names: &'static [&'static str],
    in_all: bool,
) -> Resource {
    Resource {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        status,
        short_names,
        in_all,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

/// Everything served. Order is the discovery order.
/// Columns: group, version, plural, singular, kind, namespaced, has /status, short names, in `all`.
#[rustfmt::skip]
pub static RESOURCES: &[Resource] = &[
    r("", "v1", "namespaces", "namespace", "Namespace", false, true, &["ns"], false),
    r("", "v1", "nodes", "node", "Node", false, true, &["no"], false),
    r("", "v1", "pods", "pod", "Pod", true, true, &["po"], true),
    r("", "v1", "services", "service", "Service", true, true, &["svc"], true),
    r("", "v1", "endpoints", "endpoints", "Endpoints", true, false, &["ep"], false),
    r("", "v1", "configmaps", "configmap", "ConfigMap", true, false, &["cm"], false),
    r("", "v1", "secrets", "secret", "Secret", true, false, &[], false),
    r("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, false, &["sa"], false),
    r("", "v1", "events", "event", "Event", true, false, &["ev"], false),
    r("networking.k8s.io", "v1", "networkpolicies", "networkpolicy", "NetworkPolicy", true, false, &["netpol"], false),
    r("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, false, &[], false),
    r("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, true, &["ds"], true),
    r("apps", "v1", "deployments", "deployment", "Deployment", true, true, &["deploy"], true),
    r("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, true, &["rs"], true),
    r("apps", "v1", "statefulsets", "statefulset", "StatefulSet", true, true, &["sts"], true),
    r(RBAC, "v1", "clusterroles", "clusterrole", "ClusterRole", false, false, &[], false),
    r(RBAC, "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, false, &[], false),
    r(RBAC, "v1", "roles", "role", "Role", true, false, &[], false),
    r(RBAC, "v1", "rolebindings", "rolebinding", "RoleBinding", true, false, &[], false),
    r("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, false, &[], false),
    r("events.k8s.io", "v1", "events", "event", "Event", true, false, &["ev"], false),
];

/// The groups other than core, in discovery order.
fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for res in RESOURCES {
        if !res.group.is_empty() && !out.contains(&res.group) {
            out.push(res.group);
        }
    }
    out
}

/// Finds a resource by group, version and plural.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds a resource by apiVersion (`v1`, `apps/v1`) and plural.
pub fn lookup_api_version(api_version: &str, plural: &str) -> Option<&'static Resource> {
    let (group, version) = split_api_version(api_version);
    lookup(group, version, plural)
}

/// `apps/v1` → (`apps`, `v1`); `v1` → (`""`, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Whether any resource is served under this group/version.
pub fn has_group_version(group: &str, version: &str) -> bool {
    RESOURCES.iter().any(|r| r.group == group && r.version == version)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/version`.
pub fn version_doc() -> Value {
    json!({
        "major": "1", "minor": "37", "gitVersion": "v1.37.0-warren-lab", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc",
        "platform": "linux/amd64", "emulationMajor": "1", "emulationMinor": "37", "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36"
    })
}

/// `/api`.
pub fn core_versions_doc() -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]
    })
}

/// `/apis`.
pub fn group_list_doc() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn group_doc(group: &str) -> Option<Value> {
    if !groups().contains(&group) {
        return None;
    }
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv}),
    )
}

/// `/api/v1` or `/apis/<group>/<version>`.
pub fn resource_list_doc(group: &str, version: &str) -> Option<Value> {
    if !has_group_version(group, version) {
        return None;
    }
    let mut list = Vec::new();
    for res in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let mut entry = json!({
            "name": res.plural, "singularName": res.singular, "namespaced": res.namespaced, "kind": res.kind,
            "verbs": VERBS,
        });
        if !res.short_names.is_empty() {
            entry["shortNames"] = json!(res.short_names);
        }
        if res.in_all {
            entry["categories"] = json!(["all"]);
        }
        list.push(entry);
        if res.group.is_empty() && res.kind == "Pod" {
            list.push(
                json!({"name": "pods/binding", "singularName": "", "namespaced": true, "kind": "Binding",
                             "verbs": ["create"]}),
            );
        }
        if res.status {
            list.push(json!({
                "name": format!("{}/status", res.plural), "singularName": "", "namespaced": res.namespaced,
                "kind": res.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}))
}

/// The `Content-Type` of aggregated discovery documents.
pub const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Aggregated discovery (`apidiscovery.k8s.io/v2`): `/api` (core) or `/apis` (the rest) in one document.
pub fn aggregated_doc(core: bool) -> Value {
    let wanted: Vec<&str> = if core { vec![""] } else { groups() };
    let items: Vec<Value> = wanted
        .into_iter()
        .map(|group| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group)
                .map(|res| {
                    let gvk = json!({"group": res.group, "version": res.version, "kind": res.kind});
                    let mut subs = Vec::new();
                    if res.status {
                        subs.push(
                            json!({"subresource": "status", "responseKind": gvk, "verbs": ["get", "patch", "update"]}),
                        );
                    }
                    if res.group.is_empty() && res.kind == "Pod" {
                        subs.push(json!({"subresource": "binding", "verbs": ["create"],
                                         "responseKind": {"group": "", "version": "v1", "kind": "Binding"}}));
                    }
                    let mut entry = json!({
                        "resource": res.plural, "responseKind": gvk, "singularResource": res.singular,
                        "scope": if res.namespaced { "Namespaced" } else { "Cluster" }, "verbs": VERBS,
                        "subresources": subs,
                    });
                    if !res.short_names.is_empty() {
                        entry["shortNames"] = json!(res.short_names);
                    }
                    if res.in_all {
                        entry["categories"] = json!(["all"]);
                    }
                    entry
                })
                .collect();
            json!({"metadata": {"name": group, "creationTimestamp": null},
                   "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}]})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

/// The path prefix of a group/version: `api/v1` or `apis/<group>/<version>`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: where each group/version's document is.
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    for res in RESOURCES {
        let p = gv_path(res.group, res.version);
        let url = format!("/openapi/v3/{p}?hash=warren-lab-1");
        paths.insert(p, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<gv path>`: operations only, no schemas. Each object's PATCH declares the
/// `fieldValidation` parameter, which makes kubectl leave validation to the server (it then needs
/// no schemas; this server accepts unknown fields) and compute patches from its built-in types.
pub fn openapi_v3_gv(group: &str, version: &str) -> Option<Value> {
    if !has_group_version(group, version) {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for res in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let gvk = json!({"group": res.group, "version": res.version, "kind": res.kind});
        let ns = if res.namespaced { "/namespaces/{namespace}" } else { "" };
        let path = format!("/{}{ns}/{}/{{name}}", gv_path(group, version), res.plural);
        let op = |action: &str| {
            json!({
                "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "OK"}}
            })
        };
        paths.insert(
            path,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"},
        "paths": paths, "components": {"schemas": {}}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_list_every_group_once_with_its_resources() {
        let doc = group_list_doc();
        let names: Vec<&str> = doc["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "networking.k8s.io",
                "discovery.k8s.io",
                "apps",
                "rbac.authorization.k8s.io",
                "coordination.k8s.io",
                "events.k8s.io"
            ]
        );
        let core = resource_list_doc("", "v1").unwrap();
        let pods_status = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods/status");
        assert_eq!(pods_status.unwrap()["verbs"], json!(["get", "patch", "update"]));
        assert!(resource_list_doc("apps", "v2").is_none());
    }

    #[test]
    fn should_find_resources_by_api_version() {
        assert_eq!(
            lookup_api_version("networking.k8s.io/v1", "networkpolicies")
                .unwrap()
                .kind,
            "NetworkPolicy"
        );
        assert_eq!(lookup_api_version("v1", "pods").unwrap().storage_key(), "/pods");
        assert!(lookup_api_version("v1", "networkpolicies").is_none());
    }
}
