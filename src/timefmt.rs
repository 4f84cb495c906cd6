//! Timestamps for people: RFC 3339 in UTC, without panicking.
//!
//! `humantime::format_rfc3339*` asserts that a time is after the Unix
//! epoch, and certificate dates come from the network and from files: a
//! certificate valid from 1950 must be shown, not crash the process.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-22T18:00:00Z`, or seconds relative to the epoch for times
/// humantime cannot format.
pub fn rfc3339(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        // humantime also stops at the year 9999.
        Ok(d) if d.as_secs() < 253_402_300_800 => humantime::format_rfc3339_seconds(t).to_string(),
        Ok(d) => format!("{} s after 1970-01-01T00:00:00Z", d.as_secs()),
        Err(e) => format!("{} s before 1970-01-01T00:00:00Z", e.duration().as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_any_time() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86400)),
            "1970-01-02T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(10)),
            "10 s before 1970-01-01T00:00:00Z"
        );
        assert!(rfc3339(UNIX_EPOCH + Duration::from_secs(300_000_000_000)).contains("after"));
    }
}
