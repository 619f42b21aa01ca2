//! Route matching: whether a route's `match` conditions hold on an event's
//! normalized payload. Evaluated once, when the event is received, so the
//! deliveries it decides are stored with the event (README "Routes"). The
//! conditions themselves are config data (`crate::config::Condition`).

use serde_json::Value;

use crate::config::{Condition, ConditionTest};

/// Whether the value at the condition's pointer passes its test.
pub fn holds(c: &Condition, payload: &Value) -> bool {
    let found = payload.pointer(&c.pointer);
    match &c.test {
        ConditionTest::Exists(want) => found.is_some() == *want,
        ConditionTest::Equals(v) => found.is_some_and(|f| loosely_equal(f, v)),
        ConditionTest::In(vs) => found.is_some_and(|f| vs.iter().any(|v| loosely_equal(f, v))),
        ConditionTest::Regex(re) => found.and_then(scalar_text).is_some_and(|s| re.is_match(&s)),
        ConditionTest::Prefix(p) => found.and_then(scalar_text).is_some_and(|s| s.starts_with(p.as_str())),
    }
}

/// Form senders send every value as a string; `equals = 5` should still match `"5"`.
fn loosely_equal(found: &Value, want: &Value) -> bool {
    if found == want {
        return true;
    }
    match (scalar_text(found), scalar_text(want)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_matching_is_loose_about_strings() {
        let c = Condition { pointer: "/n".into(), test: ConditionTest::Equals(serde_json::json!(5)) };
        assert!(holds(&c, &serde_json::json!({"n": "5"})));
        assert!(!holds(&c, &serde_json::json!({"n": "6"})));
        let c = Condition { pointer: "/n".into(), test: ConditionTest::Exists(false) };
        assert!(holds(&c, &serde_json::json!({})));
    }
}
