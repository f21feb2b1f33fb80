//! The seam through which tests make an ADD fail (or panic) after any of its steps, to prove
//! that rollback leaves nothing behind.

use conf::{CniError, ErrorCode};

/// The points of an ADD after which a failure can be injected, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    IpamAllocated,
    StaleRemoved,
    VethCreated,
    PodConfigured,
    HostConfigured,
    HostRouteAdded,
    ResultReady,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::IpamAllocated,
        Step::StaleRemoved,
        Step::VethCreated,
        Step::PodConfigured,
        Step::HostConfigured,
        Step::HostRouteAdded,
        Step::ResultReady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::IpamAllocated => "ipam-allocated",
            Step::StaleRemoved => "stale-removed",
            Step::VethCreated => "veth-created",
            Step::PodConfigured => "pod-configured",
            Step::HostConfigured => "host-configured",
            Step::HostRouteAdded => "host-route-added",
            Step::ResultReady => "result-ready",
        }
    }

    pub fn from_name(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name() == s)
    }
}

/// Called by ADD after each step; production code never fails here.
pub trait Faults {
    fn after(&self, step: Step) -> Result<(), CniError>;
}

/// Production: no faults.
pub struct NoFaults;

impl Faults for NoFaults {
    fn after(&self, _: Step) -> Result<(), CniError> {
        Ok(())
    }
}

/// Fails (or, with a `panic:` prefix, panics) after one named step.
#[derive(Debug, Clone)]
pub struct FailAt {
    pub step: Step,
    pub panic: bool,
}

impl FailAt {
    /// Parses `<step>` or `panic:<step>`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.strip_prefix("panic:") {
            Some(rest) => Step::from_name(rest).map(|step| FailAt { step, panic: true }),
            None => Step::from_name(s).map(|step| FailAt { step, panic: false }),
        }
    }
}

impl Faults for FailAt {
    fn after(&self, step: Step) -> Result<(), CniError> {
        if step != self.step {
            return Ok(());
        }
        if self.panic {
            panic!("injected panic after {}", step.name());
        }
        Err(CniError::new(
            ErrorCode::Internal,
            format!("injected failure after {}", step.name()),
        ))
    }
}

/// The fault a binary built with the `fault-injection` feature reads from `WARREN_TEST_FAIL_AT`.
#[cfg(feature = "fault-injection")]
pub fn from_env(env: &std::collections::HashMap<String, String>) -> Option<FailAt> {
    env.get("WARREN_TEST_FAIL_AT").and_then(|s| FailAt::parse(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_parse_step_names_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert!(FailAt::parse("panic:veth-created").unwrap().panic);
        assert!(FailAt::parse("nope").is_none());
    }

    #[test]
    fn should_fail_only_at_its_step() {
        let f = FailAt {
            step: Step::VethCreated,
            panic: false,
        };
        f.after(Step::IpamAllocated).unwrap();
        assert_eq!(f.after(Step::VethCreated).unwrap_err().code, ErrorCode::Internal);
    }
}
