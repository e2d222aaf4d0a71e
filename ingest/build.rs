//! Turns `schemas/openapi.yaml`, the edge's OpenAPI document, into the JSON that
//! `GET /openapi.json` serves, so the two can never disagree.

use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let src = Path::new(&manifest).join("../schemas/openapi.yaml");
    println!("cargo:rerun-if-changed={}", src.display());
    let text = std::fs::read_to_string(&src)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    let doc: serde_json::Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", src.display()));
    assert_eq!(doc["openapi"], "3.1.0", "the document is OpenAPI 3.1");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("openapi.json");
    std::fs::write(out, serde_json::to_vec(&doc).unwrap()).unwrap();
}
