//! A pod's labels, packed: the model holds one set per pod (10 000 at issue 5's scale), and in a
//! `BTreeMap<String, String>` even a Deployment's three labels take a 544-byte node plus one
//! allocation per key and value, ~750 bytes, against ~100 here. warren-node's pod store and the
//! model share one `Arc` of them.

use std::collections::BTreeMap;
use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a selector reads of a set of labels: pods' are [`PackedLabels`], namespaces' (a few
/// dozen per cluster) stay a map.
pub trait LabelLookup {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl<L: LabelLookup + ?Sized> LabelLookup for std::sync::Arc<L> {
    fn label(&self, key: &str) -> Option<&str> {
        (**self).label(key)
    }
}

/// Labels in two allocations; a map's semantics (one value per key, iterated in key order).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct PackedLabels {
    /// Each key then its value, back to back, in key order.
    text: Box<str>,
    /// Where each (key, value) ends in `text`.
    ends: Box<[(usize, usize)]>,
}

impl PackedLabels {
    /// As a map built from `pairs` in order: a repeated key keeps its last value.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> PackedLabels {
        let mut sorted: Vec<(&str, &str)> = pairs.into_iter().collect();
        // Stable: a key's values stay in their order, and as in a map the last one wins.
        sorted.sort_by_key(|(k, _)| *k);
        sorted.reverse();
        sorted.dedup_by_key(|(k, _)| *k);
        sorted.reverse();
        let mut text = String::with_capacity(sorted.iter().map(|(k, v)| k.len() + v.len()).sum());
        let mut ends = Vec::with_capacity(sorted.len());
        for (k, v) in sorted {
            text.push_str(k);
            let key_end = text.len();
            text.push_str(v);
            ends.push((key_end, text.len()));
        }
        PackedLabels {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// (key, value) in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(k, v)| {
            // Always in bounds and on char boundaries: `new` recorded them.
            let pair = (
                self.text.get(start..k).unwrap_or_default(),
                self.text.get(k..v).unwrap_or_default(),
            );
            start = v;
            pair
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

impl LabelLookup for PackedLabels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl fmt::Debug for PackedLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for PackedLabels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let owned: Vec<(K, V)> = pairs.into_iter().collect();
        PackedLabels::new(owned.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
    }
}

impl From<BTreeMap<String, String>> for PackedLabels {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
    }
}

/// A JSON object of strings, as in `metadata.labels`.
impl Serialize for PackedLabels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A JSON object of strings, or `null`.
impl<'de> Deserialize<'de> for PackedLabels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default();
        Ok(PackedLabels::new(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_pack_labels_as_a_map_keeps_them() {
        let pairs = [
            ("tier", "web"),
            ("app", "a"),
            ("", ""),
            ("tier", "db"),
            ("k8s.io/x", "é"),
        ];
        let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
        let labels = PackedLabels::new(pairs);
        assert_eq!(labels.iter().collect::<BTreeMap<_, _>>(), map);
        assert!(labels.iter().map(|(k, _)| k).is_sorted());
        assert_eq!(labels.len(), 4);
        assert_eq!(labels.get("tier"), Some("db"), "the last value wins, as in a map");
        assert_eq!(labels.get(""), Some(""));
        assert_eq!(labels.get("k8s.io/x"), Some("é"));
        assert_eq!(labels.get("absent"), None);
        assert_eq!(labels.label("app"), Some("a"));
        assert_eq!(format!("{labels:?}"), format!("{map:?}"));
        assert_eq!(labels, pairs.into_iter().collect::<PackedLabels>());
        assert_eq!(labels.to_map(), PackedLabels::from(labels.to_map()).to_map());
        let empty = PackedLabels::new([]);
        assert!(empty.is_empty() && empty.iter().next().is_none() && empty == PackedLabels::default());
    }

    #[test]
    fn should_read_and_write_labels_as_a_json_object() {
        let l: PackedLabels = serde_json::from_str(r#"{"tier": "web", "app": "a"}"#).unwrap();
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"app":"a","tier":"web"}"#);
        let null: PackedLabels = serde_json::from_str("null").unwrap();
        assert!(null.is_empty());
        assert!(serde_json::from_str::<PackedLabels>(r#"{"a": 1}"#).is_err());
    }
}
