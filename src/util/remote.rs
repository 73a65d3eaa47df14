//! Parquet export to object storage (`emlab export --to URL`): `s3://BUCKET/PREFIX`,
//! `gs://...`, `az://...` (also `azure://`, `abfs://`) and `file:///PATH`, through the
//! `object_store` crate. Credentials, region and endpoint come from the standard variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`; `GOOGLE_*`; `AZURE_*`) and are never stored or printed.
//!
//! The layout and the state file are the local export's ([`emlab_store::export`]): each
//! Parquet file is written locally, then uploaded whole (one put, or a multipart upload that
//! becomes visible only when complete), so no reader sees half a file; the state file is
//! written last, so a crash between files loses nothing (the next run uploads the same parts
//! again). The state file is replaced with a conditional put (`If-Match` its ETag, or
//! create-only when there was none) where the store supports it, so two exports racing on one
//! prefix cannot both advance it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use emlab_store::export::ExportTarget;
use emlab_store::{Error, Result};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion, WriteMultipart,
};

const STATE_FILE: &str = "_emlab_export.json";
/// Files larger than this go up as multipart uploads, in parts of this size.
const PART: usize = 16 << 20;

pub struct ObjectTarget {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    scratch: tempfile_dir::TempDir,
    rt: tokio::runtime::Runtime,
    /// The state file's version when it was read: the condition for replacing it.
    state_version: Option<UpdateVersion>,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Export {
        table: what.to_string(),
        message: e.to_string(),
    }
}

impl ObjectTarget {
    /// The target `url` names, built from the environment's credentials.
    pub fn open(url: &str) -> Result<ObjectTarget> {
        let parsed = url::Url::parse(url).map_err(|e| {
            err(
                "*",
                format!("{url}: not a URL ({e}); expected s3://BUCKET/PREFIX, gs://, az:// or file:///PATH"),
            )
        })?;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjPath) = match parsed.scheme() {
            "s3" | "s3a" => {
                let s = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .build()
                    .map_err(|e| err("*", format!("{url}: {e}")))?;
                (Arc::new(s), ObjPath::from(parsed.path().trim_matches('/')))
            }
            "gs" => {
                let s = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| err("*", format!("{url}: {e}")))?;
                (Arc::new(s), ObjPath::from(parsed.path().trim_matches('/')))
            }
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                let s = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| err("*", format!("{url}: {e}")))?;
                (Arc::new(s), ObjPath::from(parsed.path().trim_matches('/')))
            }
            "file" => {
                let dir = PathBuf::from(parsed.path());
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let s = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| err("*", format!("{url}: {e}")))?;
                (Arc::new(s), ObjPath::default())
            }
            other => {
                return Err(err(
                    "*",
                    format!("{url}: unknown scheme {other}:// (s3, gs, az or file)"),
                ))
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err("*", format!("cannot start the async runtime: {e}")))?;
        Ok(ObjectTarget {
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
            scratch: tempfile_dir::TempDir::new()?,
            rt,
            state_version: None,
        })
    }

    fn path(&self, rel: &str) -> ObjPath {
        rel.split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn name(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }
}

impl ExportTarget for ObjectTarget {
    fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    fn read_state(&mut self) -> Result<Option<Vec<u8>>> {
        let path = self.path(STATE_FILE);
        let got = self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => {
                    let version = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    Ok(Some((r.bytes().await?, version)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match got.map_err(|e| err("*", format!("{}: {e}", self.name(STATE_FILE))))? {
            Some((bytes, version)) => {
                self.state_version = Some(version);
                Ok(Some(bytes.to_vec()))
            }
            None => Ok(None),
        }
    }

    fn has_table(&mut self, table: &str) -> Result<bool> {
        let prefix = self.path(table);
        let first = self
            .rt
            .block_on(async { self.store.list(Some(&prefix)).next().await });
        match first {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(err(table, format!("{}: {e}", self.name(table)))),
        }
    }

    fn publish(&mut self, local: &Path, rel: &str) -> Result<String> {
        let bytes = std::fs::read(local).map_err(|e| Error::io(local, e))?;
        let path = self.path(rel);
        let name = self.name(rel);
        let res = self.rt.block_on(async {
            if bytes.len() <= PART {
                self.store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map(|_| ())
            } else {
                let upload = self.store.put_multipart(&path).await?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
                for chunk in bytes.chunks(PART) {
                    w.write(chunk);
                }
                w.finish().await.map(|_| ())
            }
        });
        res.map_err(|e| err(rel, format!("{name}: {e}")))?;
        let _ = std::fs::remove_file(local);
        Ok(name)
    }

    fn write_state(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.path(STATE_FILE);
        let mode = match self.state_version.take() {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let payload = PutPayload::from(bytes.to_vec());
        let res = self.rt.block_on(async {
            match self
                .store
                .put_opts(&path, payload.clone(), mode.into())
                .await
            {
                // The store cannot put conditionally: replace it.
                Err(object_store::Error::NotImplemented { .. }) => {
                    self.store.put(&path, payload).await.map(|_| ())
                }
                r => r.map(|_| ()),
            }
        });
        res.map_err(|e| match e {
            object_store::Error::Precondition { .. }
            | object_store::Error::AlreadyExists { .. } => err(
                "*",
                format!(
                    "{}: another export changed the state file while this one ran; its files are \
                     uploaded, rerun to record them",
                    self.name(STATE_FILE)
                ),
            ),
            e => err("*", format!("{}: {e}", self.name(STATE_FILE))),
        })
    }
}

/// A temporary local directory, removed on drop.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> emlab_store::Result<TempDir> {
            let base = std::env::temp_dir();
            let dir = base.join(format!(
                "emlab-export-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::create_dir_all(&dir).map_err(|e| emlab_store::Error::io(&dir, e))?;
            Ok(TempDir(dir))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
