//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch, JSON patch (RFC 6902).
//!
//! Strategic merge patch is implemented for what kubectl apply/label/annotate/edit send: maps merge,
//! `null` deletes, lists replace unless the field is one of the built-in merge lists below (merged by
//! their merge key, or as a set for `finalizers`), and the directives `$patch: delete|replace|merge`,
//! `$retainKeys`, `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` are honoured.
//! The merge keys are looked up by field name and parent field, not from OpenAPI schemas.

use serde_json::{Map, Value};

use crate::store::ApiError;

/// Which kind of PATCH a `Content-Type` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    /// Server-side apply; approximated by a strategic merge that creates the object when missing.
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let media = ct.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies a patch body of the given kind to `target`.
pub fn apply(kind: PatchKind, target: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    let parse_json = |b: &[u8]| {
        serde_json::from_slice::<Value>(b).map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))
    };
    match kind {
        PatchKind::Merge => {
            merge_patch(target, &parse_json(body)?);
            Ok(())
        }
        PatchKind::Strategic => strategic_merge(target, &parse_json(body)?),
        PatchKind::Apply => {
            let patch = match parse_json(body) {
                Ok(v) => v,
                Err(_) => serde_yaml::from_slice::<Value>(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?,
            };
            strategic_merge(target, &patch)
        }
        PatchKind::Json => {
            let patch: json_patch::Patch =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid json patch: {e}")))?;
            json_patch::patch(target, &patch).map_err(|e| ApiError::unprocessable(format!("json patch failed: {e}")))
        }
    }
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// Lists of objects merged by this key.
    Key(&'static str),
    /// Lists of scalars merged as a set.
    Set,
}

/// The `patchMergeKey`s of the built-in types kubectl touches, by (parent field, field).
fn list_strategy(parent: &str, field: &str) -> Option<ListStrategy> {
    use ListStrategy::*;
    Some(match (parent, field) {
        (_, "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "imagePullSecrets") => Key("name"),
        (_, "env") => Key("name"),
        (_, "volumeMounts") => Key("mountPath"),
        (_, "volumeDevices") => Key("devicePath"),
        (_, "conditions") => Key("type"),
        (_, "ownerReferences") => Key("uid"),
        (_, "finalizers") => Set,
        (_, "hostAliases") => Key("ip"),
        (_, "topologySpreadConstraints") => Key("topologyKey"),
        (_, "containerStatuses" | "initContainerStatuses" | "ephemeralContainerStatuses") => Key("name"),
        (_, "podIPs" | "hostIPs") => Key("ip"),
        ("status", "addresses") => Key("type"),
        ("spec", "ports") => Key("port"),
        // containers[].ports: the parent of an element's field is the list's name.
        ("containers" | "initContainers" | "ephemeralContainers", "ports") => Key("containerPort"),
        _ => return None,
    })
}

/// Applies a strategic merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    smp_map(target, patch, "")
}

fn smp_map(target: &mut Value, patch: &Value, parent: &str) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = p.clone();
            replaced.remove("$patch");
            *target = Value::Object(replaced);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(ApiError::bad_request(format!("unknown patch directive {other:?}"))),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return Ok(()) };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), v) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (list_strategy(parent, k), v) {
            (Some(strategy), Value::Array(items)) => {
                let cur = t.entry(k.clone()).or_insert_with(|| Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                if let Value::Array(list) = cur {
                    merge_list(list, items, strategy, k)?;
                }
            }
            _ => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                if v.is_object() && slot.is_object() {
                    smp_map(slot, v, k)?;
                } else if v.is_object() {
                    *slot = Value::Null;
                    smp_map(slot, v, k)?;
                } else {
                    *slot = v.clone();
                }
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    if let Some(order) = p
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("$setElementOrder/")?, v)))
        .next()
    {
        reorder(t, order.0, order.1, parent);
    }
    Ok(())
}

fn merge_list(list: &mut Vec<Value>, items: &[Value], strategy: ListStrategy, field: &str) -> Result<(), ApiError> {
    match strategy {
        ListStrategy::Set => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListStrategy::Key(key) => {
            if items
                .iter()
                .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
            {
                *list = items.iter().filter(|i| i.get("$patch").is_none()).cloned().collect();
                return Ok(());
            }
            for item in items {
                let Some(id) = item.get(key) else {
                    return Err(ApiError::unprocessable(format!(
                        "{field}: an element has no merge key {key:?}"
                    )));
                };
                let pos = list.iter().position(|x| x.get(key) == Some(id));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        list.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => smp_map(&mut list[i], item, field)?,
                    (None, false) => {
                        let mut fresh = Value::Object(Map::new());
                        smp_map(&mut fresh, item, field)?;
                        list.push(fresh);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `$setElementOrder/<field>`: puts the listed elements first, in that order, as kubectl apply expects.
fn reorder(t: &mut Map<String, Value>, field: &str, order: &Value, parent: &str) {
    let (Some(Value::Array(list)), Value::Array(order)) = (t.get_mut(field), order) else {
        return;
    };
    let key = match list_strategy(parent, field) {
        Some(ListStrategy::Key(k)) => Some(k),
        _ => None,
    };
    let ident = |v: &Value| match key {
        Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
        None => v.clone(),
    };
    let mut ordered = Vec::with_capacity(list.len());
    for o in order {
        let want = ident(o);
        if let Some(i) = list.iter().position(|x| ident(x) == want) {
            ordered.push(list.remove(i));
        }
    }
    ordered.append(list);
    *list = ordered;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn should_merge_and_delete_with_merge_patch() {
        let mut t = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        merge_patch(
            &mut t,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        );
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
    }

    #[test]
    fn should_merge_containers_by_name_and_ports_by_container_port() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
            {"name": "b", "image": "y:1"}
        ]}});
        let patch = json!({"spec": {
        "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
        "containers": [
            {"name": "a", "image": "x:2", "ports": [{"containerPort": 81}]},
            {"name": "b", "$patch": "delete"},
            {"name": "c", "image": "z:1"}
        ]}});
        strategic_merge(&mut pod, &patch).unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "x:2", "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 81}]},
                {"name": "c", "image": "z:1"}
            ]}})
        );
    }

    #[test]
    fn should_replace_lists_without_a_merge_strategy() {
        let mut np =
            json!({"spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}], "ports": [{"port": 1}]}});
        strategic_merge(
            &mut np,
            &json!({"spec": {"ingress": [{"from": []}], "ports": [{"port": 2}]}}),
        )
        .unwrap();
        // Service-style spec.ports merge by port; ingress (no strategy) is replaced.
        assert_eq!(
            np,
            json!({"spec": {"ingress": [{"from": []}], "ports": [{"port": 1}, {"port": 2}]}})
        );
    }

    #[test]
    fn should_honour_directives() {
        let mut o =
            json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"strategy": {"type": "X", "rolling": {"m": 1}}}});
        let patch = json!({
            "metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}
        });
        strategic_merge(&mut o, &patch).unwrap();
        assert_eq!(
            o,
            json!({"metadata": {"finalizers": ["b", "c"]}, "spec": {"strategy": {"type": "Recreate"}}})
        );
        strategic_merge(&mut o, &json!({"spec": {"$patch": "replace", "z": 1}})).unwrap();
        assert_eq!(o["spec"], json!({"z": 1}));
    }

    #[test]
    fn should_apply_json_patch_and_report_failures() {
        let mut o = json!({"metadata": {"labels": {"a": "1"}}});
        apply(
            PatchKind::Json,
            &mut o,
            br#"[{"op":"add","path":"/metadata/labels/b","value":"2"}]"#,
        )
        .unwrap();
        assert_eq!(o["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        let err = apply(PatchKind::Json, &mut o, br#"[{"op":"remove","path":"/nope"}]"#).unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            PatchKind::from_content_type("application/strategic-merge-patch+json; charset=utf-8"),
            Some(PatchKind::Strategic)
        );
    }
}
