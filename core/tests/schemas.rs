//! Every shipped schema has valid and invalid examples, and the registry agrees with
//! them: each valid example is accepted, each invalid one is rejected with a fault at
//! the expected pointer.

use floodgate_core::registry::Registry;
use serde_json::{Value, json};

const EXAMPLES: &str = include_str!("fixtures/schema-examples.json");

fn event(ty: &str, data: &Value) -> Value {
    json!({"specversion":"1.0","id":"ex-1","source":"/examples","type":ty,"data":data})
}

#[test]
fn every_schema_has_examples_and_they_hold() {
    let registry = Registry::builtin().unwrap();
    let examples: serde_json::Map<String, Value> = serde_json::from_str(EXAMPLES).unwrap();
    let summaries = registry.summaries();
    assert!(!summaries.is_empty());
    for s in &summaries {
        let name = format!("{}/v{}", s.event_type, s.version);
        let ex = examples
            .get(&name)
            .unwrap_or_else(|| panic!("no examples for {name}"));
        let valid = ex["valid"].as_array().unwrap();
        let invalid = ex["invalid"].as_array().unwrap();
        assert!(
            !valid.is_empty() && !invalid.is_empty(),
            "{name} needs valid and invalid examples"
        );
        for data in valid {
            let mut e = event(&s.event_type, data);
            e["dataschema"] = json!(format!("https://schemas.floodgate.dev/{name}.json"));
            let checked = registry
                .check(&e)
                .unwrap_or_else(|errs| panic!("{name}: {data} rejected: {errs:?}"));
            assert_eq!(checked.key, data["eventId"].as_str().unwrap());
        }
        for case in invalid {
            let e = event(&s.event_type, &case["data"]);
            let errors = registry
                .check(&e)
                .err()
                .unwrap_or_else(|| panic!("{name}: {} accepted", case["data"]));
            let want = case["pointer"].as_str().unwrap();
            assert!(
                errors.iter().any(|err| err.pointer == want),
                "{name}: expected a fault at {want}, got {errors:?}"
            );
        }
    }
    // No stale examples for schemas that no longer exist.
    for name in examples.keys() {
        assert!(
            summaries
                .iter()
                .any(|s| format!("{}/v{}", s.event_type, s.version) == *name),
            "examples for unknown schema {name}"
        );
    }
}

#[test]
fn shipped_schemas_forbid_unknown_fields_and_key_on_event_id() {
    let registry = Registry::builtin().unwrap();
    for s in registry.summaries() {
        let doc = &registry.get(&s.event_type, s.version).unwrap().document;
        assert_eq!(doc["additionalProperties"], false, "{}", s.event_type);
        assert_eq!(
            doc["x-floodgate-partition-key"], "/eventId",
            "{}",
            s.event_type
        );
        assert_eq!(
            doc["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(
            doc["properties"]["eventId"]["pattern"], "^[A-Za-z0-9_-]{1,64}$",
            "{}",
            s.event_type
        );
    }
}
