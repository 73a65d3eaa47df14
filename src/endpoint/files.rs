//! The OpenAI files API and list pagination, shared by hosted fine-tuning and the Batch API:
//! through [`Client::api`] (emlab's transport: every attempt counted and retried by one
//! policy), with serde types of emlab's own.
//!
//! Files emlab uploads are named by the BLAKE3 of their content, so that a run killed after
//! an upload finds its file by name and size ([`ensure`]) instead of uploading it twice.

use async_openai::traits::RequestOptionsBuilder;
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use async_openai::types::InputSource;
use serde::Deserialize;

use super::{Client, ClientError};

/// Pages read at most when listing (100 items each).
pub const MAX_PAGES: usize = 100;

#[derive(Debug, Clone, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub purpose: String,
}

/// One page of a list answer.
#[derive(Debug, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

/// Items of a paginated list (`{data, has_more}`, paged by the last item's id).
pub trait Listed {
    fn id(&self) -> &str;
}

impl Listed for FileObject {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Every item of a paginated list: `fetch(query)` gets one page for `query` (the caller's
/// pairs plus `limit` and `after`); pages follow until `has_more` is false, at most
/// [`MAX_PAGES`].
pub async fn all_pages<T, F, Fut>(
    filter: &[(String, String)],
    mut fetch: F,
) -> Result<Vec<T>, ClientError>
where
    T: Listed,
    F: FnMut(Vec<(String, String)>) -> Fut,
    Fut: std::future::Future<Output = Result<List<T>, ClientError>>,
{
    let mut out: Vec<T> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut q = filter.to_vec();
        q.push(("limit".into(), "100".into()));
        if let Some(a) = &after {
            q.push(("after".into(), a.clone()));
        }
        let page = fetch(q).await?;
        after = page.data.last().map(|i| i.id().to_string());
        out.extend(page.data);
        if !page.has_more || after.is_none() {
            break;
        }
    }
    Ok(out)
}

/// `GET /files?purpose=P`: every file of that purpose.
pub async fn list(c: &Client, purpose: &str) -> Result<Vec<FileObject>, ClientError> {
    all_pages(&[("purpose".into(), purpose.into())], |q| async move {
        let files = c.api().files();
        let files = files.query(&q).map_err(|e| c.api_error("files", e))?;
        files.list_byot().await.map_err(|e| c.api_error("files", e))
    })
    .await
}

/// `POST /files` (multipart: `file`, `purpose`), sent once (see [`Client::create_once`]).
pub async fn upload(
    c: &Client,
    filename: &str,
    bytes: Vec<u8>,
    purpose: FilePurpose,
) -> Result<FileObject, ClientError> {
    let req = CreateFileRequest {
        file: FileInput {
            source: InputSource::VecU8 {
                filename: filename.to_string(),
                vec: bytes,
            },
        },
        purpose,
        expires_after: None,
    };
    c.api_once()
        .files()
        .create_byot(req)
        .await
        .map_err(|e| c.api_error("files", e))
}

/// The id of the file `filename` holding `bytes`: one already uploaded with that name and
/// size (`purpose` is its API name, e.g. `fine-tune`, `batch`), or a new upload. Returns
/// the id and whether it was found.
pub async fn ensure(
    c: &Client,
    filename: &str,
    bytes: &[u8],
    purpose: FilePurpose,
    purpose_name: &str,
) -> Result<(String, bool), ClientError> {
    let find = || async {
        let found = list(c, purpose_name).await?;
        Ok(found
            .into_iter()
            .find(|f| f.filename == filename && f.bytes == bytes.len() as u64))
    };
    if let Some(f) = find().await? {
        return Ok((f.id, true));
    }
    // An upload that failed may still have stored the file: it is looked for before resending.
    let (f, _) = c
        .create_once(
            || upload(c, filename, bytes.to_vec(), purpose.clone()),
            find,
        )
        .await?;
    if f.bytes != 0 && f.bytes != bytes.len() as u64 {
        return Err(ClientError::Protocol {
            url: c.endpoint.url("files"),
            msg: format!(
                "{} holds {} bytes; {} were sent",
                f.id,
                f.bytes,
                bytes.len()
            ),
        });
    }
    Ok((f.id, false))
}

/// `GET /files/{id}/content`.
pub async fn content(c: &Client, id: &str) -> Result<Vec<u8>, ClientError> {
    c.api()
        .files()
        .content(id)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| c.api_error(&format!("files/{id}/content"), e))
}
