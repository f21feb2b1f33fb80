//! The node's block: `Node.spec.podCIDR` when the cluster allocates one, else a free block of the
//! pool claimed by annotating this node's Node object.
//!
//! Claims are exclusive without a shared lock object: a claimer writes its choice (optimistic
//! concurrency on its own Node: resourceVersion, 409 → re-read), then lists again; a *fresh* claim
//! that now overlaps another node's block always yields and picks again after a random pause. So
//! of two concurrent claimers at most one keeps a block (the one that verified first never sees a
//! conflict later, because the other listed after its write is visible). A block found on our Node
//! at start is kept (stable across restarts). Blocks of deleted Nodes are free, because only
//! existing Nodes count as taken.

// Used through generics only (see netlink.rs).
#![allow(async_fn_in_trait)]

use std::collections::BTreeSet;
use std::time::Duration;

use ipnet::Ipv4Net;
use rand::Rng;
use sha1::{Digest, Sha1};

/// What block allocation needs to know of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeClaim {
    pub name: String,
    pub resource_version: String,
    pub pod_cidr: Option<String>,
    pub annotation: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("Node {0} does not exist in the API")]
    NoNode(String),
    #[error("the node was modified concurrently (409)")]
    Conflict,
    #[error("no free /{prefix} block left in pool {pool}")]
    Exhausted { pool: Ipv4Net, prefix: u8 },
    #[error("could not claim a block after {0} attempts (contention)")]
    TooManyAttempts(usize),
    #[error("podCIDR {0:?} of this node is not an IPv4 CIDR")]
    BadPodCidr(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
}

/// Access to the Node objects (the kube client in production, a map in tests).
pub trait NodeStore {
    async fn list(&self) -> Result<Vec<NodeClaim>, ClaimError>;
    /// Writes the block annotation on `node` if its resourceVersion is still `rv`, else
    /// [`ClaimError::Conflict`].
    async fn set_block(&self, node: &str, rv: &str, block: Ipv4Net) -> Result<(), ClaimError>;
}

/// A node's block as others see it: podCIDR first, then warren's annotation.
pub fn block_of(n: &NodeClaim) -> Option<Ipv4Net> {
    n.pod_cidr
        .as_deref()
        .and_then(|c| c.parse::<Ipv4Net>().ok())
        .or_else(|| n.annotation.as_deref().and_then(|a| a.parse().ok()))
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

/// The free blocks of `pool` given the taken ones, in scan order starting at an offset derived
/// from the node name (so concurrent claimers usually start at different places).
pub fn free_blocks(pool: Ipv4Net, prefix: u8, taken: &BTreeSet<Ipv4Net>, node: &str) -> Vec<Ipv4Net> {
    let Ok(subnets) = pool.subnets(prefix) else {
        return Vec::new();
    };
    let all: Vec<Ipv4Net> = subnets.collect();
    if all.is_empty() {
        return all;
    }
    let digest = Sha1::digest(node.as_bytes());
    let start = usize::from(u16::from_be_bytes([digest[0], digest[1]])) % all.len();
    all.iter()
        .cycle()
        .skip(start)
        .take(all.len())
        .filter(|b| !taken.iter().any(|t| overlaps(t, b)))
        .copied()
        .collect()
}

/// Whether an annotation value is a usable block of this pool and size.
pub fn valid_claim(value: &str, pool: Ipv4Net, prefix: u8) -> Option<Ipv4Net> {
    let b: Ipv4Net = value.parse().ok()?;
    (b.prefix_len() == prefix && b.trunc() == b && pool.contains(&b)).then_some(b)
}

const MAX_ATTEMPTS: usize = 50;

/// Finds or claims this node's block.
pub async fn claim_block<S: NodeStore>(
    store: &S,
    pool: Ipv4Net,
    prefix: u8,
    node: &str,
) -> Result<Ipv4Net, ClaimError> {
    let mut established = true;
    for attempt in 0..MAX_ATTEMPTS {
        let nodes = store.list().await?;
        let me = nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| ClaimError::NoNode(node.to_string()))?;
        if let Some(cidr) = me.pod_cidr.as_deref().filter(|c| !c.is_empty()) {
            return cidr.parse().map_err(|_| ClaimError::BadPodCidr(cidr.to_string()));
        }
        let taken: BTreeSet<Ipv4Net> = nodes.iter().filter(|n| n.name != node).filter_map(block_of).collect();
        let mine = me.annotation.as_deref().and_then(|a| valid_claim(a, pool, prefix));
        if let Some(b) = mine {
            let conflict = taken.iter().any(|t| overlaps(t, &b));
            if !conflict {
                return Ok(b);
            }
            if established {
                // Only a crash between write and verify can get here; a newcomer yields to us.
                tracing::error!(block = %b, "another node claims our block; keeping it, the newer claim yields");
                return Ok(b);
            }
            tracing::info!(block = %b, attempt, "block claim collided; picking another");
        }
        established = false;
        let free = free_blocks(pool, prefix, &taken, node);
        if free.is_empty() {
            return Err(ClaimError::Exhausted { pool, prefix });
        }
        // After a collision pick at random, so two yielding claimers rarely pick alike again.
        let choice = if mine.is_some() {
            free[rand::thread_rng().gen_range(0..free.len())]
        } else {
            free[0]
        };
        match store.set_block(node, &me.resource_version, choice).await {
            Ok(()) | Err(ClaimError::Conflict) => {}
            Err(e) => return Err(e),
        }
        if mine.is_some() {
            let ms = rand::thread_rng().gen_range(5..50);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    Err(ClaimError::TooManyAttempts(MAX_ATTEMPTS))
}

/// An in-memory Node list with resourceVersions, for tests; yields to the scheduler inside every
/// call so concurrent claimers interleave.
#[derive(Debug, Default)]
pub struct FakeNodeStore {
    pub nodes: std::sync::Mutex<Vec<NodeClaim>>,
    counter: std::sync::atomic::AtomicU64,
}

impl FakeNodeStore {
    pub fn with_nodes(names: &[&str]) -> Self {
        let s = Self::default();
        for n in names {
            s.add(n, None);
        }
        s
    }

    pub fn add(&self, name: &str, pod_cidr: Option<&str>) {
        let rv = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .to_string();
        self.lock().push(NodeClaim {
            name: name.into(),
            resource_version: rv,
            pod_cidr: pod_cidr.map(str::to_string),
            annotation: None,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<NodeClaim>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn remove(&self, name: &str) {
        self.lock().retain(|n| n.name != name);
    }
}

impl NodeStore for FakeNodeStore {
    async fn list(&self) -> Result<Vec<NodeClaim>, ClaimError> {
        tokio::task::yield_now().await;
        Ok(self.lock().clone())
    }

    async fn set_block(&self, node: &str, rv: &str, block: Ipv4Net) -> Result<(), ClaimError> {
        tokio::task::yield_now().await;
        let next = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .to_string();
        let mut nodes = self.lock();
        let n = nodes
            .iter_mut()
            .find(|n| n.name == node)
            .ok_or_else(|| ClaimError::NoNode(node.into()))?;
        if n.resource_version != rv {
            return Err(ClaimError::Conflict);
        }
        n.annotation = Some(block.to_string());
        n.resource_version = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Ipv4Net {
        "10.233.64.0/18".parse().unwrap()
    }

    #[tokio::test]
    async fn should_use_pod_cidr_when_the_cluster_allocates_one() {
        let s = FakeNodeStore::default();
        s.add("node1", Some("10.244.1.0/24"));
        assert_eq!(
            claim_block(&s, pool(), 24, "node1").await.unwrap(),
            "10.244.1.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert!(s.nodes.lock().unwrap()[0].annotation.is_none(), "nothing written");
    }

    #[tokio::test]
    async fn should_claim_a_block_and_keep_it_across_restarts() {
        let s = FakeNodeStore::with_nodes(&["node1"]);
        let b = claim_block(&s, pool(), 24, "node1").await.unwrap();
        assert!(pool().contains(&b) && b.prefix_len() == 24);
        assert_eq!(
            s.nodes.lock().unwrap()[0].annotation.as_deref(),
            Some(b.to_string().as_str())
        );
        assert_eq!(
            claim_block(&s, pool(), 24, "node1").await.unwrap(),
            b,
            "restart keeps the block"
        );
    }

    #[tokio::test]
    async fn should_never_give_two_nodes_the_same_block() {
        let s = FakeNodeStore::with_nodes(&["node1", "node2", "node3"]);
        s.add("k8s", Some("10.233.64.0/24"));
        let mut got = BTreeSet::new();
        for n in ["node1", "node2", "node3"] {
            assert!(got.insert(claim_block(&s, pool(), 24, n).await.unwrap()));
        }
        assert!(
            !got.contains(&"10.233.64.0/24".parse().unwrap()),
            "podCIDRs count as taken"
        );
    }

    #[tokio::test]
    async fn should_free_the_block_of_a_deleted_node() {
        let s = FakeNodeStore::with_nodes(&["a"]);
        let small: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let b = claim_block(&s, small, 24, "a").await.unwrap();
        s.add("b", None);
        assert!(matches!(
            claim_block(&s, small, 24, "b").await,
            Err(ClaimError::Exhausted { .. })
        ));
        s.remove("a");
        assert_eq!(claim_block(&s, small, 24, "b").await.unwrap(), b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn should_resolve_racing_claimers_to_distinct_blocks() {
        // A pool of two blocks, so claimers collide often; repeat to exercise interleavings.
        let pool: Ipv4Net = "10.0.0.0/23".parse().unwrap();
        for round in 0..30 {
            let s = std::sync::Arc::new(FakeNodeStore::with_nodes(&["x", "y"]));
            let (s1, s2) = (s.clone(), s.clone());
            let a = tokio::spawn(async move { claim_block(&*s1, pool, 24, "x").await });
            let b = tokio::spawn(async move { claim_block(&*s2, pool, 24, "y").await });
            let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
            assert_ne!(a, b, "round {round}");
            let recorded: BTreeSet<String> = s
                .nodes
                .lock()
                .unwrap()
                .iter()
                .filter_map(|n| n.annotation.clone())
                .collect();
            assert_eq!(recorded.len(), 2, "annotations agree with results");
        }
    }

    #[tokio::test]
    async fn should_retry_after_a_resource_version_conflict() {
        struct Flaky(FakeNodeStore, std::sync::Mutex<bool>);
        impl NodeStore for Flaky {
            async fn list(&self) -> Result<Vec<NodeClaim>, ClaimError> {
                self.0.list().await
            }
            async fn set_block(&self, n: &str, rv: &str, b: Ipv4Net) -> Result<(), ClaimError> {
                if std::mem::take(&mut *self.1.lock().unwrap()) {
                    return Err(ClaimError::Conflict);
                }
                self.0.set_block(n, rv, b).await
            }
        }
        let s = Flaky(FakeNodeStore::with_nodes(&["n"]), std::sync::Mutex::new(true));
        let b = claim_block(&s, pool(), 26, "n").await.unwrap();
        assert_eq!(b.prefix_len(), 26);
    }

    #[test]
    fn should_refuse_claims_outside_the_pool_or_of_another_size() {
        assert!(valid_claim("10.233.65.0/24", pool(), 24).is_some());
        assert!(valid_claim("10.1.0.0/24", pool(), 24).is_none());
        assert!(valid_claim("10.233.65.0/25", pool(), 24).is_none());
        assert!(valid_claim("10.233.65.7/24", pool(), 24).is_none());
    }
}
