//! Group commit of attempt records on PostgreSQL (README "Several nodes:
//! PostgreSQL"): every [`Store::finish`] and [`Store::started`] waiting in
//! this process goes into one transaction, a few statements over arrays
//! (`unnest`) whatever their number, rather than a transaction each. The
//! transaction is one statement, `hooktrail_finish` (`functions`), one
//! round trip: no transaction stays open while this process waits for a CPU.
//!
//! Nobody waits on these writes but the attempt's own task, and a
//! transaction costs the database the same few statements (and the counter
//! triggers one run per statement) for one delivery as for a hundred.
//!
//! Durability, and why this keeps at-least-once: a finish answers only
//! after the `COMMIT` of the batch that holds it returned, with
//! `synchronous_commit = on`; until then nothing in this process treats the
//! delivery as done (the backlog, the wake-up of other work, the caller's
//! retries all follow the answer). If the process or the database dies
//! before that commit, the delivery is still `running` under this
//! process's lease: the lease expires, another claim takes it over and runs
//! it again, with the lost attempt recorded as interrupted. A batch that
//! fails is answered with its error for every finish in it (each caller
//! retries), never with success. Begun marks only shape the history after a
//! crash: a batch of marks alone commits with `synchronous_commit = off`.
//!
//! The rules of a finish are those of a single one: only the lease holder
//! of the same attempt (owner and attempt number) moves a delivery; its
//! record replaces what stands for that attempt (a takeover's
//! "interrupted" note it outlived); a stale holder's record is kept only
//! where none stands. Deadlocks with other nodes are avoided by taking
//! locks in one order: a key's head row before its delivery (as claims
//! do), deliveries by id, then events by id.

use super::*;

/// Finishes (and begun marks) committed in one transaction at most.
const MAX_FINISH_BATCH: usize = 256;
/// Batches of one process committing side by side: while one waits for its
/// commit, the next gathers what arrives meanwhile.
pub(super) const FINISHERS: usize = 2;

/// A write waiting for a finisher.
pub(super) enum Write {
    /// [`Store::started`]: the attempt of `delivery_id` (held by `owner`) began.
    Started {
        owner: String,
        delivery_id: i64,
    },
    Finish(Finished),
}

/// A write and who waits for its answer: for a finish, the delivery's new
/// status when this process still held it (and so decided it).
pub(super) struct Queued {
    pub write: Write,
    pub reply: oneshot::Sender<Result<Option<DeliveryStatus>, StoreError>>,
}

/// How long a begun mark may wait for a batch. An attempt that ends
/// sooner never has its mark written (its finish clears it in the same
/// transaction); a longer one has it within this, along with the finishes
/// of other attempts, or alone.
pub(super) const MARK_WITHIN: Duration = Duration::from_millis(50);

/// What the finishers take their batches from: the queue, and the begun
/// marks waiting for their time (oldest first).
pub(super) struct Inbox {
    rx: mpsc::UnboundedReceiver<Queued>,
    marks: Vec<(tokio::time::Instant, Queued)>,
}

impl Inbox {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<Queued>) -> Inbox {
        Inbox { rx, marks: Vec::new() }
    }
}

/// A finisher: takes everything queued (up to [`MAX_FINISH_BATCH`]
/// finishes) and commits it in one transaction; until the channel closes
/// (`close`) and is drained.
pub(super) async fn finisher(shared: Arc<Shared>, inbox: Arc<tokio::sync::Mutex<Inbox>>) {
    while let Some(batch) = next_batch(&inbox).await {
        commit_finishes(&shared, batch).await;
    }
}

/// The next batch: the finishes queued, with the begun marks that are due
/// or whose delivery finishes in it. `None` once the queue closed and
/// everything in it went.
async fn next_batch(inbox: &tokio::sync::Mutex<Inbox>) -> Option<Vec<Queued>> {
    let mut inbox = inbox.lock().await;
    let inbox = &mut *inbox;
    let mut batch: Vec<Queued> = Vec::new();
    loop {
        let due = inbox.marks.first().map(|(at, _)| *at + MARK_WITHIN);
        // `None`: a mark's time came first; `Some(None)`: the queue closed.
        let got = match due {
            None => Some(inbox.rx.recv().await),
            Some(due) => tokio::time::timeout_at(due, inbox.rx.recv()).await.ok(),
        };
        let closed = matches!(got, Some(None));
        if let Some(Some(q)) = got {
            sort_in(q, &mut batch, &mut inbox.marks);
        }
        while batch.len() < MAX_FINISH_BATCH {
            match inbox.rx.try_recv() {
                Ok(q) => sort_in(q, &mut batch, &mut inbox.marks),
                Err(_) => break,
            }
        }
        let finishing: std::collections::HashSet<i64> = batch
            .iter()
            .filter_map(|q| match &q.write {
                Write::Finish(f) => Some(f.delivery_id),
                Write::Started { .. } => None,
            })
            .collect();
        let now = tokio::time::Instant::now();
        let (go, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut inbox.marks).into_iter().partition(|(at, q)| {
            closed || *at + MARK_WITHIN <= now || matches!(&q.write, Write::Started { delivery_id, .. } if finishing.contains(delivery_id))
        });
        inbox.marks = wait;
        batch.extend(go.into_iter().map(|(_, q)| q));
        if !batch.is_empty() {
            return Some(batch);
        }
        if closed {
            return None;
        }
    }
}

/// A finish goes into the batch, a begun mark among those waiting.
fn sort_in(q: Queued, batch: &mut Vec<Queued>, marks: &mut Vec<(tokio::time::Instant, Queued)>) {
    match q.write {
        Write::Started { .. } => marks.push((tokio::time::Instant::now(), q)),
        Write::Finish(_) => batch.push(q),
    }
}

/// Commits a batch and answers everyone in it. If it fails for a reason
/// other than the database being away, each write is tried alone, so one
/// bad record cannot refuse its neighbours.
async fn commit_finishes(shared: &Shared, batch: Vec<Queued>) {
    let writes: Vec<&Write> = batch.iter().map(|q| &q.write).collect();
    let answers = match store_finishes(shared, &writes).await {
        Ok(moved) => moved.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) if batch.len() == 1 || matches!(e, StoreError::Unavailable(_) | StoreError::ShuttingDown) => {
            let message = e.to_string();
            batch.iter().map(|_| Err(super::again(&e, &message))).collect()
        }
        Err(_) => {
            let mut answers = Vec::with_capacity(batch.len());
            for w in &writes {
                answers.push(store_finishes(shared, &[*w]).await.map(|mut m| m.remove(0)));
            }
            answers
        }
    };
    for (q, answer) in batch.into_iter().zip(answers) {
        // The caller may have gone (a begun mark dropped when its attempt
        // ended first); the write stands either way.
        let _ = q.reply.send(answer);
    }
}

/// One transaction for `writes`, again after a deadlock or serialization
/// failure; the new status of each finish's delivery where it moved (in
/// the order of `writes`), and the backlog and wake-ups that follow.
async fn store_finishes(shared: &Shared, writes: &[&Write]) -> Result<Vec<Option<DeliveryStatus>>, StoreError> {
    let batch = Batch::new(writes);
    let client = shared.pool.get().await.map_err(connect::pool_error)?;
    let mut tries = 0;
    let (moved, heads) = loop {
        match batch.call(&client).await {
            Ok(done) => break done,
            Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
            Err(e) => return Err(connect::neutral(e)),
        }
    };
    let finished = moved.values().filter(|s| !rules::unfinished(**s)).count() as i64;
    shared.add_backlog(-finished);
    // A delivery due again, or a key whose head moved on: its next delivery
    // may be due now, and nothing else would wake a processor for it (the
    // slot it freed was offered before this commit).
    if heads > 0 || moved.values().any(|s| *s == DeliveryStatus::Pending) {
        shared.new_work();
    }
    Ok(writes
        .iter()
        .map(|w| match w {
            Write::Started { .. } => None,
            Write::Finish(f) => moved.get(&(f.delivery_id, f.attempt as i32)).copied(),
        })
        .collect())
}

/// A batch as the columns of its statements, each sorted by delivery id.
#[derive(Default)]
struct Batch {
    /// Begun marks whose finish is not in the same batch (a finish clears
    /// the mark anyway): delivery and owner.
    mark_id: Vec<i64>,
    mark_owner: Vec<String>,
    id: Vec<i64>,
    attempt: Vec<i32>,
    owner: Vec<String>,
    status: Vec<&'static str>,
    retry_at: Vec<Option<DateTime<Utc>>>,
    started_at: Vec<DateTime<Utc>>,
    duration_ms: Vec<i64>,
    outcome: Vec<&'static str>,
    exit_code: Vec<Option<i32>>,
    http_status: Vec<Option<i32>>,
    error: Vec<Option<String>>,
    output: Vec<String>,
}

impl Batch {
    fn new(writes: &[&Write]) -> Batch {
        let mut finishes: Vec<&Finished> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Finish(f) => Some(f),
                Write::Started { .. } => None,
            })
            .collect();
        finishes.sort_by_key(|f| (f.delivery_id, f.attempt));
        // One record per attempt: a statement may not write a row twice.
        finishes.dedup_by_key(|f| (f.delivery_id, f.attempt));
        let finishing: std::collections::HashSet<i64> = finishes.iter().map(|f| f.delivery_id).collect();
        let mut marks: Vec<(i64, &str)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Started { owner, delivery_id } if !finishing.contains(delivery_id) => Some((*delivery_id, owner.as_str())),
                _ => None,
            })
            .collect();
        marks.sort_unstable();
        marks.dedup();
        let mut b = Batch::default();
        for (id, owner) in marks {
            b.mark_id.push(id);
            b.mark_owner.push(owner.to_string());
        }
        for f in finishes {
            b.id.push(f.delivery_id);
            b.attempt.push(f.attempt as i32);
            b.owner.push(f.owner.clone());
            b.status.push(rules::after_attempt(f.next).as_str());
            b.retry_at.push(match f.next {
                Next::RetryAt(t) => Some(t),
                Next::Succeeded | Next::Failed | Next::Released => None,
            });
            b.started_at.push(f.started_at);
            b.duration_ms.push(i64::try_from(f.duration_ms).unwrap_or(i64::MAX));
            b.outcome.push(f.outcome.as_str());
            b.exit_code.push(f.exit_code);
            b.http_status.push(f.http_status.map(i32::from));
            b.error.push(f.error.clone());
            b.output.push(f.output.clone());
        }
        b
    }

    /// The transaction, one statement (`hooktrail_finish`, see
    /// `functions`): the head rows' follow-up, the begun marks, the
    /// deliveries moved on with their attempts recorded, the events locked
    /// and given their new status ([`rules::event_status`]). Any error rolls
    /// the whole back. Returns the new status of each (delivery, attempt)
    /// that moved, and how many key heads it moved on.
    async fn call(&self, client: &deadpool_postgres::Object) -> Result<(HashMap<(i64, i32), DeliveryStatus>, u64), tokio_postgres::Error> {
        let finishes: [&(dyn ToSql + Sync); 12] = [
            &self.id,
            &self.attempt,
            &self.owner,
            &self.status,
            &self.retry_at,
            &self.started_at,
            &self.duration_ms,
            &self.outcome,
            &self.exit_code,
            &self.http_status,
            &self.error,
            &self.output,
        ];
        let args = super::functions::FinishArgs { finishes, mark_id: &self.mark_id, mark_owner: &self.mark_owner };
        super::functions::finish_batch(client, args).await
    }
}
