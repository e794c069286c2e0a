//! The delay before a task's next attempt: exponential in the number of
//! attempts so far, capped, with jitter that is computed from the task id and
//! the attempt number, so every node applying the log computes the same delay.

use crate::scheduler::task::{Backoff, TaskId};

/// The delay after attempt `attempt_number` (1 for the first) failed.
///
/// The base delay is `initial_ms * multiplier^(attempt_number - 1)`, capped at
/// `max_ms`; the result is "equal jitter": half the base plus a pseudo-random
/// part of the other half, so retries of many tasks spread out but a delay is
/// never below half its base.
pub fn retry_delay_ms(backoff: &Backoff, task: TaskId, attempt_number: u32) -> u64 {
    let mut base_ms = backoff.initial_ms;
    for _ in 1..attempt_number {
        // In u128, so a large delay saturates at the cap instead of wrapping
        // or shrinking (u64::MAX * m / 1000 would).
        let next_ms = u128::from(base_ms) * u128::from(backoff.multiplier_milli) / 1_000;
        if next_ms >= u128::from(backoff.max_ms) {
            base_ms = backoff.max_ms;
            break;
        }
        // A multiplier of 1 (or a zero delay) no longer grows: stop early,
        // so huge attempt numbers cost nothing.
        if next_ms <= u128::from(base_ms) {
            break;
        }
        base_ms = next_ms as u64;
    }
    let base_ms = base_ms.min(backoff.max_ms);
    let half_ms = base_ms / 2;
    let jitter_range_ms = base_ms - half_ms;
    if jitter_range_ms == 0 {
        return base_ms;
    }
    half_ms + mix(task.0 ^ (u64::from(attempt_number) << 48)) % (jitter_range_ms + 1)
}

/// SplitMix64's finalizer: a fixed, well-spread hash of one word.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff { initial_ms: 1_000, max_ms: 30_000, multiplier_milli: 2_000 };

    #[test]
    fn delays_grow_exponentially_within_equal_jitter_bounds() {
        for task in (0..200).map(TaskId) {
            for (attempt, base_ms) in [
                (1, 1_000),
                (2, 2_000),
                (3, 4_000),
                (4, 8_000),
                (5, 16_000),
                (6, 30_000),
                (20, 30_000),
            ] {
                let delay_ms = retry_delay_ms(&BACKOFF, task, attempt);
                assert!(
                    (base_ms / 2..=base_ms).contains(&delay_ms),
                    "task {task} attempt {attempt}: {delay_ms} outside [{}, {base_ms}]",
                    base_ms / 2
                );
            }
        }
    }

    #[test]
    fn jitter_is_deterministic_and_spreads_tasks() {
        let delays: Vec<u64> = (0..100).map(|id| retry_delay_ms(&BACKOFF, TaskId(id), 3)).collect();
        assert_eq!(
            delays,
            (0..100).map(|id| retry_delay_ms(&BACKOFF, TaskId(id), 3)).collect::<Vec<_>>()
        );
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() > 90,
            "jitter spreads 100 tasks over many delays, got {}",
            distinct.len()
        );
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let huge =
            Backoff { initial_ms: u64::MAX / 2, max_ms: u64::MAX, multiplier_milli: 100_000 };
        // Saturates at the cap at once rather than looping u32::MAX times.
        let delay_ms = retry_delay_ms(&huge, TaskId(1), u32::MAX);
        assert!(
            delay_ms >= u64::MAX / 2,
            "equal jitter keeps at least half the capped base: {delay_ms}"
        );
        let zero = Backoff { initial_ms: 0, max_ms: 0, multiplier_milli: 1_000 };
        assert_eq!(retry_delay_ms(&zero, TaskId(1), 5), 0);
    }
}
