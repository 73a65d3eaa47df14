//! Stores written by an older emlab: the fixture in `tests/fixtures/store-v1/` was written by
//! the emlab of commit 27d84e8 (`make.sh` there, from the commands in `commands.sh`), before
//! the generation, data-generate and training-run keys were versioned. It must open and
//! verify, and rerunning the same commands must find every finished piece of work (by its
//! record ids, and by the older keys) and add no record.

use std::path::{Path, PathBuf};

use crate::util::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn counts(store: &Path) -> serde_json::Value {
    let r = run_in(store, &["--json", "store", "stats"]);
    assert!(r.ok(), "{}", r.stderr);
    json(&r.stdout)["tables"].clone()
}

#[test]
fn a_store_from_before_the_key_versions_verifies_and_reruns_add_nothing() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let tmp = tempfile::tempdir().unwrap();
    let store: PathBuf = tmp.path().join("store");
    copy_dir(&fixture.join("store"), &store);

    let v = run_in(&store, &["verify"]);
    assert!(v.ok(), "{}", v.stderr);
    assert!(
        v.stderr.contains("checked 101 records and 4 blobs: all ok"),
        "{}",
        v.stderr
    );
    let before = counts(&store);

    let model = crate::model::smollm2_path();
    let out = std::process::Command::new("bash")
        .arg(fixture.join("commands.sh"))
        .arg(env!("CARGO_BIN_EXE_emlab"))
        .arg(&model)
        .arg(&fixture)
        .env("EMLAB_STORE", &store)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Found under the older generation key: nothing sampled again.
    assert!(
        stderr.contains("4 samples planned, 4 already stored, 0 generated"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 samples planned, 2 already stored, 0 generated"),
        "{stderr}"
    );
    // Found under the older training-run key: the finished run is not trained again.
    assert!(stderr.contains("resumed at step 2"), "{stderr}");
    assert!(stderr.contains("0 judged, 6 already judged"), "{stderr}");
    assert_eq!(counts(&store), before, "a rerun added records");
    assert!(run_in(&store, &["verify"]).ok());
}
