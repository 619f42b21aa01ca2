//! The PostgreSQL schema, embedded in the binary and applied at start under
//! an advisory lock, so ten nodes starting at once migrate once (README
//! "Several nodes: PostgreSQL").
//!
//! The hot table is `deliveries`: claims read it through the partial index
//! `deliveries_due`, which holds only unfinished rows, so finished
//! deliveries (the vast majority of the table) are never scanned by a
//! claim. Its autovacuum thresholds are set low here so the dead row
//! versions every claim and finish leaves are cleaned up while the table is
//! still small.

use tokio_postgres::Client;

use super::connect::neutral;
use crate::store::StoreError;

/// Any 64-bit number the nodes agree on: the advisory lock taken while migrating.
const MIGRATION_LOCK: i64 = 0x686f_6f6b_7472_6169; // "hooktrai"

/// Each entry is one schema version; never edit one that shipped, add one.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema. Times are timestamptz (microseconds); event ids
    // are ULID text, so ordering by id is ordering by receive time.
    r#"
    CREATE TABLE events (
        id           text PRIMARY KEY,
        source       text NOT NULL,
        status       text NOT NULL,
        received_at  timestamptz NOT NULL,
        method       text NOT NULL,
        content_type text NOT NULL,
        query        text NOT NULL,
        headers      text NOT NULL,          -- JSON object, secrets redacted
        remote_addr  text NOT NULL,
        body         bytea NOT NULL,         -- exactly as received
        payload_kind smallint NOT NULL,      -- 0 null, 1 the body is the JSON, 2 in payload
        payload      text
    );
    CREATE INDEX events_source ON events (source, id);
    CREATE INDEX events_unfinished ON events (status, id) WHERE status <> 'done';
    CREATE INDEX events_received ON events (received_at);

    CREATE TABLE deliveries (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id     text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
        handler      text NOT NULL,
        status       text NOT NULL,
        attempts     integer NOT NULL DEFAULT 0,
        budget_from  integer NOT NULL DEFAULT 0,
        next_at      timestamptz NOT NULL,   -- due time; lease expiry while running
        lease_owner  text,
        held         boolean NOT NULL DEFAULT false,
        queued_at    timestamptz NOT NULL,   -- start of the max_age clock
        updated_at   timestamptz NOT NULL,
        UNIQUE (event_id, handler)
    ) WITH (
        fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.02
    );
    -- rules::unfinished, spelt out so claims touch only unfinished rows.
    CREATE INDEX deliveries_due ON deliveries (handler, next_at)
        WHERE status IN ('pending', 'retrying', 'running');

    CREATE TABLE attempts (
        delivery_id  bigint NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
        number       integer NOT NULL,
        started_at   timestamptz NOT NULL,
        duration_ms  bigint NOT NULL,
        outcome      text NOT NULL,
        exit_code    integer,
        http_status  integer,
        error        text,
        output       text NOT NULL,
        PRIMARY KEY (delivery_id, number)
    );

    -- One row per live dedup key: the unique key is what makes two nodes
    -- receiving the same key at once store one event (INSERT … ON CONFLICT).
    CREATE TABLE dedup (
        source       text NOT NULL,
        key          text NOT NULL,
        event_id     text NOT NULL,
        expires_at   timestamptz NOT NULL,
        PRIMARY KEY (source, key)
    ) WITH (autovacuum_vacuum_scale_factor = 0.02);
    CREATE INDEX dedup_expiry ON dedup (expires_at);

    -- Requests counted but not stored (rejections, duplicates), per hour.
    CREATE TABLE counters (
        source       text NOT NULL,
        kind         text NOT NULL,
        hour         bigint NOT NULL,        -- unix seconds / 3600
        n            bigint NOT NULL,
        PRIMARY KEY (source, kind, hour)
    );

    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    "#,
    // 2: ordered processing (README "Ordered processing"; the claim is
    // described in `rules`, "Ordered claims"). A delivery's ordering key,
    // stored at insert. `deliveries_unkeyed` holds the unfinished deliveries
    // without a key, so the unordered part of a claim never walks a keyed
    // backlog; `deliveries_keyed` finds a key's next head in one probe.
    // `deliveries_due` stays as it was (every unfinished row) for counts.
    // `order_heads` holds one row per (handler, key) with work or blocked;
    // claims take its rows FOR UPDATE SKIP LOCKED, so nodes claim different keys.
    r#"
    ALTER TABLE deliveries ADD COLUMN order_key text;
    CREATE INDEX deliveries_unkeyed ON deliveries (handler, next_at)
        WHERE status IN ('pending', 'retrying', 'running') AND order_key IS NULL;
    CREATE INDEX deliveries_keyed ON deliveries (handler, order_key, event_id)
        WHERE order_key IS NOT NULL AND status IN ('pending', 'retrying', 'running');
    CREATE TABLE order_heads (
        handler      text NOT NULL,
        key          text NOT NULL,
        delivery_id  bigint NOT NULL,        -- the head: the key's next to run, or its blocker
        event_id     text NOT NULL,          -- the head's event
        due          timestamptz NOT NULL,   -- when to look at it again (its next_at as last seen)
        blocked      boolean NOT NULL DEFAULT false, -- the head failed and the handler blocks
        PRIMARY KEY (handler, key)
    ) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
    CREATE INDEX order_heads_due ON order_heads (handler, blocked, due);
    "#,
    // 3: counters and search (README "Counters", "Search").
    SCALE,
    // 4: an event's search words in a table of their own. Under the GIN
    // index in `events`, every change of an event's status (a claim, a
    // finish: a new row version, as `status` is indexed) inserted all its
    // words into the GIN index again, the most costly part of forwarding
    // (README "Several nodes: PostgreSQL"). Written once at insert, deleted
    // with the event (prune deletes both in one statement).
    r#"
    CREATE TABLE event_words (
        event_id text PRIMARY KEY,
        words    text[] NOT NULL
    );
    INSERT INTO event_words SELECT id, search_words FROM events WHERE search_words IS NOT NULL;
    CREATE INDEX event_words_search ON event_words USING gin (words);
    DROP INDEX events_search;
    ALTER TABLE events DROP COLUMN search_words;
    "#,
];

/// Migration 3 (README "Counters", "Search"):
///
/// - **Counters** are kept by statement-level triggers: every statement
///   that inserts, deletes or updates events or deliveries adds its
///   changes of state ([`crate::store::rules::tally_moves`], by receive hour
///   as [`crate::store::rules::tally_hour`]) to `tally_deltas`, summed per
///   statement, in that statement's transaction. So no way of changing a
///   state (ingest, claim, finish, release, takeover, replay, skip, prune,
///   import) can forget to count it. Deltas are rows appended, never a row
///   updated, so nodes committing side by side never wait on a hot counter
///   row; a daemon folds them into `tally_hours`/`tally_totals` about once a
///   second (one node at a time), and readers add the unfolded ones.
/// - A delivery carries its event's `source` and receive `hour`, so its
///   counts need no join (and a delivery deleted with its event is still
///   counted away).
/// - **Search**: `search_words` is [`crate::store::search::words`] of the
///   event's searchable text, computed in Rust at insert, under a GIN index;
///   it finds candidates and [`crate::store::search::contains`] decides.
pub(super) const SCALE: &str = r#"
    ALTER TABLE deliveries ADD COLUMN source text, ADD COLUMN hour bigint;
    UPDATE deliveries d SET source = e.source, hour = floor(extract(epoch FROM e.received_at) / 3600)::bigint
        FROM events e WHERE e.id = d.event_id;
    ALTER TABLE deliveries ALTER COLUMN source SET NOT NULL, ALTER COLUMN hour SET NOT NULL;
    ALTER TABLE events ADD COLUMN search_words text[];
    CREATE INDEX events_search ON events USING gin (search_words);
    -- The queue-depth metrics' oldest waiting delivery per handler and state.
    CREATE INDEX deliveries_waiting ON deliveries (handler, status, queued_at)
        WHERE status IN ('pending', 'retrying', 'running');

    CREATE TABLE tally_hours (
        hour    bigint NOT NULL,        -- the event's receive time, unix seconds / 3600, rounded down
        source  text NOT NULL,
        handler text NOT NULL,          -- '' counts the events themselves
        state   text NOT NULL,
        n       bigint NOT NULL,
        PRIMARY KEY (hour, source, handler, state)
    );
    CREATE TABLE tally_totals (
        source  text NOT NULL,
        handler text NOT NULL,
        state   text NOT NULL,
        n       bigint NOT NULL,
        PRIMARY KEY (source, handler, state)
    );
    -- Appended by the triggers, folded into the two above and deleted.
    CREATE TABLE tally_deltas (
        hour    bigint NOT NULL,
        source  text NOT NULL,
        handler text NOT NULL,
        state   text NOT NULL,
        n       bigint NOT NULL
    ) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
            autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);

    INSERT INTO tally_hours
        SELECT floor(extract(epoch FROM received_at) / 3600)::bigint AS h, source, '', status, count(*)
        FROM events GROUP BY h, source, status;
    INSERT INTO tally_hours SELECT hour, source, handler, status, count(*) FROM deliveries GROUP BY 1, 2, 3, 4;
    INSERT INTO tally_totals SELECT source, handler, state, sum(n) FROM tally_hours GROUP BY 1, 2, 3;

    CREATE FUNCTION hooktrail_tally_events() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO tally_deltas
                SELECT floor(extract(epoch FROM received_at) / 3600)::bigint, source, '', status, count(*) FROM new_rows GROUP BY 1, 2, 4;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO tally_deltas
                SELECT floor(extract(epoch FROM received_at) / 3600)::bigint, source, '', status, -count(*) FROM old_rows GROUP BY 1, 2, 4;
        ELSE
            INSERT INTO tally_deltas
                SELECT h, s, '', st, sum(n) FROM (
                    SELECT floor(extract(epoch FROM received_at) / 3600)::bigint AS h, source AS s, status AS st, 1 AS n FROM new_rows
                    UNION ALL
                    SELECT floor(extract(epoch FROM received_at) / 3600)::bigint, source, status, -1 FROM old_rows
                ) AS m GROUP BY h, s, st HAVING sum(n) <> 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_tally_insert AFTER INSERT ON events
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_events();
    CREATE TRIGGER events_tally_update AFTER UPDATE ON events
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_events();
    CREATE TRIGGER events_tally_delete AFTER DELETE ON events
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_events();

    CREATE FUNCTION hooktrail_tally_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO tally_deltas SELECT hour, source, handler, status, count(*) FROM new_rows GROUP BY 1, 2, 3, 4;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO tally_deltas SELECT hour, source, handler, status, -count(*) FROM old_rows GROUP BY 1, 2, 3, 4;
        ELSE
            INSERT INTO tally_deltas
                SELECT hour, source, handler, status, sum(n) FROM (
                    SELECT hour, source, handler, status, 1 AS n FROM new_rows
                    UNION ALL
                    SELECT hour, source, handler, status, -1 FROM old_rows
                ) AS m GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER deliveries_tally_insert AFTER INSERT ON deliveries
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_deliveries();
    CREATE TRIGGER deliveries_tally_update AFTER UPDATE ON deliveries
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_deliveries();
    CREATE TRIGGER deliveries_tally_delete AFTER DELETE ON deliveries
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION hooktrail_tally_deliveries();
"#;

/// Applies the migrations this database lacks, once however many nodes
/// start together: the first takes the advisory lock and migrates, the
/// others wait for it and then find nothing left to do.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(neutral)?;
    let result = migrate_locked(client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(neutral);
    result.and(unlocked.map(|_| ()))
}

async fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS hooktrail_schema (version integer NOT NULL); SET client_min_messages = warning")
        .await
        .map_err(neutral)?;
    let version = current(client).await?.unwrap_or(0);
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(newer(version, known));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = client.transaction().await.map_err(neutral)?;
        tx.batch_execute(sql).await.map_err(neutral)?;
        if *sql == SCALE {
            let n = super::scale::index_stored(&tx).await.map_err(neutral)?;
            if n > 0 {
                tracing::info!(events = n, "indexed the stored events for search");
            }
        }
        tx.execute("DELETE FROM hooktrail_schema", &[]).await.map_err(neutral)?;
        tx.execute("INSERT INTO hooktrail_schema (version) VALUES ($1)", &[&(i as i32 + 1)]).await.map_err(neutral)?;
        tx.commit().await.map_err(neutral)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    // Not a migration: every start puts this version's functions in place.
    super::functions::install(client).await.map_err(neutral)
}

/// The schema version, `None` before the first migration.
async fn current(client: &Client) -> Result<Option<i32>, StoreError> {
    let row = client.query_opt("SELECT max(version) FROM hooktrail_schema", &[]).await.map_err(neutral)?;
    Ok(row.and_then(|r| r.get::<_, Option<i32>>(0)))
}

fn newer(version: i32, known: i32) -> StoreError {
    StoreError::Corrupt(format!("database schema version {version} is newer than this hooktrail understands ({known}); upgrade hooktrail"))
}

/// For a command (not a daemon): the schema must be there and be one this
/// version reads; a command never creates or changes it.
pub async fn check(client: &Client) -> Result<(), String> {
    let exists: bool =
        client.query_one("SELECT to_regclass('hooktrail_schema') IS NOT NULL", &[]).await.map_err(|e| neutral(e).to_string())?.get(0);
    let version = if exists { current(client).await.map_err(|e| e.to_string())? } else { None };
    match version {
        None => Err("this database has no hooktrail schema yet; start `hooktrail serve` once (it migrates)".into()),
        Some(v) if v > MIGRATIONS.len() as i32 => Err(newer(v, MIGRATIONS.len() as i32).to_string()),
        Some(v) if v < MIGRATIONS.len() as i32 => {
            Err(format!("the database schema is at version {v}; start `hooktrail serve` of this version once to migrate it"))
        }
        Some(_) => Ok(()),
    }
}
