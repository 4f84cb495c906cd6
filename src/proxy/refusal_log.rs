//! Rate-limited refusal lines: a flood of refused connections must not
//! become a flood of log lines.
//!
//! Every refusal is counted in metrics, but writing one `info` line per
//! refusal lets a handshake flood or a slowloris turn into hundreds of
//! lines a second, a denial of service on the log pipeline. So each tunnel
//! keeps a token bucket per result label (`denied`, `handshake_error`,
//! ...; a bounded set, where the reason text is not: it can carry a SPIFFE
//! ID an attacker chose): [`BURST`] lines at once, then one per
//! [`REFILL`]. A refusal over that is not written but counted, and one
//! summary line per [`SUMMARY_INTERVAL`] says how many were left out and
//! why, e.g. `refused 4,211 more connections: handshake timed out after
//! 10s (last 10 s)`. The summary is written by a timer, so it comes when
//! the flood stops too, and by the drop of the tunnel (a reload or
//! shutdown), so no count is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::metrics::ConnResult;

/// Lines written at once before the limit applies.
pub const BURST: u32 = 5;
/// One more line may be written per this much time.
pub const REFILL: Duration = Duration::from_secs(1);
/// How often the refusals left out are summed up in one line.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The refusal lines of one tunnel.
#[derive(Debug)]
pub struct RefusalLog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    tunnel: String,
    /// `inbound`, `outbound`, or `admin` for the admin endpoint.
    kind: &'static str,
    buckets: Mutex<HashMap<ConnResult, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    /// Lines that may be written now, up to [`BURST`].
    tokens: u32,
    /// When the last token was added (or the bucket made).
    refilled: Instant,
    /// Refusals left out since the last summary.
    left_out: u64,
    /// When the first of them happened.
    since: Instant,
    /// The reason of the last one left out, and whether they all had it.
    last_reason: String,
    mixed: bool,
    /// A summary timer is pending.
    scheduled: bool,
}

impl RefusalLog {
    /// The lines of tunnel `tunnel` of kind `kind` (`inbound`, `outbound`;
    /// `admin` for the admin endpoint's own refusals).
    pub fn new(tunnel: &str, kind: &'static str) -> Self {
        Self {
            shared: Arc::new(Shared {
                tunnel: tunnel.to_string(),
                kind,
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether the refusal may be written now. When not, it is counted
    /// for the next summary, which a timer writes.
    pub fn allow(&self, result: ConnResult, reason: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.shared.lock();
        let bucket = buckets.entry(result).or_insert_with(|| Bucket {
            tokens: BURST,
            refilled: now,
            left_out: 0,
            since: now,
            last_reason: String::new(),
            mixed: false,
            scheduled: false,
        });
        let earned = now.saturating_duration_since(bucket.refilled).as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(BURST);
            bucket.refilled = if bucket.tokens == BURST {
                now
            } else {
                bucket.refilled + REFILL * earned
            };
        }
        if bucket.tokens > 0 {
            bucket.tokens -= 1;
            return true;
        }
        if bucket.left_out == 0 {
            bucket.since = now;
            bucket.mixed = false;
        } else if bucket.last_reason != reason {
            bucket.mixed = true;
        }
        bucket.left_out += 1;
        if bucket.last_reason != reason {
            reason.clone_into(&mut bucket.last_reason);
        }
        if !bucket.scheduled {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                // No timer to write the summary: write the line itself.
                bucket.left_out -= 1;
                return true;
            };
            bucket.scheduled = true;
            let shared = Arc::clone(&self.shared);
            runtime.spawn(async move {
                tokio::time::sleep(SUMMARY_INTERVAL).await;
                shared.summarize(result, true);
            });
        }
        false
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnResult, Bucket>> {
        // Every update leaves the map whole: a panic cannot corrupt it.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the summary of `result`'s refusals left out, if any.
    fn summarize(&self, result: ConnResult, from_timer: bool) {
        let (left_out, since, reason, mixed) = {
            let mut buckets = self.lock();
            let Some(bucket) = buckets.get_mut(&result) else {
                return;
            };
            if from_timer {
                bucket.scheduled = false;
            }
            if bucket.left_out == 0 {
                return;
            }
            let left_out = std::mem::take(&mut bucket.left_out);
            (
                left_out,
                bucket.since,
                bucket.last_reason.clone(),
                bucket.mixed,
            )
        };
        // Whole seconds: the timer fires one interval after the first.
        let over = humantime::format_duration(Duration::from_secs(
            since.elapsed().as_secs_f64().round().max(1.0) as u64,
        ));
        let what = if mixed {
            format!("{result:?}, the last: {reason}")
        } else {
            reason
        };
        info!(
            tunnel = %self.tunnel,
            kind = self.kind,
            result = ?result,
            left_out,
            "refused {} more connections: {what} (last {over})",
            thousands(left_out)
        );
    }
}

impl Drop for RefusalLog {
    /// A tunnel that stops (reload, shutdown) writes what its timers have
    /// not written yet.
    fn drop(&mut self) {
        let results: Vec<ConnResult> = self.shared.lock().keys().copied().collect();
        for result in results {
            self.shared.summarize(result, false);
        }
    }
}

/// `4211` as `4,211`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Everything written to it, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// The refusals a summary line says it left out.
    fn summed(text: &str) -> u64 {
        text.lines()
            .filter_map(|l| l.split("refused ").nth(1)?.split(" more").next())
            .map(|n| n.replace(',', "").parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4211), "4,211");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_writes_a_few_lines_then_one_summary_and_loses_no_count() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let log = RefusalLog::new("api", "inbound");

        // 1000 refusals at once: the burst is written, the rest summed up.
        let written = (0..1000)
            .filter(|_| log.allow(ConnResult::handshake_error, "handshake timed out"))
            .count();
        assert_eq!(written, BURST as usize);
        // Another result has its own bucket.
        assert!(log.allow(ConnResult::denied, "not allowed"));
        assert_eq!(summed(&out.text()), 0, "no summary before the interval");

        // The flood stops: the timer writes the summary anyway.
        tokio::time::sleep(SUMMARY_INTERVAL + Duration::from_millis(10)).await;
        let text = out.text();
        assert!(
            text.contains("refused 995 more connections: handshake timed out (last 10s)"),
            "{text}"
        );
        assert!(
            text.contains("tunnel=api") && text.contains("left_out=995"),
            "{text}"
        );
        assert_eq!(summed(&text), 995);

        // A steady flood for 30 s, 100 a second: about one line a second
        // and a summary every 10 s, adding up to every refusal.
        let mut written = 0;
        for i in 0..3000 {
            let reason = if i % 2 == 0 { "bad data" } else { "timed out" };
            if log.allow(ConnResult::handshake_error, reason) {
                written += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(written <= BURST as usize + 31, "{written} lines written");
        drop(log);
        let text = out.text();
        assert_eq!(summed(&text) + written as u64, 995 + 3000, "{text}");
        assert!(
            text.contains("more connections: handshake_error, the last: "),
            "{text}"
        );
        assert!(text.lines().count() < 60, "{text}");
    }
}
