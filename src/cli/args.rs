//! Arguments several verbs share: [`EndpointArgs`] (one declaration of `--endpoint`,
//! `--model-name`, `--api-key-env`, `--concurrency`, `--max-retries`, `--timeout`),
//! [`WeightArgs`], and [`choice`], the value parser for any library enum that names its
//! values ([`emlab::util::choice::Choice`]).

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use emlab::endpoint::Endpoint;
use emlab::util::choice::Choice;

/// A command-line value parser for a [`Choice`] enum: its names, with their help.
pub fn choice<E: Choice>() -> impl TypedValueParser<Value = E> {
    PossibleValuesParser::new(E::ALL.iter().map(|e| {
        let v = PossibleValue::new(e.name());
        match e.help() {
            "" => v,
            h => v.help(h),
        }
    }))
    .map(|name| {
        E::from_name(&name).expect("the possible-values parser passes only the names it lists")
    })
}

/// An OpenAI-compatible endpoint to send requests to, or a pool of them.
#[derive(clap::Args, Debug, Clone)]
pub struct EndpointArgs {
    /// An OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1. Repeat it for a pool of
    /// servers serving the same model: each request goes to the one with the fewest in
    /// flight, and a failing one cools down while the others take its requests.
    #[arg(long, requires = "model_name")]
    pub endpoint: Vec<String>,
    /// A pool from a TOML file: `[[endpoint]]` tables with `url` and optionally `model`,
    /// `concurrency` and `api_key_env` (defaults: --model-name, --concurrency, --api-key-env).
    #[arg(long, value_name = "FILE", conflicts_with = "endpoint")]
    pub endpoints: Option<std::path::PathBuf>,
    /// The served model's name (with --endpoint).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Environment variable holding the endpoint's API key (never stored or logged).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = Endpoint::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Retries of a request that failed in a way worth retrying (429, 5xx, timeouts).
    #[arg(long, default_value_t = Endpoint::DEFAULT_MAX_RETRIES)]
    pub max_retries: u32,
    /// Seconds before a request is abandoned (and retried).
    #[arg(long, default_value_t = Endpoint::DEFAULT_TIMEOUT_S)]
    pub timeout: f64,
}

/// `--endpoints FILE`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    endpoint: Vec<PoolMember>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolMember {
    url: String,
    model: Option<String>,
    concurrency: Option<usize>,
    api_key_env: Option<String>,
}

impl EndpointArgs {
    fn one(
        &self,
        url: String,
        model: Option<String>,
        concurrency: Option<usize>,
        key: Option<String>,
    ) -> Endpoint {
        Endpoint {
            base_url: url,
            model: model
                .or_else(|| self.model_name.clone())
                .unwrap_or_default(),
            api_key_env: key.or_else(|| self.api_key_env.clone()),
            concurrency: concurrency.unwrap_or(self.concurrency),
            max_retries: self.max_retries,
            timeout_s: self.timeout,
        }
    }

    /// The endpoints given (`--endpoint`, repeated, or `--endpoints FILE`); empty when none.
    pub fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        use anyhow::Context;
        let Some(path) = &self.endpoints else {
            return Ok(self
                .endpoint
                .iter()
                .map(|u| self.one(u.clone(), None, None, None))
                .collect());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: PoolFile = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not an endpoint pool: {e}\nhint: one [[endpoint]] table per server, with url = \"http://HOST:PORT/v1\" and optionally model, concurrency, api_key_env",
                path.display()
            )
        })?;
        if file.endpoint.is_empty() {
            anyhow::bail!("{}: no [[endpoint]] tables", path.display());
        }
        let out: Vec<Endpoint> = file
            .endpoint
            .into_iter()
            .map(|m| self.one(m.url, m.model, m.concurrency, m.api_key_env))
            .collect();
        if let Some(e) = out.iter().find(|e| e.model.is_empty()) {
            anyhow::bail!(
                "{}: endpoint {} names no model\nhint: give it model = \"NAME\" or pass --model-name",
                path.display(),
                e.base_url
            );
        }
        Ok(out)
    }

    /// The one endpoint given, for verbs that take one; an error for a pool.
    pub fn endpoint(&self) -> anyhow::Result<Option<Endpoint>> {
        let mut all = self.endpoints()?;
        if all.len() > 1 {
            anyhow::bail!("this verb takes one endpoint, not a pool of {}", all.len());
        }
        Ok(all.pop())
    }
}

/// Which GGUF weights a local model samples with (`generate`, `bench generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct WeightArgs {
    /// GGUF weights: `quantized` (the stored blocks, on emlab's batch-invariant CPU kernels),
    /// `dense` (dequantized), or `auto` (quantized on the CPU, dense on CUDA).
    #[arg(long, value_parser = choice::<emlab::model::WeightMode>(), default_value = "auto")]
    weights: emlab::model::WeightMode,
    /// Same as `--weights quantized` (kept for older scripts).
    #[arg(long, hide = true, conflicts_with = "weights")]
    keep_quantized: bool,
}

impl WeightArgs {
    pub fn mode(&self) -> emlab::model::WeightMode {
        if self.keep_quantized {
            emlab::model::WeightMode::Quantized
        } else {
            self.weights
        }
    }
}

/// Steering and ablation of the residual stream with a stored direction (`emlab
/// activations`), for the verbs that run a local model.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EditArgs {
    /// Add SCALE x unit(direction at LAYER) to LAYER's output at every position:
    /// NAME:LAYER:SCALE (repeatable; a negative scale steers away).
    #[arg(long, value_name = "NAME:LAYER:SCALE", value_parser = emlab::jobs::direction::EditSpec::parse_steer, allow_hyphen_values = true)]
    pub steer: Vec<(String, usize, f64)>,
    /// Project a direction out of the residual stream: at each layer it measured, that
    /// layer's direction (or, with --ablate-layer L, layer L's direction at every layer).
    #[arg(long, value_name = "NAME")]
    pub ablate: Option<String>,
    /// With --ablate: use layer L's direction at every layer.
    #[arg(long, value_name = "L", requires = "ablate")]
    pub ablate_layer: Option<usize>,
    /// The control: steer or ablate with Gaussian vectors drawn from SEED, with exactly the
    /// direction's norm at each layer, instead of the direction.
    #[arg(long, value_name = "SEED")]
    pub steer_random: Option<u64>,
}

impl EditArgs {
    pub fn spec(&self) -> emlab::jobs::direction::EditSpec {
        emlab::jobs::direction::EditSpec {
            steer: self.steer.clone(),
            ablate: self.ablate.clone(),
            ablate_layer: self.ablate_layer,
            random: self.steer_random,
        }
    }
}

/// The OpenAI Batch API instead of one request at a time (`judge`, `generate --endpoint`).
#[derive(clap::Args, Debug, Clone)]
pub struct BatchApiArgs {
    /// Send the requests through the endpoint's Batch API: request files uploaded (purpose
    /// `batch`, split under 50,000 requests and 200 MB), one batch each, polled until done,
    /// the answers stored as direct answers would be. A rerun follows the batches it created
    /// and sends only what is not stored (e.g. what an expired batch left).
    #[arg(long)]
    pub batch_api: bool,
    /// Seconds between polls of a batch while it changes (backing off to ten times that).
    #[arg(long, default_value_t = 30.0, requires = "batch_api")]
    pub poll_interval: f64,
    /// Requests per batch file, at most.
    #[arg(long, default_value_t = emlab::endpoint::batch::MAX_REQUESTS, requires = "batch_api",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=emlab::endpoint::batch::MAX_REQUESTS as u64))]
    pub batch_max_requests: usize,
}

impl BatchApiArgs {
    /// The batch mode asked for, checked against the endpoints given.
    pub fn mode(&self, endpoints: &[Endpoint]) -> anyhow::Result<Option<emlab::jobs::batch::Mode>> {
        if !self.batch_api {
            return Ok(None);
        }
        match endpoints.len() {
            0 => anyhow::bail!("--batch-api sends through an endpoint: give --endpoint"),
            1 => {}
            n => anyhow::bail!(
                "--batch-api sends through one endpoint's Batch API, not a pool of {n}\nhint: give one --endpoint"
            ),
        }
        if !(self.poll_interval > 0.0 && self.poll_interval <= 86_400.0) {
            anyhow::bail!(
                "--poll-interval must be a number of seconds above 0 and at most 86400 (a day)"
            );
        }
        Ok(Some(emlab::jobs::batch::Mode::Api(
            emlab::jobs::batch::ApiOptions {
                poll_interval: self.poll_interval,
                max_requests: self.batch_max_requests,
                max_bytes: emlab::endpoint::batch::MAX_BYTES,
            },
        )))
    }
}
