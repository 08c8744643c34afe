//! Days of the UTC calendar as numbers (days since 1970-01-01), and the
//! week (from Monday) and month each falls in: what history ranges and
//! groups are made of. Pure.

use std::fmt;

use crate::results::cache::DAY_MS;

/// A UTC day: days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i32);

impl Day {
    /// The day `year-month-day`, if it exists (years 1970 to 9999).
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Self> {
        if !(1970..=9999).contains(&year)
            || !(1..=12).contains(&month)
            || day == 0
            || day > days_in(year, month)
        {
            return None;
        }
        // Howard Hinnant's days_from_civil, for years from 1970.
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = (month as i32 + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day as i32 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(Day(era * 146_097 + doe - 719_468))
    }

    /// Year, month (1–12) and day of the month.
    pub fn ymd(self) -> (i32, u32, u32) {
        // Howard Hinnant's civil_from_days.
        let z = self.0 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i32::from(month <= 2);
        (year, month, day)
    }

    /// A strict `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return None;
        }
        let number = |range: std::ops::Range<usize>| -> Option<u32> {
            let part = text.get(range)?;
            part.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| part.parse().ok())?
        };
        Day::from_ymd(i32::try_from(number(0..4)?).ok()?, number(5..7)?, number(8..10)?)
    }

    /// The day holding the instant `ms` (since the Unix epoch).
    pub fn of_ms(ms: i64) -> Self {
        Day(i32::try_from(ms.div_euclid(DAY_MS)).unwrap_or(i32::MAX))
    }

    /// Its start, in ms since the Unix epoch.
    pub fn start_ms(self) -> i64 {
        i64::from(self.0) * DAY_MS
    }

    /// The Monday of its week (ISO 8601 weeks start on Monday; 1970-01-01 was a Thursday).
    pub fn week(self) -> Self {
        Day(self.0 - (self.0 + 3).rem_euclid(7))
    }

    /// The first day of its month.
    pub fn month(self) -> Self {
        let (y, m, _) = self.ymd();
        Day::from_ymd(y, m, 1).unwrap_or(self)
    }

    /// The day after.
    pub fn next(self) -> Self {
        Day(self.0 + 1)
    }

    /// `YYYY.MM`, as the monthly cold indices are suffixed.
    pub fn month_suffix(self) -> String {
        let (y, m, _) = self.ymd();
        format!("{y:04}.{m:02}")
    }

    /// `YYYY-MM`, as a month group is keyed.
    pub fn month_key(self) -> String {
        let (y, m, _) = self.ymd();
        format!("{y:04}-{m:02}")
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

fn days_in(year: i32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_strictly_and_round_trip() {
        let cases = [
            ("1970-01-01", Some(0)),
            ("1970-01-02", Some(1)),
            ("2000-02-29", Some(11_016)),
            ("2026-11-30", Some(20_787)),
            ("1900-02-29", None),
            ("2026-02-29", None),
            ("2026-13-01", None),
            ("2026-00-10", None),
            ("2026-1-01", None),
            ("2026-01-1x", None),
            ("+026-01-01", None),
            ("2026/01/01", None),
            ("", None),
            ("1969-12-31", None),
        ];
        for (text, want) in cases {
            let day = Day::parse(text);
            assert_eq!(day.map(|d| d.0), want, "{text}");
            if let Some(day) = day {
                assert_eq!(day.to_string(), text);
            }
        }
        for n in 0..40_000 {
            let (y, m, d) = Day(n).ymd();
            assert_eq!(Day::from_ymd(y, m, d), Some(Day(n)), "{n}");
        }
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        // (day, its week's Monday, its month's first day)
        let cases = [
            ("1970-01-01", "1969-12-29", "1970-01-01"),
            ("2026-11-30", "2026-11-30", "2026-11-01"),
            ("2026-11-29", "2026-11-23", "2026-11-01"),
            ("2026-12-31", "2026-12-28", "2026-12-01"),
            ("2027-01-01", "2026-12-28", "2027-01-01"),
            ("2024-02-29", "2024-02-26", "2024-02-01"),
        ];
        for (day, week, month) in cases {
            let d = Day::parse(day).unwrap_or(Day(i32::MIN));
            let (want_week, want_month) = (Day::parse(week), Day::parse(month));
            if want_week.is_some() {
                assert_eq!(Some(d.week()), want_week, "{day}");
            } else {
                // Before 1970: only the number.
                assert_eq!(d.week(), Day(-3), "{day}");
            }
            assert_eq!(Some(d.month()), want_month, "{day}");
        }
        let d = Day::parse("2026-03-04").unwrap_or(Day(0));
        assert_eq!(
            (d.month_key(), d.month_suffix()),
            ("2026-03".into(), "2026.03".into())
        );
        assert_eq!(Day::of_ms(d.start_ms() + DAY_MS - 1), d);
    }
}
