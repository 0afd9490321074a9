//! Fair claims: highest priority first; within a priority, turns across
//! fairness keys in key order, continuing after the key served last
//! (`weight` requests per turn, skipping keys at their running `cap`);
//! within a key, oldest first — the same order as the embedded store.
//!
//! The store plans a whole claim at once instead of walking it one request
//! at a time: it finds the level and its keys with one loose index scan
//! ([`sql::LEVEL_KEYS`]), computes how many requests each key gets by
//! simulating the turns ([`plan`]), then locks each key's oldest claimable
//! requests with one pipelined `FOR UPDATE SKIP LOCKED` query per key. A
//! key that had fewer than planned (delayed, or held by a concurrent claim)
//! drops out and the rest is planned again. So a claim is three round
//! trips however many keys and however deep the backlog.
//!
//! The rotation cursor (which key was served last) is kept per node, in
//! memory: each node rotates fairly on its own, and across nodes the keys
//! interleave. Sharing it in a row would make every claim of a queue wait
//! for the previous one. Caps are strict across nodes: when any key has a
//! cap, claims of that queue take a transaction-scoped advisory lock before
//! they count what runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use coatcheck_core::clock::truncate;
use coatcheck_core::model::new_lease_token;
use coatcheck_core::rules;
use coatcheck_core::Request;
use coatcheck_store::{ClaimParams, FairnessRules, Result};
use tokio_postgres::types::ToSql;

use crate::error::internal;
use crate::listen;
use crate::migrate::fnv;
use crate::sql;
use crate::tx::Tx;
use crate::write::Batch;
use crate::Inner;

/// Where a queue's rotation stands: the level and key served last, and how
/// many of its turn that key has had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The priority level.
    pub priority: i32,
    /// The key served last.
    pub key: String,
    /// Requests it got in its current turn.
    pub used: u32,
}

/// The per-queue cursors of this node.
#[derive(Debug, Default)]
pub struct Cursors(Mutex<HashMap<String, Cursor>>);

impl Cursors {
    fn get(&self, queue: &str) -> Option<Cursor> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)
            .cloned()
    }

    fn set(&self, queue: &str, c: Cursor) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_string(), c);
    }
}

/// One turn of one key: `n` requests; `resumed` is how many of its turn it
/// had already had (a turn continued from the cursor), else 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The key.
    pub key: String,
    /// How many requests.
    pub n: usize,
    /// Its turn so far before this slot.
    pub resumed: u32,
}

/// Shares `need` claims among `keys` (sorted, one priority level) turn by
/// turn, assuming every key has enough requests: the slots in order.
/// `room` limits keys with a cap (what is left of it); `cursor` is where the
/// rotation stands on this level.
pub fn plan(
    keys: &[String],
    need: usize,
    rules: &FairnessRules,
    room: &HashMap<String, usize>,
    cursor: Option<&Cursor>,
) -> Vec<Slot> {
    let mut slots = Vec::new();
    if keys.is_empty() || need == 0 {
        return slots;
    }
    let mut room = room.clone();
    let mut left = need;
    // The first pass: the cursor's key finishes its turn, then the keys
    // after it, then from the first key round to it.
    let mut order: Vec<(&String, u32)> = Vec::with_capacity(keys.len() + 1);
    match cursor {
        Some(c) => {
            let resume = c.used < rules.weight(&c.key) && keys.contains(&c.key);
            if resume {
                let k = keys.iter().find(|k| **k == c.key).expect("contained");
                order.push((k, c.used));
            }
            order.extend(keys.iter().filter(|k| **k > c.key).map(|k| (k, 0)));
            order.extend(
                keys.iter()
                    .filter(|k| **k < c.key || (**k == c.key && !resume))
                    .map(|k| (k, 0)),
            );
        }
        None => order.extend(keys.iter().map(|k| (k, 0))),
    }
    loop {
        let mut any = false;
        for &(k, already) in &order {
            if left == 0 {
                break;
            }
            let turn = (rules.weight(k).saturating_sub(already)) as usize;
            let cap = room.get(k.as_str()).copied().unwrap_or(usize::MAX);
            let take = turn.min(cap).min(left);
            if take == 0 {
                continue;
            }
            slots.push(Slot {
                key: k.clone(),
                n: take,
                resumed: already,
            });
            left -= take;
            if let Some(r) = room.get_mut(k.as_str()) {
                *r -= take;
            }
            any = true;
        }
        if left == 0 || !any {
            return slots;
        }
        // Later passes: every key, round from the one after the last.
        let last = order.last().expect("not empty").0.clone();
        order = keys
            .iter()
            .filter(|k| **k > last)
            .chain(keys.iter().filter(|k| **k <= last))
            .map(|k| (k, 0))
            .collect();
    }
}

impl Inner {
    /// A fair claim (see the module docs).
    pub async fn claim(&self, p: ClaimParams) -> Result<Vec<Request>> {
        let now = truncate(p.now);
        if p.max == 0 {
            return Ok(Vec::new());
        }
        // A claim a crash undoes leaves the request queued: no WAL flush wait.
        let mut tx = Tx::start_relaxed(&self.pool).await?;
        match self.claim_in(&mut tx, &p, now).await {
            Ok((out, batch, cursor)) => {
                if out.is_empty() {
                    tx.rollback().await;
                    return Ok(out);
                }
                batch.commit(tx).await?;
                if let Some(c) = cursor {
                    self.cursors.set(&p.queue, c);
                }
                self.announce(out.iter().map(listen::entry).collect()).await;
                Ok(out)
            }
            Err(e) => tx.end(Err(e)).await,
        }
    }

    async fn claim_in(
        &self,
        tx: &mut Tx,
        p: &ClaimParams,
        now: coatcheck_core::Ts,
    ) -> Result<(Vec<Request>, Batch, Option<Cursor>)> {
        let rules = &*p.fairness;
        let max = p.max as usize;
        let mut out: Vec<Request> = Vec::with_capacity(max);
        let mut batch = Batch::default();
        let mut cursor = self.cursors.get(&p.queue);
        let mut moved = None;
        // Running counts per key, when caps apply.
        let mut running: HashMap<String, usize> = HashMap::new();
        let capped = rules.default_cap.is_some() || !rules.caps.is_empty();
        if capped {
            let key = fnv(&format!("coatcheck:caps:{}", p.queue)) as i64;
            tx.query(sql::LOCK_QUEUE_CAPS, &[&key]).await?;
            for row in tx.query(sql::KEYS_RUNNING, &[&p.queue]).await? {
                let k: String = row.try_get(0).map_err(internal)?;
                let n: i64 = row.try_get(1).map_err(internal)?;
                running.insert(k, n as usize);
            }
        }
        let key_limit = (max * 4 + 64) as i64;
        // The next level is at or below this.
        let mut at_most = i32::MAX;
        while out.len() < max {
            let rows = tx
                .query(sql::LEVEL_KEYS, &[&p.queue, &at_most, &key_limit])
                .await?;
            let Some(first) = rows.first() else { break };
            let priority: i32 = first.try_get(0).map_err(internal)?;
            let mut keys = Vec::with_capacity(rows.len());
            for row in &rows {
                keys.push(row.try_get::<_, String>(1).map_err(internal)?);
            }
            let mut room: HashMap<String, usize> = HashMap::new();
            for k in &keys {
                if let Some(cap) = rules.cap(k) {
                    let r = running.get(k).copied().unwrap_or(0);
                    room.insert(k.clone(), (cap as usize).saturating_sub(r));
                }
            }
            let mut dry: HashSet<String> = HashSet::new();
            loop {
                let need = max - out.len();
                let live: Vec<String> =
                    keys.iter().filter(|k| !dry.contains(*k)).cloned().collect();
                let here = cursor.as_ref().filter(|c| c.priority == priority);
                let slots = plan(&live, need, rules, &room, here);
                if slots.is_empty() {
                    break;
                }
                // How many of each key, in first-slot order.
                let mut wanted: Vec<(String, usize)> = Vec::new();
                for s in &slots {
                    match wanted.iter_mut().find(|(k, _)| *k == s.key) {
                        Some((_, n)) => *n += s.n,
                        None => wanted.push((s.key.clone(), s.n)),
                    }
                }
                let limits: Vec<i64> = wanted.iter().map(|(_, n)| *n as i64).collect();
                let params: Vec<Vec<&(dyn ToSql + Sync)>> = wanted
                    .iter()
                    .zip(&limits)
                    .map(|((k, _), n)| vec![&p.queue as &(dyn ToSql + Sync), &priority, k, &now, n])
                    .collect();
                let results = tx.query_many(sql::LOCK_KEY_HEADS, &params).await?;
                let mut heads: HashMap<String, VecDeque<Request>> = HashMap::new();
                for ((k, n), rows) in wanted.iter().zip(results) {
                    let mut got = VecDeque::with_capacity(rows.len());
                    for row in &rows {
                        let mut req = sql::row_to_request(row)?;
                        batch.loaded(&req);
                        if let Ok(events) =
                            rules::claim(&mut req, &p.worker_id, p.lease, new_lease_token(), now)
                        {
                            batch.update(&req, &events)?;
                            got.push_back(req);
                        }
                    }
                    if got.len() < *n {
                        dry.insert(k.clone());
                    }
                    heads.insert(k.clone(), got);
                }
                let mut progressed = false;
                for s in &slots {
                    let q = heads.get_mut(&s.key).expect("fetched");
                    let mut emitted = 0;
                    while emitted < s.n {
                        let Some(r) = q.pop_front() else { break };
                        out.push(r);
                        emitted += 1;
                    }
                    if emitted > 0 {
                        progressed = true;
                        if let Some(r) = room.get_mut(&s.key) {
                            *r = r.saturating_sub(emitted);
                        }
                        let c = Cursor {
                            priority,
                            key: s.key.clone(),
                            used: s.resumed + emitted as u32,
                        };
                        cursor = Some(c.clone());
                        moved = Some(c);
                    }
                }
                if !progressed || out.len() >= max {
                    break;
                }
            }
            match priority.checked_sub(1) {
                Some(next) => at_most = next,
                None => break,
            }
        }
        Ok((out, batch, moved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    fn flat(slots: &[Slot]) -> Vec<(String, usize)> {
        slots.iter().map(|s| (s.key.clone(), s.n)).collect()
    }

    fn s(k: &str, n: usize) -> (String, usize) {
        (k.to_string(), n)
    }

    #[test]
    fn turns_rotate_from_after_the_cursor() {
        let rules = FairnessRules::default();
        let none = HashMap::new();
        let p = plan(&keys(&["a", "b", "c"]), 4, &rules, &none, None);
        assert_eq!(flat(&p), [s("a", 1), s("b", 1), s("c", 1), s("a", 1)]);
        let c = Cursor {
            priority: 0,
            key: "a".into(),
            used: 1,
        };
        let p = plan(&keys(&["a", "b", "c"]), 4, &rules, &none, Some(&c));
        assert_eq!(flat(&p), [s("b", 1), s("c", 1), s("a", 1), s("b", 1)]);
    }

    #[test]
    fn weights_and_caps_shape_the_turns() {
        let rules = FairnessRules {
            weights: HashMap::from([("a".to_string(), 2)]),
            ..Default::default()
        };
        let room = HashMap::from([("b".to_string(), 1)]);
        let p = plan(&keys(&["a", "b"]), 6, &rules, &room, None);
        assert_eq!(flat(&p), [s("a", 2), s("b", 1), s("a", 2), s("a", 1)]);
        // A turn half used is finished first.
        let c = Cursor {
            priority: 0,
            key: "a".into(),
            used: 1,
        };
        let p = plan(&keys(&["a", "b"]), 2, &rules, &HashMap::new(), Some(&c));
        assert_eq!(flat(&p), [s("a", 1), s("b", 1)]);
        assert_eq!(p[0].resumed, 1);
        // Everything capped: nothing.
        let room = HashMap::from([("a".to_string(), 0), ("b".to_string(), 0)]);
        assert!(plan(&keys(&["a", "b"]), 3, &rules, &room, None).is_empty());
    }
}
