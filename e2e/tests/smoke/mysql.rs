//! MariaDB: a row inserted through mysql_async is read back from the binlog stream,
//! and the member store's DC-B replica follows its DC-A primary.

use std::time::{Duration, Instant};

use ballast_e2e::Stack;
use futures::StreamExt;
use mysql_async::binlog::events::EventData;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Value};

#[tokio::test]
async fn mysql_insert_is_read_back_from_the_binlog_stream() -> anyhow::Result<()> {
    let url = Stack::discover().get("BALLAST_MYSQL_SOURCE_URL")?;
    let opts = Opts::from_url(&url)?;
    let table = super::unique("orders").replace('-', "_");
    let marker = super::unique("marker");

    let mut conn = Conn::new(opts.clone()).await?;
    conn.query_drop(format!(
        "CREATE TABLE `{table}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, marker VARCHAR(128) NOT NULL)"
    ))
    .await?;
    // Start reading at the current end of the binlog, so the stream holds
    // (almost) only this test's insert.
    let (file, pos): (String, u64) = conn
        .query_first("SHOW MASTER STATUS")
        .await?
        .map(|row: mysql_async::Row| (row.get(0).unwrap_or_default(), row.get(1).unwrap_or_default()))
        .ok_or_else(|| anyhow::anyhow!("SHOW MASTER STATUS is empty: is log_bin on?"))?;
    conn.exec_drop(
        format!("INSERT INTO `{table}` (marker) VALUES (?)"),
        (marker.as_str(),),
    )
    .await?;

    let server_id = 1_000_000 + ballast_e2e::run_id() % 1_000_000;
    let mut stream = Conn::new(opts)
        .await?
        .get_binlog_stream(
            BinlogStreamRequest::new(server_id)
                .with_filename(file.as_bytes())
                .with_pos(pos)
                .with_non_blocking(),
        )
        .await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        let Some(event) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await? else {
            break; // non-blocking stream: end of the binlog reached
        };
        let event = event?;
        let Some(EventData::RowsEvent(rows)) = event.read_data()? else {
            continue;
        };
        let Some(tme) = stream.get_tme(rows.table_id()) else {
            continue;
        };
        if tme.table_name() != table {
            continue;
        }
        for row in rows.rows(tme) {
            let (_before, after) = row?;
            if let Some(after) = after {
                let value = after.as_ref(1).cloned().and_then(|v| Value::try_from(v).ok());
                found = value;
            }
        }
    }
    assert_eq!(
        found,
        Some(Value::Bytes(marker.into_bytes())),
        "the insert into {table} was not in the binlog after {file}:{pos}"
    );
    Ok(())
}

#[tokio::test]
async fn member_replica_in_dc_b_follows_primary_in_dc_a() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let primary = Opts::from_url(&stack.get("BALLAST_MYSQL_MEMBER_DC_A_URL")?)?;
    let replica = Opts::from_url(&stack.get("BALLAST_MYSQL_MEMBER_DC_B_URL")?)?;
    let table = super::unique("members").replace('-', "_");

    let mut primary = Conn::new(primary).await?;
    primary
        .query_drop(format!(
            "CREATE TABLE `{table}` (member_id BIGINT PRIMARY KEY, phone VARCHAR(32) NOT NULL)"
        ))
        .await?;
    primary
        .exec_drop(
            format!("INSERT INTO `{table}` VALUES (?, ?)"),
            (42_u64, "13800000000"),
        )
        .await?;

    let mut replica = Conn::new(replica).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let phone: Option<String> = replica
            .exec_first(
                format!("SELECT phone FROM `{table}` WHERE member_id = ?"),
                (42_u64,),
            )
            .await
            .unwrap_or(None); // the table itself may not have replicated yet
        if phone.as_deref() == Some("13800000000") {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the row written to DC-A did not reach the DC-B replica within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
