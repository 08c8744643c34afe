//! The JSON scanner's unit tests: kinds, malformed input, hints, plain runs, escapes.
use super::*;

/// Every member as (name, value rendered by kind) — or the error.
fn scan(input: &str) -> Result<Vec<(String, String)>, String> {
    let mut scanner = Scanner::default();
    scanner.start(input.as_bytes())?;
    let mut out = Vec::new();
    while let Some((key, value)) = scanner.member(None)? {
        let Key::Name(key) = key else {
            return Err("no hint was given".into());
        };
        let shown = match value {
            Val::Null => "null".to_owned(),
            Val::Bool(b) => format!("bool {b}"),
            Val::Int(v, t) => format!("int {v} {t}"),
            Val::Float(v, t) => format!("float {v} {t}"),
            Val::Big(t) => format!("big {t}"),
            Val::Str(s) => format!("str {s}"),
            Val::Nested(s) => format!("nested {s}"),
        };
        out.push((key.to_owned(), shown));
    }
    Ok(out)
}

#[test]
fn members_are_scanned_by_kind() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("{}", &[]),
        (" { } ", &[]),
        (r#"{"a":1}"#, &[("a", "int 1 1")]),
        (r#"{"a":-0}"#, &[("a", "int 0 -0")]),
        (
            r#"{"a":-12,"b":1.5}"#,
            &[("a", "int -12 -12"), ("b", "float 1.5 1.5")],
        ),
        (r#"{"a":1e3}"#, &[("a", "float 1000 1e3")]),
        (r#"{"a":2.5E-1}"#, &[("a", "float 0.25 2.5E-1")]),
        (
            r#"{"a":18446744073709551615}"#,
            &[("a", "big 18446744073709551615")],
        ),
        (
            r#"{"a":true,"b":false,"c":null}"#,
            &[("a", "bool true"), ("b", "bool false"), ("c", "null")],
        ),
        (r#"{"a":"x y"}"#, &[("a", "str x y")]),
        (r#"{"a":"é€😀"}"#, &[("a", "str é€😀")]),
        (
            r#"{"a":"q\"b\\s\/n\nt\tu\u00e9p\ud83d\ude00"}"#,
            &[("a", "str q\"b\\s/n\nt\tuép😀")],
        ),
        (r#"{"k\"ey":"v"}"#, &[("k\"ey", "str v")]),
        (
            r#"{"a":[1, {"b": "c"}],"d":{}}"#,
            &[("a", r#"nested [1,{"b":"c"}]"#), ("d", "nested {}")],
        ),
        (
            "{\n \"a\" : 1 ,\t\"b\" :\"x\"\r\n}",
            &[("a", "int 1 1"), ("b", "str x")],
        ),
    ];
    for (input, expected) in cases {
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(scan(input), Ok(expected), "{input}");
    }
}

#[test]
fn malformed_objects_are_errors_not_panics() {
    let cases = [
        "",
        "[]",
        "1",
        "\"a\"",
        "{",
        "{\"a\"",
        "{\"a\":",
        "{\"a\":1",
        "{\"a\":1,}",
        "{,}",
        "{\"a\" 1}",
        "{a:1}",
        "{\"a\":01}",
        "{\"a\":-}",
        "{\"a\":1.}",
        "{\"a\":1e}",
        "{\"a\":.5}",
        "{\"a\":tru}",
        "{\"a\":nul}",
        "{\"a\":\"x}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12\"}",
        "{\"a\":\"\\ud800\"}",
        "{\"a\":\"\\udc00\"}",
        "{\"a\":\"\\ud800\\u0041\"}",
        "{\"a\":\"tab\there\"}",
        "{\"a\":1} x",
        "{\"a\":1}{}",
        "{\"a\":[1,}",
        "{\"a\":+1}",
        "{\"a\":\"\\u+123\"}",
    ];
    for input in cases {
        assert!(scan(input).is_err(), "{input:?} should not scan");
        // The oracle agrees that these are not JSON objects.
        assert!(
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(input).is_err(),
            "{input:?}"
        );
    }
    let mut scanner = Scanner::default();
    assert!(
        scanner.start(b"{\"a\":\"\xff\"}").is_err(),
        "invalid UTF-8 is an error"
    );
}

#[test]
fn a_matching_hint_skips_the_name_and_others_are_read() -> Result<(), String> {
    let input = r#"{"amount":1,"amounts":2,"x\"y":3,"":4}"#;
    let mut scanner = Scanner::default();
    scanner.start(input.as_bytes())?;
    let mut got = Vec::new();
    for hint in ["amount", "amount", "x\"y", ""] {
        let hint = Some(hint).filter(|h| plain(h));
        match scanner.member(hint)? {
            Some((Key::Hint, Val::Int(v, _))) => got.push(format!("hint {v}")),
            Some((Key::Name(name), Val::Int(v, _))) => got.push(format!("{name} {v}")),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    assert_eq!(scanner.member(None)?, None);
    assert_eq!(got, ["hint 1", "amounts 2", "x\"y 3", "hint 4"]);
    Ok(())
}

#[test]
fn plain_runs_stop_at_quotes_backslashes_and_control_characters() {
    let cases = [
        ("", 0),
        ("abc", 3),
        ("abcdefgh", 8),
        ("abcdefghij\"", 10),
        ("abcdefgh\"", 8),
        ("abcdefg\"", 7),
        ("abcdefghijklmno\\x", 15),
        ("abcdefghijklmnopq\n", 17),
        ("ééééé\"", 10),
        ("\u{7f}\u{80}abcdefgh\t", 11),
    ];
    for (text, want) in cases {
        assert_eq!(plain_run(text.as_bytes()), want, "{text:?}");
    }
}

#[test]
fn strings_decode_like_serde_json() {
    let strings = [
        "",
        "plain",
        "a\"b",
        "\\",
        "\u{1}",
        "é",
        "😀",
        "tab\t",
        "/",
        "\u{7f}\u{2028}",
    ];
    for s in strings {
        let input = serde_json::json!({ "k": s }).to_string();
        assert_eq!(
            scan(&input),
            Ok(vec![("k".to_owned(), format!("str {s}"))]),
            "{input}"
        );
    }
}

#[test]
fn mixed_kinds_render_as_their_source_text() {
    let cases = [
        (Val::Null, None),
        (Val::Bool(true), Some("true")),
        (Val::Int(7, "7"), Some("7")),
        (Val::Float(100.0, "1E2"), Some("1E2")),
        (Val::Big("99999999999999999999"), Some("99999999999999999999")),
        (Val::Str("x"), Some("x")),
        (Val::Nested("[1]"), Some("[1]")),
    ];
    for (value, text) in cases {
        assert_eq!(value.as_text(), text);
    }
}
