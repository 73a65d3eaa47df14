//! The OpenAI Batch API's protocol: the request JSONL (`custom_id`, `method`, `url`, `body`
//! per line), its split into files under the API's limits, the `/batches` calls and the
//! result JSONL (the output and error files, and `vllm run-batch`'s output, which has the
//! same lines). The job that drives it and stores the answers is [`crate::jobs::batch`].

use std::collections::BTreeMap;

use async_openai::traits::RequestOptionsBuilder;
use serde::Deserialize;
use serde_json::{json, Value as J};

use super::files::{all_pages, Listed};
use super::{Client, ClientError};

/// Requests per batch file, at most (the API's limit).
pub const MAX_REQUESTS: usize = 50_000;
/// Bytes per batch file, at most (the API's limit: 200 MB).
pub const MAX_BYTES: usize = 200 * 1000 * 1000;
/// The one endpoint emlab batches.
pub const CHAT_URL: &str = "/v1/chat/completions";
/// The batch metadata entry holding the BLAKE3 of its input file, by which a rerun finds it.
pub const META_KEY: &str = "emlab_key";

/// A batch as the API returns it (the fields emlab reads).
#[derive(Debug, Clone, Deserialize)]
pub struct BatchObject {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub input_file_id: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, J>>,
    #[serde(default)]
    pub request_counts: Option<J>,
    #[serde(default)]
    pub errors: Option<J>,
    #[serde(default)]
    pub created_at: i64,
}

impl Listed for BatchObject {
    fn id(&self) -> &str {
        &self.id
    }
}

impl BatchObject {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }

    /// `completed`, `failed`, `expired` or `cancelled`: the batch will not change again.
    pub fn finished(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// Why a batch answered nothing (a `failed` batch: its validation errors).
    pub fn error_message(&self) -> String {
        let msgs: Vec<String> = self
            .errors
            .as_ref()
            .and_then(|e| e["data"].as_array())
            .map(|d| {
                d.iter()
                    .map(|e| {
                        let line = e["line"]
                            .as_i64()
                            .map_or(String::new(), |l| format!("line {l}: "));
                        format!("{line}{}", e["message"].as_str().unwrap_or("?"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if msgs.is_empty() {
            format!("batch {} {}", self.id, self.status)
        } else {
            format!("batch {} {}: {}", self.id, self.status, msgs.join("; "))
        }
    }
}

/// One request line: `body` (a chat request) for `model`, named by `custom_id`.
pub fn request_line(custom_id: &str, model: &str, mut body: J) -> String {
    body["model"] = J::String(model.to_string());
    json!({"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}).to_string()
}

/// Request lines joined into files of at most `max_requests` lines and `max_bytes` bytes
/// (newline-terminated), in order. A single line over `max_bytes` is an error.
pub fn split(
    lines: &[String],
    max_requests: usize,
    max_bytes: usize,
) -> Result<Vec<(Vec<u8>, usize)>, String> {
    let mut out: Vec<(Vec<u8>, usize)> = Vec::new();
    let (mut cur, mut n) = (Vec::new(), 0usize);
    for (i, l) in lines.iter().enumerate() {
        let len = l.len() + 1;
        if len > max_bytes {
            return Err(format!(
                "request {} is {len} bytes, over the {max_bytes} bytes a batch file may hold",
                i + 1
            ));
        }
        if n > 0 && (n >= max_requests.max(1) || cur.len() + len > max_bytes) {
            out.push((std::mem::take(&mut cur), n));
            n = 0;
        }
        cur.extend_from_slice(l.as_bytes());
        cur.push(b'\n');
        n += 1;
    }
    if n > 0 {
        out.push((cur, n));
    }
    Ok(out)
}

/// One line of a result file: the request it answers and its answer (a chat completion) or
/// why there is none.
#[derive(Debug)]
pub struct Answer {
    pub custom_id: String,
    pub result: Result<J, String>,
}

/// The lines of a result file (an output or error file of the Batch API, or the output of
/// `vllm run-batch`). A line that is not a result is an error naming it (`source`: where the
/// bytes came from).
pub fn parse_results(bytes: &[u8], source: &str) -> Result<Vec<Answer>, ClientError> {
    let bad = |n: usize, msg: String| ClientError::Protocol {
        url: source.to_string(),
        msg: format!("line {n}: {msg}"),
    };
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: J = serde_json::from_slice(line).map_err(|e| bad(n, format!("not JSON: {e}")))?;
        let Some(custom_id) = v["custom_id"].as_str() else {
            return Err(bad(n, "no `custom_id`".into()));
        };
        let resp = &v["response"];
        let status = resp["status_code"].as_i64();
        let result = if !v["error"].is_null() {
            let e = &v["error"];
            Err(format!(
                "{}{}",
                e["code"]
                    .as_str()
                    .map_or(String::new(), |c| format!("{c}: ")),
                e["message"].as_str().unwrap_or("no message")
            ))
        } else if status == Some(200) && resp["body"]["choices"].is_array() {
            Ok(resp["body"].clone())
        } else if resp.is_object() {
            // OpenAI: `{"error": {"message"}}`; vLLM: `{"object": "error", "message"}`.
            let body = &resp["body"];
            let msg = body["error"]["message"]
                .as_str()
                .or(body["message"].as_str())
                .map_or_else(|| body.to_string(), str::to_string);
            Err(format!("status {}: {msg}", status.unwrap_or(0)))
        } else {
            return Err(bad(n, "neither `response` nor `error`".into()));
        };
        out.push(Answer {
            custom_id: custom_id.to_string(),
            result,
        });
    }
    Ok(out)
}

/// `POST /batches` for an uploaded request file, sent once (see [`Client::create_once`]).
pub async fn create(
    c: &Client,
    input_file_id: &str,
    key: &str,
) -> Result<BatchObject, ClientError> {
    let body = json!({"input_file_id": input_file_id, "endpoint": CHAT_URL,
        "completion_window": "24h", "metadata": {META_KEY: key}});
    c.api_once()
        .batches()
        .create_byot(body)
        .await
        .map_err(|e| c.api_error("batches", e))
}

/// `GET /batches/{id}`.
pub async fn retrieve(c: &Client, id: &str) -> Result<BatchObject, ClientError> {
    c.api()
        .batches()
        .retrieve_byot(id)
        .await
        .map_err(|e| c.api_error(&format!("batches/{id}"), e))
}

/// Every batch of the organisation, oldest first.
pub async fn list(c: &Client) -> Result<Vec<BatchObject>, ClientError> {
    let mut all: Vec<BatchObject> = all_pages(&[], |q| async move {
        let b = c.api().batches();
        let b = b.query(&q).map_err(|e| c.api_error("batches", e))?;
        b.list_byot().await.map_err(|e| c.api_error("batches", e))
    })
    .await?;
    all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_order_and_both_limits() {
        let lines: Vec<String> = (0..7).map(|i| format!("{{\"n\":{i}}}")).collect();
        let by_count = split(&lines, 3, 1 << 20).unwrap();
        assert_eq!(by_count.iter().map(|c| c.1).collect::<Vec<_>>(), [3, 3, 1]);
        let joined: Vec<u8> = by_count.iter().flat_map(|c| c.0.clone()).collect();
        assert_eq!(joined, (lines.join("\n") + "\n").into_bytes());
        // Each line is 8 bytes with its newline: 20 bytes hold two.
        let by_size = split(&lines, 100, 20).unwrap();
        assert_eq!(
            by_size.iter().map(|c| c.1).collect::<Vec<_>>(),
            [2, 2, 2, 1]
        );
        assert!(by_size.iter().all(|c| c.0.len() <= 20));
        let err = split(&lines, 100, 5).unwrap_err();
        assert!(err.contains("request 1 is 8 bytes"), "{err}");
        assert!(split(&[], 3, 10).unwrap().is_empty());
    }

    #[test]
    fn results_read_answers_errors_and_refuse_what_is_not_a_result() {
        let ok = json!({"id": "r1", "custom_id": "a", "response": {"status_code": 200, "body": {"choices": [{"message": {"content": "hi"}}]}}, "error": null});
        let refused = json!({"id": "r2", "custom_id": "b", "response": {"status_code": 400, "body": {"error": {"message": "bad model"}}}, "error": null});
        let expired = json!({"id": "r3", "custom_id": "c", "response": null, "error": {"code": "batch_expired", "message": "not answered in time"}});
        let text = format!("{ok}\n\n{refused}\n{expired}\n");
        let a = parse_results(text.as_bytes(), "out.jsonl").unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].custom_id, "a");
        assert_eq!(
            a[0].result.as_ref().unwrap()["choices"][0]["message"]["content"],
            "hi"
        );
        assert_eq!(a[1].result.as_ref().unwrap_err(), "status 400: bad model");
        assert_eq!(
            a[2].result.as_ref().unwrap_err(),
            "batch_expired: not answered in time"
        );
        let e = parse_results(format!("{ok}\nnot json\n").as_bytes(), "out.jsonl").unwrap_err();
        assert!(e.to_string().contains("out.jsonl: line 2: not JSON"), "{e}");
        let e = parse_results(b"{\"custom_id\": \"x\"}\n", "out.jsonl").unwrap_err();
        assert!(
            e.to_string()
                .contains("line 1: neither `response` nor `error`"),
            "{e}"
        );
        let e = parse_results(b"{\"response\": {}}\n", "out.jsonl").unwrap_err();
        assert!(e.to_string().contains("line 1: no `custom_id`"), "{e}");
    }

    #[test]
    fn request_lines_name_the_model_and_the_chat_url() {
        let l: J =
            serde_json::from_str(&request_line("k1", "judge", json!({"max_tokens": 1}))).unwrap();
        assert_eq!(
            l,
            json!({"custom_id": "k1", "method": "POST", "url": CHAT_URL, "body": {"max_tokens": 1, "model": "judge"}})
        );
    }
}
