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

/// An OpenAI-compatible endpoint to send requests to.
#[derive(clap::Args, Debug, Clone)]
pub struct EndpointArgs {
    /// An OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1.
    #[arg(long, requires = "model_name")]
    pub endpoint: Option<String>,
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

impl EndpointArgs {
    /// The endpoint, when `--endpoint` was given.
    pub fn endpoint(&self) -> Option<Endpoint> {
        let url = self.endpoint.clone()?;
        Some(Endpoint {
            base_url: url,
            model: self.model_name.clone().unwrap_or_default(),
            api_key_env: self.api_key_env.clone(),
            concurrency: self.concurrency,
            max_retries: self.max_retries,
            timeout_s: self.timeout,
        })
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
