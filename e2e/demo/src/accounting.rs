//! The demo's account of every order it fed: counted in results, shed by
//! the backup intake (and reported as such), or lost and reported with why
//! (a slave's memory while the KV store was down, a dead-lettered event).
//! What is left over is lost unannounced, and the summary says so.

use mysql_async::prelude::Queryable;

use ballast_worker::results::hot::HotStore;

/// Where the fed orders went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// Orders inserted into the source table by the demo.
    pub fed: u64,
    /// Orders in the results: the `orders` column of every window computed
    /// from the KV store, and of every hour computed from the slaves' memory
    /// while the KV store was down (`_from` = `memory`).
    pub counted: u64,
    /// Orders the backup intake shed (`ballast_backup_intake_events_shed_total`).
    pub shed: u64,
    /// Orders held in a slave's memory when it left or restarted
    /// (`ballast_master_slave_events_lost_total`).
    pub memory_lost: u64,
    /// Orders set aside as unprocessable (`status.deadLetteredEvents`).
    pub dead_lettered: u64,
}

impl Account {
    /// Fed orders neither counted nor shed: lost. Negative: counted twice. Pure.
    pub fn lost(&self) -> i64 {
        self.fed as i64 - (self.counted + self.shed) as i64
    }

    /// Lost orders that no report covers: lost unannounced. The slave-memory
    /// report is what departed slaves held, computed or not, so it bounds
    /// the loss it explains from above. Pure.
    pub fn unexplained(&self) -> i64 {
        let lost = self.lost();
        if lost <= 0 {
            return lost;
        }
        (lost - (self.memory_lost + self.dead_lettered) as i64).max(0)
    }

    /// The summary's lines. Pure.
    pub fn lines(&self) -> String {
        let mut out = format!(
            "  orders fed:       {}\n    counted in results:      {}\n    shed (reported):         {}\n",
            self.fed, self.counted, self.shed
        );
        let lost = self.lost();
        if lost < 0 {
            out.push_str(&format!(
                "    counted twice:           {} (more in the results than fed: a bug)\n",
                -lost
            ));
            return out;
        }
        out.push_str(&format!("    lost:                    {lost}\n"));
        if self.memory_lost > 0 {
            out.push_str(&format!(
                "      reported as slave memory: up to {} (events slaves held when they left while or \
                 after the KV store was down, computed or not)\n",
                self.memory_lost
            ));
        }
        if self.dead_lettered > 0 {
            out.push_str(&format!(
                "      reported as dead-lettered: {} (events that could not be processed)\n",
                self.dead_lettered
            ));
        }
        match self.unexplained() {
            0 if lost == 0 => {
                out.push_str("    lost unannounced:        0: every order is counted or shed\n")
            }
            0 => out.push_str("    lost unannounced:        0: every lost order is within a report\n"),
            n => out.push_str(&format!(
                "    lost unannounced:        {n} (not in the results and not reported: a bug)\n"
            )),
        }
        out
    }
}

/// The sum of every sample of the counter `name` in a Prometheus text
/// exposition (whatever its labels). Pure.
pub fn counter(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// Orders of the pipeline's results in the hot MySQL (see [`Account::counted`]).
pub async fn counted(
    pool: &mysql_async::Pool,
    hot: &HotStore,
    pipeline: &str,
) -> Result<u64, mysql_async::Error> {
    let mut conn = pool.get_conn().await?;
    let mut total = 0;
    for d in 0..2 {
        for t in 0..4 {
            let table = hot.table_name(d, t);
            let sum: Option<Option<u64>> = conn
                .exec_first(
                    format!(
                        "SELECT CAST(SUM(JSON_VALUE(metrics, '$.orders')) AS UNSIGNED) FROM {table} \
                         WHERE pipeline = ? AND (granularity = 'window' \
                           OR (granularity = 'hour' AND JSON_VALUE(metrics, '$._from') = 'memory'))"
                    ),
                    (pipeline,),
                )
                .await?;
            total += sum.flatten().unwrap_or(0);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_neither_counted_shed_nor_within_a_report_is_unexplained() {
        let account = Account {
            fed: 100,
            counted: 80,
            shed: 15,
            memory_lost: 4,
            dead_lettered: 1,
        };
        assert_eq!((account.lost(), account.unexplained()), (5, 0));
        assert!(account.lines().contains("every lost order is within a report"));
        // The slave-memory report bounds the loss from above.
        let over = Account {
            memory_lost: 40,
            ..account
        };
        assert_eq!(over.unexplained(), 0);
        let short = Account {
            counted: 70,
            ..account
        };
        assert_eq!(short.unexplained(), 10);
        assert!(short.lines().contains("lost unannounced:        10"));
        let whole = Account {
            counted: 85,
            memory_lost: 0,
            dead_lettered: 0,
            ..account
        };
        assert!(whole.lines().contains("every order is counted or shed"));
        let twice = Account {
            counted: 90,
            ..account
        };
        assert!(twice.lines().contains("counted twice:           5"));
    }

    #[test]
    fn counters_sum_over_their_labels_and_ignore_other_metrics() {
        let text = "# HELP ballast_backup_intake_events_shed_total x\n\
                    # TYPE ballast_backup_intake_events_shed_total counter\n\
                    ballast_backup_intake_events_shed_total 12\n\
                    ballast_backup_intake_events_shed_total_created 1.7e9\n\
                    ballast_master_slave_events_lost_total{slave=\"a\"} 3\n\
                    ballast_master_slave_events_lost_total{slave=\"b\"} 4.0\n";
        assert_eq!(counter(text, "ballast_backup_intake_events_shed_total"), 12);
        assert_eq!(counter(text, "ballast_master_slave_events_lost_total"), 7);
        assert_eq!(counter(text, "ballast_nothing_total"), 0);
    }
}
