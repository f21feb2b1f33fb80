//! The scenario's table math: what counts as a match, mismatch counts, verdicts and the grid.
#![allow(clippy::unwrap_used)]

use lab::scenario::{
    matches, render_report, render_table, CellReport, ExpectedCell, ExperimentReport, Observed, Outcome, ScenarioData,
    ScenarioReport,
};

const DASH: &str = "tekton-dashboard-75c65d785b-xbgk6";

fn reached(seen_as: &str) -> Observed {
    Observed {
        connected: true,
        reply: DASH.into(),
        seen_as: seen_as.into(),
        detail: String::new(),
    }
}

fn refused(detail: &str) -> Observed {
    Observed {
        connected: false,
        reply: String::new(),
        seen_as: String::new(),
        detail: detail.into(),
    }
}

#[test]
fn should_count_only_the_dashboards_answer_as_connected() {
    assert!(matches(Outcome::Connected, &reached("10.2.3.4"), DASH));
    assert!(!matches(Outcome::Blocked, &reached("10.2.3.4"), DASH));
    let elsewhere = Observed {
        reply: "client-node1".into(),
        ..reached("10.233.90.5")
    };
    assert!(!matches(Outcome::Connected, &elsewhere, DASH));
    assert!(matches(Outcome::Blocked, &elsewhere, DASH));
    // A probe cannot tell a policy drop from a missing endpoint: both are "not connected".
    for o in [refused("Connection timed out"), refused("Connection refused")] {
        assert!(matches(Outcome::Blocked, &o, DASH));
        assert!(matches(Outcome::NoAnswer, &o, DASH));
        assert!(!matches(Outcome::Connected, &o, DASH));
    }
}

/// exp1 of the iptables table, observed as the seed's IPVS cluster behaves (LB refused via node2).
fn exp1_with_ipvs_like_observation(d: &ScenarioData) -> ExperimentReport {
    let cells: Vec<CellReport> = d
        .expected_for("iptables", "exp1")
        .unwrap()
        .iter()
        .map(|e| {
            let obs = if e.from == "lb" {
                refused("timed out")
            } else if e.expect == Outcome::Connected {
                reached("10.233.90.7")
            } else {
                refused("timed out")
            };
            CellReport::new(e, Ok(obs), DASH)
        })
        .collect();
    ExperimentReport::new("exp1", "title", cells, true, vec![])
}

#[test]
fn should_count_mismatches_and_probe_errors() {
    let d = ScenarioData::tekton_builtin().unwrap();
    let r = exp1_with_ipvs_like_observation(&d);
    // iptables expects the load balancer in through node2 (FORWARD sees 10.2.3.4): one mismatch.
    assert_eq!(r.mismatches, 1);
    let bad: Vec<_> = r
        .cells
        .iter()
        .filter(|c| !c.ok)
        .map(|c| (c.from.as_str(), c.via.as_str()))
        .collect();
    assert_eq!(bad, vec![("lb", "node2:31602")]);
    assert!(
        r.verdict().starts_with("FAIL exp1: 26/27 cells as expected"),
        "{}",
        r.verdict()
    );

    let e = ExpectedCell {
        from: "lb".into(),
        via: "node1:31602".into(),
        expect: Outcome::Blocked,
        why: "because".into(),
    };
    let errored = CellReport::new(&e, Err("controller gone".into()), DASH);
    assert!(!errored.ok, "a probe that could not run is never a match");
    assert_eq!(errored.observed_label(DASH), "error");

    let report = ScenarioReport::new(&d, "iptables", vec![r.clone(), r], vec![]);
    assert_eq!(report.mismatches, 2);
}

#[test]
fn should_pass_and_summarise_an_experiment_that_matches() {
    let d = ScenarioData::tekton_builtin().unwrap();
    let cells: Vec<CellReport> = d
        .expected_for("ipvs", "exp4")
        .unwrap()
        .iter()
        .map(|e| {
            let obs = if e.expect.connects() {
                reached("10.2.3.4")
            } else {
                refused("timed out")
            };
            CellReport::new(e, Ok(obs), DASH)
        })
        .collect();
    let r = ExperimentReport::new("exp4", "t", cells, true, vec![]);
    assert_eq!(r.mismatches, 0);
    assert_eq!(
        r.verdict(),
        "PASS exp4: 27/27 cells as expected — lb in everywhere; bar kept out; baz in everywhere"
    );
}

#[test]
fn should_render_a_grid_with_marks_and_the_reason_of_each_mismatch() {
    let d = ScenarioData::tekton_builtin().unwrap();
    let r = exp1_with_ipvs_like_observation(&d);
    let report = ScenarioReport::new(&d, "iptables", vec![r.clone()], vec![]);
    let grid = render_table(&report, &r);
    let lines: Vec<&str> = grid.lines().collect();
    assert_eq!(lines.len(), 1 + 7, "{grid}");
    assert!(lines[0].contains("node1:31602") && lines[0].contains("clusterip:9097"));
    let lb = lines.iter().find(|l| l.trim_start().starts_with("lb ")).unwrap();
    assert!(lb.contains("blocked ✗ (exp connected)"), "{lb}");
    assert!(lb.contains("·"), "the load balancer has no ClusterIP cell: {lb}");
    let baz2 = lines.iter().find(|l| l.trim_start().starts_with("baz@node2")).unwrap();
    assert_eq!(baz2.matches('✓').count(), 4, "{baz2}");

    let text = render_report(&report, false);
    assert!(text.contains("✗ lb → node2:31602: expected connected, observed not connected (timed out)"));
    assert!(text.contains("why: local endpoint"), "{text}");
    assert!(text.contains("FAIL exp1: 26/27"));
    assert!(text.contains("1 mismatch in iptables mode"));
    // Without verbose, matching cells are only in the grid.
    assert!(!text.contains("✓ bar@node1"));
    assert!(render_report(&report, true).contains("✓ bar@node1 → node1:31602"));
}
