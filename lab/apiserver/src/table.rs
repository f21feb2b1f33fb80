//! Server-side printing: the `Table` (and `PartialObjectMetadata`) forms kubectl asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`. Columns follow the real printers for
//! the kinds the lab shows; other kinds get NAME and AGE.

use serde_json::{json, Value};

use crate::resources::Resource;

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn or_none(x: &str) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x.into()
    }
}

/// `kubectl`'s short human durations (k8s.io/apimachinery's `HumanDuration`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        _ if secs < 120 => format!("{secs}s"),
        _ if m < 10 => match secs % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        },
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        },
        _ if h < 24 * 365 * 2 => format!("{d}d"),
        _ => {
            let y = d / 365;
            match d % 365 {
                0 => format!("{y}y"),
                r if y < 8 => format!("{y}y{r}d"),
                _ => format!("{y}y"),
            }
        }
    }
}

fn age(obj: &Value) -> String {
    let created: Option<jiff::Timestamp> = s(obj, "/metadata/creationTimestamp").parse().ok();
    match created {
        Some(t) => human_duration(jiff::Timestamp::now().as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn col(name: &str, ty: &str, priority: u8, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn pod_cells(p: &Value) -> Vec<Value> {
    let total = p
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = p.pointer("/status/containerStatuses").and_then(Value::as_array);
    let ready = statuses.map_or(0, |c| c.iter().filter(|c| c["ready"] == json!(true)).count());
    let restarts: i64 = statuses.map_or(0, |c| c.iter().filter_map(|c| c["restartCount"].as_i64()).sum());
    let mut status = s(p, "/status/reason").to_string();
    if status.is_empty() {
        status = s(p, "/status/phase").to_string();
    }
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".into();
    }
    vec![
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts),
        json!(age(p)),
        json!(or_none(s(p, "/status/podIP"))),
        json!(or_none(s(p, "/spec/nodeName"))),
    ]
}

fn node_cells(n: &Value) -> Vec<Value> {
    let conds = n.pointer("/status/conditions").and_then(Value::as_array);
    let ready = conds.and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    let mut status = match ready.and_then(|c| c["status"].as_str()) {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if n.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<&str> = n
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    let internal = n
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .unwrap_or("");
    vec![
        json!(status),
        json!(or_none(&roles.join(","))),
        json!(age(n)),
        json!(s(n, "/status/nodeInfo/kubeletVersion")),
        json!(or_none(internal)),
    ]
}

fn service_cells(svc: &Value) -> Vec<Value> {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_u64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    let lb: Vec<&str> = svc
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().or_else(|| i["hostname"].as_str()))
        .collect();
    let external = match s(svc, "/spec/type") {
        "LoadBalancer" if lb.is_empty() => "<pending>".to_string(),
        "ExternalName" => s(svc, "/spec/externalName").to_string(),
        _ => or_none(&lb.join(",")),
    };
    let selector: Vec<String> = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    vec![
        json!(s(svc, "/spec/type")),
        json!(or_none(s(svc, "/spec/clusterIP"))),
        json!(external),
        json!(or_none(&ports.join(","))),
        json!(age(svc)),
        json!(or_none(&selector.join(","))),
    ]
}

fn count(v: &Value, ptr: &str) -> usize {
    v.pointer(ptr).and_then(Value::as_object).map_or(0, |m| m.len())
}

/// Columns (after Name) and the cells function for a kind.
type CellsFn = fn(&Value) -> Vec<Value>;

fn printer(res: &Resource) -> (Vec<Value>, CellsFn) {
    match (res.group, res.kind) {
        ("", "Pod") => (
            vec![
                col(
                    "Ready",
                    "string",
                    0,
                    "The aggregate readiness state of this pod for accepting traffic.",
                ),
                col(
                    "Status",
                    "string",
                    0,
                    "The aggregate status of the containers in this pod.",
                ),
                col(
                    "Restarts",
                    "integer",
                    0,
                    "The number of times the containers in this pod have been restarted.",
                ),
                col("Age", "string", 0, "CreationTimestamp"),
                col("IP", "string", 1, "IP address allocated to the pod."),
                col("Node", "string", 1, "Name of the Node to which this pod is assigned."),
            ],
            pod_cells,
        ),
        ("", "Node") => (
            vec![
                col("Status", "string", 0, "The status of the node"),
                col("Roles", "string", 0, "The roles of the node"),
                col("Age", "string", 0, "CreationTimestamp"),
                col("Version", "string", 0, "Kubelet Version reported by the node."),
                col("Internal-IP", "string", 1, "List of internal IPs."),
            ],
            node_cells,
        ),
        ("", "Service") => (
            vec![
                col("Type", "string", 0, "The type of the service."),
                col("Cluster-IP", "string", 0, "The cluster IP of the service."),
                col("External-IP", "string", 0, "The external IP of the service."),
                col("Port(s)", "string", 0, "The ports of the service."),
                col("Age", "string", 0, "CreationTimestamp"),
                col("Selector", "string", 1, "The label selector of the service."),
            ],
            service_cells,
        ),
        ("", "Namespace") => (
            vec![
                col("Status", "string", 0, "The status of the namespace"),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |n| vec![json!(s(n, "/status/phase")), json!(age(n))],
        ),
        ("", "ConfigMap") => (
            vec![
                col("Data", "integer", 0, "Number of data items"),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |c| vec![json!(count(c, "/data") + count(c, "/binaryData")), json!(age(c))],
        ),
        ("networking.k8s.io", "NetworkPolicy") => (
            vec![
                col("Pod-Selector", "string", 0, "Selected pods"),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |np| {
                let sel: Vec<String> = np
                    .pointer("/spec/podSelector/matchLabels")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                vec![json!(or_none(&sel.join(","))), json!(age(np))]
            },
        ),
        _ => (vec![col("Age", "string", 0, "CreationTimestamp")], |o| {
            vec![json!(age(o))]
        }),
    }
}

/// How much of each object a row carries (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// An object's `PartialObjectMetadata` form.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
           "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

/// A `Table` for the objects; `rv` is the list's resourceVersion.
pub fn table(res: &Resource, items: &[Value], rv: Option<u64>, include: Include) -> Value {
    let (cols, cells) = printer(res);
    let mut defs = vec![col("Name", "string", 0, "Name must be unique within a namespace.")];
    defs.extend(cols);
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut c = vec![json!(s(o, "/metadata/name"))];
            c.extend(cells(o));
            let mut row = json!({"cells": c});
            match include {
                Include::None => {}
                Include::Metadata => row["object"] = partial_metadata(o),
                Include::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    let mut meta = json!({});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv.to_string());
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::lookup;

    #[test]
    fn should_print_durations_like_kubectl() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want);
        }
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
    }

    #[test]
    fn should_print_pod_and_service_columns() {
        let pods = lookup("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"nodeName": "node2", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.233.96.32",
                       "containerStatuses": [{"ready": true, "restartCount": 1}, {"ready": false, "restartCount": 0}]}});
        let t = table(pods, &[pod], Some(7), Include::Metadata);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "p");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[5], "10.233.96.32");
        assert_eq!(cells[6], "node2");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        let svcs = lookup("", "v1", "services").unwrap();
        let svc = json!({"metadata": {"name": "d"}, "spec": {"type": "NodePort", "clusterIP": "10.233.5.155",
            "ports": [{"port": 9097, "nodePort": 31602, "protocol": "TCP"}]}});
        let t = table(svcs, &[svc], None, Include::None);
        assert_eq!(t["rows"][0]["cells"][4], "9097:31602/TCP");
        assert_eq!(t["rows"][0]["cells"][3], "<none>");
    }
}
