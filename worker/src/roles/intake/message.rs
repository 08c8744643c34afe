//! Which Kafka messages the intake stores: decoded change events of the
//! pipeline's tables, of a sane size. Everything else goes to the dead-letter
//! topic with the reason returned here. Pure.

use prost::Message as _;

use crate::wire::ChangeEvent;

/// Largest event the intake stores; a bigger one is a producer bug, not data.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The event in `payload`, or why it is refused.
pub fn accept(payload: &[u8], tables: &[String]) -> Result<ChangeEvent, String> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "oversized event: {} bytes (limit {MAX_EVENT_BYTES})",
            payload.len()
        ));
    }
    let event = ChangeEvent::decode(payload).map_err(|e| format!("not a ChangeEvent: {e}"))?;
    if event.event_id.is_empty() || event.merchant_id.is_empty() {
        return Err("event without event_id or merchant_id".into());
    }
    if !tables.contains(&event.table) {
        return Err(format!(
            "event for table {:?}, which the pipeline does not track",
            event.table
        ));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<String> {
        vec!["orders".into()]
    }

    #[test]
    fn table_of_refusals() {
        let ok = ChangeEvent::insert("e1", "m1", "orders", 0, b"{}".to_vec());
        assert_eq!(accept(&ok.encode_to_vec(), &tables()), Ok(ok));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\xff\xfe".to_vec(), "not a ChangeEvent"),
            (
                ChangeEvent::insert("", "m1", "orders", 0, vec![]).encode_to_vec(),
                "without event_id",
            ),
            (
                ChangeEvent::insert("e", "", "orders", 0, vec![]).encode_to_vec(),
                "without event_id or merchant_id",
            ),
            (
                ChangeEvent::insert("e", "m", "refunds", 0, vec![]).encode_to_vec(),
                "table \"refunds\"",
            ),
            (
                ChangeEvent::insert("e", "m", "orders", 0, vec![b'x'; MAX_EVENT_BYTES]).encode_to_vec(),
                "oversized",
            ),
        ];
        for (payload, reason) in cases {
            let err = accept(&payload, &tables()).expect_err(reason);
            assert!(err.contains(reason), "{err}");
        }
    }
}
