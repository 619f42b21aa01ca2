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
        let name = format!("ht_{}", ulid::Ulid::new().to_string().to_lowercase());
        admin(&server, &format!("CREATE DATABASE {name}"));
        PgDatabase { server, name }
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

/// Runs one statement on the server's `postgres` database, on a thread of
/// its own (callers may be inside a runtime, or not).
fn admin(server: &str, sql: &str) {
    let url = format!("{server}/postgres?sslmode=disable");
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        rt.block_on(async move {
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
        })
    })
    .join()
    .expect("the PostgreSQL admin thread panicked");
}
