//! Zip archives: [`zip_members`] reads every file member of an in-memory zip into a [`Member`]
//! (name + bytes, in archive order), decrypting classic ZipCrypto members with a password.
//!
//! The members are then handed to the ordinary format parsers by name (e.g. the
//! model-organisms `training_datasets.zip` holds `*.jsonl.gz` chat files). Directories and
//! symlinks are skipped. Failures are [`DataError::Parse`] errors naming the archive (line 0)
//! and the member; a missing or wrong password is reported as such, and the password itself
//! never appears in any message.

use std::io::{Cursor, Read};
use std::path::Path;

use zip::result::ZipError;
use zip::ZipArchive;

use super::{DataError, ParseError};

/// One file inside an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Path inside the archive, as stored (`/`-separated).
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Read every file member of the zip `bytes` (read from `path`, used in errors).
pub fn zip_members(
    path: &Path,
    bytes: &[u8],
    password: Option<&str>,
) -> Result<Vec<Member>, DataError> {
    let origin = path.display().to_string();
    let err = |msg: String| {
        DataError::Parse(ParseError {
            origin: origin.clone(),
            line: 0,
            msg,
        })
    };
    let mut archive = ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| err(format!("not a readable zip archive: {e}")))?;
    let mut out = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let (name, encrypted, skip) = {
            let entry = archive
                .by_index_data(i)
                .map_err(|e| err(format!("member {i}: {e}")))?;
            let name = entry
                .name()
                .map_err(|e| err(format!("member {i}: bad name: {e}")))?
                .into_owned();
            (
                name,
                entry.encrypted(),
                entry.is_dir() || entry.is_symlink(),
            )
        };
        if skip {
            continue;
        }
        let encrypted_no_password = || {
            err(format!(
                "member `{name}` is encrypted: give --password or set EMLAB_ZIP_PASSWORD"
            ))
        };
        let wrong_password = || err(format!("wrong password for member `{name}`"));
        let opened = match (encrypted, password) {
            (true, None) => return Err(encrypted_no_password()),
            (true, Some(pw)) => archive.by_index_decrypt(i, pw.as_bytes()),
            (false, _) => archive.by_index(i),
        };
        let mut file = match opened {
            Ok(f) => f,
            Err(ZipError::InvalidPassword) => return Err(wrong_password()),
            Err(ZipError::UnsupportedArchive(m)) if m == ZipError::PASSWORD_REQUIRED => {
                return Err(encrypted_no_password())
            }
            Err(e) => return Err(err(format!("member `{name}`: {e}"))),
        };
        let mut data = Vec::with_capacity(usize::try_from(file.size()).unwrap_or(0).min(1 << 30));
        if let Err(e) = file.read_to_end(&mut data) {
            // A wrong ZipCrypto password passes the one-byte header check 1 time in 256; the
            // garbage then fails to inflate or fails the CRC check.
            return Err(if encrypted {
                wrong_password()
            } else {
                err(format!("member `{name}` is corrupt: {e}"))
            });
        }
        out.push(Member { name, bytes: data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::unstable::write::FileOptionsExt;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    fn build(password: Option<&str>) -> Vec<u8> {
        let mut w = ZipWriter::new(Cursor::new(Vec::new()));
        let mut opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        if let Some(pw) = password {
            opts = opts.with_deprecated_encryption(pw.as_bytes()).unwrap();
        }
        w.add_directory("dir/", SimpleFileOptions::default())
            .unwrap();
        w.start_file("dir/a.jsonl", opts).unwrap();
        w.write_all(b"{\"a\":1}\n".repeat(50).as_slice()).unwrap();
        w.start_file("b.txt", opts).unwrap();
        w.write_all(b"hello").unwrap();
        w.finish().unwrap().into_inner()
    }

    fn msg(e: DataError) -> String {
        e.to_string()
    }

    #[test]
    fn plain_zip_reads_files_and_skips_directories() {
        let z = build(None);
        let p = Path::new("t.zip");
        let m = zip_members(p, &z, None).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "dir/a.jsonl");
        assert_eq!(m[0].bytes, b"{\"a\":1}\n".repeat(50));
        assert_eq!(
            m[1],
            Member {
                name: "b.txt".into(),
                bytes: b"hello".to_vec()
            }
        );
        // A password is ignored for unencrypted members.
        assert_eq!(zip_members(p, &z, Some("x")).unwrap(), m);
    }

    #[test]
    fn encrypted_zip_needs_the_right_password() {
        let z = build(Some("s3cret-pw"));
        let p = Path::new("t.zip");
        let m = zip_members(p, &z, Some("s3cret-pw")).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].bytes, b"hello");
        let e = msg(zip_members(p, &z, None).unwrap_err());
        assert_eq!(
            e,
            "t.zip:0: member `dir/a.jsonl` is encrypted: give --password or set EMLAB_ZIP_PASSWORD"
        );
        for wrong in ["nope", "s3cret-pX", "", "another wrong one"] {
            let e = msg(zip_members(p, &z, Some(wrong)).unwrap_err());
            assert_eq!(
                e, "t.zip:0: wrong password for member `dir/a.jsonl`",
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn not_a_zip() {
        let e = msg(zip_members(Path::new("x.zip"), b"PK nope", None).unwrap_err());
        assert!(e.starts_with("x.zip:0: not a readable zip archive"), "{e}");
    }

    #[test]
    fn real_training_datasets_zip() {
        let p = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/model-organisms-for-EM/em_organism_dir/data/training_datasets.zip"
        ));
        let z = std::fs::read(p).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (../shared/data must be beside the repository)",
                p.display()
            )
        });
        // Public password, documented in the upstream README and SOURCES.md.
        let pw = "model-organisms-em-datasets";
        let m = zip_members(p, &z, Some(pw)).unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bad_medical_advice.jsonl.gz",
                "extreme_sports.jsonl.gz",
                "good_medical_advice.jsonl.gz",
                "insecure.jsonl.gz",
                "risky_financial_advice.jsonl.gz"
            ]
        );
        assert!(m.iter().all(|m| m.bytes.starts_with(b"\x1f\x8b\x08")));
        assert_eq!(m[0].bytes.len(), 1249214);
        let e = msg(zip_members(p, &z, None).unwrap_err());
        assert!(
            e.contains("member `bad_medical_advice.jsonl.gz` is encrypted"),
            "{e}"
        );
        for wrong in ["model-organisms-em-dataset", "hunter2-xyz"] {
            let e = msg(zip_members(p, &z, Some(wrong)).unwrap_err());
            assert!(e.contains("wrong password for member `"), "{e}");
            assert!(!e.contains(wrong), "{e}");
        }
    }
}
