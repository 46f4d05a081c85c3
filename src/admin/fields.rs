//! Admin API request bodies -> the key service's input types. Only JSON types are checked
//! here (a number where a number belongs); every rule is the key service's.

use serde_json::Value;

use crate::manage::{GroupChanges, GroupSpec, KeyChanges, KeyError, KeySpec};

/// An optional limit: absent -> `None`, `null` -> `Some(None)` (unlimited), a whole number
/// -> `Some(Some(n))`, signed so that the service explains a negative one.
fn limit(v: &Value, field: &'static str) -> Result<Option<Option<i64>>, KeyError> {
    match v.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Some(None)),
        Some(n) => n
            .as_i64()
            .or_else(|| n.as_str().and_then(|s| s.trim().parse().ok()))
            .map(|n| Some(Some(n)))
            .ok_or_else(|| {
                KeyError::invalid(field, format!("{field} must be a whole number or null"))
            }),
    }
}

fn budget(v: &Value) -> Result<Option<Option<f64>>, KeyError> {
    usd(v, "monthly_budget_usd")
}

/// An optional USD amount: absent, `null` (none), a number or a numeric string.
fn usd(v: &Value, field: &'static str) -> Result<Option<Option<f64>>, KeyError> {
    match v.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Some(None)),
        Some(n) => n
            .as_f64()
            .or_else(|| {
                n.as_str()
                    .and_then(|s| s.trim().trim_start_matches('$').parse().ok())
            })
            .map(|usd| Some(Some(usd)))
            .ok_or_else(|| KeyError::invalid(field, format!("{field} must be a number or null"))),
    }
}

/// `max_usd_per_hour`: a USD number (or numeric string), or null to clear it.
fn usd_per_hour(v: &Value) -> Result<Option<Option<f64>>, KeyError> {
    usd(v, "max_usd_per_hour")
}

fn string(v: &Value, field: &'static str) -> Result<Option<String>, KeyError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(KeyError::invalid(
            field,
            format!("{field} must be a string"),
        )),
    }
}

/// `client_id`: a string, or null to clear it; any other type is refused (a number must
/// not silently clear the field).
fn client_id(v: &Value) -> Result<Option<Option<String>>, KeyError> {
    nullable_string(v, "client_id")
}

/// A string, or null to clear the field.
fn nullable_string(v: &Value, field: &'static str) -> Result<Option<Option<String>>, KeyError> {
    match v.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
        Some(_) => Err(KeyError::invalid(
            field,
            format!("{field} must be a string or null"),
        )),
    }
}

/// A list of strings; a single comma-separated string is accepted too (form input).
fn list(v: &Value, field: &'static str) -> Result<Option<Vec<String>>, KeyError> {
    let bad = || KeyError::invalid(field, format!("{field} must be a list of strings"));
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(Value::String(s)) => Ok(Some(crate::keys::split_list(s))),
        Some(_) => Err(bad()),
    }
}

fn boolean(v: &Value, field: &'static str) -> Result<Option<bool>, KeyError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(KeyError::invalid(
            field,
            format!("{field} must be true or false"),
        )),
    }
}

/// The fields of a key's body (create and update): SPEC §5's names.
const KEY_FIELDS: [&str; 14] = [
    "name",
    "rpm",
    "rpd",
    "max_inflight",
    "monthly_budget_usd",
    "budget_mode",
    "allowed_models",
    "free_only",
    "scopes",
    "ttl",
    "client_id",
    "group",
    "max_usd_per_hour",
    "loop_limit",
];

const GROUP_FIELDS: [&str; 5] = [
    "name",
    "budget_usd",
    "monthly_budget_usd",
    "budget_mode",
    "rpm",
];

/// A body with a field the API does not have is refused, naming it: a misspelt limit
/// (`rmp`) must not make a key without that limit.
fn only_known(v: &Value, known: &[&str]) -> Result<(), KeyError> {
    let Some(object) = v.as_object() else {
        return Ok(());
    };
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(KeyError::unknown_field(unknown, known)),
        None => Ok(()),
    }
}

/// `POST /admin/keys`.
pub fn key_spec(v: &Value) -> Result<KeySpec, KeyError> {
    only_known(v, &KEY_FIELDS)?;
    Ok(KeySpec {
        name: string(v, "name")?.unwrap_or_default(),
        rpm: limit(v, "rpm")?.flatten(),
        rpd: limit(v, "rpd")?.flatten(),
        max_inflight: limit(v, "max_inflight")?.flatten(),
        budget_usd: budget(v)?.flatten(),
        budget_mode: string(v, "budget_mode")?,
        allowed_models: list(v, "allowed_models")?.unwrap_or_default(),
        free_only: boolean(v, "free_only")?.unwrap_or(false),
        scopes: list(v, "scopes")?,
        ttl: string(v, "ttl")?,
        client_id: client_id(v)?.flatten(),
        group: nullable_string(v, "group")?.flatten(),
        max_usd_per_hour: usd_per_hour(v)?.flatten(),
        loop_limit: limit(v, "loop_limit")?.flatten(),
    })
}

/// `PATCH /admin/keys/{id}`.
pub fn key_changes(v: &Value) -> Result<KeyChanges, KeyError> {
    only_known(v, &KEY_FIELDS)?;
    Ok(KeyChanges {
        name: string(v, "name")?,
        rpm: limit(v, "rpm")?,
        rpd: limit(v, "rpd")?,
        max_inflight: limit(v, "max_inflight")?,
        budget_usd: budget(v)?,
        budget_mode: string(v, "budget_mode")?,
        allowed_models: list(v, "allowed_models")?,
        free_only: boolean(v, "free_only")?,
        scopes: list(v, "scopes")?,
        ttl: string(v, "ttl")?,
        client_id: client_id(v)?,
        group: nullable_string(v, "group")?,
        max_usd_per_hour: usd_per_hour(v)?,
        loop_limit: limit(v, "loop_limit")?,
    })
}

/// `POST /admin/groups`. The budget is `budget_usd` (or `monthly_budget_usd`, as on keys).
pub fn group_spec(v: &Value) -> Result<GroupSpec, KeyError> {
    only_known(v, &GROUP_FIELDS)?;
    Ok(GroupSpec {
        name: string(v, "name")?.unwrap_or_default(),
        budget_usd: group_budget(v)?.flatten(),
        budget_mode: string(v, "budget_mode")?,
        rpm: limit(v, "rpm")?.flatten(),
    })
}

/// `PATCH /admin/groups/{name}`.
pub fn group_changes(v: &Value) -> Result<GroupChanges, KeyError> {
    only_known(v, &GROUP_FIELDS)?;
    Ok(GroupChanges {
        budget_usd: group_budget(v)?,
        budget_mode: string(v, "budget_mode")?,
        rpm: limit(v, "rpm")?,
    })
}

fn group_budget(v: &Value) -> Result<Option<Option<f64>>, KeyError> {
    match usd(v, "budget_usd")? {
        Some(b) => Ok(Some(b)),
        None => budget(v),
    }
}

/// `POST /admin/keys/{id}/rotate`: `{"grace": "1h"}`, all optional.
pub fn grace(v: &Value) -> Result<Option<String>, KeyError> {
    only_known(v, &["grace"])?;
    string(v, "grace")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_types_are_checked_and_named() {
        let e = key_spec(&json!({"name": "a", "rpm": "ten"})).unwrap_err();
        assert_eq!(e.field(), Some("rpm"));
        let e = key_spec(&json!({"name": "a", "client_id": 5})).unwrap_err();
        assert_eq!(e.field(), Some("client_id"));
        let e = key_changes(&json!({"scopes": "a"})).map(|c| c.scopes);
        assert_eq!(e.unwrap(), Some(vec!["a".to_string()]));
        let c = key_changes(&json!({"rpm": null, "rpd": -5})).unwrap();
        assert_eq!((c.rpm, c.rpd), (Some(None), Some(Some(-5))));
    }

    #[test]
    fn a_field_the_api_does_not_have_is_refused_by_its_name() {
        let e = key_spec(&json!({"name": "a", "rmp": 10})).unwrap_err();
        assert_eq!((e.status(), e.field()), (400, Some("rmp")));
        assert!(e.to_string().contains("\"rmp\""), "{e}");
        let e = key_changes(&json!({"monthly_budget": 5})).unwrap_err();
        assert_eq!(e.field(), Some("monthly_budget"));
        assert_eq!(
            group_spec(&json!({"name": "g", "budget": 1}))
                .unwrap_err()
                .field(),
            Some("budget")
        );
        assert_eq!(
            grace(&json!({"grace_period": "1h"})).unwrap_err().field(),
            Some("grace_period")
        );
        // Every field the API has passes.
        let all: serde_json::Map<String, Value> = KEY_FIELDS
            .iter()
            .map(|f| (f.to_string(), Value::Null))
            .collect();
        assert!(key_changes(&Value::Object(all.clone())).is_ok());
        assert!(key_spec(&Value::Object(all)).is_ok());
    }
}
