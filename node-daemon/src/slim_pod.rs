//! The Pod as warren-node keeps it: only what NetworkPolicy and the pod-programmed metric read,
//! taken straight from the API server's JSON.
//!
//! The reflector used to deserialize whole `k8s_openapi` Pods and strip them afterwards, which
//! still left each stored pod at ~5.6 KB (a `Container` alone is 2.3 KB of mostly-`None` fields,
//! inline) and allocated every field of every pod on each LIST page and watch event: 56 MiB of
//! store at 10 000 pods against issue 5's 60 MiB for the whole daemon. [`SlimPod`] is served by
//! the same `/api/v1/pods` list and watch (it is a `k8s_openapi::Resource` with the Pod's own
//! API constants), and serde skips every field it does not name without allocating it.
//! Its labels are packed ([`PackedLabels`]): in a `BTreeMap` they were half of what was left.

use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use policy::PackedLabels;
use serde::{Deserialize, Deserializer};

/// A Pod reduced, as it is deserialized, to its names, uid, labels, resourceVersion,
/// creationTimestamp, node, host-network flag, container ports, phase and IP.
///
/// Absent and `null` fields read as k8s-openapi reads them (`None`, empty, 0); `apiVersion` and
/// `kind` are not checked, the endpoint already says what the objects are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "WirePod")]
pub struct SlimPod {
    /// Only name, namespace, uid, resourceVersion and creationTimestamp are set: `kube`'s
    /// [`Resource`](kube::Resource) needs a whole `ObjectMeta`, but annotations, owner references
    /// and managedFields (often most of a pod's bytes) are never read by the daemon. The labels
    /// are in [`SlimPod::labels`], so `metadata.labels` (and `ResourceExt::labels`) is empty.
    pub metadata: ObjectMeta,
    /// `metadata.labels`, packed, and shared with the pod's entry in the policy model.
    pub labels: Arc<PackedLabels>,
    pub spec: Option<SlimPodSpec>,
    pub status: Option<SlimPodStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<SlimContainer>,
}

/// A container's ports, the targets of named ports in policies; init containers' are not
/// (`policy::convert::convert_pod` reads `containers` only).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SlimContainer {
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<SlimContainerPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimContainerPort {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub container_port: i32,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SlimPodStatus {
    pub phase: Option<String>,
    /// `podIPs` is left out: warren enforces IPv4 policy on `podIP`, the pod's primary address.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
}

/// What is read of the API's JSON, before the labels move out of the metadata.
#[derive(Deserialize)]
struct WirePod {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: Meta,
    spec: Option<SlimPodSpec>,
    status: Option<SlimPodStatus>,
}

/// The metadata fields kept, in the API's spelling.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    #[serde(default)]
    labels: PackedLabels,
}

impl From<WirePod> for SlimPod {
    fn from(w: WirePod) -> SlimPod {
        let m = w.metadata;
        SlimPod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                creation_timestamp: m.creation_timestamp,
                ..ObjectMeta::default()
            },
            labels: Arc::new(m.labels),
            spec: w.spec,
            status: w.status,
        }
    }
}

/// `null` as the type's default, as k8s-openapi reads its non-optional fields.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl SlimPod {
    /// The API's Pod with the same content, for `policy::convert::convert_pod`, which stays the
    /// one place that says what a pod means to policy. Built only when a pod changed.
    pub fn to_k8s(&self) -> core::Pod {
        core::Pod {
            metadata: ObjectMeta {
                labels: Some(self.labels.to_map()),
                ..self.metadata.clone()
            },
            spec: self.spec.as_ref().map(|s| core::PodSpec {
                node_name: s.node_name.clone(),
                host_network: s.host_network,
                containers: s
                    .containers
                    .iter()
                    .map(|c| core::Container {
                        ports: Some(
                            c.ports
                                .iter()
                                .map(|p| core::ContainerPort {
                                    name: p.name.clone(),
                                    container_port: p.container_port,
                                    protocol: p.protocol.clone(),
                                    ..core::ContainerPort::default()
                                })
                                .collect(),
                        ),
                        ..core::Container::default()
                    })
                    .collect(),
                ..core::PodSpec::default()
            }),
            status: self.status.as_ref().map(|s| core::PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                ..core::PodStatus::default()
            }),
        }
    }
}

/// The Pod's own API constants: `Api::<SlimPod>` lists and watches `/api/v1/pods`, and the
/// reflector keys the store as for Pods.
impl k8s_openapi::Resource for SlimPod {
    const API_VERSION: &'static str = <core::Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <core::Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <core::Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <core::Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <core::Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <core::Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::ListableResource for SlimPod {
    const LIST_KIND: &'static str = <core::Pod as k8s_openapi::ListableResource>::LIST_KIND;
}

impl k8s_openapi::Metadata for SlimPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::{ObjectList, WatchEvent};
    use kube::Resource;
    use serde_json::{json, Value};

    /// A Deployment's pod as a real API server returns it, managedFields and all.
    fn api_pod(host_network: bool, phase: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c-x2x8k", "generateName": "web-7d4b9c-", "namespace": "shop",
                "uid": "0b0f8c2e-3c1f-4f7e-9d7a-1f2e3d4c5b6a", "resourceVersion": "48211",
                "creationTimestamp": "2026-11-23T10:00:00Z",
                "labels": {"app": "web", "tier": "front", "pod-template-hash": "7d4b9c"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4000)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                                     "uid": "r", "controller": true, "blockOwnerDeletion": true}],
                "finalizers": ["example.com/keep"],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                                   "time": "2026-11-23T10:00:00Z", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}]
            },
            "spec": {
                "nodeName": "node2", "hostNetwork": host_network, "serviceAccountName": "default",
                "initContainers": [{"name": "init", "image": "busybox",
                                    "ports": [{"name": "init-port", "containerPort": 1, "protocol": "TCP"}]}],
                "containers": [
                    {"name": "app", "image": "nginx", "env": [{"name": "A", "value": "b".repeat(2000)}],
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                               {"name": "dns", "containerPort": 53, "protocol": "UDP", "hostPort": 53},
                               {"containerPort": 9090, "protocol": "TCP"}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                     "resources": {"requests": {"cpu": "100m"}}},
                    {"name": "sidecar", "image": "envoy",
                     "ports": [{"name": "admin", "containerPort": 9901, "protocol": "SCTP"}]}
                ],
                "volumes": [{"name": "token", "projected": {"sources": []}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}]
            },
            "status": {
                "phase": phase, "hostIP": "192.168.1.2", "podIP": "10.233.90.7",
                "podIPs": [{"ip": "10.233.90.7"}, {"ip": "fd00::7"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "nginx",
                                       "imageID": "sha256:abc", "state": {"running": {"startedAt": "2026-11-23T10:00:05Z"}}}],
                "qosClass": "Burstable"
            }
        })
    }

    #[test]
    fn should_keep_what_the_daemon_reads_of_an_api_pod() {
        let p: SlimPod = serde_json::from_value(api_pod(false, "Running")).unwrap();
        let m = &p.metadata;
        assert_eq!(m.name.as_deref(), Some("web-7d4b9c-x2x8k"));
        assert_eq!(m.namespace.as_deref(), Some("shop"));
        assert_eq!(m.uid.as_deref(), Some("0b0f8c2e-3c1f-4f7e-9d7a-1f2e3d4c5b6a"));
        assert_eq!(m.resource_version.as_deref(), Some("48211"));
        assert_eq!(
            m.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            Some(1_795_428_000)
        );
        assert_eq!(
            p.labels.iter().collect::<Vec<_>>(),
            [("app", "web"), ("pod-template-hash", "7d4b9c"), ("tier", "front")]
        );
        assert_eq!(p.labels.get("tier"), Some("front"));
        // Nothing else of the metadata is kept; the labels are in `labels`.
        assert_eq!(
            ObjectMeta {
                name: None,
                namespace: None,
                uid: None,
                resource_version: None,
                creation_timestamp: None,
                labels: None,
                ..m.clone()
            },
            ObjectMeta::default()
        );

        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node2"));
        assert_eq!(spec.host_network, Some(false));
        let ports: Vec<(Option<&str>, i32, Option<&str>)> = spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .map(|p| (p.name.as_deref(), p.container_port, p.protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), 8080, Some("TCP")),
                (Some("dns"), 53, Some("UDP")),
                (None, 9090, Some("TCP")),
                (Some("admin"), 9901, Some("SCTP")),
            ],
            "the containers' ports, not the init containers'"
        );
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.233.90.7"));
    }

    #[test]
    fn should_convert_to_the_same_policy_pod_as_the_whole_pod() {
        for (host, phase) in [
            (false, "Running"),
            (false, "Pending"),
            (false, "Succeeded"),
            (false, "Failed"),
            (true, "Running"),
        ] {
            let whole: core::Pod = serde_json::from_value(api_pod(host, phase)).unwrap();
            let slim: SlimPod = serde_json::from_value(api_pod(host, phase)).unwrap();
            assert_eq!(
                policy::convert::convert_pod(&slim.to_k8s()),
                policy::convert::convert_pod(&whole),
                "{host} {phase}"
            );
        }
        let slim: SlimPod = serde_json::from_value(api_pod(false, "Running")).unwrap();
        let converted = policy::convert::convert_pod(&slim.to_k8s()).unwrap();
        assert_eq!(converted.ports.len(), 3, "every named port of every container");
    }

    #[test]
    fn should_read_absent_and_null_fields_as_k8s_openapi_does() {
        for v in [
            json!({}),
            json!({"metadata": null, "spec": null, "status": null}),
            json!({"metadata": {"name": "p", "labels": null}}),
            json!({"metadata": {"name": "p"}, "spec": {"containers": null}}),
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": null}]}}),
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"ports": [{"name": "http"}]}]}}),
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"ports": [{"containerPort": null}]}]},
                   "status": {"phase": null, "podIP": null}}),
        ] {
            let slim: SlimPod = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            let whole: core::Pod = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(
                slim.metadata,
                ObjectMeta {
                    labels: None,
                    ..whole.metadata.clone()
                },
                "{v}"
            );
            assert_eq!(slim.labels.to_map(), whole.metadata.labels.clone().unwrap_or_default());
            assert_eq!(
                policy::convert::convert_pod(&slim.to_k8s()),
                policy::convert::convert_pod(&whole),
                "{v}"
            );
        }
        // Malformed where the API's Pod is malformed too.
        for v in [
            json!({"metadata": {"name": 7}}),
            json!({"metadata": {"labels": {"app": 7}}}),
            json!({"spec": {"containers": [{"ports": [{"containerPort": "http"}]}]}}),
        ] {
            assert!(serde_json::from_value::<SlimPod>(v.clone()).is_err(), "{v}");
            assert!(serde_json::from_value::<core::Pod>(v.clone()).is_err(), "{v}");
        }
    }

    #[test]
    fn should_be_listed_and_watched_at_the_pods_endpoint() {
        assert_eq!(SlimPod::url_path(&(), None), "/api/v1/pods");
        assert_eq!(SlimPod::url_path(&(), Some("shop")), "/api/v1/namespaces/shop/pods");
        assert_eq!(SlimPod::kind(&()), "Pod");
        assert_eq!(SlimPod::api_version(&()), "v1");

        // kube's own wrappers: a LIST page and a watch event.
        let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"},
                          "items": [api_pod(false, "Running"), api_pod(true, "Pending")]});
        let list: ObjectList<SlimPod> = serde_json::from_value(list).unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.metadata.resource_version.as_deref(), Some("9"));
        let event: WatchEvent<SlimPod> =
            serde_json::from_value(json!({"type": "MODIFIED", "object": api_pod(false, "Running")})).unwrap();
        assert!(matches!(event, WatchEvent::Modified(p) if p.metadata.resource_version.as_deref() == Some("48211")));
    }
}
