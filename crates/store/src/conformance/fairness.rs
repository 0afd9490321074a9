//! Fair claiming: within a priority, claims rotate across fairness keys,
//! with weights and per-key running caps; priority still comes first.

use std::collections::HashMap;
use std::sync::Arc;

use super::new_request;
use super::support::*;
use crate::{ClaimParams, FairnessRules, Store};

async fn submit_keyed(
    store: &dyn Store,
    queue: &str,
    key: &str,
    priority: i32,
    n: usize,
    t0: coatcheck_core::Ts,
    from: u64,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut new = new_request(queue);
        new.fairness_key = Some(key.to_string());
        new.priority = priority;
        ids.push(submit(store, new, at(t0, from + i as u64)).await.id);
    }
    ids
}

async fn claim_keys(
    store: &dyn Store,
    queue: &str,
    rules: &FairnessRules,
    n: usize,
    max: u32,
    now: coatcheck_core::Ts,
) -> Vec<String> {
    let mut keys = Vec::new();
    while keys.len() < n {
        let got = store
            .request_claim(ClaimParams {
                queue: queue.into(),
                worker_id: WORKER.into(),
                max,
                lease: LEASE,
                fairness: Arc::new(rules.clone()),
                now,
            })
            .await
            .expect("claim");
        if got.is_empty() {
            break;
        }
        keys.extend(got.into_iter().map(|r| r.fairness_key));
    }
    keys
}

/// A heavy key's backlog does not delay a light key: claims alternate.
pub async fn claims_rotate_across_fairness_keys(store: &dyn Store) {
    let t0 = base();
    submit_keyed(store, "q-fair", "heavy", 0, 6, t0, 0).await;
    submit_keyed(store, "q-fair", "light", 0, 2, t0, 100).await;
    let keys = claim_keys(
        store,
        "q-fair",
        &FairnessRules::default(),
        8,
        1,
        at(t0, 1_000),
    )
    .await;
    assert_eq!(
        keys,
        ["heavy", "light", "heavy", "light", "heavy", "heavy", "heavy", "heavy"]
    );
}

/// Rotation also holds inside one claim of many.
pub async fn one_batch_claim_rotates_across_keys(store: &dyn Store) {
    let t0 = base();
    submit_keyed(store, "q-fair-batch", "a", 0, 5, t0, 0).await;
    submit_keyed(store, "q-fair-batch", "b", 0, 5, t0, 100).await;
    submit_keyed(store, "q-fair-batch", "c", 0, 1, t0, 200).await;
    let mut first = claim_keys(
        store,
        "q-fair-batch",
        &FairnessRules::default(),
        3,
        3,
        at(t0, 1_000),
    )
    .await;
    first.sort();
    assert_eq!(first, ["a", "b", "c"], "one of each key in a claim of 3");
}

/// Priority comes before fairness.
pub async fn priority_comes_before_fairness(store: &dyn Store) {
    let t0 = base();
    submit_keyed(store, "q-fair-prio", "a", 0, 2, t0, 0).await;
    submit_keyed(store, "q-fair-prio", "b", 5, 2, t0, 100).await;
    let keys = claim_keys(
        store,
        "q-fair-prio",
        &FairnessRules::default(),
        4,
        1,
        at(t0, 1_000),
    )
    .await;
    assert_eq!(keys, ["b", "b", "a", "a"]);
}

/// A key with weight 2 gets two requests per turn.
pub async fn weights_give_a_key_more_turns(store: &dyn Store) {
    let t0 = base();
    submit_keyed(store, "q-fair-w", "a", 0, 6, t0, 0).await;
    submit_keyed(store, "q-fair-w", "b", 0, 6, t0, 100).await;
    let rules = FairnessRules {
        weights: HashMap::from([("a".to_string(), 2)]),
        ..Default::default()
    };
    let keys = claim_keys(store, "q-fair-w", &rules, 6, 1, at(t0, 1_000)).await;
    let a = keys.iter().filter(|k| *k == "a").count();
    assert_eq!(a, 4, "a gets 2 of every 3: {keys:?}");
}

/// A key at its running cap is skipped until one of its requests finishes.
pub async fn a_capped_key_waits_for_its_running_requests(store: &dyn Store) {
    let t0 = base();
    submit_keyed(store, "q-fair-cap", "a", 0, 3, t0, 0).await;
    submit_keyed(store, "q-fair-cap", "b", 0, 3, t0, 100).await;
    let rules = FairnessRules {
        caps: HashMap::from([("a".to_string(), 1)]),
        ..Default::default()
    };
    let now = at(t0, 1_000);
    let keys = claim_keys(store, "q-fair-cap", &rules, 10, 10, now).await;
    assert_eq!(
        keys.iter().filter(|k| *k == "a").count(),
        1,
        "only one of a runs: {keys:?}"
    );
    assert_eq!(keys.iter().filter(|k| *k == "b").count(), 3);
    // a's running request completes: the next a may run.
    let running = crate::ListParams {
        queue: Some("q-fair-cap".into()),
        status: Some(coatcheck_core::Status::Running),
        limit: 100,
        ..Default::default()
    };
    let a = store
        .request_list(running)
        .await
        .expect("list")
        .into_iter()
        .find(|r| r.fairness_key == "a")
        .expect("a runs");
    settle(store, &a.id, &token(&a), completion("1"), at(t0, 2_000))
        .await
        .expect("complete");
    let keys = claim_keys(store, "q-fair-cap", &rules, 10, 10, at(t0, 3_000)).await;
    assert_eq!(keys, ["a"]);
}

/// A key alone at its level may take many turns in one claim, and the
/// rotation then goes on exactly as if they had been taken one by one: its
/// last turn (1 of a weight of 2) is finished before the next key's.
pub async fn a_lone_keys_turns_carry_into_the_rotation(store: &dyn Store) {
    let t0 = base();
    let rules = FairnessRules {
        weights: HashMap::from([("a".to_string(), 2)]),
        ..Default::default()
    };
    submit_keyed(store, "q-fair-lone", "a", 0, 5, t0, 0).await;
    let first = claim_keys(store, "q-fair-lone", &rules, 5, 5, at(t0, 1_000)).await;
    assert_eq!(first, ["a"; 5], "a lone key takes the whole claim");
    submit_keyed(store, "q-fair-lone", "b", 0, 2, t0, 100).await;
    submit_keyed(store, "q-fair-lone", "a", 0, 3, t0, 200).await;
    let keys = claim_keys(store, "q-fair-lone", &rules, 5, 1, at(t0, 2_000)).await;
    assert_eq!(keys, ["a", "b", "a", "a", "b"]);
}
