//! The echo loop as a store sees it under load, for measurements and
//! stress tests outside the suite (the hot-path guard, the WAL bound):
//! `per_round` submits at once, one claim of them all, one settlement batch
//! completing each with its input as output.

use std::time::Duration;

use coatcheck_core::{Clock, SystemClock};
use serde_json::value::RawValue;

use crate::{ClaimParams, SettleParams, Settlement, Store, SubmitParams};

/// Runs `rounds` rounds on `queue`; `input(i)` makes the i-th request's
/// input; `after` runs after every round. Panics on any store error.
pub async fn echo_rounds(
    store: &dyn Store,
    queue: &str,
    rounds: usize,
    per_round: usize,
    input: impl Fn(usize) -> Box<RawValue>,
    mut after: impl FnMut(),
) {
    let clock = SystemClock;
    for round in 0..rounds {
        let submits = (0..per_round).map(|i| {
            let mut new = super::new_request(queue);
            new.input = input(round * per_round + i);
            store.request_submit(SubmitParams {
                new,
                idempotency: None,
                now: clock.now(),
            })
        });
        futures::future::try_join_all(submits)
            .await
            .expect("submit");
        let claimed = store
            .request_claim(ClaimParams {
                queue: queue.into(),
                worker_id: "w".into(),
                max: per_round as u32,
                lease: Duration::from_secs(30),
                fairness: Default::default(),
                now: clock.now(),
            })
            .await
            .expect("claim");
        assert_eq!(
            claimed.len(),
            per_round,
            "every submit of the round is claimed"
        );
        let items = claimed
            .into_iter()
            .map(|r| SettleParams {
                id: r.id.clone(),
                queue: None,
                lease_token: r.lease.expect("leased").token,
                settlement: Settlement::Complete { output: r.input },
            })
            .collect();
        for res in store
            .request_settle_many(items, clock.now())
            .await
            .expect("settle")
        {
            res.expect("completed");
        }
        after();
    }
}
