//! Just enough of Kubernetes' protobuf encoding to read the request bodies kubectl's typed clients
//! send (`kubectl create namespace|configmap|secret`): the `k8s\0` envelope (`runtime.Unknown`),
//! ObjectMeta, and those three kinds. Responses are always JSON, which those clients accept.
//! Other kinds in protobuf get 415 Unsupported Media Type.

use serde_json::{json, Map, Value};

use crate::store::ApiError;

#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn malformed() -> ApiError {
    ApiError::bad_request("malformed protobuf body")
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ApiError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(malformed)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(malformed())
}

/// The fields of one message, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ApiError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let wire = match tag & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| malformed())?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len()).ok_or_else(malformed)?;
                let bytes = &buf[pos..end];
                pos = end;
                Wire::Bytes(bytes)
            }
            1 => {
                pos += 8;
                Wire::Fixed
            }
            5 => {
                pos += 4;
                Wire::Fixed
            }
            _ => return Err(malformed()),
        };
        out.push((tag >> 3, wire));
    }
    if pos > buf.len() {
        return Err(malformed());
    }
    Ok(out)
}

fn string(w: Wire<'_>) -> Result<String, ApiError> {
    match w {
        Wire::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| malformed()),
        _ => Err(malformed()),
    }
}

fn bytes(w: Wire<'_>) -> Result<&[u8], ApiError> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(malformed()),
    }
}

fn base64(data: &[u8]) -> String {
    crate::base64(data)
}

/// A `map<string, string>` (or `map<string, bytes>` rendered base64, as in JSON) entry into `map`.
fn map_entry(map: &mut Map<String, Value>, w: Wire<'_>, binary: bool) -> Result<(), ApiError> {
    let (mut key, mut val) = (String::new(), Value::String(String::new()));
    for (n, f) in fields(bytes(w)?)? {
        match n {
            1 => key = string(f)?,
            2 if binary => val = json!(base64(bytes(f)?)),
            2 => val = json!(string(f)?),
            _ => {}
        }
    }
    map.insert(key, val);
    Ok(())
}

fn object_meta(buf: &[u8]) -> Result<Value, ApiError> {
    let mut m = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Map::new(), Map::new(), Vec::new());
    for (n, f) in fields(buf)? {
        match n {
            1 => _ = m.insert("name".into(), json!(string(f)?)),
            2 => _ = m.insert("generateName".into(), json!(string(f)?)),
            3 => _ = m.insert("namespace".into(), json!(string(f)?)),
            11 => map_entry(&mut labels, f, false)?,
            12 => map_entry(&mut annotations, f, false)?,
            14 => finalizers.push(json!(string(f)?)),
            _ => {}
        }
    }
    for (k, v) in [("labels", labels), ("annotations", annotations)] {
        if !v.is_empty() {
            m.insert(k.into(), Value::Object(v));
        }
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Ok(Value::Object(m))
}

/// Decodes a `application/vnd.kubernetes.protobuf` body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unsupported = |what: &str| {
        ApiError::unsupported_media(format!(
            "protobuf bodies are only read for Namespace, ConfigMap, Secret ({what})"
        ))
    };
    let rest = body.strip_prefix(b"k8s\0").ok_or_else(malformed)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(rest)? {
        match n {
            1 => {
                for (m, g) in fields(bytes(f)?)? {
                    match m {
                        1 => api_version = string(g)?,
                        2 => kind = string(g)?,
                        _ => {}
                    }
                }
            }
            2 => raw = bytes(f)?,
            _ => {}
        }
    }
    if api_version != "v1" {
        return Err(unsupported(&format!("{api_version} {kind}")));
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    let (mut data, mut binary, mut string_data) = (Map::new(), Map::new(), Map::new());
    for (n, f) in fields(raw)? {
        match (kind.as_str(), n) {
            (_, 1) => obj["metadata"] = object_meta(bytes(f)?)?,
            ("Namespace", 2) => {
                let mut fin = Vec::new();
                for (m, g) in fields(bytes(f)?)? {
                    if m == 1 {
                        fin.push(json!(string(g)?));
                    }
                }
                obj["spec"] = json!({"finalizers": fin});
            }
            ("Namespace", _) => {}
            ("ConfigMap", 2) => map_entry(&mut data, f, false)?,
            ("ConfigMap", 3) => map_entry(&mut binary, f, true)?,
            ("ConfigMap", 4) | ("Secret", 5) => obj["immutable"] = json!(matches!(f, Wire::Varint(1))),
            ("ConfigMap", _) => {}
            ("Secret", 2) => map_entry(&mut data, f, true)?,
            ("Secret", 3) => obj["type"] = json!(string(f)?),
            ("Secret", 4) => map_entry(&mut string_data, f, false)?,
            ("Secret", _) => {}
            _ => return Err(unsupported(&kind)),
        }
    }
    for (k, v) in [("data", data), ("binaryData", binary), ("stringData", string_data)] {
        if !v.is_empty() {
            obj[k] = Value::Object(v);
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, u8::try_from(payload.len()).unwrap()];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn should_decode_a_configmap_as_kubectl_create_sends_it() {
        let meta = [
            field(1, b"cfg"),
            field(3, b"demo"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let cm = [field(1, &meta), field(2, &[field(1, b"a"), field(2, b"b")].concat())].concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let mut body = b"k8s\0".to_vec();
        body.extend([field(1, &type_meta), field(2, &cm)].concat());
        let obj = decode(&body).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "b"},
                   "metadata": {"name": "cfg", "namespace": "demo", "labels": {"app": "web"}}})
        );
    }

    #[test]
    fn should_refuse_truncated_and_unknown_bodies() {
        assert_eq!(decode(b"k8s\0\x0a\x05ab").unwrap_err().code, 400);
        let type_meta = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let mut body = b"k8s\0".to_vec();
        body.extend(field(1, &type_meta));
        assert_eq!(decode(&body).unwrap_err().code, 415);
    }
}
