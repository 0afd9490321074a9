//! The shared conformance suite: one set of behaviours every [`Store`] must
//! show, written once and run against each store by one macro line.
//!
//! Each area of the trait has a file of plain `pub async fn case(store)`
//! functions, each named for the one behaviour it proves
//! (`claim_skips_a_leased_request`). A store's test crate provides an
//! `async fn() -> Fixture` that opens a **fresh, empty** store, and writes
//!
//! ```ignore
//! coatcheck_store::conformance_suite!(fixture);
//! ```
//!
//! which expands to one `#[test]` per case, grouped in one module per area
//! (`submit::submit_then_get_returns_the_same_request`), each on its own
//! multi-threaded Tokio runtime with two workers (built by [`run`], so the
//! test crate needs no tokio macros). The factory path is resolved where the
//! macro is invoked.
//!
//! Rules the cases follow, and that a store's fixture must allow:
//! - **Time only through `now`.** Cases build timestamps from one base
//!   (truncated to whole microseconds, the precision stores keep) plus
//!   offsets; nothing sleeps.
//! - **A fresh store per case**, built with [`StoreOptions::default()`]
//!   (the default [`RetryPolicy`](coatcheck_core::RetryPolicy)): cases count
//!   whole-store results such as `due_times` and `queue_stats`, and check
//!   backoff against the default policy.
//! - **Refused means unchanged.** After every refused operation the case
//!   checks the stored request (all fields, private ones included) and its
//!   history are exactly as before.
//!
//! [`StoreOptions::default()`]: crate::StoreOptions

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use coatcheck_core::model::new_request_id;
use coatcheck_core::rules::NewRequest;

use crate::Store;

pub mod cancel;
pub mod channel;
pub mod claim;
pub mod deadline;
pub mod fairness;
pub mod history;
pub mod lease;
pub mod list;
pub mod parked;
pub mod redrive;
pub mod retention;
pub mod secrets;
pub mod settle;
pub mod stats;
pub mod submit;
mod support;
pub mod webhook;
pub mod workload;

/// The tenant [`new_request`] submits as.
pub const TENANT: &str = "t1";

/// A fresh store for one case, and whatever keeps it alive.
///
/// Fields drop in order: the store first, then the guard.
pub struct Fixture {
    /// The store under test, empty.
    pub store: Arc<dyn Store>,
    /// Keeps the store's resources alive for the case (a temp dir, a schema).
    pub guard: Box<dyn Any + Send + Sync>,
}

/// What a case takes from the fixture: most cases borrow the store
/// (`&dyn Store`); a case that spawns tasks takes a shared handle
/// (`Arc<dyn Store>`). The macro picks by the case's signature.
#[doc(hidden)]
pub trait FromFixture<'a> {
    /// The argument for the case.
    fn from_fixture(fx: &'a Fixture) -> Self;
}

impl<'a> FromFixture<'a> for &'a dyn Store {
    fn from_fixture(fx: &'a Fixture) -> Self {
        &*fx.store
    }
}

impl<'a> FromFixture<'a> for Arc<dyn Store> {
    fn from_fixture(fx: &'a Fixture) -> Self {
        fx.store.clone()
    }
}

/// Runs one case on a fresh multi-threaded runtime with two workers (what
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` does,
/// without asking the store's test crate for tokio's macros).
#[doc(hidden)]
pub fn run<F: Future<Output = ()>>(case: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
        .block_on(case)
}

/// A submission with the defaults: tenant [`TENANT`], a fresh id, input
/// `{"n":1}`, priority 0, no delay, no timeout, 3 attempts, no reply
/// address, no metadata, no fallback, fairness key left to default.
pub fn new_request(queue: &str) -> NewRequest {
    NewRequest {
        id: new_request_id(),
        tenant: TENANT.to_string(),
        queue: queue.to_string(),
        input: support::raw(r#"{"n":1}"#),
        correlation_id: None,
        priority: 0,
        delay: None,
        timeout: None,
        max_attempts: 3,
        reply_to: None,
        metadata: BTreeMap::new(),
        fallback_queue: None,
        fallback_of: None,
        fairness_key: None,
    }
}

/// Expands to one test per conformance case, in one module per area, each
/// calling `$factory().await` for a fresh [`Fixture`].
///
/// Every case of the suite is listed here; a listed case that does not exist
/// is a compile error. Invoke it once per module (it defines a private
/// `__coatcheck_conformance_fixture` function and one module per area).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        async fn __coatcheck_conformance_fixture() -> $crate::conformance::Fixture {
            $factory().await
        }

        $crate::conformance_suite! { @areas
            submit {
                submit_then_get_returns_the_same_request,
                idempotent_submit_with_same_key_returns_the_existing_request,
                idempotent_submit_with_other_body_is_a_mismatch,
                concurrent_submits_of_one_key_create_one_request,
                idempotency_keys_are_per_tenant,
                get_of_another_tenants_request_is_not_found,
                get_of_unknown_id_is_not_found,
                an_unsynced_submit_stores_the_same_request,
            }
            claim {
                claim_takes_highest_priority_then_oldest,
                claim_respects_max,
                claim_skips_a_leased_request,
                claim_skips_delayed_until_run_after,
                claim_skips_requests_of_other_queues,
                concurrent_claims_never_lease_one_request_twice,
                claim_counts_an_attempt_and_records_history,
            }
            fairness {
                claims_rotate_across_fairness_keys,
                one_batch_claim_rotates_across_keys,
                priority_comes_before_fairness,
                weights_give_a_key_more_turns,
                a_capped_key_waits_for_its_running_requests,
                a_lone_keys_turns_carry_into_the_rotation,
            }
            lease {
                heartbeat_extends_the_lease_and_records_progress,
                heartbeat_with_stale_token_is_lease_lost,
                complete_with_stale_token_is_lease_lost_and_changes_nothing,
                complete_twice_with_the_current_token_is_idempotent,
                expired_lease_requeues_with_attempts_left,
                expired_lease_dead_letters_without_attempts_left,
                expired_lease_after_cancel_requested_cancels,
                lease_expiry_respects_its_limit,
                old_token_is_fenced_after_reclaim,
            }
            settle {
                fail_retryable_requeues_with_backoff,
                fail_with_retry_after_sets_run_after,
                fail_not_retryable_dead_letters,
                fail_after_cancel_requested_cancels,
                settle_many_items_are_independent,
                fallback_queue_spawns_a_linked_request_on_dead_letter,
                fallback_queue_spawns_on_lease_expiry_dead_letter,
            }
            cancel {
                cancel_queued_cancels_at_once,
                cancel_running_requests_cancel,
                cancel_terminal_is_wrong_state,
                cancel_of_other_tenant_is_not_found,
            }
            deadline {
                deadline_expires_queued_and_running_requests,
                deadline_not_yet_due_changes_nothing,
                deadline_expiry_respects_its_limit,
                expired_request_is_not_claimable,
            }
            redrive {
                redrive_failed_resets_attempts,
                redrive_cancelled_and_expired_requeue,
                redrive_non_terminal_is_wrong_state,
                redrive_of_other_tenant_is_not_found,
            }
            retention {
                purge_deletes_only_requests_finished_before_the_cutoff,
                purge_respects_its_limit,
            }
            list {
                list_is_newest_first_and_pages_with_before_id,
                list_filters_by_queue_status_correlation_and_tenant,
            }
            history {
                history_is_gapless_and_ordered_for_a_full_life,
                history_after_seq_returns_only_later_events,
            }
            stats {
                queue_stats_counts_by_status,
                queue_counts_match_the_requests_through_every_change,
                due_times_report_the_earliest_lease_deadline_and_run_after,
            }
            channel {
                terminal_transition_appends_exactly_one_reply,
                failed_cancelled_and_expired_requests_reply,
                receive_hides_then_redelivers_after_visibility,
                ack_with_the_current_token_removes_the_message,
                ack_with_a_stale_token_keeps_the_message,
                channels_are_per_tenant_and_name,
                receive_respects_max_oldest_first,
                channel_purge_deletes_only_older_messages,
                due_times_report_when_a_received_message_becomes_visible,
                fallback_chain_replies_once_for_its_last_request,
            }
            secrets {
                secret_is_created_once_and_then_stable,
                secrets_with_different_names_differ,
                concurrent_first_calls_agree_on_one_secret,
            }
            webhook {
                webhook_reply_creates_a_delivery_taken_under_a_lease,
                webhook_record_retries_then_delivers,
                webhook_record_without_next_attempt_fails_for_good,
                webhook_deliveries_only_for_terminal_transitions,
                fallback_chain_delivers_once_for_its_last_request,
            }
        }
    };

    (@areas $( $area:ident { $( $case:ident ),* $(,)? } )*) => {
        $(
            mod $area {
                $(
                    #[test]
                    fn $case() {
                        $crate::conformance::run(async {
                            let fx = super::__coatcheck_conformance_fixture().await;
                            $crate::conformance::$area::$case(
                                $crate::conformance::FromFixture::from_fixture(&fx),
                            )
                            .await;
                            fx.store.store_close().await;
                        });
                    }
                )*
            }
        )*
    };
}
