//! `schema/<table>.snap` agrees with the table definitions and with the Parquet the export
//! writes. The files are insta snapshots of the documentation generated from the definitions:
//! after adding a column, `cargo insta review` (or `INSTA_UPDATE=always cargo test schema`)
//! rewrites them, and the diff shows what changed.

use crate::util::*;

use emlab::provenance::tables::{schema_markdown, TABLES};

#[test]
fn schema_docs_match_definitions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(&dir);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.bind(|| {
        for def in TABLES {
            insta::assert_snapshot!(def.name, schema_markdown(def));
        }
    });
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".snap"))
        .collect();
    assert_eq!(
        files.len(),
        TABLES.len(),
        "schema/ has a file for a table that does not exist: {files:?}"
    );
}

/// Parse the `| column | type | parquet | nullable |` rows of a schema file.
fn documented_columns(md: &str) -> Vec<(String, String, bool)> {
    md.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_string(),
                cells[3].to_string(),
                cells[4] == "yes",
            )
        })
        .collect()
}

#[test]
fn exported_parquet_schema_matches_schema_docs() {
    let s = TestStore::new();
    let file = s.write("a.jsonl", chat_jsonl("a", 3).as_bytes());
    s.ok(&["data", "import", file.to_str().unwrap(), "--name", "a"]);
    let out = s.path("pq");
    s.ok(&["export", "--out", out.to_str().unwrap()]);
    for def in TABLES {
        let md = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("schema/{}.snap", def.name)),
        )
        .unwrap();
        let documented = documented_columns(&md);
        let part = std::fs::read_dir(out.join(def.name))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let f = std::fs::File::open(part.join("data.parquet")).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        let schema = reader.schema();
        let actual: Vec<(String, String, bool)> = schema
            .fields()
            .iter()
            .map(|f| {
                let ty = match f.data_type() {
                    arrow::datatypes::DataType::List(i) => format!("List<{}>", i.data_type()),
                    t => t.to_string(),
                };
                (f.name().clone(), ty, f.is_nullable())
            })
            .collect();
        assert_eq!(actual, documented, "table {}", def.name);
    }
}
