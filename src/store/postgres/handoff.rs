//! One synchronous commit per key cycle (README "Several nodes:
//! PostgreSQL", "Ordered processing"): a finish batch that lets a key's
//! head go (it succeeded) claims the key's next delivery, when it is due,
//! in the same transaction, for the node that finished it, and after
//! `COMMIT` hands it to that node's processor through a queue kept here,
//! which [`crate::store::Store::claim_ordered`] serves first, with no round
//! trip and no commit. Without it a key's cycle waited for two commits in
//! series: the finish batch's (which moved the head on) and then the next
//! claim's (BENCHMARKS.md, "pgorder2").
//!
//! What keeps it to the rules:
//!
//! - **Order.** The pre-claim is a claim of the key's head row like any
//!   other, by the transaction that already locked that row (the finish
//!   batch locks a key's head before its delivery): it takes the key's
//!   oldest unfinished delivery, only when it is `pending` or `retrying`
//!   and due, and points the head at it with the lease just taken, as
//!   `ordering::claim_ordered_in` does. One delivery per key at a time, in
//!   event-id order, on every node.
//! - **Only after a success.** A head that failed for good (`block` must
//!   not pass on), or waits for a retry (it holds its key), hands nothing
//!   on: the key goes the ordinary way, through the next claim.
//! - **Room.** Only for a handler this process claims with `ordering`, and
//!   at most as many as the processor's last ordered claim left room for
//!   (its `limit` less what it got): the processor never holds more than
//!   it asked for. A claim takes at most its `limit` from the queue.
//! - **Leases.** A handed delivery's lease runs from its finish batch's
//!   `BEGIN`. The processor dates the lease from its own claim, later, and
//!   renews it every third of it; so a handed delivery is served only
//!   within [`fresh_for`] of that `BEGIN` (a sixth of the lease at most):
//!   the processor's view of the lease is then never more than a sixth
//!   late, and an attempt it lets begin still has a sixth of the lease in
//!   hand. One not served by then is released ([`sweeper`]), and so is one
//!   claimed with another lease than the claim asks for (a reload changed
//!   it: the processor would date and renew it by the new one).
//! - **Stopping and reloading.** What waits here is released (pending
//!   again, due at once, no attempt recorded, as the processor releases
//!   its claimed-ahead queue), never left to its lease: at `close`, and by
//!   the sweeper when no claim takes it (a handler a reload removed). A
//!   reload that turns `ordering` off makes the handler claim with
//!   [`crate::store::Store::claim`], which takes what waits here first and
//!   stops the pre-claims.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{connect, Shared};
use crate::store::Claimed;

/// The longest a handed delivery waits for its processor before it is
/// released (see [`fresh_for`]).
const MAX_WAIT: Duration = Duration::from_secs(1);
/// How often the sweeper looks for handed deliveries nobody took.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// How long a delivery handed with `lease` may wait to be served: a sixth
/// of the lease, at most [`MAX_WAIT`].
fn fresh_for(lease: Duration) -> Duration {
    (lease / 6).min(MAX_WAIT)
}

/// Who a delivery is handed to: a process's lease owner and the handler.
type Taker = (String, String);

/// The handed deliveries of this process, and what the processor's ordered
/// claims said about room.
#[derive(Default)]
pub(super) struct Handoff {
    takers: Mutex<HashMap<Taker, Hand>>,
}

struct Hand {
    /// The handler claims with `ordering` (the last claim was ordered): its
    /// finished heads may hand their keys' next deliveries on.
    ordered: bool,
    lease: Duration,
    /// How many more deliveries may be handed before the next claim: its
    /// `limit` less what it got, less what was handed or reserved since.
    room: usize,
    queue: VecDeque<Handed>,
    /// The last claim was served from the queue alone: the next one goes to
    /// the database too, so keys nobody finishes are claimed as well.
    database_next: bool,
}

struct Handed {
    claimed: Claimed,
    /// Served until then; released after.
    fresh_until: Instant,
    /// The lease it was claimed with: served only to a claim that asks for
    /// the same (the processor dates and renews it by its own).
    lease: Duration,
}

/// Room reserved for the pre-claims of one finish batch; what is not handed
/// goes back when it is dropped.
pub(super) struct Reserved<'a> {
    handoff: &'a Handoff,
    pub owner: String,
    pub handler: String,
    /// At most this many may be handed.
    pub n: usize,
    /// The lease to claim them with, in microseconds.
    pub lease_us: i64,
    lease: Duration,
}

impl Reserved<'_> {
    fn taker(&self) -> Taker {
        (self.owner.clone(), self.handler.clone())
    }

    /// The batch that claimed `claimed` committed: they wait for the
    /// processor, fresh until `began` (before the batch's `BEGIN`) plus
    /// [`fresh_for`] the lease.
    pub fn hand(mut self, claimed: Vec<Claimed>, began: Instant) {
        let mut takers = self.handoff.lock();
        let hand = takers.entry(self.taker()).or_insert_with(|| Hand::new(self.lease));
        hand.room += self.n.saturating_sub(claimed.len());
        self.n = 0;
        let (fresh_until, lease) = (began + fresh_for(self.lease), self.lease);
        hand.queue.extend(claimed.into_iter().map(|claimed| Handed { claimed, fresh_until, lease }));
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            let taker = self.taker();
            if let Some(hand) = self.handoff.lock().get_mut(&taker) {
                hand.room += self.n;
            }
        }
    }
}

impl Hand {
    fn new(lease: Duration) -> Hand {
        Hand { ordered: false, lease, room: 0, queue: VecDeque::new(), database_next: false }
    }

    /// Up to `limit` fresh handed deliveries claimed with `lease`, oldest
    /// first; stale ones stay for the sweeper. One claimed with another
    /// lease (a reload changed it) becomes stale at once.
    fn take(&mut self, limit: usize, now: Instant, lease: Duration) -> Vec<Claimed> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for mut h in self.queue.drain(..) {
            if h.lease != lease {
                h.fresh_until = now;
            }
            if out.len() < limit && h.fresh_until > now {
                out.push(h.claimed);
            } else {
                kept.push_back(h);
            }
        }
        self.queue = kept;
        out
    }

    fn fresh(&self, now: Instant, lease: Duration) -> usize {
        self.queue.iter().filter(|h| h.fresh_until > now && h.lease == lease).count()
    }
}

/// What an ordered claim does first.
pub(super) enum Serve {
    /// These were handed: return them alone (the next claim goes to the
    /// database too).
    Handed(Vec<Claimed>),
    /// Claim from the database, at most `limit` less `queued` (then take
    /// what waits here, [`Handoff::after_claim`]).
    Database { queued: usize },
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Taker, Hand>> {
        self.takers.lock().expect("handoff lock poisoned")
    }

    /// An ordered claim by `owner` for `handler` with room for `limit`:
    /// marks the handler ordered, and serves the handed deliveries first,
    /// alone, every other call.
    pub fn ordered_claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Serve {
        let now = Instant::now();
        let mut takers = self.lock();
        let hand = takers.entry((owner.to_string(), handler.to_string())).or_insert_with(|| Hand::new(lease));
        hand.ordered = true;
        hand.lease = lease;
        let queued = hand.fresh(now, lease);
        if queued > 0 && !hand.database_next {
            let handed = hand.take(limit, now, lease);
            hand.room = limit - handed.len();
            hand.database_next = true;
            return Serve::Handed(handed);
        }
        hand.database_next = false;
        Serve::Database { queued: queued.min(limit) }
    }

    /// After an ordered claim's database part brought `got`: adds what was
    /// handed meanwhile, up to `limit` in all, and keeps the room left.
    pub fn after_claim(&self, owner: &str, handler: &str, limit: usize, mut got: Vec<Claimed>) -> Vec<Claimed> {
        let now = Instant::now();
        let mut takers = self.lock();
        if let Some(hand) = takers.get_mut(&(owner.to_string(), handler.to_string())) {
            let lease = hand.lease;
            got.extend(hand.take(limit.saturating_sub(got.len()), now, lease));
            hand.room = limit.saturating_sub(got.len());
        }
        got
    }

    /// A plain claim by `owner` for `handler` (its `ordering` is off, or it
    /// never had one): no more pre-claims for it; what was handed before
    /// is served first, up to `limit`.
    pub fn plain_claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Vec<Claimed> {
        let mut takers = self.lock();
        let Some(hand) = takers.get_mut(&(owner.to_string(), handler.to_string())) else { return Vec::new() };
        hand.ordered = false;
        hand.room = 0;
        let out = hand.take(limit, Instant::now(), lease);
        if hand.queue.is_empty() {
            takers.remove(&(owner.to_string(), handler.to_string()));
        }
        out
    }

    /// Room for up to `want` pre-claims for `owner`'s `handler`, if it is
    /// claimed with `ordering` and has room, and the store is not closing.
    pub fn reserve(&self, owner: &str, handler: &str, want: usize) -> Option<Reserved<'_>> {
        let mut takers = self.lock();
        let taker = (owner.to_string(), handler.to_string());
        let hand = takers.get_mut(&taker)?;
        let n = want.min(hand.room);
        if !hand.ordered || n == 0 {
            return None;
        }
        hand.room -= n;
        let lease = hand.lease;
        Some(Reserved { handoff: self, owner: taker.0, handler: taker.1, n, lease_us: super::micros(lease), lease })
    }

    #[cfg(test)]
    fn push_for_test(&self, owner: &str, handler: &str, claimed: Claimed, lease: Duration) {
        let mut takers = self.lock();
        let hand = takers.entry((owner.to_string(), handler.to_string())).or_insert_with(|| Hand::new(lease));
        hand.queue.push_back(Handed { claimed, fresh_until: Instant::now() + fresh_for(lease), lease });
    }

    /// The handed deliveries no claim served in time (all of them when
    /// `all`), by owner, taken out of the queues.
    fn take_unserved(&self, all: bool) -> HashMap<String, Vec<i64>> {
        let now = Instant::now();
        let mut out: HashMap<String, Vec<i64>> = HashMap::new();
        let mut takers = self.lock();
        for ((owner, _), hand) in takers.iter_mut() {
            let (gone, kept): (VecDeque<Handed>, VecDeque<Handed>) = hand.queue.drain(..).partition(|h| all || h.fresh_until <= now);
            hand.queue = kept;
            out.entry(owner.clone()).or_default().extend(gone.into_iter().map(|h| h.claimed.delivery_id));
        }
        takers.retain(|_, hand| hand.ordered || !hand.queue.is_empty());
        out.retain(|_, ids| !ids.is_empty());
        out
    }
}

/// Releases what waits here unserved (everything when `all`), as
/// [`crate::store::Store::release`] does; how many went back.
pub(super) async fn release_unserved(shared: &Shared, all: bool) -> u64 {
    let mut n = 0;
    for (owner, ids) in shared.handoff.take_unserved(all) {
        // One transaction each, as the processor releases what it held:
        // a release locks its delivery, then the key's head and the event.
        for id in ids {
            match release(shared, &owner, id).await {
                Ok(k) => n += k,
                Err(e) => tracing::warn!(error = %e, delivery = id, "could not release a handed delivery; it runs when its lease expires"),
            }
        }
    }
    if n > 0 {
        if all {
            tracing::info!(deliveries = n, "released the deliveries finishes had handed on and no attempt took; due again at once");
        } else {
            tracing::debug!(deliveries = n, "released handed-on deliveries no claim took in time");
        }
        shared.new_work();
    }
    n
}

/// [`super::release_in`] in a transaction of its own, again after a deadlock.
async fn release(shared: &Shared, owner: &str, id: i64) -> Result<u64, crate::store::StoreError> {
    let mut client = shared.pool.get().await.map_err(connect::pool_error)?;
    let mut tries = 0;
    loop {
        let tx = client.transaction().await.map_err(connect::neutral)?;
        let result = match super::release_in(&tx, owner, &[id]).await {
            Ok(n) => tx.commit().await.map(|()| n),
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => return Ok(n),
            Err(e) if connect::retryable(&e) && tries < super::RETRIES => tries += 1,
            Err(e) => return Err(connect::neutral(e)),
        }
    }
}

/// Releases handed deliveries no claim took within [`fresh_for`] their
/// lease (a handler a reload removed, a processor too busy to claim).
pub(super) async fn sweeper(shared: std::sync::Arc<Shared>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        release_unserved(&shared, false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_delivery_waits_a_sixth_of_its_lease_at_most_one_second() {
        assert_eq!(fresh_for(Duration::from_secs(3)), Duration::from_millis(500));
        assert_eq!(fresh_for(Duration::from_secs(60)), MAX_WAIT);
    }

    fn claimed(id: i64) -> Claimed {
        Claimed {
            delivery_id: id,
            event_id: crate::store::EventId(ulid::Ulid::new()),
            source: "s".into(),
            handler: "h".into(),
            attempt: 1,
            attempt_in_budget: 1,
            received_at: chrono::Utc::now(),
            first_queued_at: chrono::Utc::now(),
            content_type: String::new(),
            query: String::new(),
            headers: serde_json::Value::Null,
            body: bytes::Bytes::new(),
            payload: serde_json::Value::Null,
            payload_text: None,
        }
    }

    #[test]
    fn a_delivery_handed_with_another_lease_than_the_claim_asks_is_not_served_but_released() {
        let h = Handoff::default();
        h.push_for_test("o", "h", claimed(1), Duration::from_secs(5));
        h.push_for_test("o", "h", claimed(2), Duration::from_secs(60));
        // A reload made the lease 60 s: the one leased for 5 s goes back.
        let Serve::Handed(got) = h.ordered_claim("o", "h", 10, Duration::from_secs(60)) else { panic!("the queue is served first") };
        assert_eq!(got.iter().map(|c| c.delivery_id).collect::<Vec<_>>(), [2]);
        assert_eq!(h.take_unserved(false), HashMap::from([("o".to_string(), vec![1])]));
    }

    #[test]
    fn room_comes_from_the_last_ordered_claim_and_only_an_ordered_handler_has_any() {
        let h = Handoff::default();
        assert!(h.reserve("o", "h", 5).is_none(), "never claimed: no room");
        assert!(matches!(h.ordered_claim("o", "h", 10, Duration::from_secs(60)), Serve::Database { queued: 0 }));
        let got = h.after_claim("o", "h", 10, Vec::new());
        assert!(got.is_empty());
        let r = h.reserve("o", "h", 50).expect("room");
        assert_eq!(r.n, 10, "no more than the claim had room for");
        assert!(h.reserve("o", "h", 1).is_none(), "all of it reserved");
        drop(r);
        assert_eq!(h.reserve("o", "h", 3).expect("given back").n, 3);
        assert!(h.plain_claim("o", "h", 10, Duration::from_secs(60)).is_empty());
        assert!(h.reserve("o", "h", 1).is_none(), "ordering off: no pre-claims");
    }
}
