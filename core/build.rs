//! Embeds the shipped JSON Schemas (`../schemas/<type>/v<N>.json`) into the crate so that the
//! default registry needs no files at run time. Adding a schema file needs no code change.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest).join("../schemas");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    if let Ok(types) = std::fs::read_dir(&root) {
        for ty in types.flatten() {
            if !ty.path().is_dir() {
                continue;
            }
            println!("cargo:rerun-if-changed={}", ty.path().display());
            for file in std::fs::read_dir(ty.path())
                .expect("schema type dir is readable")
                .flatten()
            {
                let name = file.file_name().to_string_lossy().into_owned();
                if name.starts_with('v') && name.ends_with(".json") {
                    let rel = format!("{}/{}", ty.file_name().to_string_lossy(), name);
                    let abs = file
                        .path()
                        .canonicalize()
                        .expect("schema path canonicalizes");
                    println!("cargo:rerun-if-changed={}", abs.display());
                    entries.push((rel, abs));
                }
            }
        }
    }
    entries.sort();
    let mut out = String::from("/// Shipped schemas: (path relative to `schemas/`, contents).\n");
    out.push_str("pub static BUILTIN_SCHEMAS: &[(&str, &str)] = &[\n");
    for (rel, abs) in entries {
        writeln!(
            out,
            "    ({rel:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("builtin_schemas.rs");
    std::fs::write(dest, out).unwrap();
}
