//! A fresh PostgreSQL database per test (README "Tests"). The server is
//! named by `HOOKTRAIL_TEST_PG_URL` (`postgres://user:password@host:port`,
//! no database); `.ci/postgres.sh start` starts a throw-away one and prints
//! that URL. A test that asked for PostgreSQL fails, never skips, when the
//! variable is unset or the server is out of reach.

use std::time::Duration;

/// The variable naming the test server.
pub const SERVER_VAR: &str = "HOOKTRAIL_TEST_PG_URL";

/// A database made for one test, dropped (with its connections) afterwards.
pub struct PgDatabase {
    server: String,
    name: String,
}

impl PgDatabase {
    /// Creates an empty database on the test server.
    pub fn create() -> PgDatabase {
        let server = std::env::var(SERVER_VAR).unwrap_or_else(|_| {
            panic!(
                "this test runs against PostgreSQL and {SERVER_VAR} is not set: start a server with \
                 `bash .ci/postgres.sh start` and export the URL it prints"
            )
        });
        Self::create_on(&server)
    }

    /// Creates an empty database on the server at `server`.
    pub fn create_on(server: &str) -> PgDatabase {
        let server = server.to_string();
        let name = format!("ht_{}", ulid::Ulid::new().to_string().to_lowercase());
        admin(&server, &format!("CREATE DATABASE {name}"));
        PgDatabase { server, name }
    }

    /// The first column of the first row of `sql` on this database, as text
    /// (`None` for no row or NULL): for a test that must wait for a state
    /// only the database shows.
    pub fn scalar(&self, sql: &str) -> Option<String> {
        let url = self.url();
        let sql = format!("SELECT ({sql})::text");
        on_a_thread(move || async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connecting to the test database");
            let driver = tokio::spawn(conn);
            let row = client.query_opt(&sql, &[]).await.unwrap_or_else(|e| panic!("`{sql}`: {e}"));
            drop(client);
            let _ = driver.await;
            row.and_then(|r| r.get::<_, Option<String>>(0))
        })
    }

    /// The URL hooktrail is given (`storage.url_env`).
    pub fn url(&self) -> String {
        format!("{}/{}?sslmode=disable", self.server, self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            admin(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// Runs `f`'s future to its end on a thread and runtime of its own (callers
/// may be inside a runtime, or not).
fn on_a_thread<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    std::thread::spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f()))
        .join()
        .expect("the PostgreSQL test thread panicked")
}

/// Runs one statement on the server's `postgres` database.
fn admin(server: &str, sql: &str) {
    let url = format!("{server}/postgres?sslmode=disable");
    let sql = sql.to_string();
    on_a_thread(move || async move {
        {
            let mut tries = 0;
            let (client, conn) = loop {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok(c) => break c,
                    Err(e) if tries < 20 => {
                        tries += 1;
                        eprintln!("connecting to the test PostgreSQL ({SERVER_VAR}): {e}; trying again");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => panic!("cannot reach the test PostgreSQL named by {SERVER_VAR}: {e}"),
                }
            };
            let driver = tokio::spawn(conn);
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("`{sql}` on the test PostgreSQL: {e}"));
            drop(client);
            let _ = driver.await;
        }
    })
}
