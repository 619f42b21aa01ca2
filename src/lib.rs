//! hooktrail: receive webhooks, store each one durably before answering, then
//! process them with user-configured handlers, recording every attempt.
//!
//! Data flow, upstream to downstream:
//! 1. [`ingest`] accepts a request on the public listener, routes it by path to
//!    a source, checks method, address, rate, auth, type and size, and decodes
//!    the body into a normalized JSON view.
//! 2. [`store`] commits the event and one delivery per routed handler in one
//!    group-committed transaction; only then does ingest answer 200.
//! 3. `process` claims due deliveries with a lease, runs a `handlers` kind
//!    (shell, http, crm_upsert), and records the attempt and the next state.
//! 4. [`ops`] reads the store for metrics, health, the admin API and the page.
//!
//! [`config`] is loaded and validated once (and on SIGHUP) into a frozen struct.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod fail_gate;
pub mod handlers;
pub mod http_server;
pub mod ingest;
pub mod metrics;
pub mod ops;
pub mod process;
pub mod store;
pub mod template;
pub mod tls;
