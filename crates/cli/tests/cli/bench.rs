//! `coatcheck bench` end to end, small: it starts its own server and echo
//! worker, runs every phase, and reports numbers that fit together.

use serde_json::Value;

use crate::proc::run;

fn report(args: &[&str]) -> Value {
    let out = run(args, None);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report on stdout")
}

#[test]
fn bench_runs_every_phase_and_reports_each_number() {
    let r = report(&[
        "bench",
        "--json",
        "--n",
        "300",
        "--warmup",
        "20",
        "--latency-n",
        "50",
        "--window",
        "8",
        "--concurrency",
        "4",
    ]);
    assert_eq!(r["reply_mode"], "prefer-wait");
    assert_eq!(
        (r["n"].as_u64(), r["window"].as_u64()),
        (Some(300), Some(8))
    );
    for key in [
        "throughput_replies_per_s",
        "enqueue_only_per_s",
        "claim_complete_only_per_s",
    ] {
        let v = r[key].as_f64().unwrap_or(0.0);
        assert!(v > 0.0 && v.is_finite(), "{key}: {v}");
    }
    let lat = &r["latency"];
    assert_eq!(lat["n"], 50);
    let (p50, p99, max) = (
        lat["p50_ms"].as_f64().unwrap(),
        lat["p99_ms"].as_f64().unwrap(),
        lat["max_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
    assert_eq!(
        r["wake"]["n"], 50,
        "every sequential request's history is read"
    );
    // The stages are parts of one round trip: together no longer than it.
    let s = &r["stages"];
    let parts: f64 = [
        "sent_to_stored_p50_ms",
        "stored_to_claimed_p50_ms",
        "claimed_to_completed_p50_ms",
        "completed_to_received_p50_ms",
    ]
    .iter()
    .map(|k| s[*k].as_f64().expect("a stage"))
    .sum();
    assert!(parts > 0.0 && parts <= max + 1.0, "{s} against {lat}");
    // The slowest 1 % of 50 is one trip: the slowest, so its stages add up
    // to no more than the max, and to at least the p50's.
    let t = &r["stages_slowest"];
    assert_eq!(t["n"], 1, "{t}");
    let tail: f64 = [
        "sent_to_stored_ms",
        "stored_to_claimed_ms",
        "claimed_to_completed_ms",
        "completed_to_received_ms",
    ]
    .iter()
    .map(|k| t[*k].as_f64().expect("a stage"))
    .sum();
    assert!(tail <= max + 1.0 && tail + 1.0 >= p50, "{t} against {lat}");
}

#[test]
fn bench_with_a_reply_channel_skipping_phases() {
    let r = report(&[
        "bench",
        "--json",
        "--mode",
        "channel",
        "--skip-phases",
        "--n",
        "200",
        "--warmup",
        "10",
        "--latency-n",
        "20",
    ]);
    assert_eq!(r["reply_mode"], "channel");
    assert!(r["throughput_replies_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["enqueue_only_per_s"].is_null());
    assert_eq!(r["latency"]["n"], 20);
}

/// `--idle-workers`: many more single-slot workers on the same queue (one
/// process); every request is still answered, whichever worker took it.
#[test]
fn bench_with_many_idle_workers_on_the_queue() {
    let r = report(&[
        "bench",
        "--json",
        "--skip-phases",
        "--n",
        "200",
        "--warmup",
        "10",
        "--latency-n",
        "40",
        "--window",
        "8",
        "--concurrency",
        "2",
        "--idle-workers",
        "30",
    ]);
    assert_eq!(r["idle_workers"], 30);
    assert_eq!(r["latency"]["n"], 40);
    assert_eq!(r["wake"]["n"], 40);
    let v = r["throughput_replies_per_s"].as_f64().unwrap_or(0.0);
    assert!(v > 0.0 && v.is_finite(), "{v}");
}
