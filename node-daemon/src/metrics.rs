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
    pub api_errors: AtomicU64,
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
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
    }
}
