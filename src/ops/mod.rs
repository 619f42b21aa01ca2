//! Operations: metrics now; the admin listener (health, metrics, admin API,
//! event-log page) reads the store and never sits on the public listener.

pub mod metrics;
