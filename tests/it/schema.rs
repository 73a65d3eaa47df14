//! `schema/<table>.md` agrees with the table definitions and with the Parquet the export
//! writes. `EMLAB_BLESS=1` rewrites the files from the definitions.

use crate::util::*;
use emlab::provenance::tables::{schema_markdown, TABLES};

#[test]
fn schema_docs_match_definitions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    let bless = std::env::var_os("EMLAB_BLESS").is_some();
    let mut wrong = Vec::new();
    for def in TABLES {
        let path = dir.join(format!("{}.md", def.name));
        let want = schema_markdown(def);
        if bless {
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            _ => wrong.push(path.display().to_string()),
        }
    }
    assert!(
        wrong.is_empty(),
        "out of date (run with EMLAB_BLESS=1): {wrong:?}"
    );
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        TABLES.len(),
        "schema/ has a file for a table that does not exist"
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
                .join(format!("schema/{}.md", def.name)),
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
