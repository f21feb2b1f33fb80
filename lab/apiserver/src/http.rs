//! HTTPS serving, authentication, and the mapping of REST paths and verbs onto the store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use crate::patch::PatchKind;
use crate::resources::{self, Resource};
use crate::store::{ApiError, EventType, ListParams, Store, Watch};
use crate::table::{self, Include};
use crate::tls::Pki;
use crate::Error;

type Body = BoxBody<Bytes, Infallible>;

pub(crate) struct State {
    pub store: Store,
    pub token: String,
}

pub(crate) fn acceptor(pki: &Pki) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let bad_pem = |e| Error::Io("parsing generated PEM".into(), std::io::Error::other(e));
    let mut chain = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).map_err(bad_pem)?];
    chain.push(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).map_err(bad_pem)?);
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).map_err(bad_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(Error::Tls)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts until `stopped` flips; dropping the connection set then ends every connection.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        conns.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    conns.shutdown().await;
}

fn full(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    full(code, serde_json::to_vec(v).unwrap_or_default())
}

fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.status())
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | "True"))
    }
}

/// How a response body should represent objects, from the Accept header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    Full,
    Table(Include),
    Metadata,
}

fn render_of(req: &Request<Incoming>, q: &Query) -> Render {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The first acceptable media type wins, as in the real negotiation.
    for media in accept.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        if !params.first().is_some_and(|m| *m == "application/json" || *m == "*/*") {
            continue;
        }
        let as_ = params.iter().find_map(|p| p.strip_prefix("as="));
        match as_ {
            Some("Table") => return Render::Table(Include::parse(q.get("includeObject"))),
            Some("PartialObjectMetadata" | "PartialObjectMetadataList") => return Render::Metadata,
            Some(_) => continue,
            None => return Render::Full,
        }
    }
    Render::Full
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = route(&state, req).await.unwrap_or_else(|e| error_response(&e));
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    Ok(resp)
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let Some(h) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    h.strip_prefix("Bearer ").is_some_and(|t| t.trim() == state.token)
}

async fn route(state: &State, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
        return Ok(full(StatusCode::OK, b"ok".to_vec()));
    }
    if !authorized(state, &req) {
        return Err(ApiError::unauthorized());
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_get = req.method() == Method::GET;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // kubectl (and kube-rs' run_aggregated) ask for aggregated discovery first; v2 is served.
    let aggregated = accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=APIGroupDiscoveryList") && first.contains("v=v2;"));
    if is_get && aggregated && matches!(segs.as_slice(), ["api"] | ["apis"]) {
        let doc = resources::aggregated_doc(segs == ["api"]);
        let mut resp = json_response(StatusCode::OK, &doc);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(resources::AGGREGATED_V2),
        );
        return Ok(resp);
    }
    let doc = match segs.as_slice() {
        ["version"] => Some(resources::version_doc()),
        ["api"] => Some(resources::core_versions_doc()),
        ["apis"] => Some(resources::group_list_doc()),
        ["apis", g] => Some(resources::group_doc(g).ok_or_else(|| ApiError::path_not_found(&path))?),
        ["api", v] => Some(resources::resource_list_doc("", v).ok_or_else(|| ApiError::path_not_found(&path))?),
        ["apis", g, v] => Some(resources::resource_list_doc(g, v).ok_or_else(|| ApiError::path_not_found(&path))?),
        ["openapi", "v3"] => Some(resources::openapi_v3_root()),
        ["openapi", "v3", "api", v] => {
            Some(resources::openapi_v3_gv("", v).ok_or_else(|| ApiError::path_not_found(&path))?)
        }
        ["openapi", "v3", "apis", g, v] => {
            Some(resources::openapi_v3_gv(g, v).ok_or_else(|| ApiError::path_not_found(&path))?)
        }
        _ => None,
    };
    if let Some(doc) = doc {
        if !is_get {
            return Err(ApiError::method_not_allowed(format!(
                "{} is not supported on {path}",
                req.method()
            )));
        }
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::path_not_found(&path)),
    };
    let target = parse_target(group, version, rest).ok_or_else(|| ApiError::path_not_found(&path))?;
    resource_request(state, req, target).await
}

struct Target<'a> {
    res: &'static Resource,
    ns: Option<&'a str>,
    name: Option<&'a str>,
    status: bool,
    /// `pods/<name>/binding`, the scheduler's way of setting `spec.nodeName`.
    binding: bool,
    watch_path: bool,
}

fn parse_target<'a>(group: &str, version: &str, segs: &[&'a str]) -> Option<Target<'a>> {
    let (watch_path, segs) = match segs {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, segs),
    };
    let (ns, segs) = match segs {
        ["namespaces", ns, res, rest @ ..] if *res != "status" && *res != "finalize" => (Some(*ns), {
            let mut v = vec![*res];
            v.extend_from_slice(rest);
            v
        }),
        _ => (None, segs.to_vec()),
    };
    let (plural, name, sub) = match segs.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return None,
    };
    let res = resources::lookup(group, version, plural)?;
    if ns.is_some() && !res.namespaced {
        return None;
    }
    let binding = sub == Some("binding") && res.group.is_empty() && res.kind == "Pod";
    let status = match sub {
        Some("binding") if binding => false,
        None => false,
        Some("status") if res.status => true,
        // Namespace finalization has nothing to do here: deletion is immediate.
        Some("finalize") if res.kind == "Namespace" => false,
        Some(_) => return None,
    };
    if watch_path && (status || binding) {
        return None;
    }
    Some(Target {
        res,
        ns,
        name,
        status,
        binding,
        watch_path,
    })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    req.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))
}

fn parse_object(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" {
        return crate::proto::decode(body);
    }
    // Other encodings (CBOR, protobuf for other kinds) get 415.
    if !(media.is_empty() || media == "*/*" || media.ends_with("json") || media.ends_with("yaml")) {
        return Err(ApiError::unsupported_media(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, \
             application/yaml (got {media:?})"
        )));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if content_type.contains("yaml") => serde_yaml::from_slice(body)
            .map_err(|y| ApiError::bad_request(format!("the body is neither JSON ({e}) nor YAML ({y})"))),
        Err(e) => Err(ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
    }
}

fn render_one(res: &Resource, obj: &Value, render: Render) -> Value {
    match render {
        Render::Full => obj.clone(),
        Render::Metadata => table::partial_metadata(obj),
        Render::Table(inc) => table::table(res, std::slice::from_ref(obj), None, inc),
    }
}

fn render_list(res: &Resource, items: Vec<Value>, rv: u64, render: Render) -> Value {
    match render {
        Render::Table(inc) => table::table(res, &items, Some(rv), inc),
        Render::Metadata => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
        }),
        Render::Full => json!({
            "kind": format!("{}List", res.kind), "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}, "items": items,
        }),
    }
}

async fn resource_request(state: &State, req: Request<Incoming>, t: Target<'_>) -> Result<Response<Body>, ApiError> {
    let q = Query::parse(req.uri().query());
    let render = render_of(&req, &q);
    let dry_run = q.get("dryRun") == Some("All");
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let store = &state.store;
    let res = t.res;
    let mut field_selector = q.get("fieldSelector").unwrap_or("").to_string();
    let label_selector = q.get("labelSelector").unwrap_or("").to_string();
    let method = req.method().clone();
    let ok = |v: &Value| Ok(json_response(StatusCode::OK, v));

    match (method, t.name) {
        (Method::GET, name) if t.watch_path || (name.is_none() && q.flag("watch")) => {
            if let Some(n) = name {
                let pin = format!("metadata.name={n}");
                field_selector = if field_selector.is_empty() {
                    pin
                } else {
                    format!("{field_selector},{pin}")
                };
            }
            let params = ListParams {
                label_selector: &label_selector,
                field_selector: &field_selector,
            };
            let send_initial = q.flag("sendInitialEvents");
            let watch = store.watch_in(res, t.ns, q.get("resourceVersion"), send_initial, &params);
            let opts = WatchOpts {
                bookmarks: q.flag("allowWatchBookmarks"),
                initial_end: send_initial,
                timeout: Duration::from_secs(q.get("timeoutSeconds").and_then(|s| s.parse().ok()).unwrap_or(1800)),
                interval: store.options().bookmark_interval,
                render,
            };
            Ok(stream_watch(store.clone(), res, watch, opts))
        }
        (Method::GET, None) => {
            let params = ListParams {
                label_selector: &label_selector,
                field_selector: &field_selector,
            };
            let (items, rv) = store.list_in(res, t.ns, &params)?;
            ok(&render_list(res, items, rv, render))
        }
        (Method::GET, Some(name)) => ok(&render_one(res, &store.get_in(res, t.ns, name)?, render)),
        (Method::POST, Some(name)) if t.binding => {
            let body = parse_object(&read_body(req).await?, &content_type)?;
            let node = body.pointer("/target/name").and_then(Value::as_str).unwrap_or("");
            store.bind_pod(t.ns.unwrap_or(""), name, node, dry_run)?;
            let ok = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
            Ok(json_response(StatusCode::CREATED, &ok))
        }
        (_, Some(_)) if t.binding => Err(ApiError::method_not_allowed("only POST is supported on pods/binding")),
        (Method::POST, None) if t.ns.is_some() || !res.namespaced => {
            let body = read_body(req).await?;
            let obj = parse_object(&body, &content_type)?;
            let created = store.create_in(res, t.ns, obj, dry_run)?;
            Ok(json_response(StatusCode::CREATED, &render_one(res, &created, render)))
        }
        (Method::PUT, Some(name)) => {
            let body = read_body(req).await?;
            let obj = parse_object(&body, &content_type)?;
            ok(&render_one(
                res,
                &store.update_in(res, t.ns, name, obj, t.status, dry_run)?,
                render,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let kind = PatchKind::from_content_type(&content_type).ok_or_else(|| {
                ApiError::unsupported_media(format!(
                    "the body of the request was in an unknown format - accepted \
                     media types include: application/json-patch+json, application/merge-patch+json, \
                     application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
                ))
            })?;
            let body = read_body(req).await?;
            ok(&render_one(
                res,
                &store.patch_in(res, t.ns, name, kind, &body, t.status, dry_run)?,
                render,
            ))
        }
        (Method::DELETE, Some(name)) if !t.status => ok(&store.delete_in(res, t.ns, name, dry_run)?),
        (Method::DELETE, None) => {
            let params = ListParams {
                label_selector: &label_selector,
                field_selector: &field_selector,
            };
            let (items, _) = store.list_in(res, t.ns, &params)?;
            let mut deleted = Vec::new();
            for obj in items {
                let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
                match store.delete_in(res, ns, name, dry_run) {
                    Ok(d) => deleted.push(d),
                    // Gone meanwhile (e.g. with its namespace): nothing left to do.
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let rv = store.resource_version();
            ok(&render_list(res, deleted, rv, Render::Full))
        }
        (m, _) => Err(ApiError::method_not_allowed(format!(
            "{m} is not supported on this path"
        ))),
    }
}

struct WatchOpts {
    bookmarks: bool,
    initial_end: bool,
    timeout: Duration,
    interval: Duration,
    render: Render,
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(res: &Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}),
    )
}

/// A 200 response whose body is the watch's event stream, one JSON event per line.
fn stream_watch(
    store: Store,
    res: &'static Resource,
    watch: Result<Watch, ApiError>,
    opts: WatchOpts,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        match watch {
            // Too old a resourceVersion is reported inside the stream, as the real server does.
            Err(e) => {
                let _ = tx.send(event_line("ERROR", e.status())).await;
            }
            Ok(w) => run_watch(store, res, w, opts, tx).await,
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    resp
}

async fn run_watch(store: Store, res: &'static Resource, mut w: Watch, opts: WatchOpts, tx: mpsc::Sender<Bytes>) {
    let mut first_table = true;
    let mut render = |ev: &crate::store::Event, kind: EventType| {
        let obj = match opts.render {
            Render::Table(inc) => {
                let mut t = table::table(res, std::slice::from_ref(&ev.object), None, inc);
                // Column definitions come with the first event only, as from the real server.
                if !std::mem::take(&mut first_table) {
                    t["columnDefinitions"] = json!([]);
                }
                t
            }
            other => render_one(res, &ev.object, other),
        };
        event_line(kind.as_str(), obj)
    };
    let mut last_rv = w.start_rv;
    for ev in std::mem::take(&mut w.initial) {
        if let Some(kind) = w.filter.translate(&ev) {
            if tx.send(render(&ev, kind)).await.is_err() {
                return;
            }
        }
    }
    if opts.initial_end && tx.send(bookmark(res, w.start_rv, true)).await.is_err() {
        return;
    }
    let deadline = tokio::time::sleep(opts.timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + opts.interval, opts.interval);
    loop {
        tokio::select! {
            ev = w.rx.recv() => {
                let Some(ev) = ev else { return };
                last_rv = last_rv.max(ev.rv);
                if let Some(kind) = w.filter.translate(&ev) {
                    if tx.send(render(&ev, kind)).await.is_err() {
                        return;
                    }
                }
            }
            _ = ticks.tick(), if opts.bookmarks => {
                // Every event up to `now` is already queued for us (commits enqueue under the
                // store lock), so after draining the queue a bookmark at `now` skips nothing.
                let now = store.resource_version();
                while let Ok(ev) = w.rx.try_recv() {
                    last_rv = last_rv.max(ev.rv);
                    if let Some(kind) = w.filter.translate(&ev) {
                        if tx.send(render(&ev, kind)).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.send(bookmark(res, last_rv.max(now), false)).await.is_err() {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_decode_query_strings() {
        let q = Query::parse(Some("labelSelector=app%20in%20(a%2Cb)&watch=true&x"));
        assert_eq!(q.get("labelSelector"), Some("app in (a,b)"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(decode("a+b%3D%"), "a b=%");
    }

    #[test]
    fn should_route_namespaced_cluster_and_subresource_paths() {
        let t = parse_target("", "v1", &["namespaces", "a", "pods", "p", "status"]).unwrap();
        assert_eq!(
            (t.res.plural, t.ns, t.name, t.status),
            ("pods", Some("a"), Some("p"), true)
        );
        let t = parse_target("", "v1", &["namespaces", "a", "status"]).unwrap();
        assert_eq!(
            (t.res.plural, t.ns, t.name, t.status),
            ("namespaces", None, Some("a"), true)
        );
        let t = parse_target("", "v1", &["watch", "namespaces", "a", "pods"]).unwrap();
        assert!(t.watch_path && t.name.is_none());
        assert!(parse_target("", "v1", &["namespaces", "a", "nodes"]).is_none());
        assert!(parse_target("", "v1", &["namespaces", "a", "configmaps", "c", "status"]).is_none());
        assert!(parse_target("apps", "v1", &["namespaces", "a", "daemonsets"]).is_some());
    }
}
