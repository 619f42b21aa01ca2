//! The event-log page's logins, held server-side so logout revokes them. A
//! leaf of `ops`: the admin listener creates, checks and revokes sessions;
//! nothing here knows HTTP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::crypto;

/// How long a page login lasts.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Live sessions kept at most; past it the one closest to expiry is dropped.
/// Only someone with the token can create one, so this only bounds a runaway script.
const MAX_SESSIONS: usize = 10_000;

/// The page's logins. A session is a random id held in this process's memory
/// (never derived from the token), so logout revokes it for good: a copied
/// cookie stops working at once. A restart ends every session, and so does a
/// change of the admin token (each session remembers the token's digest).
///
/// The map is keyed by the SHA-256 of the cookie value, so looking one up
/// leaks nothing usable about live ids through timing.
pub(super) struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
}

struct Session {
    expires: Instant,
    /// SHA-256 of the admin token it was created under.
    token: [u8; 32],
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

impl Sessions {
    pub(super) fn new() -> Self {
        Sessions { live: Default::default() }
    }

    /// Starts a session under `token`; returns the cookie value.
    pub(super) fn create(&self, token: &[u8]) -> String {
        use rand::RngCore as _;
        let mut id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let value = hex::encode(id);
        let now = Instant::now();
        let mut live = self.live.lock().expect("admin sessions lock poisoned");
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(first) = live.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                live.remove(&first);
            }
        }
        live.insert(sha256(value.as_bytes()), Session { expires: now + SESSION_TTL, token: sha256(token) });
        value
    }

    /// Whether `value` is a live session created under `token`.
    pub(super) fn valid(&self, token: &[u8], value: &str) -> bool {
        let live = self.live.lock().expect("admin sessions lock poisoned");
        live.get(&sha256(value.as_bytes())).is_some_and(|s| s.expires > Instant::now() && crypto::secret_eq(&s.token, &sha256(token)))
    }

    /// Ends the session `value`, if it is one.
    pub(super) fn revoke(&self, value: &str) {
        self.live.lock().expect("admin sessions lock poisoned").remove(&sha256(value.as_bytes()));
    }

    /// Forgets expired sessions.
    pub(super) fn trim(&self) {
        let now = Instant::now();
        self.live.lock().expect("admin sessions lock poisoned").retain(|_, s| s.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_bound_to_the_token_and_revocable() {
        let sessions = Sessions::new();
        let v = sessions.create(b"tok");
        assert_eq!(v.len(), 64);
        assert!(!v.contains("tok"));
        assert_ne!(v, sessions.create(b"tok"), "each login gets its own id");
        assert!(sessions.valid(b"tok", &v));
        assert!(!sessions.valid(b"other", &v), "a new token ends old sessions");
        assert!(!sessions.valid(b"tok", &v[1..]));
        assert!(!sessions.valid(b"tok", "1.deadbeef"));
        sessions.revoke(&v);
        assert!(!sessions.valid(b"tok", &v), "revoked for good");
        sessions.live.lock().unwrap().values_mut().for_each(|s| s.expires = Instant::now());
        sessions.trim();
        assert!(sessions.live.lock().unwrap().is_empty(), "expired sessions are forgotten");
    }
}
