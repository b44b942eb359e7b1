//! The waits between fetches (DESIGN.md §5): poll interval with jitter, and
//! full-jitter backoff after failures. Pure: the random draw is a parameter
//! (`unit`, uniform in [0, 1)), so tests pick it and the fleet's request
//! rate can be reasoned about without a clock or an RNG.
//!
//! Both the fetch loop and the subscription stream use these; they sit
//! outside `agent` and `source` so that neither imports the other.

use std::time::Duration;

/// A uniform draw in [0, 1) from the process's RNG, for callers that do not
/// pick their own.
pub(crate) fn draw() -> f64 {
    fastrand::f64()
}

/// Full-jitter backoff after `failures` (≥ 1) failures in a row: uniform in
/// [0, cap], the cap doubling from `interval` (2·`interval` after the first
/// failure, 4·`interval` after the second, …) up to `max_backoff`. Starting
/// at 2·`interval` makes the mean wait (cap / 2) never shorter than the poll
/// interval, so an outage never raises a fleet's request rate.
///
/// A server's `Retry-After` is honoured, capped at `max_backoff` (DESIGN.md
/// §5), and jittered: as a plain floor it would turn every short draw into
/// the same wait, and agents told "come back at 12:00:00" would come back
/// together. The wait is uniform in a window as wide as the jitter (the
/// cap, at most half of `max_backoff`) that starts at `Retry-After` and
/// slides down so that it ends at `max_backoff` at the latest. So a
/// `Retry-After` up to half of `max_backoff` is waited in full, a longer
/// one is cut to the cap and still spread below it, and no value however
/// large holds up the next fetch (and with it a revocation) for longer than
/// `max_backoff`. A short one never makes the wait shorter than the plain
/// backoff's. `max_backoff` under `interval` counts as `interval`.
pub(crate) fn backoff(
    interval: Duration,
    max_backoff: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let ceiling = max_backoff.max(interval);
    let cap = interval
        .saturating_mul(2u32.saturating_pow(failures.min(30)))
        .min(ceiling);
    let unit = unit.clamp(0.0, 1.0);
    let plain = scale(cap, unit).min(cap);
    match retry_after {
        None => plain,
        Some(retry_after) => {
            let width = cap.min(ceiling / 2);
            let start = retry_after.min(ceiling.saturating_sub(width));
            // Both grow with the same draw, so this is still spread; and a
            // short Retry-After never makes the wait shorter than without.
            plain.max(start.saturating_add(scale(width, unit).min(width)))
        }
    }
}

/// The next poll: `base` ± uniform jitter, never under a tenth of `base`.
pub(crate) fn jittered(base: Duration, jitter: Duration, unit: f64) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let offset = scale(jitter, unit.clamp(0.0, 1.0) * 2.0);
    base.saturating_add(offset)
        .saturating_sub(jitter)
        .max(base / 10)
}

/// The next poll after an answer: `poll` (the jittered interval, or
/// resync), but no sooner than the answer's `Cache-Control: max-age`, which
/// counts only up to `max_backoff` (DESIGN.md §5): a cache in front of the
/// list serves the same answer until then, and no max-age, however long,
/// holds up a revocation for longer than a failure could.
pub(crate) fn poll_after(
    poll: Duration,
    max_age: Option<Duration>,
    max_backoff: Duration,
) -> Duration {
    max_age.map_or(poll, |age| poll.max(age.min(max_backoff)))
}

/// `d · factor`, saturating: `Duration::mul_f64` panics on overflow.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    //! The waits of the fetch loop: what a fleet's request rate depends on.

    use super::*;

    fn draws(n: usize, mut f: impl FnMut(f64) -> Duration) -> (Duration, Duration, Duration) {
        let v: Vec<Duration> = (0..n).map(|_| f(draw())).collect();
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        let mean = v.iter().sum::<Duration>() / n as u32;
        (min, mean, max)
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn full_jitter_with_a_doubling_cap() {
        for (failures, cap) in [(1, 4), (2, 8), (3, 10), (10, 10), (u32::MAX, 10)] {
            let cap = S(cap);
            let (min, mean, max) = draws(20_000, |u| backoff(S(2), S(10), failures, None, u));
            assert!(
                max <= cap,
                "failures {failures}: {max:?} over the cap {cap:?}"
            );
            // Full jitter: the whole range is used, the mean is half the cap.
            assert!(min < cap / 20, "failures {failures}: min {min:?}");
            assert!(max > cap.mul_f64(0.95), "failures {failures}: max {max:?}");
            let half = cap.as_secs_f64() / 2.0;
            assert!(
                (mean.as_secs_f64() - half).abs() < half * 0.05,
                "failures {failures}: mean {mean:?}"
            );
        }
        // The ends of the draw are the ends of the range.
        assert_eq!(backoff(S(2), S(10), 1, None, 0.0), Duration::ZERO);
        assert_eq!(backoff(S(2), S(10), 1, None, 1.0), S(4));
    }

    #[test]
    fn an_outage_never_raises_the_request_rate() {
        // The mean wait after any number of failures is at least the interval.
        for failures in 1..8 {
            let (_, mean, _) = draws(20_000, |u| backoff(S(60), S(300), failures, None, u));
            assert!(
                mean.as_secs_f64() >= 60.0 * 0.95,
                "failures {failures}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn retry_after_below_the_cap_is_honoured_in_full_and_spread() {
        let ra = S(3);
        let (min, _, max) = draws(20_000, |u| backoff(S(2), S(10), 1, Some(ra), u));
        assert!(min >= ra, "{min:?}");
        assert!(max <= ra + S(4), "{max:?}");
        // Not all at the same instant: spread over the first cap after it.
        assert!(max - min > S(3), "{min:?}..{max:?}");
        // Many failures later the jitter is wide, and Retry-After still a floor.
        let (min, _, max) = draws(20_000, |u| backoff(S(60), S(300), 6, Some(S(30)), u));
        assert!(min >= S(30) && max <= S(300), "{min:?}..{max:?}");
        assert!(max - min > S(100), "{min:?}..{max:?}");
    }

    #[test]
    fn retry_after_is_capped_at_max_backoff_and_still_spread() {
        // DESIGN.md §5: Retry-After is honoured, capped at max_backoff. A
        // 30 s Retry-After with a 10 s max_backoff waits at most 10 s; the
        // full-jitter window slides down to end at the cap, so a fleet told
        // the same Retry-After does not come back in lockstep.
        for ra in [S(30), S(10), S(9), Duration::MAX] {
            let (min, _, max) = draws(20_000, |u| backoff(S(2), S(10), 1, Some(ra), u));
            assert!(max <= S(10), "{ra:?}: {max:?} over max_backoff");
            assert!(min >= S(6), "{ra:?}: {min:?}");
            assert!(max - min > S(3), "{ra:?}: {min:?}..{max:?}");
        }
        // A max_backoff under the interval: the interval is the ceiling.
        let (_, _, max) = draws(2_000, |u| backoff(S(20), S(10), 1, Some(S(3600)), u));
        assert!(max <= S(20), "{max:?}");
    }

    #[test]
    fn a_short_retry_after_never_shortens_the_backoff() {
        for failures in 1..10 {
            for i in 0..=100 {
                let u = f64::from(i) / 100.0;
                let plain = backoff(S(2), S(60), failures, None, u);
                for ra in [Duration::ZERO, S(1), S(5)] {
                    let told = backoff(S(2), S(60), failures, Some(ra), u);
                    assert!(told >= plain, "{failures} {u} {ra:?}: {told:?} < {plain:?}");
                }
            }
        }
    }

    #[test]
    fn jitter_is_uniform_around_the_interval() {
        let (min, mean, max) = draws(20_000, |u| jittered(S(2), S(1), u));
        assert!(min >= S(1) && max <= S(3), "{min:?}..{max:?}");
        assert!((mean.as_secs_f64() - 2.0).abs() < 0.05, "{mean:?}");
        assert_eq!(jittered(S(2), Duration::ZERO, 0.5), S(2));
        // A jitter as large as the interval never makes a zero wait.
        let (min, _, _) = draws(20_000, |u| jittered(S(1), S(1), u));
        assert!(min >= Duration::from_millis(100), "{min:?}");
        assert_eq!(jittered(S(1), S(1), 0.0), Duration::from_millis(100));
    }

    #[test]
    fn max_age_spaces_polls_up_to_max_backoff() {
        assert_eq!(poll_after(S(60), None, S(300)), S(60));
        assert_eq!(poll_after(S(60), Some(S(10)), S(300)), S(60));
        assert_eq!(poll_after(S(60), Some(S(120)), S(300)), S(120));
        assert_eq!(poll_after(S(60), Some(S(3600)), S(300)), S(300));
        assert_eq!(poll_after(S(60), Some(Duration::MAX), S(300)), S(300));
        // resync beyond max_backoff stays resync: max-age only lengthens.
        assert_eq!(poll_after(S(600), Some(S(3600)), S(300)), S(600));
    }

    #[test]
    fn huge_values_saturate_instead_of_panicking() {
        assert!(jittered(Duration::MAX, Duration::MAX, 1.0) >= Duration::MAX / 10);
        let _ = backoff(
            Duration::MAX,
            Duration::MAX,
            u32::MAX,
            Some(Duration::MAX),
            1.0,
        );
    }
}
