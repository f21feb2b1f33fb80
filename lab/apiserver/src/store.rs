//! The object store: objects as JSON, one global resourceVersion counter, a bounded event history
//! for watches, and the server-side behaviour clients rely on (defaulting, conflicts, status).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::patch::{self, PatchKind};
use crate::resources::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector};

/// An error the API answers with, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    fn with_details(mut self, res: &Resource, name: &str) -> Self {
        let mut d = json!({"name": name, "kind": res.plural});
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        self.details = Some(d);
        self
    }
    fn qualified(res: &Resource) -> String {
        if res.group.is_empty() {
            res.plural.to_string()
        } else {
            format!("{}.{}", res.plural, res.group)
        }
    }
    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", Self::qualified(res)),
        )
        .with_details(res, name)
    }
    pub fn already_exists(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", Self::qualified(res)),
        )
        .with_details(res, name)
    }
    pub fn conflict(res: &Resource, name: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes \
             to the latest version and try again",
            Self::qualified(res)
        );
        Self::new(409, "Conflict", msg).with_details(res, name)
    }
    pub fn invalid(res: &Resource, name: &str, field: &str, why: &str) -> Self {
        let msg = format!("{} \"{name}\" is invalid: {field}: {why}", res.kind);
        let mut e = Self::new(422, "Invalid", msg).with_details(res, name);
        if let Some(d) = e.details.as_mut() {
            d["kind"] = json!(res.kind);
            d["causes"] = json!([{"reason": "FieldValueInvalid", "message": why, "field": field}]);
        }
        e
    }
    pub fn forbidden(res: &Resource, name: &str, why: &str) -> Self {
        let msg = format!("{} \"{name}\" is forbidden: {why}", Self::qualified(res));
        Self::new(403, "Forbidden", msg).with_details(res, name)
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }
    pub fn path_not_found(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change, as kept in the history and sent to watchers.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub key: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    /// The object before a modification, so a watcher can tell when it stops matching a selector.
    pub old: Option<Value>,
}

/// Tunables; the defaults suit the lab.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of events kept for watches that resume from a resourceVersion; older ones get 410 Gone.
    pub history_limit: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: std::time::Duration,
    /// Where Service ClusterIPs are allocated from.
    pub service_cidr: Ipv4Net,
    /// NodePort range, inclusive.
    pub node_ports: (u16, u16),
    /// How long a deleted Namespace stays `Terminating` before it and its contents go (the
    /// namespace controller's delay). Without a tokio runtime the purge is immediate.
    pub namespace_termination: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: 1000,
            bookmark_interval: std::time::Duration::from_secs(60),
            service_cidr: Ipv4Net::new(Ipv4Addr::new(10, 233, 0, 0), 18).unwrap_or_default(),
            node_ports: (30000, 32767),
            namespace_termination: std::time::Duration::from_millis(500),
        }
    }
}

type Key = (String, String, String);

struct Inner {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Every event with rv <= this one has left the history.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<Arc<Event>>>,
    dirty: bool,
}

/// A handle on the store, cheap to clone; the HTTP layer and in-process users share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    opts: Arc<Options>,
}

/// A watch in progress: events to send first, then live events from `rx`.
pub struct Watch {
    pub initial: VecDeque<Arc<Event>>,
    pub rx: mpsc::UnboundedReceiver<Arc<Event>>,
    pub filter: WatchFilter,
    /// The resourceVersion the initial events bring the watcher to.
    pub start_rv: u64,
}

impl Watch {
    /// The next event this watcher sees (initial ones first), as the HTTP watch would send it;
    /// `None` once the store closes its watches.
    pub async fn next(&mut self) -> Option<(EventType, Value)> {
        loop {
            let ev = match self.initial.pop_front() {
                Some(ev) => ev,
                None => self.rx.recv().await?,
            };
            if let Some(kind) = self.filter.translate(&ev) {
                return Some((kind, ev.object.clone()));
            }
        }
    }
}

/// Which events of the store a watcher wants.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    pub key: String,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event type this watcher sees for `ev`, if any. An update that makes an object stop
    /// (or start) matching is a DELETED (or ADDED) for this watcher, as with the real server.
    pub fn translate(&self, ev: &Event) -> Option<EventType> {
        if ev.key != self.key || self.namespace.as_ref().is_some_and(|ns| *ns != ev.namespace) {
            return None;
        }
        let now = self.matches(&ev.object);
        match ev.kind {
            EventType::Modified => {
                let before = ev.old.as_ref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some(EventType::Modified),
                    (true, false) => Some(EventType::Deleted),
                    (false, true) => Some(EventType::Added),
                    (false, false) => None,
                }
            }
            kind => now.then_some(kind),
        }
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::thread_rng().gen();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// The suffix alphabet Kubernetes uses for generateName (no vowels, no confusable digits).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Just made an object above; this arm cannot be reached but must not panic.
        _ => unreachable!("metadata is an object"),
    }
}

/// The object without metadata and status: what a generation bump is about.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn rv_of(obj: &Value) -> Option<u64> {
    meta_str(obj, "resourceVersion").parse().ok()
}

/// What the filter for a list or watch call asks for.
#[derive(Debug, Clone, Default)]
pub struct ListParams<'a> {
    pub label_selector: &'a str,
    pub field_selector: &'a str,
}

impl Store {
    pub fn new(opts: Options) -> Self {
        let inner = Inner {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: opts.history_limit.max(1),
            compacted: 0,
            watchers: Vec::new(),
            dirty: false,
        };
        let store = Store {
            inner: Arc::new(Mutex::new(inner)),
            opts: Arc::new(opts),
        };
        store.ensure_system_namespaces();
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is one insert), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn ensure_system_namespaces(&self) {
        let ns = resources::lookup("", "v1", "namespaces");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if let Some(ns) = ns {
                let _ = self.create_in(ns, None, json!({"metadata": {"name": name}}), false);
            }
        }
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Shrinks (or grows) the event history; shrinking drops the oldest events at once, so a watch
    /// resuming from before them gets 410 Gone.
    pub fn set_history_limit(&self, limit: usize) {
        let mut inner = self.lock();
        inner.history_limit = limit.max(1);
        trim(&mut inner);
    }

    fn resource(api_version: &str, plural: &str) -> Result<&'static Resource, ApiError> {
        resources::lookup_api_version(api_version, plural)
            .ok_or_else(|| ApiError::path_not_found(&format!("{api_version}/{plural}")))
    }

    // ---- in-process API, by apiVersion and plural -------------------------------------------

    /// Creates an object (POST semantics).
    pub fn create(&self, api_version: &str, plural: &str, ns: Option<&str>, obj: Value) -> Result<Value, ApiError> {
        self.create_in(Self::resource(api_version, plural)?, ns, obj, false)
    }
    pub fn get(&self, api_version: &str, plural: &str, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.get_in(Self::resource(api_version, plural)?, ns, name)
    }
    /// Lists objects (all namespaces when `ns` is `None`); returns the items and the list's resourceVersion.
    pub fn list(
        &self,
        api_version: &str,
        plural: &str,
        ns: Option<&str>,
        params: &ListParams<'_>,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        self.list_in(Self::resource(api_version, plural)?, ns, params)
    }
    /// Replaces an object (PUT semantics; 409 when its resourceVersion is stale).
    pub fn update(&self, api_version: &str, plural: &str, ns: Option<&str>, obj: Value) -> Result<Value, ApiError> {
        let res = Self::resource(api_version, plural)?;
        let name = meta_str(&obj, "name").to_string();
        self.update_in(res, ns, &name, obj, false, false)
    }
    /// Replaces an object's status (PUT on `/status`).
    pub fn update_status(
        &self,
        api_version: &str,
        plural: &str,
        ns: Option<&str>,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let res = Self::resource(api_version, plural)?;
        let name = meta_str(&obj, "name").to_string();
        self.update_in(res, ns, &name, obj, true, false)
    }
    /// PATCH with a body of the given kind (merge, strategic merge, JSON patch, apply), on the
    /// object or (with `status`) on its status subresource.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        api_version: &str,
        plural: &str,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let res = Self::resource(api_version, plural)?;
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.patch_in(res, ns, name, kind, &bytes, status, false)
    }
    pub fn delete(&self, api_version: &str, plural: &str, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.delete_in(Self::resource(api_version, plural)?, ns, name, false)
    }
    /// Starts a watch; `rv` as in `?resourceVersion=` (None or "0": current objects first as ADDED).
    pub fn watch(
        &self,
        api_version: &str,
        plural: &str,
        ns: Option<&str>,
        rv: Option<&str>,
        params: &ListParams<'_>,
    ) -> Result<Watch, ApiError> {
        self.watch_in(Self::resource(api_version, plural)?, ns, rv, false, params)
    }

    // ---- the verbs, by resource -------------------------------------------------------------

    pub(crate) fn get_in(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let key = key_of(res, ns, name);
        self.lock()
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub(crate) fn list_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        params: &ListParams<'_>,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        let labels = LabelSelector::parse(params.label_selector)?;
        let fields = FieldSelector::parse(params.field_selector)?;
        let inner = self.lock();
        let sk = res.storage_key();
        let items = inner
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == sk && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .filter(|v| labels.matches(v) && fields.matches(v))
            .cloned()
            .collect();
        Ok((items, inner.rv))
    }

    pub(crate) fn create_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request is not a JSON object"));
        }
        check_type(res, &mut obj)?;
        let ns = resolve_namespace(res, ns, &mut obj)?;
        let meta = metadata_mut(&mut obj);
        let mut name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => name = format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ))
                }
            }
        }
        if !is_dns_subdomain(&name) || (res.kind == "Namespace" && (name.contains('.') || name.len() > 63)) {
            return Err(ApiError::invalid(
                res,
                &name,
                "metadata.name",
                "Invalid value: must be a lowercase RFC 1123 name",
            ));
        }
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(random_uid()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        for f in ["resourceVersion", "deletionTimestamp", "selfLink", "managedFields"] {
            meta.remove(f);
        }

        let mut inner = self.lock();
        if let Some(ns) = &ns {
            let ns_key = (String::from("/namespaces"), String::new(), ns.clone());
            match inner.objects.get(&ns_key) {
                None => {
                    let ns_res = resources::lookup("", "v1", "namespaces").unwrap_or(res);
                    return Err(ApiError::not_found(ns_res, ns));
                }
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::forbidden(
                        res,
                        &name,
                        &format!("unable to create new content in namespace {ns} because it is being terminated"),
                    ));
                }
                Some(_) => {}
            }
        }
        let key = key_of(res, ns.as_deref(), &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        reset_status_on_create(res, &mut obj);
        default_and_validate(res, &mut obj, None, &inner, &self.opts)?;
        if dry_run {
            return Ok(obj);
        }
        Ok(commit(&mut inner, key, EventType::Added, obj, None))
    }

    /// PUT, PUT /status, and the second half of PATCH.
    pub(crate) fn update_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        status_only: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request is not a JSON object"));
        }
        check_type(res, &mut obj)?;
        let ns = resolve_namespace(res, ns, &mut obj)?;
        let body_name = meta_str(&obj, "name");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut inner = self.lock();
        let key = key_of(res, ns.as_deref(), name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        let want_rv = meta_str(&obj, "resourceVersion");
        if !want_rv.is_empty() && want_rv != meta_str(&current, "resourceVersion") {
            return Err(ApiError::conflict(res, name));
        }
        let mut next = if status_only {
            let mut n = current.clone();
            n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            if n["status"].is_null() {
                if let Value::Object(m) = &mut n {
                    m.remove("status");
                }
            }
            n
        } else {
            // Identity and server-owned metadata come from the stored object, whatever the body says.
            let keep = ["uid", "creationTimestamp", "generation", "deletionTimestamp"];
            let cur_meta = current.get("metadata").cloned().unwrap_or(json!({}));
            let meta = metadata_mut(&mut obj);
            for f in keep {
                match cur_meta.get(f) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
            if res.status {
                match current.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut obj {
                            m.remove("status");
                        }
                    }
                }
            }
            default_and_validate(res, &mut obj, Some(&current), &inner, &self.opts)?;
            if spec_part(&obj) != spec_part(&current) {
                let g = current
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                metadata_mut(&mut obj).insert("generation".into(), json!(g + 1));
            }
            obj
        };
        metadata_mut(&mut next).insert("resourceVersion".into(), json!(meta_str(&current, "resourceVersion")));
        // A write that changes nothing keeps the resourceVersion and sends no event, as the real server does.
        if next == current || dry_run {
            return Ok(next);
        }
        Ok(commit(&mut inner, key, EventType::Modified, next, Some(current)))
    }

    /// PATCH (or server-side apply, approximated) on the object or its `/status`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        status_only: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let current = match self.get_in(res, ns, name) {
            Ok(c) => c,
            Err(e) if e.code == 404 && kind == PatchKind::Apply && !status_only => {
                let mut fresh = json!({"metadata": {"name": name}});
                patch::apply(kind, &mut fresh, body)?;
                return self.create_in(res, ns, fresh, dry_run);
            }
            Err(e) => return Err(e),
        };
        let mut patched = current.clone();
        patch::apply(kind, &mut patched, body)?;
        if kind == PatchKind::Apply {
            // Apply configurations carry no resourceVersion precondition unless they set one.
            let asked = serde_json::from_slice::<Value>(body).ok();
            if asked.as_ref().is_none_or(|a| meta_str(a, "resourceVersion").is_empty()) {
                metadata_mut(&mut patched)
                    .insert("resourceVersion".into(), json!(meta_str(&current, "resourceVersion")));
            }
        }
        self.update_in(res, ns, name, patched, status_only, dry_run)
    }

    pub(crate) fn delete_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = key_of(res, ns, name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        if dry_run {
            return Ok(current);
        }
        if res.kind == "Namespace" && res.group.is_empty() {
            // As with the real namespace controller, the namespace is Terminating for a moment,
            // so the rest of a `kubectl delete -f` still finds its objects; then everything in it
            // goes, and the namespace last.
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(current);
            }
            let mut terminating = current.clone();
            metadata_mut(&mut terminating).insert("deletionTimestamp".into(), json!(now_rfc3339()));
            terminating["status"] = json!({"phase": "Terminating"});
            let marked = commit(&mut inner, key, EventType::Modified, terminating, Some(current));
            drop(inner);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) if !self.opts.namespace_termination.is_zero() => {
                    let (store, name, delay) = (self.clone(), name.to_string(), self.opts.namespace_termination);
                    rt.spawn(async move {
                        tokio::time::sleep(delay).await;
                        store.purge_namespace(&name);
                    });
                }
                _ => self.purge_namespace(name),
            }
            return Ok(marked);
        }
        Ok(commit(&mut inner, key, EventType::Deleted, current, None))
    }

    /// `pods/<name>/binding`: sets `spec.nodeName` once, as the scheduler does.
    pub fn bind_pod(&self, ns: &str, name: &str, node: &str, dry_run: bool) -> Result<Value, ApiError> {
        let res = Self::resource("v1", "pods")?;
        if node.is_empty() {
            return Err(ApiError::invalid(res, name, "target.name", "Required value"));
        }
        let mut inner = self.lock();
        let key = key_of(res, Some(ns), name);
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        let assigned = current.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
        if !assigned.is_empty() {
            let mut e = ApiError::conflict(res, name);
            e.message = format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{assigned}\"");
            return Err(e);
        }
        let mut bound = current.clone();
        if bound.get("spec").is_some_and(Value::is_object) {
            bound["spec"]["nodeName"] = json!(node);
        }
        if dry_run {
            return Ok(bound);
        }
        Ok(commit(&mut inner, key, EventType::Modified, bound, Some(current)))
    }

    /// The namespace controller's work: everything in the namespace, then the namespace.
    fn purge_namespace(&self, name: &str) {
        let mut inner = self.lock();
        let inside: Vec<Key> = inner.objects.keys().filter(|(_, n, _)| n == name).cloned().collect();
        for k in inside {
            if let Some(obj) = inner.objects.get(&k).cloned() {
                commit(&mut inner, k, EventType::Deleted, obj, None);
            }
        }
        let key = (String::from("/namespaces"), String::new(), name.to_string());
        if let Some(obj) = inner.objects.get(&key).cloned() {
            commit(&mut inner, key, EventType::Deleted, obj, None);
        }
    }

    pub(crate) fn watch_in(
        &self,
        res: &Resource,
        ns: Option<&str>,
        rv: Option<&str>,
        send_initial_events: bool,
        params: &ListParams<'_>,
    ) -> Result<Watch, ApiError> {
        let filter = WatchFilter {
            key: res.storage_key(),
            namespace: ns.map(str::to_string),
            labels: LabelSelector::parse(params.label_selector)?,
            fields: FieldSelector::parse(params.field_selector)?,
        };
        let from: Option<u64> = match rv {
            None | Some("") | Some("0") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?,
            ),
        };
        let mut inner = self.lock();
        let mut initial = VecDeque::new();
        if from.is_none() || send_initial_events {
            for ((k, n, _), obj) in &inner.objects {
                if *k == filter.key && filter.namespace.as_ref().is_none_or(|ns| ns == n) && filter.matches(obj) {
                    initial.push_back(Arc::new(Event {
                        rv: rv_of(obj).unwrap_or(0),
                        key: k.clone(),
                        namespace: n.clone(),
                        kind: EventType::Added,
                        object: obj.clone(),
                        old: None,
                    }));
                }
            }
        }
        match from {
            Some(from) if !send_initial_events => {
                if from < inner.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {from} ({})",
                        inner.compacted + 1
                    )));
                }
                initial.extend(inner.history.iter().filter(|e| e.rv > from).cloned());
            }
            _ => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        inner.watchers.push(tx);
        Ok(Watch {
            initial,
            rx,
            filter,
            start_rv: inner.rv,
        })
    }

    // ---- persistence ------------------------------------------------------------------------

    /// Writes every object and the resourceVersion counter to `path` (atomically) if anything changed.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let snapshot = {
            let mut inner = self.lock();
            if !inner.dirty && path.exists() {
                return Ok(());
            }
            inner.dirty = false;
            let objects: Vec<Value> = inner
                .objects
                .iter()
                .map(|((k, n, name), v)| json!({"key": k, "namespace": n, "name": name, "object": v}))
                .collect();
            json!({"resourceVersion": inner.rv, "objects": objects})
        };
        let tmp: PathBuf = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&snapshot)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Loads a snapshot written by [`Store::save`]. The history starts empty, so watches resuming
    /// from before the restart get 410 Gone and relist, as after an etcd compaction.
    pub fn load(path: &Path, opts: Options) -> std::io::Result<Self> {
        let snapshot: Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let store = Store::new(opts);
        {
            let mut inner = store.lock();
            inner.objects.clear();
            for entry in snapshot["objects"].as_array().into_iter().flatten() {
                let field = |f: &str| entry[f].as_str().unwrap_or("").to_string();
                inner.objects.insert(
                    (field("key"), field("namespace"), field("name")),
                    entry["object"].clone(),
                );
            }
            let rv = snapshot["resourceVersion"].as_u64().unwrap_or(0);
            inner.rv = rv;
            inner.compacted = rv;
            inner.dirty = false;
        }
        store.ensure_system_namespaces();
        // A namespace saved while Terminating finishes terminating now.
        let terminating: Vec<String> = {
            let inner = store.lock();
            inner
                .objects
                .iter()
                .filter(|((k, _, _), v)| k == "/namespaces" && v.pointer("/metadata/deletionTimestamp").is_some())
                .map(|((_, _, name), _)| name.clone())
                .collect()
        };
        for name in terminating {
            store.purge_namespace(&name);
        }
        Ok(store)
    }

    /// Ends every watch (their streams see the channel close).
    pub fn close_watches(&self) {
        self.lock().watchers.clear();
    }
}

fn key_of(res: &Resource, ns: Option<&str>, name: &str) -> Key {
    let ns = if res.namespaced { ns.unwrap_or("") } else { "" };
    (res.storage_key(), ns.to_string(), name.to_string())
}

fn trim(inner: &mut Inner) {
    while inner.history.len() > inner.history_limit {
        if let Some(e) = inner.history.pop_front() {
            inner.compacted = e.rv;
        }
    }
}

/// Stamps a new resourceVersion, stores (or removes) the object, records and broadcasts the event.
fn commit(inner: &mut Inner, key: Key, kind: EventType, mut obj: Value, old: Option<Value>) -> Value {
    inner.rv += 1;
    inner.dirty = true;
    let rv = inner.rv;
    metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
    if kind == EventType::Deleted {
        inner.objects.remove(&key);
    } else {
        inner.objects.insert(key.clone(), obj.clone());
    }
    let ev = Arc::new(Event {
        rv,
        key: key.0,
        namespace: key.1,
        kind,
        object: obj.clone(),
        old,
    });
    inner.history.push_back(ev.clone());
    trim(inner);
    inner.watchers.retain(|w| w.send(ev.clone()).is_ok());
    obj
}

/// kind/apiVersion in the body must match the URL when given; they are filled in when not.
fn check_type(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if !kind.is_empty() && kind != res.kind {
        return Err(ApiError::bad_request(format!(
            "the kind {kind:?} does not match the resource {:?}",
            res.plural
        )));
    }
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if !av.is_empty() && resources::split_api_version(av).0 != res.group {
        return Err(ApiError::bad_request(format!(
            "the apiVersion {av:?} does not match the group of {:?}",
            res.plural
        )));
    }
    obj["kind"] = json!(res.kind);
    obj["apiVersion"] = json!(res.api_version());
    Ok(())
}

fn resolve_namespace(res: &Resource, url_ns: Option<&str>, obj: &mut Value) -> Result<Option<String>, ApiError> {
    let body_ns = meta_str(obj, "namespace").to_string();
    if !res.namespaced {
        metadata_mut(obj).remove("namespace");
        return Ok(None);
    }
    let ns = match (url_ns, body_ns.as_str()) {
        (Some(u), "") => u.to_string(),
        (Some(u), b) if u == b => u.to_string(),
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ))
        }
        (None, "") => {
            return Err(ApiError::bad_request(
                "a namespace is required for a namespaced resource",
            ))
        }
        (None, b) => b.to_string(),
    };
    metadata_mut(obj).insert("namespace".into(), json!(ns));
    Ok(Some(ns))
}

/// Status a client cannot set on create, as the real registries reset it.
fn reset_status_on_create(res: &Resource, obj: &mut Value) {
    match (res.group, res.kind) {
        ("", "Pod") => obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"}),
        ("", "Service") => obj["status"] = json!({"loadBalancer": {}}),
        ("", "Namespace") => obj["status"] = json!({"phase": "Active"}),
        // Nodes may set their status on create (kubelet registers that way).
        ("", "Node") => {}
        _ if res.status => {
            if let Value::Object(m) = obj {
                m.remove("status");
            }
        }
        _ => {}
    }
}

fn set_default(obj: &mut Value, field: &str, value: Value) {
    if let Value::Object(m) = obj {
        if m.get(field).is_none_or(Value::is_null) {
            m.insert(field.to_string(), value);
        }
    }
}

fn default_protocols(list: Option<&mut Value>) {
    for p in list.and_then(Value::as_array_mut).into_iter().flatten() {
        set_default(p, "protocol", json!("TCP"));
    }
}

/// The defaulting and validation of the registries that matter to warren and its lab.
fn default_and_validate(
    res: &Resource,
    obj: &mut Value,
    old: Option<&Value>,
    inner: &Inner,
    opts: &Options,
) -> Result<(), ApiError> {
    let name = meta_str(obj, "name").to_string();
    match (res.group, res.kind) {
        ("", "Namespace") => {
            // The real server always labels namespaces with their name; namespaceSelectors rely on it.
            let meta = metadata_mut(obj);
            if !meta.get("labels").is_some_and(Value::is_object) {
                meta.insert("labels".into(), json!({}));
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
        }
        ("", "Pod") => {
            let spec = obj.get_mut("spec").filter(|s| s.is_object());
            let Some(spec) = spec else {
                return Err(ApiError::invalid(res, &name, "spec.containers", "Required value"));
            };
            if spec
                .get("containers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return Err(ApiError::invalid(res, &name, "spec.containers", "Required value"));
            }
            for (f, v) in [
                ("restartPolicy", json!("Always")),
                ("dnsPolicy", json!("ClusterFirst")),
                ("schedulerName", json!("default-scheduler")),
                ("terminationGracePeriodSeconds", json!(30)),
            ] {
                set_default(spec, f, v);
            }
            for list in ["containers", "initContainers"] {
                for c in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
                    default_protocols(c.get_mut("ports"));
                }
            }
        }
        ("", "Service") => default_service(res, &name, obj, old, inner, opts)?,
        ("networking.k8s.io", "NetworkPolicy") => {
            if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
                if spec
                    .get("policyTypes")
                    .and_then(Value::as_array)
                    .is_none_or(|p| p.is_empty())
                {
                    let mut types = vec![json!("Ingress")];
                    if spec.get("egress").is_some_and(|e| !e.is_null()) {
                        types.push(json!("Egress"));
                    }
                    spec["policyTypes"] = Value::Array(types);
                }
                for dir in ["ingress", "egress"] {
                    for rule in spec.get_mut(dir).and_then(Value::as_array_mut).into_iter().flatten() {
                        default_protocols(rule.get_mut("ports"));
                    }
                }
            }
        }
        ("", "Secret") => {
            // stringData is write-only: the registry folds it into data.
            if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
                if !obj.get("data").is_some_and(Value::is_object) {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    obj["data"][k] = json!(crate::base64(v.as_str().unwrap_or("").as_bytes()));
                }
            }
            set_default(obj, "type", json!("Opaque"));
        }
        ("discovery.k8s.io", "EndpointSlice") => default_protocols(obj.get_mut("ports")),
        ("", "Endpoints") => {
            for s in obj
                .get_mut("subsets")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                default_protocols(s.get_mut("ports"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// ClusterIP and NodePort allocation and the Service defaults kube-proxy reads.
fn default_service(
    res: &Resource,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
    inner: &Inner,
    opts: &Options,
) -> Result<(), ApiError> {
    if !obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"] = json!({});
    }
    let self_key = (
        res.storage_key(),
        meta_str(obj, "namespace").to_string(),
        name.to_string(),
    );
    let mut used_ips = BTreeSet::new();
    let mut used_ports = BTreeSet::new();
    for ((k, n, nm), svc) in &inner.objects {
        if *k != self_key.0 || (*n == self_key.1 && *nm == self_key.2) {
            continue;
        }
        if let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
            used_ips.insert(ip.to_string());
        }
        for p in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(np) = p.get("nodePort").and_then(Value::as_u64) {
                used_ports.insert(np);
            }
        }
    }
    let spec = &mut obj["spec"];
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut ip = spec.get("clusterIP").and_then(Value::as_str).unwrap_or("").to_string();
    if ip.is_empty() {
        ip = old_ip.to_string();
    }
    if !old_ip.is_empty() && ip != old_ip {
        return Err(ApiError::invalid(
            res,
            name,
            "spec.clusterIP",
            "Invalid value: field is immutable",
        ));
    }
    if ip.is_empty() {
        let net = opts.service_cidr;
        let size = 1u64 << (32 - u32::from(net.prefix_len()));
        let base = u64::from(u32::from(net.network()));
        let mut rng = rand::thread_rng();
        // Random like the real allocator; skip the network address and the first host (the
        // `kubernetes` Service's address in a real cluster).
        let found = (0..4096)
            .map(|_| rng.gen_range(2..size.saturating_sub(1).max(3)))
            .find_map(|off| {
                let cand = Ipv4Addr::from(u32::try_from(base + off).ok()?).to_string();
                (!used_ips.contains(&cand)).then_some(cand)
            });
        ip = found.ok_or_else(|| ApiError::invalid(res, name, "spec.clusterIP", "Internal error: range is full"))?;
    } else if ip != "None" {
        let parsed: Ipv4Addr = ip
            .parse()
            .map_err(|_| ApiError::invalid(res, name, "spec.clusterIP", "Invalid value: must be a valid IP address"))?;
        if !opts.service_cidr.contains(&parsed) {
            return Err(ApiError::invalid(
                res,
                name,
                "spec.clusterIP",
                &format!(
                    "Invalid value: {ip:?}: provided IP is not in the valid range ({})",
                    opts.service_cidr
                ),
            ));
        }
        if used_ips.contains(&ip) {
            return Err(ApiError::invalid(
                res,
                name,
                "spec.clusterIP",
                &format!("Invalid value: {ip:?}: provided IP is already allocated"),
            ));
        }
    }
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    set_default(spec, "ipFamilies", json!(["IPv4"]));
    set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
    let wants_node_port = ty == "NodePort" || ty == "LoadBalancer";
    if wants_node_port {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (lo, hi) = opts.node_ports;
    let mut mine = BTreeSet::new();
    for p in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if !p.is_object() {
            return Err(ApiError::invalid(
                res,
                name,
                "spec.ports",
                "Invalid value: each port must be an object",
            ));
        }
        set_default(p, "protocol", json!("TCP"));
        if let Some(port) = p.get("port").cloned() {
            set_default(p, "targetPort", port);
        }
        if !wants_node_port {
            if let Value::Object(m) = p {
                m.remove("nodePort");
            }
            continue;
        }
        let np = match p.get("nodePort").and_then(Value::as_u64) {
            Some(np) => {
                if np < u64::from(lo) || np > u64::from(hi) {
                    return Err(ApiError::invalid(res, name, "spec.ports.nodePort", &format!("Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {lo}-{hi}")));
                }
                if used_ports.contains(&np) || mine.contains(&np) {
                    return Err(ApiError::invalid(
                        res,
                        name,
                        "spec.ports.nodePort",
                        &format!("Invalid value: {np}: provided port is already allocated"),
                    ));
                }
                np
            }
            None => {
                // Keep the port an update's body left out, as the real server does.
                let kept = old_ports
                    .iter()
                    .find(|o| {
                        o.get("port") == p.get("port")
                            && o.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == p["protocol"]
                    })
                    .and_then(|o| o.get("nodePort").and_then(Value::as_u64));
                let mut rng = rand::thread_rng();
                let free = kept.or_else(|| {
                    (0..4096)
                        .map(|_| rng.gen_range(u64::from(lo)..=u64::from(hi)))
                        .find(|c| !used_ports.contains(c) && !mine.contains(c))
                });
                free.ok_or_else(|| {
                    ApiError::invalid(res, name, "spec.ports.nodePort", "Internal error: range is full")
                })?
            }
        };
        mine.insert(np);
        p["nodePort"] = json!(np);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(Options::default())
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "spec": {"nodeName": node, "containers": [
            {"name": "c", "image": "busybox", "ports": [{"containerPort": 80}]}]}})
    }

    #[test]
    fn should_create_with_server_fields_and_refuse_duplicates() {
        let s = store();
        let p = s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["metadata"]["namespace"], "default");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(p["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert!(p["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
        let err = s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        let err = s.create("v1", "pods", Some("nope"), pod("b", "n1")).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (404, "namespaces \"nope\" not found"));
        let g = s
            .create(
                "v1",
                "configmaps",
                Some("default"),
                json!({"metadata": {"generateName": "cm-"}}),
            )
            .unwrap();
        let gname = g["metadata"]["name"].as_str().unwrap();
        assert!(gname.starts_with("cm-") && gname.len() == 8, "{gname}");
        let err = s
            .create(
                "v1",
                "configmaps",
                Some("default"),
                json!({"metadata": {"name": "Bad_Name"}}),
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn should_conflict_on_stale_resource_version_and_keep_status_on_main_update() {
        let s = store();
        let p = s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        let mut running = p.clone();
        running["status"] = json!({"phase": "Running", "podIP": "10.233.90.5"});
        let after_status = s.update_status("v1", "pods", Some("default"), running).unwrap();
        assert_eq!(after_status["status"]["phase"], "Running");
        let err = s.update("v1", "pods", Some("default"), p.clone()).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let mut relabel = after_status.clone();
        relabel["metadata"]["labels"]["app"] = json!("y");
        relabel["status"] = json!({"phase": "Failed"});
        let updated = s.update("v1", "pods", Some("default"), relabel).unwrap();
        assert_eq!(
            updated["status"]["phase"], "Running",
            "main-resource PUT must not change status"
        );
        assert_eq!(updated["metadata"]["labels"]["app"], "y");
        let before = s.resource_version();
        let same = s.update("v1", "pods", Some("default"), updated.clone()).unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            updated["metadata"]["resourceVersion"]
        );
        assert_eq!(
            s.resource_version(),
            before,
            "a no-op update must not bump the resourceVersion"
        );
    }

    #[test]
    fn should_allocate_service_addresses_and_refuse_taken_ones() {
        let s = store();
        let svc = |name: &str, ip: Option<&str>, np: Option<u16>| {
            let mut port = json!({"port": 9097});
            if let Some(np) = np {
                port["nodePort"] = json!(np);
            }
            let mut v = json!({"metadata": {"name": name}, "spec": {"type": "NodePort", "ports": [port]}});
            if let Some(ip) = ip {
                v["spec"]["clusterIP"] = json!(ip);
            }
            v
        };
        let a = s
            .create(
                "v1",
                "services",
                Some("default"),
                svc("a", Some("10.233.5.155"), Some(31602)),
            )
            .unwrap();
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.233.5.155"]));
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 9097);
        assert_eq!(a["spec"]["externalTrafficPolicy"], "Cluster");
        let b = s
            .create("v1", "services", Some("default"), svc("b", None, None))
            .unwrap();
        let ip: Ipv4Addr = b["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(Options::default().service_cidr.contains(&ip));
        let np = b["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=32767).contains(&np) && np != 31602);
        let err = s
            .create("v1", "services", Some("default"), svc("c", Some("10.233.5.155"), None))
            .unwrap_err();
        assert_eq!(err.code, 422);
        let err = s
            .create("v1", "services", Some("default"), svc("d", None, Some(31602)))
            .unwrap_err();
        assert!(err.message.contains("already allocated"), "{}", err.message);
    }

    #[test]
    fn should_replay_history_and_expire_old_resource_versions() {
        let s = store();
        let p = s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        let rv = p["metadata"]["resourceVersion"].as_str().unwrap().to_string();
        s.delete("v1", "pods", Some("default"), "a").unwrap();
        let w = s.watch("v1", "pods", None, Some(&rv), &ListParams::default()).unwrap();
        let kinds: Vec<EventType> = w.initial.iter().filter_map(|e| w.filter.translate(e)).collect();
        assert_eq!(kinds, [EventType::Deleted]);
        s.set_history_limit(1);
        s.create("v1", "configmaps", Some("default"), json!({"metadata": {"name": "x"}}))
            .unwrap();
        let err = s
            .watch("v1", "pods", None, Some(&rv), &ListParams::default())
            .err()
            .unwrap();
        assert_eq!(err.code, 410);
    }

    #[test]
    fn should_tell_a_selector_watcher_when_an_object_stops_matching() {
        let s = store();
        let p = s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        let params = ListParams {
            label_selector: "app=x",
            field_selector: "spec.nodeName=n1",
        };
        let mut w = s
            .watch(
                "v1",
                "pods",
                Some("default"),
                Some(p["metadata"]["resourceVersion"].as_str().unwrap()),
                &params,
            )
            .unwrap();
        let mut q = p.clone();
        q["metadata"]["labels"]["app"] = json!("z");
        s.update("v1", "pods", Some("default"), q).unwrap();
        let ev = w.rx.try_recv().unwrap();
        assert_eq!(w.filter.translate(&ev), Some(EventType::Deleted));
    }

    #[test]
    fn should_delete_namespace_contents_and_label_namespaces() {
        let s = store();
        let ns = s
            .create("v1", "namespaces", None, json!({"metadata": {"name": "bar"}}))
            .unwrap();
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "bar");
        s.create("v1", "pods", Some("bar"), pod("a", "n1")).unwrap();
        s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        s.delete("v1", "namespaces", None, "bar").unwrap();
        assert_eq!(s.get("v1", "pods", Some("bar"), "a").unwrap_err().code, 404);
        s.get("v1", "pods", Some("default"), "a").unwrap();
    }

    #[test]
    fn should_answer_malformed_objects_with_errors_not_panics() {
        let s = store();
        let bodies = [
            json!(null),
            json!([]),
            json!({"metadata": "x"}),
            json!({"metadata": {"name": "x", "labels": "y"}, "spec": 5, "status": "z"}),
            json!({"metadata": {"name": "x"}, "spec": {"ports": [1, "a"], "containers": [1], "ingress": [1]},
                   "ports": [1], "subsets": [1], "stringData": {"a": 1}}),
            json!({"metadata": {"name": "x"}, "spec": {"type": "NodePort", "clusterIP": "bad", "ports": [{"nodePort": "x"}]}}),
        ];
        for res in resources::RESOURCES {
            for body in &bodies {
                let ns = res.namespaced.then_some("default");
                let _ = s.create_in(res, ns, body.clone(), false);
                let _ = s.update_in(res, ns, "x", body.clone(), false, false);
                let _ = s.update_in(res, ns, "x", body.clone(), true, false);
                let raw = serde_json::to_vec(body).unwrap();
                for kind in [
                    PatchKind::Merge,
                    PatchKind::Strategic,
                    PatchKind::Json,
                    PatchKind::Apply,
                ] {
                    let _ = s.patch_in(res, ns, "x", kind, &raw, false, false);
                }
            }
        }
    }

    #[tokio::test]
    async fn should_stream_in_process_watch_events_in_order() {
        let s = store();
        s.create("v1", "pods", Some("default"), pod("a", "n1")).unwrap();
        let mut w = s
            .watch("v1", "pods", Some("default"), None, &ListParams::default())
            .unwrap();
        let status = json!({"status": {"phase": "Running"}});
        s.patch("v1", "pods", Some("default"), "a", PatchKind::Merge, &status, true)
            .unwrap();
        s.delete("v1", "pods", Some("default"), "a").unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (kind, obj) = w.next().await.unwrap();
            seen.push((kind, obj["status"]["phase"].as_str().unwrap_or("").to_string()));
        }
        let want = [
            (EventType::Added, "Pending"),
            (EventType::Modified, "Running"),
            (EventType::Deleted, "Running"),
        ];
        assert_eq!(seen, want.map(|(k, p)| (k, p.to_string())));
        s.close_watches();
        assert!(w.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn should_keep_a_deleted_namespace_terminating_before_purging_it() {
        let s = store();
        s.create("v1", "namespaces", None, json!({"metadata": {"name": "bar"}}))
            .unwrap();
        s.create("v1", "pods", Some("bar"), pod("a", "n1")).unwrap();
        let ns = s.delete("v1", "namespaces", None, "bar").unwrap();
        assert_eq!(ns["status"]["phase"], "Terminating");
        s.get("v1", "pods", Some("bar"), "a").unwrap();
        let err = s.create("v1", "pods", Some("bar"), pod("b", "n1")).unwrap_err();
        assert_eq!((err.code, err.reason), (403, "Forbidden"));
        tokio::time::sleep(Options::default().namespace_termination * 2).await;
        assert_eq!(s.get("v1", "pods", Some("bar"), "a").unwrap_err().code, 404);
        assert_eq!(s.get("v1", "namespaces", None, "bar").unwrap_err().code, 404);
    }

    #[test]
    fn should_survive_a_save_and_load_with_monotonic_resource_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        let s = store();
        s.create(
            "v1",
            "configmaps",
            Some("default"),
            json!({"metadata": {"name": "keep"}, "data": {"a": "1"}}),
        )
        .unwrap();
        let rv = s.resource_version();
        s.save(&path).unwrap();
        let t = Store::load(&path, Options::default()).unwrap();
        assert_eq!(
            t.get("v1", "configmaps", Some("default"), "keep").unwrap()["data"]["a"],
            "1"
        );
        assert_eq!(t.resource_version(), rv);
        let next = t
            .create("v1", "configmaps", Some("default"), json!({"metadata": {"name": "n"}}))
            .unwrap();
        assert!(
            next["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > rv
        );
        assert_eq!(
            t.watch("v1", "configmaps", None, Some("1"), &ListParams::default())
                .err()
                .unwrap()
                .code,
            410
        );
    }
}
