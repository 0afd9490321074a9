//! The state machine, tested: a table that walks every edge of
//! `docs/state-machine.md`, and a property test that random operation
//! sequences keep the invariants.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::clock::Ts;

fn t0() -> Ts {
    chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap()
}

fn new_req(max_attempts: u32) -> Request {
    let (req, events) = submit(
        NewRequest {
            id: "r1".into(),
            tenant: "t".into(),
            queue: "q".into(),
            input: raw(r#"{"x":1}"#),
            correlation_id: Some("c".into()),
            priority: 0,
            delay: None,
            timeout: Some(Duration::from_secs(100)),
            max_attempts,
            reply_to: None,
            metadata: Default::default(),
            fallback_queue: None,
            fallback_of: None,
            fairness_key: None,
        },
        t0(),
    );
    assert_eq!(events.len(), 1);
    req
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn at(n: i64) -> Ts {
    t0() + chrono::Duration::seconds(n)
}

fn err() -> ErrorInfo {
    ErrorInfo::new("boom", "it broke")
}

fn claimed(max_attempts: u32) -> Request {
    let mut r = new_req(max_attempts);
    claim(&mut r, "w", secs(10), "tok".into(), at(1)).unwrap();
    r
}

fn kinds(events: &[HistoryEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// One row per edge of the state machine: (name, setup, transition, expected
/// status afterwards, expected history kinds).
#[test]
fn every_edge_of_the_state_machine() {
    type Setup = fn() -> Request;
    type Step = fn(&mut Request) -> Result<Vec<HistoryEvent>, RuleError>;
    let table: Vec<(&str, Setup, Step, Status, Vec<&str>)> = vec![
        (
            "queued -claim-> running",
            || new_req(3),
            |r| claim(r, "w", secs(10), "t2".into(), at(1)),
            Status::Running,
            vec!["claimed"],
        ),
        (
            "queued -cancel-> cancelled",
            || new_req(3),
            |r| cancel(r, at(1)).map(|x| x.1),
            Status::Cancelled,
            vec!["cancelled"],
        ),
        (
            "queued -deadline-> expired",
            || new_req(3),
            |r| expire_deadline(r, at(100)),
            Status::Expired,
            vec!["expired"],
        ),
        (
            "running -complete-> succeeded",
            || claimed(3),
            |r| complete(r, "tok", raw("1"), at(2)),
            Status::Succeeded,
            vec!["succeeded"],
        ),
        (
            "running -fail retryable-> queued",
            || claimed(3),
            |r| {
                fail(
                    r,
                    "tok",
                    err(),
                    true,
                    None,
                    &RetryPolicy::default(),
                    0.5,
                    at(2),
                )
            },
            Status::Queued,
            vec!["attempt_failed"],
        ),
        (
            "running -fail not retryable-> failed",
            || claimed(3),
            |r| {
                fail(
                    r,
                    "tok",
                    err(),
                    false,
                    None,
                    &RetryPolicy::default(),
                    0.5,
                    at(2),
                )
            },
            Status::Failed,
            vec!["failed"],
        ),
        (
            "running -fail, last attempt-> failed",
            || claimed(1),
            |r| {
                fail(
                    r,
                    "tok",
                    err(),
                    true,
                    None,
                    &RetryPolicy::default(),
                    0.5,
                    at(2),
                )
            },
            Status::Failed,
            vec!["failed"],
        ),
        (
            "running -cancel-> running (requested)",
            || claimed(3),
            |r| cancel(r, at(2)).map(|x| x.1),
            Status::Running,
            vec!["cancel_requested"],
        ),
        (
            "running -lease expiry-> queued",
            || claimed(3),
            |r| expire_lease(r, at(11)),
            Status::Queued,
            vec!["lease_expired"],
        ),
        (
            "running -lease expiry, last attempt-> failed",
            || claimed(1),
            |r| expire_lease(r, at(11)),
            Status::Failed,
            vec!["lease_expired", "failed"],
        ),
        (
            "running -deadline-> expired",
            || claimed(3),
            |r| expire_deadline(r, at(100)),
            Status::Expired,
            vec!["expired"],
        ),
        (
            "running+cancel_requested -fail-> cancelled",
            || {
                let mut r = claimed(3);
                cancel(&mut r, at(2)).unwrap();
                r
            },
            |r| {
                fail(
                    r,
                    "tok",
                    err(),
                    true,
                    None,
                    &RetryPolicy::default(),
                    0.5,
                    at(3),
                )
            },
            Status::Cancelled,
            vec!["cancelled"],
        ),
        (
            "running+cancel_requested -lease expiry-> cancelled",
            || {
                let mut r = claimed(3);
                cancel(&mut r, at(2)).unwrap();
                r
            },
            |r| expire_lease(r, at(11)),
            Status::Cancelled,
            vec!["lease_expired", "cancelled"],
        ),
        (
            "running+cancel_requested -complete-> succeeded",
            || {
                let mut r = claimed(3);
                cancel(&mut r, at(2)).unwrap();
                r
            },
            |r| complete(r, "tok", raw("1"), at(3)),
            Status::Succeeded,
            vec!["succeeded"],
        ),
        (
            "failed -redrive-> queued",
            || {
                let mut r = claimed(1);
                fail(
                    &mut r,
                    "tok",
                    err(),
                    false,
                    None,
                    &RetryPolicy::default(),
                    0.5,
                    at(2),
                )
                .unwrap();
                r
            },
            |r| redrive(r, at(3)),
            Status::Queued,
            vec!["redriven"],
        ),
        (
            "cancelled -redrive-> queued",
            || {
                let mut r = new_req(3);
                cancel(&mut r, at(1)).unwrap();
                r
            },
            |r| redrive(r, at(3)),
            Status::Queued,
            vec!["redriven"],
        ),
        (
            "expired -redrive-> queued",
            || {
                let mut r = new_req(3);
                expire_deadline(&mut r, at(100)).unwrap();
                r
            },
            |r| redrive(r, at(101)),
            Status::Queued,
            vec!["redriven"],
        ),
    ];
    for (name, setup, step, want, want_kinds) in table {
        let mut r = setup();
        let before_seq = r.history_seq;
        let events = step(&mut r).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, want, "{name}");
        assert_eq!(kinds(&events), want_kinds, "{name}");
        assert_eq!(
            r.history_seq,
            before_seq + events.len() as u64,
            "{name}: seq"
        );
        assert_eq!(
            r.lease.is_some(),
            r.status == Status::Running,
            "{name}: lease iff running"
        );
        assert_eq!(
            r.finished_at.is_some(),
            r.status.is_terminal(),
            "{name}: finished_at"
        );
    }
}

#[test]
fn terminal_states_refuse_everything_but_redrive() {
    let mut done = claimed(3);
    complete(&mut done, "tok", raw("1"), at(2)).unwrap();
    let snapshot = format!("{done:?}");
    assert!(matches!(
        cancel(&mut done, at(3)),
        Err(RuleError::WrongState { .. })
    ));
    assert!(matches!(
        redrive(&mut done, at(3)),
        Err(RuleError::WrongState { .. })
    ));
    assert!(expire_deadline(&mut done, at(500)).is_err());
    assert!(claim(&mut done, "w", secs(1), "x".into(), at(3)).is_err());
    assert!(fail(
        &mut done,
        "tok",
        err(),
        true,
        None,
        &RetryPolicy::default(),
        0.1,
        at(3)
    )
    .is_err());
    assert_eq!(
        format!("{done:?}"),
        snapshot,
        "a refused transition changes nothing"
    );
}

#[test]
fn complete_is_idempotent_with_the_same_token_only() {
    let mut r = claimed(3);
    complete(&mut r, "tok", raw("1"), at(2)).unwrap();
    assert!(complete(&mut r, "tok", raw("2"), at(3)).unwrap().is_empty());
    assert_eq!(r.output.as_ref().unwrap().get(), "1");
    assert!(matches!(
        complete(&mut r, "other", raw("1"), at(3)),
        Err(RuleError::LeaseLost { .. })
    ));
}

#[test]
fn stale_and_expired_tokens_are_fenced() {
    let mut r = claimed(3);
    assert!(matches!(
        complete(&mut r, "nope", raw("1"), at(2)),
        Err(RuleError::LeaseLost { .. })
    ));
    // The lease ran out: even the right token is no longer good.
    assert!(matches!(
        heartbeat(&mut r, "tok", None, None, at(11)),
        Err(RuleError::LeaseLost { .. })
    ));
    expire_lease(&mut r, at(11)).unwrap();
    claim(&mut r, "w2", secs(10), "tok2".into(), at(12)).unwrap();
    assert!(matches!(
        complete(&mut r, "tok", raw("1"), at(13)),
        Err(RuleError::LeaseLost { .. })
    ));
    assert_eq!(r.attempts, 2);
    complete(&mut r, "tok2", raw("1"), at(13)).unwrap();
}

#[test]
fn heartbeat_extends_and_records_progress() {
    let mut r = claimed(3);
    let ev = heartbeat(&mut r, "tok", Some(raw(r#"{"pct":50}"#)), None, at(5)).unwrap();
    assert_eq!(kinds(&ev), ["progress"]);
    assert_eq!(r.lease.as_ref().unwrap().expires_at, at(15));
    heartbeat(&mut r, "tok", None, Some(secs(60)), at(6)).unwrap();
    assert_eq!(r.lease.as_ref().unwrap().expires_at, at(66));
    assert_eq!(r.progress.as_ref().unwrap().get(), r#"{"pct":50}"#);
}

#[test]
fn retry_after_and_backoff_set_run_after() {
    let mut r = claimed(3);
    fail(
        &mut r,
        "tok",
        err(),
        true,
        Some(Duration::from_millis(300)),
        &RetryPolicy::default(),
        0.5,
        at(2),
    )
    .unwrap();
    assert_eq!(
        r.run_after,
        Some(at(2) + chrono::Duration::milliseconds(300))
    );
    assert!(!claimable(&r, at(2)));
    assert!(claimable(&r, at(3)));
    claim(&mut r, "w", secs(10), "t2".into(), at(3)).unwrap();
    let p = RetryPolicy {
        jitter: 0.0,
        ..Default::default()
    };
    fail(&mut r, "t2", err(), true, None, &p, 0.5, at(4)).unwrap();
    assert_eq!(r.run_after, Some(at(6)), "second failure waits base*2");
}

#[test]
fn delay_makes_a_request_claimable_later() {
    let (r, ev) = submit(
        NewRequest {
            delay: Some(secs(5)),
            ..base_new()
        },
        t0(),
    );
    assert!(matches!(
        ev[0].kind,
        EventKind::Submitted {
            run_after: Some(_),
            ..
        }
    ));
    assert!(!claimable(&r, at(4)));
    assert!(claimable(&r, at(5)));
}

#[test]
fn fallback_is_created_once_and_takes_over_the_reply() {
    let (mut r, _) = submit(
        NewRequest {
            fallback_queue: Some("q2".into()),
            reply_to: Some(ReplyTo::Channel("c".into())),
            max_attempts: 1,
            ..base_new()
        },
        t0(),
    );
    claim(&mut r, "w", secs(10), "tok".into(), at(1)).unwrap();
    fail(
        &mut r,
        "tok",
        err(),
        true,
        None,
        &RetryPolicy::default(),
        0.5,
        at(2),
    )
    .unwrap();
    let (new, ev) = fallback(&mut r, "r2".into(), at(2)).unwrap();
    assert_eq!(kinds(&ev), ["fallback_submitted"]);
    assert_eq!(new.queue, "q2");
    assert_eq!(new.fallback_of.as_deref(), Some("r1"));
    assert_eq!(new.input.get(), r.input.get());
    assert_eq!(r.fallback_request_id.as_deref(), Some("r2"));
    assert!(!reply_due(&r));
    assert!(fallback(&mut r, "r3".into(), at(2)).is_none());
}

fn base_new() -> NewRequest {
    NewRequest {
        id: "r1".into(),
        tenant: "t".into(),
        queue: "q".into(),
        input: raw("{}"),
        correlation_id: None,
        priority: 0,
        delay: None,
        timeout: None,
        max_attempts: 3,
        reply_to: None,
        metadata: Default::default(),
        fallback_queue: None,
        fallback_of: None,
        fairness_key: None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    Heartbeat(u8),
    Complete(u8),
    Fail { token: u8, retryable: bool },
    Cancel,
    ExpireLease,
    ExpireDeadline,
    Redrive,
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Claim),
        (0u8..4).prop_map(Op::Heartbeat),
        (0u8..4).prop_map(Op::Complete),
        ((0u8..4), any::<bool>()).prop_map(|(token, retryable)| Op::Fail { token, retryable }),
        Just(Op::Cancel),
        Just(Op::ExpireLease),
        Just(Op::ExpireDeadline),
        Just(Op::Redrive),
        (0u8..20).prop_map(Op::Tick),
    ]
}

proptest! {
    /// Any sequence of operations keeps the invariants: a lease exists iff
    /// the request is running (so at most one live lease), attempts never
    /// exceed max_attempts, a terminal request changes only by redrive, and
    /// history numbers are gapless.
    #[test]
    fn random_operations_keep_the_invariants(max_attempts in 1u32..4, ops in proptest::collection::vec(op(), 0..60)) {
        let (mut r, _) = submit(NewRequest { max_attempts, timeout: Some(secs(200)), ..base_new() }, t0());
        let mut now = t0();
        let mut seq = r.history_seq;
        let policy = RetryPolicy::default();
        for op in ops {
            let before = r.clone();
            let token = |n: u8| format!("tok{n}");
            let res = match op {
                Op::Claim(n) => claim(&mut r, "w", secs(5), token(n), now),
                Op::Heartbeat(n) => heartbeat(&mut r, &token(n), None, None, now),
                Op::Complete(n) => complete(&mut r, &token(n), raw("1"), now),
                Op::Fail { token: n, retryable } => fail(&mut r, &token(n), err(), retryable, Some(secs(1)), &policy, 0.5, now),
                Op::Cancel => cancel(&mut r, now).map(|x| x.1),
                Op::ExpireLease => expire_lease(&mut r, now),
                Op::ExpireDeadline => expire_deadline(&mut r, now),
                Op::Redrive => redrive(&mut r, now),
                Op::Tick(s) => { now += chrono::Duration::seconds(s as i64); Ok(vec![]) }
            };
            match res {
                Ok(events) => {
                    for e in &events { seq += 1; prop_assert_eq!(e.seq, seq); }
                    if before.status.is_terminal() && !events.is_empty() {
                        prop_assert!(matches!(events[0].kind, EventKind::Redriven { .. }), "terminal changed by {:?}", events[0].kind);
                    }
                }
                Err(_) => prop_assert_eq!(format!("{:?}", before), format!("{:?}", r), "refused op changed the request"),
            }
            prop_assert_eq!(r.lease.is_some(), r.status == Status::Running);
            prop_assert!(r.attempts <= r.max_attempts);
            prop_assert_eq!(r.history_seq, seq);
            prop_assert_eq!(r.finished_at.is_some(), r.status.is_terminal());
        }
    }
}
