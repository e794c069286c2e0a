//! Periodic tasks: a task template that the cluster submits again on a
//! cadence, a cron expression or a fixed interval, like Nomad's periodic
//! jobs, Kubernetes' CronJobs or Celery beat, but without a beat process to
//! lose.
//!
//! The time of the next fire is part of the replicated state. The leader
//! proposes a fire once that time has come, and `apply` creates the task
//! and moves the cursor in the same entry, so a new leader neither repeats
//! a fire its predecessor committed nor skips one it did not (the failure
//! of Dkron's jobs after an election, D#1210, and of two Celery beats).
//! Each fired task carries the idempotency key `periodic/<name>/<fire_ms>`,
//! which names the periodic task and the tick it was fired for.
//!
//! Cron expressions have the five fields of Vixie cron (minute, hour, day
//! of month, month, day of week), with lists, ranges, steps, month and day
//! names and the `@hourly`-style macros, and are read in UTC. When both day
//! fields are restricted, a day matching either runs, as in Vixie cron.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scheduler::task::{TaskId, TaskSpec};

/// The shortest interval of an `Every` cadence.
pub const PERIOD_MS_MIN: u64 = 1_000;
/// The longest interval of an `Every` cadence.
pub const PERIOD_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
/// The longest name of a periodic task, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// The longest cron expression, in bytes.
pub const CRON_BYTES_MAX: usize = 256;
/// How far ahead a cron expression's next time is looked for. An
/// expression that matches no time that soon (`0 0 30 2 *`) is refused.
const CRON_SEARCH_YEARS_MAX: i64 = 9;

const MINUTE_MS: u64 = 60_000;
const DAY_MINUTES: i64 = 24 * 60;

/// When a periodic task fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cadence {
    /// At the times a cron expression matches, in UTC.
    Cron(CronExpr),
    /// Every `period_ms`, counted from when the periodic task was put.
    Every { period_ms: u64 },
}

impl Cadence {
    /// Checks the cadence's own bounds.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Cadence::Cron(_) => Ok(()),
            Cadence::Every { period_ms } => {
                if !(PERIOD_MS_MIN..=PERIOD_MS_MAX).contains(period_ms) {
                    return Err(format!(
                        "the interval is {period_ms} ms; it must be from {PERIOD_MS_MIN} ms to {PERIOD_MS_MAX} ms"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The first fire time strictly after `after_ms`, for a periodic task
    /// put at `anchor_ms`; `None` if there is none within the search bound.
    pub fn next_after(&self, anchor_ms: u64, after_ms: u64) -> Option<u64> {
        match self {
            Cadence::Cron(cron) => cron.next_after(after_ms),
            Cadence::Every { period_ms } => {
                let period_ms = (*period_ms).max(1);
                if after_ms < anchor_ms {
                    return anchor_ms.checked_add(period_ms);
                }
                let n_periods = (after_ms - anchor_ms) / period_ms + 1;
                anchor_ms.checked_add(n_periods.checked_mul(period_ms)?)
            }
        }
    }
}

impl fmt::Display for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cadence::Cron(cron) => write!(f, "cron '{}'", cron.text),
            Cadence::Every { period_ms } => write!(f, "every {period_ms} ms"),
        }
    }
}

/// What a fire does while the task of the fire before has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overlap {
    /// Fires anyway: runs may overlap.
    Allow,
    /// Skips the fire (Nomad's `prohibit_overlap`, Kubernetes' `Forbid`).
    Forbid,
}

/// A periodic task as the replicated state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Periodic {
    pub name: String,
    pub cadence: Cadence,
    pub overlap: Overlap,
    /// The spec of every task it fires; `schedule` is `Now`, and no
    /// idempotency key is set (each fire sets its own).
    pub spec: TaskSpec,
    /// When it was put (or last replaced); an `Every` cadence counts from here.
    pub anchor_ms: u64,
    /// The next fire time; `None` when the cadence has no more.
    pub next_fire_ms: Option<u64>,
    /// The task of the last fire that created one.
    pub last_task: Option<TaskId>,
    /// The time of the last fire, whether it created a task or was skipped.
    pub last_fire_ms: Option<u64>,
    pub fired_total: u64,
    /// Fires that created no task: the last one's task was still running
    /// under `Overlap::Forbid`, or the queue was full.
    pub skipped_total: u64,
}

impl Periodic {
    /// The idempotency key of the task fired at `fire_ms`.
    pub fn fire_key(&self, fire_ms: u64) -> String {
        format!("periodic/{}/{fire_ms}", self.name)
    }
}

/// Checks a periodic task's name: 1 to [`NAME_BYTES_MAX`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`, so that it reads well in the keys of
/// the tasks it fires.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "a periodic task's name must be 1 to {NAME_BYTES_MAX} bytes; this one is {}",
            name.len()
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c))) {
        return Err(format!(
            "a periodic task's name may hold letters, digits, '-', '_' and '.', not {bad:?}"
        ));
    }
    Ok(())
}

/// A parsed cron expression. Serialized as its text, and parsed again when
/// read back, so a stored expression is checked like a new one.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CronExpr {
    text: String,
    /// Bit n set: minute n matches.
    minutes: u64,
    hours: u32,
    /// Bit n set: day n of the month (1-31) matches.
    days_of_month: u32,
    /// Bit n set: month n (1-12) matches.
    months: u16,
    /// Bit n set: weekday n (0 = Sunday) matches.
    days_of_week: u8,
    /// The day-of-month field was `*` (or a step over all of it).
    any_day_of_month: bool,
    any_day_of_week: bool,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.text)
    }
}

impl TryFrom<String> for CronExpr {
    type Error = String;

    fn try_from(text: String) -> Result<CronExpr, String> {
        CronExpr::parse(&text)
    }
}

impl From<CronExpr> for String {
    fn from(cron: CronExpr) -> String {
        cron.text
    }
}

const MONTH_NAMES: [&str; 12] =
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl CronExpr {
    /// Parses five fields or a macro, and refuses an expression that
    /// matches no time in the next [`CRON_SEARCH_YEARS_MAX`] years from
    /// any start.
    pub fn parse(text: &str) -> Result<CronExpr, String> {
        if text.len() > CRON_BYTES_MAX {
            return Err(format!(
                "the cron expression is {} bytes, more than {CRON_BYTES_MAX}",
                text.len()
            ));
        }
        let expanded = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            macro_name if macro_name.starts_with('@') => {
                return Err(format!(
                    "unknown cron macro {macro_name:?}; known: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
                ));
            }
            fields => fields,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week); {text:?} has {}",
                fields.len()
            ));
        };
        let (minutes, _) = parse_field(minute, "minute", 0, 59, &[])?;
        let (hours, _) = parse_field(hour, "hour", 0, 23, &[])?;
        let (days_of_month, any_day_of_month) =
            parse_field(day_of_month, "day of month", 1, 31, &[])?;
        let (months, _) = parse_field(month, "month", 1, 12, &MONTH_NAMES)?;
        // 7 is Sunday too.
        let (days_of_week, any_day_of_week) =
            parse_field(day_of_week, "day of week", 0, 7, &DAY_NAMES)?;
        let days_of_week = ((days_of_week | (days_of_week >> 7)) & 0x7f) as u8;
        let cron = CronExpr {
            text: text.to_owned(),
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week,
            any_day_of_month,
            any_day_of_week,
        };
        // Every day-of-month a month can hold is tried over a leap cycle's
        // worth of years, so an expression that fails here never fires.
        if cron.next_after(0).is_none() {
            return Err(format!("the cron expression {text:?} matches no time"));
        }
        Ok(cron)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after_ms` that the expression
    /// matches, on a whole minute; `None` if none within
    /// [`CRON_SEARCH_YEARS_MAX`] years.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let mut minute = i64::try_from(after_ms / MINUTE_MS).ok()? + 1;
        let (start_year, _, _) = civil_from_days(minute.div_euclid(DAY_MINUTES));
        loop {
            let day = minute.div_euclid(DAY_MINUTES);
            let (year, month, day_of_month) = civil_from_days(day);
            if year > start_year + CRON_SEARCH_YEARS_MAX {
                return None;
            }
            if self.months & (1 << month) == 0 {
                let (next_year, next_month) =
                    if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                minute = days_from_civil(next_year, next_month, 1) * DAY_MINUTES;
                continue;
            }
            if !self.day_matches(day, day_of_month) {
                minute = (day + 1) * DAY_MINUTES;
                continue;
            }
            let minute_of_day = minute.rem_euclid(DAY_MINUTES);
            let (hour, minute_of_hour) = (minute_of_day / 60, minute_of_day % 60);
            if self.hours & (1 << hour) == 0 {
                minute = day * DAY_MINUTES + (hour + 1) * 60;
                continue;
            }
            if self.minutes & (1 << minute_of_hour) == 0 {
                minute += 1;
                continue;
            }
            return u64::try_from(minute).ok()?.checked_mul(MINUTE_MS);
        }
    }

    fn day_matches(&self, day: i64, day_of_month: u32) -> bool {
        let weekday = (day + 4).rem_euclid(7); // 1970-01-01 was a Thursday.
        let by_month = self.days_of_month & (1 << day_of_month) != 0;
        let by_week = self.days_of_week & (1 << weekday) != 0;
        match (self.any_day_of_month, self.any_day_of_week) {
            (true, true) => true,
            (true, false) => by_week,
            (false, true) => by_month,
            (false, false) => by_month || by_week,
        }
    }
}

/// Parses one field into a bit set over `low..=high`, and whether it
/// started with `*` (so it restricts nothing, for the day rule).
fn parse_field(
    field: &str,
    what: &str,
    low: u32,
    high: u32,
    names: &[&str],
) -> Result<(u64, bool), String> {
    let value = |token: &str| -> Result<u32, String> {
        if let Some(idx) = names.iter().position(|name| name.eq_ignore_ascii_case(token)) {
            // Month names count from 1, day names from 0: both from `low`.
            return Ok(idx as u32 + low);
        }
        let number: u32 = token
            .parse()
            .map_err(|_| format!("the {what} field has {token:?}, which is not a number"))?;
        if !(low..=high).contains(&number) {
            return Err(format!("the {what} field has {number}, outside {low}-{high}"));
        }
        Ok(number)
    };
    let mut bits: u64 = 0;
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|step| *step >= 1)
                    .ok_or_else(|| format!("the {what} field has a bad step in {item:?}"))?;
                (range, step)
            }
            None => (item, 1),
        };
        let (first, last) = if range == "*" {
            (low, high)
        } else if let Some((first, last)) = range.split_once('-') {
            (value(first)?, value(last)?)
        } else {
            let first = value(range)?;
            // `5/15` means from 5 to the end, by 15.
            (first, if item.contains('/') { high } else { first })
        };
        if first > last {
            return Err(format!("the {what} field has the backward range {item:?}"));
        }
        for n in (first..=last).step_by(step as usize) {
            bits |= 1 << n;
        }
    }
    Ok((bits, field.starts_with('*')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01: year, month (1-12), day (1-31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix milliseconds of a UTC date and time.
    fn utc(year: i64, month: u32, day: u32, hour: u64, minute: u64) -> u64 {
        days_from_civil(year, month, day) as u64 * 86_400_000 + hour * 3_600_000 + minute * 60_000
    }

    fn next(expr: &str, after_ms: u64) -> Option<u64> {
        CronExpr::parse(expr).unwrap().next_after(after_ms)
    }

    #[test]
    fn dates_convert_both_ways() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for day in [-800_000, -1, 0, 59, 11_016, 11_017, 20_000, 2_932_896] {
            let (year, month, day_of_month) = civil_from_days(day);
            assert_eq!(days_from_civil(year, month, day_of_month), day, "day {day}");
        }
        // 2026-12-05 is a Saturday.
        let saturday = days_from_civil(2026, 12, 5);
        assert_eq!((saturday + 4).rem_euclid(7), 6);
    }

    #[test]
    fn cron_finds_the_next_matching_minute() {
        let t = utc(2026, 12, 5, 21, 7) + 30_000;
        assert_eq!(next("* * * * *", t), Some(utc(2026, 12, 5, 21, 8)));
        assert_eq!(next("*/15 * * * *", t), Some(utc(2026, 12, 5, 21, 15)));
        assert_eq!(next("7 * * * *", t), Some(utc(2026, 12, 5, 22, 7)));
        assert_eq!(next("0 9 * * MON-FRI", t), Some(utc(2026, 12, 7, 9, 0)));
        assert_eq!(next("30 2 1 * *", t), Some(utc(2027, 1, 1, 2, 30)));
        assert_eq!(next("@yearly", t), Some(utc(2027, 1, 1, 0, 0)));
        assert_eq!(next("@weekly", t), Some(utc(2026, 12, 6, 0, 0)));
        assert_eq!(next("0 0 29 2 *", t), Some(utc(2028, 2, 29, 0, 0)));
        assert_eq!(next("0 12 * feb,Aug sun", t), Some(utc(2027, 2, 7, 12, 0)));
        assert_eq!(next("5/20 1-2 * * *", t), Some(utc(2026, 12, 6, 1, 5)));
        // 7 is Sunday as well as 0.
        assert_eq!(next("0 0 * * 7", t), next("0 0 * * 0", t));
        // Both day fields restricted: either matches (the 13th, or a Friday).
        assert_eq!(next("0 0 13 * 5", t), Some(utc(2026, 12, 11, 0, 0)));
        // Exactly on a match: strictly after.
        assert_eq!(next("0 * * * *", utc(2026, 12, 5, 21, 0)), Some(utc(2026, 12, 5, 22, 0)));
    }

    #[test]
    fn cron_refuses_bad_expressions_with_a_reason() {
        let cases = [
            ("* * * *", "5 fields"),
            ("60 * * * *", "outside 0-59"),
            ("* 24 * * *", "outside 0-23"),
            ("* * 0 * *", "outside 1-31"),
            ("* * * 13 *", "outside 1-12"),
            ("* * * * 8", "outside 0-7"),
            ("*/0 * * * *", "bad step"),
            ("5-1 * * * *", "backward"),
            ("x * * * *", "not a number"),
            ("@often", "unknown cron macro"),
            ("0 0 30 2 *", "matches no time"),
            ("0 0 31 4,6,9,11 *", "matches no time"),
        ];
        for (expr, expected) in cases {
            let err = CronExpr::parse(expr).unwrap_err();
            assert!(err.contains(expected), "{expr}: {err}");
        }
        assert!(CronExpr::parse(&"* ".repeat(200)).unwrap_err().contains("bytes"));
    }

    #[test]
    fn cron_round_trips_through_its_text() {
        let cron = CronExpr::parse("*/5 9-17 * * 1-5").unwrap();
        let text: String = cron.clone().into();
        assert_eq!(CronExpr::try_from(text).unwrap(), cron);
    }

    #[test]
    fn an_interval_counts_from_its_anchor_and_skips_what_was_missed() {
        let every = Cadence::Every { period_ms: 1_000 };
        assert_eq!(every.next_after(10_500, 10_500), Some(11_500));
        assert_eq!(every.next_after(10_500, 11_499), Some(11_500));
        assert_eq!(every.next_after(10_500, 11_500), Some(12_500));
        assert_eq!(every.next_after(10_500, 19_999), Some(20_500));
        assert_eq!(every.next_after(10_500, 0), Some(11_500));
        assert!(Cadence::Every { period_ms: 999 }.check().is_err());
        assert!(Cadence::Every { period_ms: PERIOD_MS_MAX + 1 }.check().is_err());
        assert_eq!(Cadence::Every { period_ms: u64::MAX }.next_after(u64::MAX - 1, u64::MAX), None);
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(check_name("nightly-report_v2.1").is_ok());
        assert!(check_name("").unwrap_err().contains("1 to 128"));
        assert!(check_name(&"a".repeat(129)).is_err());
        assert!(check_name("a/b").unwrap_err().contains("'/'"));
    }
}
