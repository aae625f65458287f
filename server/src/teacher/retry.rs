//! Retry policy for teacher requests: exponential backoff with jitter, `Retry-After`, and a
//! cool-down shared by all requests to one teacher so a burst of 429s backs everyone off.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

/// Backoff before retry number `retry` (1-based): base·2^(retry-1), capped, with jitter in [d/2, d].
pub fn backoff(retry: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let d = exp.min(cap);
    let half = d / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// Parses a `Retry-After` header: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(3600.0)));
        }
        return None;
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(Duration::from_secs(3600)))
}

/// A shared "do not send before" instant.
#[derive(Debug, Default)]
pub struct CoolDown {
    until: Mutex<Option<Instant>>,
}

impl CoolDown {
    /// Pushes the cool-down out to at least `now + d`.
    pub fn extend(&self, d: Duration) {
        let target = Instant::now() + d;
        let mut until = self.until.lock().unwrap();
        if until.is_none_or(|u| u < target) {
            *until = Some(target);
        }
    }

    /// Time left to wait, if any.
    pub fn remaining(&self) -> Option<Duration> {
        let until = *self.until.lock().unwrap();
        until.and_then(|u| u.checked_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// Waits until the cool-down has passed (it may be extended while waiting).
    pub async fn wait(&self) {
        while let Some(d) = self.remaining() {
            tokio::time::sleep(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for _ in 0..100 {
            let d1 = backoff(1, base, cap);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d4 = backoff(4, base, cap);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800));
            let d30 = backoff(30, base, cap);
            assert!(d30 >= Duration::from_secs(1) && d30 <= cap);
        }
    }

    #[test]
    fn parses_retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        let future = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(28), "{d:?}");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
    }
}
