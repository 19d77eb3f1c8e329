//! Small statistics helpers for the benchmarks.
use std::time::Duration;

/// Latency summary of one series.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
    /// The slowest sample: a few stalls (a SYN retransmitted after a second) hide from the
    /// p99 of tens of thousands of samples, yet dominate their total time.
    pub max: Duration,
    /// Samples over [`STALL`].
    pub stalls: usize,
}

/// A sample slower than this is a stall (a retransmission, a timeout), not a slow path: every
/// mode measured here answers in well under a millisecond.
pub const STALL: Duration = Duration::from_millis(100);

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort();
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
        Self {
            n: sorted.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            mean,
            max: sorted[sorted.len() - 1],
            stalls: sorted.iter().filter(|d| **d > STALL).count(),
        }
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `a / b` as "N.NN×".
pub fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_counts_the_stalls_its_p99_hides() {
        let mut samples = vec![Duration::from_micros(50); 1000];
        samples[10] = Duration::from_millis(1003);
        samples[500] = Duration::from_millis(101);
        let summary = Summary::of(&samples);
        assert_eq!(summary.p99, Duration::from_micros(50));
        assert_eq!(summary.max, Duration::from_millis(1003));
        assert_eq!(summary.stalls, 2);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(
            (s.p50, s.p99, s.n),
            (Duration::from_millis(50), Duration::from_millis(99), 100)
        );
        let one = Summary::of(&[Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99), (Duration::from_millis(7), Duration::from_millis(7)));
    }
}
