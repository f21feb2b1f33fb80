//! Counters and gauges exported on `/metrics` in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub route_syncs: AtomicU64,
    pub route_sync_errors: AtomicU64,
    pub route_sync_micros_total: AtomicU64,
    pub route_sync_micros_last: AtomicU64,
    pub routes: AtomicU64,
    pub dataplane_applies: AtomicU64,
    pub dataplane_apply_errors: AtomicU64,
    pub dataplane_apply_micros_total: AtomicU64,
    pub drift_repairs: AtomicU64,
    /// Chains and ipsets make-before-break writes left for cleanup (unreachable by packets).
    pub dataplane_untidy: AtomicU64,
    pub api_errors: AtomicU64,
    pub ready: AtomicBool,
    /// Policy programmed at least once by this process (its first full sync is done).
    pub policy_synced: AtomicBool,
    /// The programmed policy carries the NodePort check (preserve-source).
    pub nodeport_preserve_source: AtomicBool,
    pub policy_compiles: AtomicU64,
    pub policy_compile_micros_last: AtomicU64,
    pub policy_compile_micros_total: AtomicU64,
    pub policy_apply_micros_last: AtomicU64,
    pub policy_errors: AtomicU64,
    pub policy_rules: AtomicU64,
    pub policy_chains: AtomicU64,
    pub policy_ipsets: AtomicU64,
    pub policy_ipset_members: AtomicU64,
    pub policy_local_workloads: AtomicU64,
    pub pod_programmed: AtomicU64,
    pub pod_programmed_micros_total: AtomicU64,
    pub pod_programmed_micros_last: AtomicU64,
    pub pod_seen_to_programmed_micros_last: AtomicU64,
    /// Event-driven passes that changed the dataplane, and their event → programmed times.
    pub event_passes: AtomicU64,
    pub event_to_programmed_micros_total: AtomicU64,
    pub event_to_programmed_micros_last: AtomicU64,
    /// Local addresses whose conntrack entries were deleted after their pod went away.
    pub conntrack_flushes: AtomicU64,
    pub conntrack_flush_errors: AtomicU64,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one event-driven pass that changed the dataplane, `waited` after its oldest event.
    pub fn event_programmed(&self, waited: std::time::Duration) {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.event_to_programmed_micros_last.store(micros, Ordering::Relaxed);
        self.event_to_programmed_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        Self::inc(&self.event_passes);
    }

    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let secs = |c: &AtomicU64| g(c) as f64 / 1e6;
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "warren_route_syncs_total",
            "counter",
            "Route syncs done.",
            g(&self.route_syncs).to_string(),
        );
        metric(
            "warren_route_sync_errors_total",
            "counter",
            "Route syncs that failed.",
            g(&self.route_sync_errors).to_string(),
        );
        metric(
            "warren_route_sync_seconds_total",
            "counter",
            "Time spent syncing routes.",
            secs(&self.route_sync_micros_total).to_string(),
        );
        metric(
            "warren_route_sync_last_seconds",
            "gauge",
            "Duration of the last route sync.",
            secs(&self.route_sync_micros_last).to_string(),
        );
        metric(
            "warren_routes",
            "gauge",
            "Peer routes programmed.",
            g(&self.routes).to_string(),
        );
        metric(
            "warren_dataplane_applies_total",
            "counter",
            "iptables/ipset applies done.",
            g(&self.dataplane_applies).to_string(),
        );
        metric(
            "warren_dataplane_apply_errors_total",
            "counter",
            "iptables/ipset applies that failed.",
            g(&self.dataplane_apply_errors).to_string(),
        );
        metric(
            "warren_dataplane_apply_seconds_total",
            "counter",
            "Time spent applying iptables/ipset.",
            secs(&self.dataplane_apply_micros_total).to_string(),
        );
        metric(
            "warren_drift_repairs_total",
            "counter",
            "Kernel objects found changed by someone else and repaired.",
            g(&self.drift_repairs).to_string(),
        );
        metric(
            "warren_conntrack_flushes_total",
            "counter",
            "Addresses of departed local pods whose conntrack entries were deleted.",
            g(&self.conntrack_flushes).to_string(),
        );
        metric(
            "warren_conntrack_flush_errors_total",
            "counter",
            "Departed pods' addresses whose conntrack entries could not be deleted (not tried again).",
            g(&self.conntrack_flush_errors).to_string(),
        );
        metric(
            "warren_api_errors_total",
            "counter",
            "Kubernetes API errors.",
            g(&self.api_errors).to_string(),
        );
        metric(
            "warren_ready",
            "gauge",
            "1 once the first route sync is done.",
            u8::from(self.ready.load(Ordering::Relaxed)).to_string(),
        );
        metric(
            "warren_policy_synced",
            "gauge",
            "1 once this process has programmed NetworkPolicy from complete lists.",
            u8::from(self.policy_synced.load(Ordering::Relaxed)).to_string(),
        );
        metric(
            "warren_nodeport_preserve_source",
            "gauge",
            "1 when the programmed policy checks forwarded service traffic against the client's own address.",
            u8::from(self.nodeport_preserve_source.load(Ordering::Relaxed)).to_string(),
        );
        let gauges: [(&str, &str, &AtomicU64); 7] = [
            (
                "warren_policy_errors",
                "NetworkPolicies currently skipped because warren cannot enforce them.",
                &self.policy_errors,
            ),
            (
                "warren_policy_rules",
                "iptables rules in the policy dataplane.",
                &self.policy_rules,
            ),
            (
                "warren_policy_chains",
                "iptables chains in the policy dataplane.",
                &self.policy_chains,
            ),
            (
                "warren_policy_ipsets",
                "ipsets in the policy dataplane.",
                &self.policy_ipsets,
            ),
            (
                "warren_policy_ipset_members",
                "Members of all policy ipsets.",
                &self.policy_ipset_members,
            ),
            (
                "warren_policy_local_workloads",
                "Local pods with workload chains.",
                &self.policy_local_workloads,
            ),
            (
                "warren_pod_programmed",
                "Local pods programmed so far (count for warren_pod_programmed_seconds_total).",
                &self.pod_programmed,
            ),
        ];
        for (name, help, v) in gauges {
            metric(name, "gauge", help, g(v).to_string());
        }
        metric(
            "warren_dataplane_untidy",
            "gauge",
            "Chains and ipsets left by make-before-break writes, unreachable by packets, awaiting cleanup.",
            g(&self.dataplane_untidy).to_string(),
        );
        metric(
            "warren_policy_compiles_total",
            "counter",
            "Policy compiles done.",
            g(&self.policy_compiles).to_string(),
        );
        metric(
            "warren_policy_compile_seconds_total",
            "counter",
            "Time spent converting and compiling policy.",
            secs(&self.policy_compile_micros_total).to_string(),
        );
        metric(
            "warren_policy_compile_last_seconds",
            "gauge",
            "Duration of the last policy compile.",
            secs(&self.policy_compile_micros_last).to_string(),
        );
        metric(
            "warren_policy_apply_last_seconds",
            "gauge",
            "Duration of the last reconcile that carried policy (compile not included).",
            secs(&self.policy_apply_micros_last).to_string(),
        );
        metric(
            "warren_pod_programmed_seconds_total",
            "counter",
            "Sum over local pods of the time from the pod's creationTimestamp to its chains being programmed.",
            secs(&self.pod_programmed_micros_total).to_string(),
        );
        metric(
            "warren_pod_programmed_last_seconds",
            "gauge",
            "creationTimestamp to programmed, for the last pod programmed.",
            secs(&self.pod_programmed_micros_last).to_string(),
        );
        metric(
            "warren_pod_seen_to_programmed_last_seconds",
            "gauge",
            "From this daemon seeing the pod with its IP to its chains being programmed, last pod.",
            secs(&self.pod_seen_to_programmed_micros_last).to_string(),
        );
        metric(
            "warren_event_programmed_passes_total",
            "counter",
            "Passes started by watch events that changed the dataplane (routes, rules or sets).",
            g(&self.event_passes).to_string(),
        );
        metric(
            "warren_event_to_programmed_seconds_total",
            "counter",
            "Sum over those passes of the time from the oldest event a pass took to its changes being in the kernel.",
            secs(&self.event_to_programmed_micros_total).to_string(),
        );
        metric(
            "warren_event_to_programmed_last_seconds",
            "gauge",
            "Watch event to programmed, for the last pass that changed the dataplane.",
            secs(&self.event_to_programmed_micros_last).to_string(),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_render_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.drift_repairs);
        m.route_sync_micros_total.store(1_500_000, Ordering::Relaxed);
        let t = m.render();
        assert!(t.contains("# TYPE warren_drift_repairs_total counter\nwarren_drift_repairs_total 1\n"));
        assert!(t.contains("warren_route_sync_seconds_total 1.5\n"));
        assert!(t.contains("warren_ready 0\n"));
        m.event_programmed(std::time::Duration::from_millis(25));
        m.event_programmed(std::time::Duration::from_millis(5));
        let t = m.render();
        assert!(t.contains("warren_event_programmed_passes_total 2\n"));
        assert!(t.contains("warren_event_to_programmed_seconds_total 0.03\n"));
        assert!(t.contains("warren_event_to_programmed_last_seconds 0.005\n"));
    }
}
