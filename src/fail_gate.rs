//! Counting wrong credentials per client address, for every door that checks
//! a secret: the admin listener's token and each source's auth. A leaf module:
//! it knows addresses, counts and time, nothing of HTTP or of who uses it.
//!
//! The rule: an address may get its credentials wrong `burst` times; the wrong
//! try that empties its bucket blocks it until the bucket holds a try again
//! (one per `period`). While blocked, whatever it sends is refused unchecked,
//! so a right guess looks the same as a wrong one and the block cannot be used
//! to test secrets faster, nor to spend CPU on checking them. Only failures are
//! counted: a sender that authenticates never touches its bucket, and one
//! address's failures never block another address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::Clock as _;
use governor::middleware::StateInformationMiddleware;

/// Wrong credentials per client address; see the module doc.
pub struct FailGate {
    period: Duration,
    wrong: governor::DefaultKeyedRateLimiter<IpAddr, StateInformationMiddleware>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// How many addresses `blocked` holds, so that [`FailGate::check`] (on
    /// every authenticated request) takes no lock while nobody is blocked.
    blocked_len: AtomicUsize,
}

impl FailGate {
    /// `burst` wrong tries, then one more per `period`.
    pub fn new(burst: NonZeroU32, period: Duration) -> Self {
        let quota = governor::Quota::with_period(period).expect("a fail gate's period is not zero").allow_burst(burst);
        FailGate {
            period,
            wrong: governor::RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            blocked: Default::default(),
            blocked_len: AtomicUsize::new(0),
        }
    }

    /// `Err(wait)` while `ip` may not try a credential.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.blocked_len.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let blocked = self.blocked.lock().expect("fail gate lock poisoned");
        match blocked.get(&gate_key(ip)).map(|until| until.saturating_duration_since(Instant::now())) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Records a wrong credential from `ip`; `Some(wait)` when this one
    /// blocked the address (for the caller's log line). The try that empties
    /// the bucket blocks until the bucket holds a try again, so after the
    /// burst exactly one try per `period` is ever checked.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let key = gate_key(ip);
        let wait = match self.wrong.check_key(&key) {
            Ok(state) if state.remaining_burst_capacity() > 0 => return None,
            Ok(_) => self.period,
            Err(not_until) => not_until.wait_time_from(governor::clock::DefaultClock::default().now()).max(self.period),
        };
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("fail gate lock poisoned");
        blocked.retain(|_, until| *until > now);
        blocked.insert(key, now + wait);
        self.blocked_len.store(blocked.len(), Ordering::Release);
        Some(wait)
    }

    /// Forgets idle per-address counts and ended blocks so memory stays bounded.
    pub fn trim(&self) {
        self.wrong.retain_recent();
        self.wrong.shrink_to_fit();
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("fail gate lock poisoned");
        blocked.retain(|_, until| *until > now);
        self.blocked_len.store(blocked.len(), Ordering::Release);
    }
}

/// The address a FailGate counts under: IPv6 by its /64, the block one
/// machine or customer usually gets, so fresh addresses from it do not mean
/// fresh tries.
pub fn gate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_try_that_empties_the_burst_blocks_that_address_only() {
        let gate = FailGate::new(NonZeroU32::new(3).unwrap(), Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(gate.failed(a), None);
        assert_eq!(gate.failed(a), None);
        assert!(gate.check(a).is_ok(), "two wrong tries of three do not block");
        assert!(gate.failed(a).is_some(), "the third empties the bucket and blocks");
        let wait = gate.check(a).expect_err("blocked");
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60), "{wait:?}");
        assert!(gate.check(b).is_ok(), "another address is not blocked");
    }

    #[test]
    fn fail_gate_counts_ipv6_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(gate_key("2001:db8:1:2:aaaa::1".parse().unwrap()), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(gate_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7".parse::<IpAddr>().unwrap());
        let gate = FailGate::new(NonZeroU32::new(2).unwrap(), Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        gate.failed(a);
        gate.failed(a);
        assert!(gate.check("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap()).is_err(), "the whole /64 is blocked");
        assert!(gate.check("2001:db8:1:3::1".parse().unwrap()).is_ok(), "another /64 is not");
    }
}
