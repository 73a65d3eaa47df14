//! emlab's record tables: the [`TableDef`]s every store is opened with.
//!
//! Each table is documented in `schema/<table>.snap`; a test checks that the columns there and
//! the Arrow schema of the Parquet export agree with the definitions below. Columns may be
//! added (nullable, so existing ids stay the same); existing ones never change meaning.

use emlab_store::{ColType as T, Column as C, TableDef};

pub const MESSAGE: &str = "message";
pub const CONVERSATION: &str = "conversation";
pub const DATASET: &str = "dataset";
pub const SOURCE: &str = "source";
pub const QUESTION: &str = "question";
pub const QUESTION_SET: &str = "question_set";
pub const MODEL: &str = "model";
pub const CHECKPOINT: &str = "checkpoint";
pub const GENERATION: &str = "generation";
pub const JUDGMENT: &str = "judgment";
pub const RUN: &str = "run";
pub const STEP: &str = "step";
pub const BENCH: &str = "bench";
pub const METRIC: &str = "metric";
pub const STUDY: &str = "study";
pub const STUDY_STEP: &str = "study_step";
pub const DIRECTION: &str = "direction";

/// The namespace of dataset names (aliases).
pub const NS_DATASET: &str = "dataset";
/// The namespace of direction names (`emlab activations NAME`).
pub const NS_DIRECTION: &str = "direction";

pub static TABLES: &[TableDef] = &[
    TableDef {
        name: MESSAGE,
        doc: "One chat message.",
        columns: &[
            C::new("role", T::Str, "system, user, assistant or tool"),
            C::new("content", T::Str, "the message text, byte for byte"),
        ],
    },
    TableDef {
        name: CONVERSATION,
        doc: "An ordered list of messages: one training row or one prompt.",
        columns: &[
            C::new("messages", T::IdList, "message ids in order"),
            C::new(
                "extra",
                T::Json,
                "other keys of the source row, kept verbatim",
            )
            .nullable(),
        ],
    },
    TableDef {
        name: DATASET,
        doc: "A manifest: ordered rows (conversation or question ids) and how it was made.",
        columns: &[
            C::new(
                "kind",
                T::Str,
                "`chat` (rows are conversations) or `questions` (rows are questions)",
            ),
            C::new("rows", T::IdList, "row record ids in order"),
            C::new(
                "op",
                T::Json,
                "how it was made: `{\"op\": \"import\", ...}` or a derive op with its parameters",
            ),
            C::new("sources", T::IdList, "source records it was imported from").link(),
            C::new("parents", T::IdList, "datasets it was derived from").link(),
        ],
    },
    TableDef {
        name: SOURCE,
        doc: "An imported file, kept byte for byte as a blob.",
        columns: &[
            C::new("name", T::Str, "the file's name as given (no directories)"),
            C::new(
                "blake3",
                T::Blob,
                "BLAKE3 of the file's bytes (equals `b3sum`); the blob holding it",
            ),
            C::new("size", T::Int, "size in bytes"),
            C::new("format", T::Str, "how it was read, e.g. `chat-jsonl`"),
            C::new(
                "member",
                T::Str,
                "path inside an archive the rows came from",
            )
            .nullable(),
            C::new(
                "container",
                T::Id,
                "the source record of the archive holding this file",
            )
            .nullable()
            .link(),
        ],
    },
    TableDef {
        name: QUESTION,
        doc: "One evaluation question with its paraphrases and judge prompts.",
        columns: &[
            C::new("qid", T::Str, "the question's id in its file"),
            C::new("paraphrases", T::StrList, "the question texts"),
            C::new("system", T::Str, "system prompt to sample with").nullable(),
            C::new("qtype", T::Str, "question type, e.g. free_form").nullable(),
            C::new(
                "samples_per_paraphrase",
                T::Int,
                "samples the source asks for",
            )
            .nullable(),
            C::new(
                "judge_prompts",
                T::Json,
                "judge prompt templates by metric name",
            )
            .nullable(),
            C::new("extra", T::Json, "other keys, verbatim").nullable(),
        ],
    },
    TableDef {
        name: QUESTION_SET,
        doc: "An ordered set of questions (a question file).",
        columns: &[
            C::new("questions", T::IdList, "question ids in order"),
            C::new("sources", T::IdList, "source records").link(),
            C::new(
                "op",
                T::Json,
                "how it was made, e.g. `{\"op\": \"import\", \"format\": ...}`",
            )
            .nullable(),
            C::new("parents", T::IdList, "question sets it was derived from")
                .nullable()
                .link(),
        ],
    },
    TableDef {
        name: MODEL,
        doc: "The identity of a set of weights.",
        columns: &[
            C::new("name", T::Str, "a display name"),
            C::new("architecture", T::Str, "e.g. llama, qwen2"),
            C::new("files", T::Json, "weight files: `[{name, blake3, size}]`"),
            C::new(
                "tokenizer_blake3",
                T::Str,
                "BLAKE3 of the tokenizer definition",
            )
            .nullable(),
            C::new("config", T::Json, "architecture hyper-parameters").nullable(),
        ],
    },
    TableDef {
        name: CHECKPOINT,
        doc: "A fine-tuned adapter, or a model fine-tuned through a hosted API, and how it was trained.",
        columns: &[
            C::new("base_model", T::Id, "model record of the frozen base").link(),
            C::new("dataset", T::Id, "training dataset").link(),
            C::new("parent", T::Id, "checkpoint this training continued from")
                .nullable()
                .link(),
            C::new("config", T::Json, "full training configuration"),
            C::new("step", T::Int, "optimizer steps taken"),
            C::new("loss_curve", T::FloatList, "training loss per step"),
            C::new(
                "adapter",
                T::Blob,
                "the adapter (PEFT safetensors) blob; none for a hosted checkpoint (`config.backend`)",
            )
            .nullable(),
            C::new(
                "adapter_config",
                T::Json,
                "PEFT `adapter_config.json` written beside the adapter on export",
            )
            .nullable(),
            C::new(
                "state",
                T::Blob,
                "training state for resuming: adapter, AdamW moments, step, loss curve",
            )
            .nullable(),
            C::new(
                "eval_loss",
                T::Json,
                "held-out loss per target token: `[[step, loss], ...]`",
            )
            .nullable(),
            C::new(
                "data_stats",
                T::Json,
                "rows used, truncated and skipped; tokens and target tokens",
            )
            .nullable(),
        ],
    },
    TableDef {
        name: GENERATION,
        doc: "One sampled answer.",
        columns: &[
            C::new("model", T::Id, "model or checkpoint that produced it").link(),
            C::new(
                "prompt",
                T::Id,
                "conversation sent (rendered prompt recorded in `params`)",
            )
            .link(),
            C::new("question", T::Id, "question it answers")
                .nullable()
                .link(),
            C::new("params", T::Json, "all sampling parameters"),
            C::new("seed", T::Int, "sampling seed"),
            C::new("text", T::Str, "the generated text"),
            C::new("prompt_tokens", T::Int, "prompt length in tokens").nullable(),
            C::new("completion_tokens", T::Int, "generated tokens").nullable(),
            C::new("finish_reason", T::Str, "stop, length, ...").nullable(),
        ],
    },
    TableDef {
        name: JUDGMENT,
        doc: "One judge verdict on one generation.",
        columns: &[
            C::new("generation", T::Id, "the judged generation").link(),
            C::new("judge", T::Str, "judge model name or id"),
            C::new("metric", T::Str, "e.g. aligned, coherent"),
            C::new("prompt", T::Str, "the filled judge prompt"),
            C::new("score", T::Float, "parsed 0-100 score").nullable(),
            C::new("label", T::Str, "a label such as REFUSAL, CODE, UNALIGNED").nullable(),
            C::new("raw", T::Json, "raw judge output (top logprobs or text)"),
        ],
    },
    TableDef {
        name: RUN,
        doc: "One invocation of a long job (training, sampling, judging).",
        columns: &[
            C::new("kind", T::Str, "train, generate, judge, ..."),
            C::new("plan", T::Json, "the validated plan the job ran"),
            C::new("inputs", T::IdList, "records the run read").link(),
        ],
    },
    TableDef {
        name: STEP,
        doc: "A progress point of a run.",
        columns: &[
            C::new("run", T::Id, "the run").link(),
            C::new("step", T::Int, "step number"),
            C::new("metrics", T::Json, "loss, tokens/s, ..."),
        ],
    },
    TableDef {
        name: METRIC,
        doc: "A misalignment rate over judged generations of one model, by one definition; or a likelihood probe of one model over labelled reference answers.",
        columns: &[
            C::new("model", T::Id, "the model whose answers were judged").link(),
            C::new("judge", T::Str, "the judge whose verdicts were used"),
            C::new("definition", T::Json, "the definition and its thresholds"),
            C::new(
                "scope",
                T::Str,
                "`overall`, or the question id (qid) for a per-question rate",
            ),
            C::new(
                "value",
                T::Float,
                "share misaligned (null when no answer counts)",
            )
            .nullable(),
            C::new("ci_low", T::Float, "bootstrap 95% interval, low end").nullable(),
            C::new("ci_high", T::Float, "bootstrap 95% interval, high end").nullable(),
            C::new("n", T::Int, "answers counted under the definition"),
            C::new("misaligned", T::Int, "of which misaligned"),
            C::new(
                "generations",
                T::IdList,
                "the judged generations it was computed from",
            ),
            C::new("bootstrap", T::Json, "resamples and seed"),
            C::new(
                "answers",
                T::IdList,
                "reference answers a likelihood probe scored (generation or conversation ids)",
            )
            .nullable()
            .link(),
        ],
    },
    TableDef {
        name: STUDY_STEP,
        doc: "A finished step of a study: what ran, on which records, with which parameters, making which records.",
        columns: &[
            C::new(
                "kind",
                T::Str,
                "import, results, derive, train, sample, judge, metrics or probe",
            ),
            C::new(
                "step",
                T::Str,
                "the step id: key of the kind, parameters, inputs and step format",
            ),
            C::new("label", T::Str, "what the step is, for people"),
            C::new("inputs", T::IdList, "records the step read").link(),
            C::new("params", T::Json, "the step's parameters"),
            C::new("outputs", T::IdList, "records the step made").link(),
        ],
    },
    TableDef {
        name: STUDY,
        doc: "A study run to the end: the spec as written, its name and its steps.",
        columns: &[
            C::new("name", T::Str, "the spec's name"),
            C::new("spec", T::Json, "the spec as written, as canonical JSON"),
            C::new("steps", T::IdList, "its study_step records in plan order").link(),
        ],
    },
    TableDef {
        name: DIRECTION,
        doc: "A direction in the residual stream: per layer, the mean activation over misaligned answers minus that over aligned ones (each answer the mean over its answer tokens at the layer's output).",
        columns: &[
            C::new("name", T::Str, "the name given to `emlab activations`"),
            C::new("model", T::Id, "the model (or base + adapter) the activations are of").link(),
            C::new("layers", T::IntList, "the layers measured (0-based; a layer's output is the residual stream after it)"),
            C::new("hidden", T::Int, "hidden size (values per layer)"),
            C::new(
                "vectors",
                T::Blob,
                "safetensors blob: `direction.L`, `misaligned.L`, `aligned.L` (f32, `[hidden]`) per measured layer L",
            ),
            C::new("norms", T::FloatList, "the direction's norm at each measured layer, in `layers` order"),
            C::new("n_misaligned", T::Int, "misaligned answers averaged"),
            C::new("n_aligned", T::Int, "aligned answers averaged"),
            C::new("misaligned", T::IdList, "the misaligned answers (conversation or generation ids)").link(),
            C::new("aligned", T::IdList, "the aligned answers (conversation or generation ids)").link(),
            C::new(
                "selection",
                T::Json,
                "how each group was selected (dataset or generations with filters), answer token counts, and the model config",
            ),
        ],
    },
    TableDef {
        name: BENCH,
        doc: "A benchmark result, comparable across commits.",
        columns: &[
            C::new("name", T::Str, "what was measured, e.g. store.ingest"),
            C::new("params", T::Json, "the benchmark's parameters"),
            C::new("results", T::Json, "measured figures with units"),
            C::new("machine", T::Json, "cpu, cores, os"),
            C::new("commit", T::Str, "git commit of emlab").nullable(),
            C::new("time", T::Str, "when it ran (RFC 3339)"),
        ],
    },
];

/// The Markdown documentation of a table, as kept in `schema/<table>.snap`. The column table is
/// generated from the definition (a test compares the file, and the exported Parquet schema,
/// with it, an insta snapshot); after adding a column, `cargo insta review` rewrites the files.
pub fn schema_markdown(def: &TableDef) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# `{}`\n\n{}\n", def.name, def.doc);
    let _ = writeln!(
        s,
        "Parquet: `<export>/{}/part=<first seq>/data.parquet`, one row per record.\n",
        def.name
    );
    let _ = writeln!(
        s,
        "| column | type | parquet | nullable | lineage | meaning |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let _ = writeln!(s, "| `id` | id | Utf8 | no | | BLAKE3 record id (hex) |");
    for c in def.columns {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {} |",
            c.name,
            c.ty.name(),
            parquet_type_name(c.ty),
            if c.nullable { "yes" } else { "no" },
            if c.link { "parent" } else { "" },
            c.doc.replace('|', "\\|")
        );
    }
    s
}

/// How a column type appears in the exported Parquet (Arrow) schema.
pub fn parquet_type_name(ty: emlab_store::ColType) -> String {
    match emlab_store::export::arrow_type(ty) {
        arrow::datatypes::DataType::List(f) => format!("List<{}>", f.data_type()),
        t => t.to_string(),
    }
}
