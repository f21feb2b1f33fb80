//! A small Kubernetes API stand-in for warren-lab.
//!
//! It serves HTTPS (HTTP/1.1 and HTTP/2 via ALPN) with a generated CA and a bearer token, so that
//! real `kubectl` and kube-rs clients talk to it exactly as to a kube-apiserver. Objects are kept as
//! JSON in memory, with one global resourceVersion counter and a bounded event history for watches;
//! a JSON snapshot in the state directory keeps them across restarts.
//!
//! # Faithful
//! - Discovery: `/version`, the legacy documents (`/api`, `/api/v1`, `/apis`, `/apis/<g>[/<v>]`)
//!   and aggregated discovery v2 (`/api`, `/apis` with `Accept: ...;as=APIGroupDiscoveryList`,
//!   what kubectl 1.37 and kube-rs' `run_aggregated` ask for).
//! - create (generateName, uid, creationTimestamp, generation, namespace defaulting, 404 for a
//!   missing namespace, 409 AlreadyExists), get, list, update (409 Conflict on a stale
//!   resourceVersion; a no-op update keeps the resourceVersion), delete, deletecollection,
//!   merge patch, strategic merge patch, JSON patch, `dryRun=All`.
//! - The `status` subresource for Pod, Node, Service, Namespace and the apps kinds: a write to the
//!   main resource keeps the stored status; a write to `/status` changes only the status. Pods
//!   start `Pending` and Services with an empty status, whatever the create body says.
//! - Defaulting the lab relies on: Service ClusterIP (from 10.233.0.0/18 by default) and NodePort
//!   allocation (30000-32767, refusing taken or out-of-range ones), `clusterIPs`, `targetPort`,
//!   `protocol`, `externalTrafficPolicy: Cluster`; container and policy port protocols; NetworkPolicy
//!   `policyTypes`; the `kubernetes.io/metadata.name` label on Namespaces.
//! - Label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors (`=`, `==`,
//!   `!=` on any dotted path, e.g. `metadata.name`, `spec.nodeName`, `status.phase`).
//! - Watch (`?watch=1` and `/watch/` paths): from a resourceVersion (events after it), or with
//!   synthetic ADDED events first when it is absent or `0`; `410 Gone` as an ERROR event when the
//!   resourceVersion is older than the history; BOOKMARKs with `allowWatchBookmarks`;
//!   `sendInitialEvents=true` ends the initial events with the `k8s.io/initial-events-end`
//!   bookmark; `timeoutSeconds`; selectors, with DELETED/ADDED when an update makes an object
//!   leave/enter the selection.
//! - Errors are `Status` objects with the real reasons; Tables for `kubectl get` (Pod, Node,
//!   Service, Namespace, ConfigMap, NetworkPolicy columns; NAME/AGE otherwise), and
//!   `PartialObjectMetadata` for metadata-only clients.
//!
//! # Simplified (and why that is enough for the lab)
//! - Deletion is immediate: no graceful period, no finalizers, no garbage collection by owner
//!   references. DELETE answers with the deleted object. A deleted Namespace is `Terminating`
//!   (creates in it get 403) for [`Options::namespace_termination`] (500 ms), then everything in it
//!   and the Namespace itself are deleted, as the namespace controller would; without a tokio
//!   runtime (plain in-process use) that happens at once.
//! - `pods/<name>/binding` sets `spec.nodeName` once (409 when already bound); otherwise Pod specs
//!   are not immutable here, nor are other fields the real server freezes (except a Service's
//!   ClusterIP).
//! - No RBAC, admission or schema validation beyond what is listed above; every kind is stored
//!   as given. `limit`/`continue` are ignored (lists are complete).
//! - Server-side apply (`application/apply-patch+yaml`) is approximated by a strategic merge that
//!   creates a missing object; no managedFields.
//! - Strategic merge patch knows the merge keys of the built-in fields kubectl touches
//!   (see [`patch`]), not the OpenAPI schemas.
//! - `/openapi/v3` lists operations but no schemas: each PATCH declares `fieldValidation`, so
//!   kubectl leaves validation to the server and builds its patches from its built-in types.
//!   `fieldValidation=Strict` is accepted but unknown fields are kept, not refused. No
//!   `/openapi/v2` (so no `kubectl explain`).
//! - Request bodies are JSON or YAML; protobuf (what `kubectl create namespace|configmap|secret`
//!   send) is read for Namespace, ConfigMap and Secret only, other protobuf bodies get 415.
//!   Responses are always JSON.
//! - Secret `stringData` is folded into `data`, as the real registry does.
//! - `events.k8s.io/v1` Events are stored apart from core Events.
//! - After a restart the watch history is empty: watches resuming from before get 410 and relist.
//! - No `pods/log`, `pods/exec`, `pods/portforward`, proxy or eviction subresources (nothing runs
//!   containers), and no `default/kubernetes` Service or its Endpoints.
//! - The server's `/healthz`, `/livez`, `/readyz` answer without a token; everything else needs it.

pub mod patch;
pub mod resources;
pub mod selector;
pub mod store;
pub mod table;

mod http;
mod proto;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;

pub use patch::PatchKind;
pub use store::{ApiError, Event, EventType, ListParams, Options, Store, Watch, WatchFilter};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("certificate generation failed")]
    Cert(#[source] rcgen::Error),
    #[error("TLS setup failed")]
    Tls(#[source] tokio_rustls::rustls::Error),
    #[error("reading the saved state in {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (see [`Server::url`]).
    pub listen: SocketAddr,
    /// Holds the CA, the server certificate, the token and the object snapshot.
    pub state_dir: PathBuf,
    /// Bearer token clients must send; generated (and kept in the state dir) when `None`.
    pub token: Option<String>,
    /// Extra subject alternative names (IPs or DNS names) for the server certificate.
    pub extra_sans: Vec<String>,
}

/// A running API server.
pub struct Server {
    url: String,
    ca_pem: String,
    token: String,
    store: Store,
    state_dir: PathBuf,
    /// What [`Server::restart`] starts again with: the bound address (not port 0) and the token.
    restart_cfg: Config,
    opts: Options,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    saver: tokio::task::JoinHandle<()>,
}

const SNAPSHOT: &str = "store.json";

impl Server {
    /// Binds, generates (or reloads) the CA and server certificate, loads saved objects, serves.
    pub async fn start(cfg: Config) -> Result<Server, Error> {
        Self::start_with(cfg, Options::default()).await
    }

    /// [`Server::start`] with tunables (history size, bookmark interval, service ranges).
    pub async fn start_with(cfg: Config, opts: Options) -> Result<Server, Error> {
        let restart_opts = opts.clone();
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
        let token = match cfg.token.clone() {
            Some(t) => t,
            None => match std::fs::read_to_string(dir.join("token")) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                _ => {
                    let bytes: [u8; 24] = rand::thread_rng().gen();
                    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    std::fs::write(dir.join("token"), &t)
                        .map_err(|e| Error::Io(format!("writing {}", dir.join("token").display()), e))?;
                    t
                }
            },
        };
        let pki = tls::load_or_create(dir, &cfg.extra_sans)?;
        let snapshot = dir.join(SNAPSHOT);
        let store = if snapshot.exists() {
            Store::load(&snapshot, opts).map_err(|source| Error::State {
                path: snapshot.clone(),
                source,
            })?
        } else {
            Store::new(opts)
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| Error::Io(format!("binding {}", cfg.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Io("reading the bound address".into(), e))?;
        let acceptor = http::acceptor(&pki)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let state = Arc::new(http::State {
            store: store.clone(),
            token: token.clone(),
        });
        let task = tokio::spawn(http::serve(listener, acceptor, state, stopped.clone()));
        let saver = tokio::spawn(save_periodically(store.clone(), snapshot, stopped));
        let host = match addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        tracing::info!(%addr, "API stand-in serving");
        let restart_cfg = Config {
            listen: SocketAddr::new(cfg.listen.ip(), addr.port()),
            token: Some(token.clone()),
            ..cfg.clone()
        };
        Ok(Server {
            url: format!("https://{host}:{}", addr.port()),
            ca_pem: pki.ca_pem,
            token,
            store,
            state_dir: cfg.state_dir,
            restart_cfg,
            opts: restart_opts,
            stop,
            task,
            saver,
        })
    }

    /// `https://<ip>:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The CA certificate clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Writes a kubeconfig (context `warren-lab`) with the CA data and the token; `server_url`
    /// overrides [`Server::url`] (e.g. the address seen from inside the lab's VM).
    pub fn write_kubeconfig(&self, path: &Path, server_url: Option<&str>) -> Result<(), Error> {
        let text = kubeconfig(server_url.unwrap_or(&self.url), &self.ca_pem, &self.token);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::Io(format!("creating {}", parent.display()), e))?;
        }
        std::fs::write(path, text).map_err(|e| Error::Io(format!("writing {}", path.display()), e))
    }

    /// The in-process store (shared with the HTTP side; writes are seen by watchers).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Stops serving, ends watches, and saves the objects to the state directory.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.store.close_watches();
        let _ = self.task.await;
        let _ = self.saver.await;
        let path = self.state_dir.join(SNAPSHOT);
        if let Err(e) = self.store.save(&path) {
            tracing::warn!(error = %e, path = %path.display(), "could not save the API objects");
        }
    }

    /// An outage of the API server, as clients live through a control-plane restart: the listener
    /// closes and every open connection (watches included) is cut, nothing answers for `down`,
    /// then a server with the saved objects, the same CA, certificate and token serves on the same
    /// address. resourceVersions continue from where they were; the watch history starts empty, so
    /// a watch resuming from an older resourceVersion gets 410 and relists.
    pub async fn restart(self, down: std::time::Duration) -> Result<Server, Error> {
        let (cfg, opts) = (self.restart_cfg.clone(), self.opts.clone());
        self.shutdown().await;
        tracing::info!(?down, "API stand-in down");
        tokio::time::sleep(down).await;
        // The old listener is closed, but a just-closed port can take a moment to be free again.
        let mut tries = 0;
        loop {
            match Self::start_with(cfg.clone(), opts.clone()).await {
                Err(Error::Io(what, e)) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                    tracing::debug!(%what, "address still in use; retrying");
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}

async fn save_periodically(store: Store, path: PathBuf, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let (s, p) = (store.clone(), path.clone());
        match tokio::task::spawn_blocking(move || s.save(&p)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not save the API objects"),
            Err(e) => tracing::warn!(error = %e, "saver task failed"),
        }
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A kubeconfig document for this server.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: warren-lab\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: warren-lab\n  user:\n    token: {token}\ncontexts:\n\
         - name: warren-lab\n  context:\n    cluster: warren-lab\n    user: warren-lab\n    namespace: default\n\
         current-context: warren-lab\npreferences: {{}}\n",
        ca = base64(ca_pem.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn should_base64_like_the_standard_alphabet() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
