//! Time: `retry_after`, lease expiry, deadlines and delays — on a manual
//! clock where a test clock can drive them, and at their own (sub-second)
//! scale in real time where the promptness itself is the point.

use std::time::{Duration, Instant};

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn retry_after_makes_it_claimable_that_much_later_and_not_before() {
    let s = TestServer::start().await;
    let id = id(&s.submit("ra", json!({"input": 1})).await);
    let c = claim_one(&s, "ra", 30.0).await;
    let t0 = Instant::now();
    let r = json_of(
        fail(&s, &id, &token(&c), json!({"retry_after": 0.3})).await,
        200,
    )
    .await;
    let backoff = secs_between(&r["updated_at"], &r["run_after"]);
    assert!(
        (backoff - 0.3).abs() < 0.002,
        "run_after = now + 0.3 s: {backoff}"
    );
    let early = s.claim("ra", 1).await;
    if t0.elapsed() < Duration::from_millis(280) {
        assert!(early.is_empty(), "not claimable before 0.3 s");
    }
    let got = claim_wait(&s, "ra", 1, 30.0, 5.0).await;
    let took = t0.elapsed();
    assert_eq!(got.len(), 1, "claimable after 0.3 s");
    assert!(
        took >= Duration::from_millis(295),
        "not before 0.3 s: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "about 0.3 s later, not at a periodic sweep: {took:?}"
    );
}

#[tokio::test]
async fn an_expired_lease_requeues_and_fences_the_old_token() {
    let s = TestServer::with_manual_clock().await;
    let id = id(&s.submit("le", json!({"input": 1, "max_attempts": 2})).await);
    let c1 = claim_one(&s, "le", 30.0).await;
    s.advance(Duration::from_secs(29));
    assert_eq!(
        get_req(&s, &id).await["status"],
        "running",
        "not before the lease runs out"
    );
    assert_eq!(
        heartbeat(&s, &id, json!({"lease_token": token(&c1)}))
            .await
            .status(),
        200,
        "still live at 29 s"
    );
    s.advance(Duration::from_secs(31));
    let r = wait_for_status(&s, &id, "queued", Duration::from_secs(10)).await;
    assert_eq!(r["attempts"], 1);
    let h = history(&s, &id).await;
    let last = h.last().unwrap();
    assert_eq!(last["kind"], "lease_expired");
    assert_eq!(last["next_status"], "queued");
    assert_eq!(last["worker_id"], "w-test");
    // The old token is fenced.
    assert_problem(
        complete(&s, &id, &token(&c1), json!(1)).await,
        409,
        "lease-lost",
    )
    .await;
    assert_problem(
        heartbeat(&s, &id, json!({"lease_token": token(&c1)})).await,
        409,
        "lease-lost",
    )
    .await;
    // Re-claimed: the new lease works, the old one still does not.
    let c2 = claim_one(&s, "le", 30.0).await;
    assert_eq!(c2["attempt"], 2);
    assert_ne!(token(&c2), token(&c1));
    let p = assert_problem(
        complete(&s, &id, &token(&c1), json!("old")).await,
        409,
        "lease-lost",
    )
    .await;
    assert_eq!(p.extensions["request_status"], "running");
    // The last attempt's lease runs out too: dead-lettered.
    s.advance(Duration::from_secs(31));
    let r = wait_terminal(&s, &id).await;
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["code"], "lease_expired");
    assert_problem(
        complete(&s, &id, &token(&c2), json!("late")).await,
        409,
        "lease-lost",
    )
    .await;
    let ks = kinds(&s, &id).await;
    assert_eq!(
        ks,
        [
            "submitted",
            "claimed",
            "lease_expired",
            "claimed",
            "lease_expired",
            "failed"
        ]
    );
}

#[tokio::test]
async fn a_one_second_lease_is_reaped_about_one_second_later() {
    let s = TestServer::start().await;
    let id = id(&s.submit("le1", json!({"input": 1})).await);
    let t0 = Instant::now();
    let c = claim_one(&s, "le1", 1.0).await;
    // The claim long-poll wakes when the reaper puts it back.
    let again = claim_wait(&s, "le1", 1, 30.0, 10.0).await;
    let took = t0.elapsed();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["id"], id.as_str());
    assert_eq!(again[0]["attempt"], 2);
    assert!(
        took >= Duration::from_millis(900),
        "not before the lease ran out: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "about 1 s later: {took:?}");
    assert_problem(
        complete(&s, &id, &token(&c), json!(1)).await,
        409,
        "lease-lost",
    )
    .await;
}

#[tokio::test]
async fn a_deadline_expires_queued_and_running_requests() {
    let s = TestServer::with_manual_clock().await;
    let queued = id(&s.submit("dd", json!({"input": 1, "timeout": 10})).await);
    let running = id(&s.submit("dd", json!({"input": 2, "timeout": 10})).await);
    let later = id(&s.submit("dd", json!({"input": 3, "timeout": 100})).await);
    let c = claim_wait(&s, "dd", 2, 60.0, 0.0).await;
    assert_eq!(c.len(), 2);
    assert_eq!(c[0]["id"], queued.as_str());
    assert_eq!(c[1]["id"], running.as_str());
    // Put the first back so that it is queued when its deadline passes.
    let r = json_of(
        fail(&s, &queued, &token(&c[0]), json!({"retry_after": 0})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "queued");
    s.advance(Duration::from_secs(9));
    assert_eq!(
        get_req(&s, &running).await["status"],
        "running",
        "not before the deadline"
    );
    s.advance(Duration::from_secs(2));
    for (id, from) in [(&queued, "queued"), (&running, "running")] {
        let r = wait_terminal(&s, id).await;
        assert_eq!(r["status"], "expired");
        assert_eq!(r["error"]["code"], "deadline_exceeded");
        assert!(r["finished_at"].is_string());
        let h = history(&s, id).await;
        assert_eq!(h.last().unwrap()["kind"], "expired");
        assert_eq!(h.last().unwrap()["from"], from);
    }
    // The worker of the expired running request is fenced.
    assert_problem(
        complete(&s, &running, &token(&c[1]), json!(1)).await,
        409,
        "lease-lost",
    )
    .await;
    // Expired requests are not claimable; the one with a later deadline is.
    let got = claim_wait(&s, "dd", 10, 30.0, 0.0).await;
    let ids: Vec<String> = got.iter().map(id).collect();
    assert_eq!(ids, std::slice::from_ref(&later));
    assert_eq!(get_req(&s, &later).await["status"], "running");
}

#[tokio::test]
async fn a_request_past_its_deadline_is_never_claimed_even_before_the_expirer_runs() {
    let s = TestServer::with_manual_clock().await;
    let id = id(&s.submit("dd2", json!({"input": 1, "timeout": 5})).await);
    s.advance(Duration::from_secs(6));
    assert!(s.claim("dd2", 5).await.is_empty());
    assert_eq!(wait_terminal(&s, &id).await["status"], "expired");
}

#[tokio::test]
async fn a_delayed_request_is_claimable_after_its_delay() {
    let s = TestServer::start().await;
    let t0 = Instant::now();
    let req = s.submit("dl", json!({"input": 1, "delay": 0.5})).await;
    let d = secs_between(&req["created_at"], &req["run_after"]);
    assert!(
        (d - 0.5).abs() < 0.002,
        "run_after = created_at + 0.5 s: {d}"
    );
    if t0.elapsed() < Duration::from_millis(450) {
        assert!(s.claim("dl", 1).await.is_empty(), "not claimable yet");
    }
    let got = claim_wait(&s, "dl", 1, 30.0, 5.0).await;
    let took = t0.elapsed();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], req["id"]);
    assert!(took >= Duration::from_millis(495), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

#[tokio::test]
async fn a_half_second_deadline_expires_about_half_a_second_later() {
    let s = TestServer::start().await;
    let t0 = Instant::now();
    let id = id(&s.submit("dl-rt", json!({"input": 1, "timeout": 0.5})).await);
    // The status long-poll is woken by the expirer, at the deadline, not at a sweep.
    let r = wait_terminal(&s, &id).await;
    let took = t0.elapsed();
    assert_eq!(r["status"], "expired");
    assert!(
        took >= Duration::from_millis(495),
        "not before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "about 0.5 s later: {took:?}"
    );
}

#[tokio::test]
async fn a_one_second_last_lease_dead_letters_and_wakes_the_status_long_poll() {
    let s = TestServer::start().await;
    let id = id(&s
        .submit("le-rt", json!({"input": 1, "max_attempts": 1}))
        .await);
    let t0 = Instant::now();
    claim_one(&s, "le-rt", 1.0).await;
    let r = wait_terminal(&s, &id).await;
    let took = t0.elapsed();
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["code"], "lease_expired");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
}
