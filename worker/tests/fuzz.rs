//! Bad input as an attacker sends it: every decoder that takes bytes from
//! outside is fed generated input (proptest, a bounded number of cases each,
//! so that `make test` runs them): Kafka event payloads, gRPC event batches
//! and the window tables built from their columns, binlog row values, and the
//! query and member APIs' parameters as they land. No decoder may panic, and
//! none may allocate more than a bound proportional to its input: a counting
//! allocator measures every call (allocated bytes, an upper bound of what it
//! held at once).

use std::alloc::System;
use std::sync::Mutex;

use ballast_worker::cold::Day;
use ballast_worker::compute::frame;
use ballast_worker::members::model::{self, MAX_IDENTITIES};
use ballast_worker::roles::collector::rows;
use ballast_worker::roles::intake::message;
use ballast_worker::roles::member::grpc;
use ballast_worker::roles::query::{history, input};
use ballast_worker::wire;
use mysql_async::Value;
use mysql_async::binlog::value::BinlogValue;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The allocator's counts are process-wide: one measured decoder at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Cases per decoder: bounded, so that the whole file runs in seconds.
const CASES: u32 = 1_000;

/// What a decoder may allocate for `input_len` bytes of input: a fixed
/// allowance plus a multiple of the input. Unbounded growth (a length field
/// believed, a quadratic copy) breaks it at once.
fn bound(input_len: usize) -> usize {
    (1 << 20) + 64 * input_len
}

/// Runs `check` over `strategy`'s cases, each call measured against [`bound`].
fn fuzz<S: Strategy>(name: &str, strategy: S, len: impl Fn(&S::Value) -> usize, check: impl Fn(&S::Value))
where
    S::Value: std::fmt::Debug,
{
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let config = Config {
        cases: CASES,
        // No regression files written into the source tree.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |input| {
        let region = Region::new(GLOBAL);
        check(&input);
        let allocated = region.change().bytes_allocated;
        let allowed = bound(len(&input));
        prop_assert!(
            allocated <= allowed,
            "{name}: {allocated} bytes allocated, bound {allowed}"
        );
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{name}: {failure}");
    }
}

/// Bytes that are sometimes noise and sometimes nearly valid: a valid
/// encoding with bytes flipped, cut or appended.
fn mangled(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 0..2048);
    let flipped = (
        valid,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        any::<usize>(),
    )
        .prop_map(|(mut bytes, flips, cut)| {
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= byte;
                }
            }
            let keep = if bytes.is_empty() {
                0
            } else {
                cut % (bytes.len() + 1)
            };
            bytes.truncate(keep.max(bytes.len() / 2));
            bytes
        });
    prop_oneof![noise, flipped]
}

/// Text of every kind: plain, Unicode, control characters, very long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.:-]{0,16}",
        any::<String>(),
        "\\PC{0,300}",
        "[\\x00-\\x1f\\x7f]{0,8}",
    ]
}

/// A JSON document of the kind the columns carry, or something near it.
fn json_columns() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let object = prop::collection::btree_map(
        prop_oneof![
            "(merchant_id|amount|status|paid_at|order_id)",
            "[a-z_]{1,8}",
            text()
        ],
        value,
        0..8,
    )
    .prop_map(|m| {
        serde_json::to_vec(&serde_json::Value::Object(m.into_iter().collect())).unwrap_or_default()
    });
    mangled(object)
}

fn change_event() -> impl Strategy<Value = wire::ChangeEvent> {
    (
        text(),
        text(),
        prop_oneof![Just("orders".to_owned()), text()],
        any::<i32>(),
        any::<i64>(),
        json_columns(),
    )
        .prop_map(|(id, merchant, table, op, time, columns)| {
            let mut event = wire::ChangeEvent::insert(id, merchant, table, time, columns);
            event.op = op;
            event
        })
}

#[test]
fn kafka_event_payloads_are_accepted_or_refused_with_a_reason() {
    let tables = vec!["orders".to_owned()];
    let payloads = mangled(change_event().prop_map(|e| e.encode_to_vec()));
    fuzz("kafka payload", payloads, Vec::len, |payload| {
        if let Err(reason) = message::accept(payload, &tables) {
            assert!(!reason.is_empty());
        }
    });
    // Past the size limit: refused before it is decoded.
    let huge = vec![0x0a; message::MAX_EVENT_BYTES + 1];
    assert!(message::accept(&huge, &tables).is_err_and(|r| r.contains("oversized")));
}

#[test]
fn grpc_event_batches_and_the_window_tables_of_their_columns_never_panic() {
    // A batch as it arrives on the wire, decoded; then the tables a slave builds from it.
    let batches = prop::collection::vec(change_event(), 0..16)
        .prop_map(|events| wire::EventBatch {
            events,
            epoch: 1,
            generation: 0,
        })
        .prop_map(|batch| batch.encode_to_vec());
    fuzz("event batch", mangled(batches), Vec::len, |bytes| {
        if let Ok(batch) = wire::EventBatch::decode(bytes.as_slice()) {
            let _tables = frame::tables(&batch.events);
        }
    });
}

fn mysql_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::NULL),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Value::Bytes),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        any::<f32>().prop_map(Value::Float),
        any::<f64>().prop_map(Value::Double),
        (
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u32>()
        )
            .prop_map(|(y, mo, d, h, mi, s, us)| Value::Date(y, mo, d, h, mi, s, us)),
        (
            any::<bool>(),
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u32>()
        )
            .prop_map(|(neg, days, h, mi, s, us)| Value::Time(neg, days, h, mi, s, us)),
    ]
}

#[test]
fn binlog_row_values_convert_to_json_or_are_kept_as_unconverted() {
    let rows = prop::collection::vec(mysql_value(), 0..32);
    let len = |row: &Vec<Value>| {
        row.iter()
            .map(|v| match v {
                Value::Bytes(b) => b.len() + 16,
                _ => 16,
            })
            .sum()
    };
    fuzz("binlog row", rows, len, |row| {
        let image = rows::image(row.iter().cloned().map(BinlogValue::Value).collect());
        assert_eq!(image.values.len(), row.len());
        for value in &image.values {
            let _json = rows::to_json(value);
        }
    });
}

#[test]
fn query_api_parameters_are_parsed_or_refused_with_a_bad_input() {
    let names = prop_oneof![
        Just("from".to_owned()),
        Just("to".to_owned()),
        Just("where".to_owned()),
        Just("groupBy".to_owned()),
        Just("aggregate".to_owned()),
        Just("sort".to_owned()),
        Just("limit".to_owned()),
        text(),
    ];
    let values = prop_oneof![
        "20[0-9]{2}-[01][0-9]-[0-3][0-9]",
        "[a-z_]{1,8}(=|!=|<|>|<=|>=|:)[a-z0-9_.-]{0,8}",
        "(sum|count|avg|min|max)\\([a-z_]{0,8}\\)(:desc|:asc)?",
        "-?[0-9]{1,20}",
        text(),
    ];
    let pairs = prop::collection::vec((names, values), 0..12);
    let len = |p: &Vec<(String, String)>| p.iter().map(|(n, v)| n.len() + v.len()).sum();
    fuzz("history query", pairs, len, |pairs| {
        let _parsed = history::query::parse(pairs, Day(20_000));
    });
    fuzz("merchant id", text(), String::len, |id| {
        let _merchant = input::merchant(id);
    });
}

#[test]
fn member_api_parameters_are_validated_or_refused_as_invalid() {
    let identity = (
        any::<i32>(),
        prop_oneof!["\\+?86[ -]?1[0-9 -]{10,14}", "[A-Za-z0-9_-]{0,40}", text()],
    )
        .prop_map(|(kind, value)| wire::Identity {
            kind: kind % 6,
            value,
        });
    let requests = (
        text(),
        text(),
        prop::collection::vec(identity, 0..(MAX_IDENTITIES + 4)),
    )
        .prop_map(|(name, level, identities)| wire::RegisterRequest {
            name,
            level,
            identities,
        })
        .prop_map(|r| r.encode_to_vec());
    fuzz("member register", mangled(requests), Vec::len, |bytes| {
        if let Ok(request) = wire::RegisterRequest::decode(bytes.as_slice()) {
            let _name = model::parse_name(&request.name);
            let _level = model::parse_level(&request.level);
            let _identities = grpc::identities(&request.identities, MAX_IDENTITIES, "identities");
        }
    });
    fuzz("member id", text(), String::len, |id| {
        let _id = model::parse_member_id(id);
    });
}
