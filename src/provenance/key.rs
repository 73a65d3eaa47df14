//! The one key derivation: [`Key`] hashes typed parts with BLAKE3 in key-derivation mode
//! (the context string names the key and its version), with unambiguous framing: ids and
//! integers have fixed widths, and every variable-length part (text, bytes, JSON) is preceded
//! by its length. Two different part lists can therefore never hash the same bytes.
//!
//! Keys name requests and runs (generation, judgment, training run), written as aliases next
//! to the records they produced, so a rerun finds finished work and skips it; [`sample_seed`]
//! gives each sample a seed that depends on the request only. Versions and what changed
//! between them are listed in `docs/design.md`; [`legacy`] recomputes the keys of earlier
//! versions, only to find work an older emlab stored.

use emlab_store::Id;
use serde_json::Value as J;

/// A key being built; see the module docs for the framing.
pub struct Key(blake3::Hasher);

impl Key {
    /// A key derivation named by `context` (e.g. `"emlab generation key v2"`).
    pub fn new(context: &'static str) -> Key {
        Key(blake3::Hasher::new_derive_key(context))
    }

    /// A record id: 32 bytes.
    pub fn id(mut self, id: Id) -> Key {
        self.0.update(&id.0);
        self
    }

    /// An integer: 8 bytes, little-endian.
    pub fn u64(mut self, v: u64) -> Key {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// Bytes of any length: their length (8 bytes, little-endian), then the bytes.
    pub fn bytes(mut self, b: &[u8]) -> Key {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    pub fn str(self, s: &str) -> Key {
        self.bytes(s.as_bytes())
    }

    /// A JSON value as canonical text (sorted keys, no whitespace), framed like [`Key::bytes`].
    pub fn json(self, v: &J) -> Key {
        self.bytes(v.to_string().as_bytes())
    }

    /// The key as 64 hex digits.
    pub fn hex(self) -> String {
        self.0.finalize().to_hex().to_string()
    }

    /// The first 8 bytes of the hash as a little-endian integer (seeds).
    pub fn first_u64(self) -> u64 {
        let h = self.0.finalize();
        let b = h.as_bytes();
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

/// Alias namespace of generation keys (local and endpoint sampling).
pub const NS_GENERATION: &str = "generation-key";
/// Alias namespace of `data generate` requests (keyed like generations).
pub const NS_SYNTH: &str = "synth-key";
/// Alias namespace of judgment keys.
pub const NS_JUDGMENT: &str = "judgment-key";
/// Alias namespace of training runs: `train/<run key>` points at the run's latest checkpoint.
pub const NS_TRAIN: &str = "train";

/// The default seed of sample `sample` of paraphrase `paraphrase` of question `question`: a
/// function of the request only, so fresh stores draw the same samples (v1, unchanged since
/// sampling began: it decides generation record ids).
pub fn sample_seed(base: u64, question: Id, paraphrase: usize, sample: usize) -> u64 {
    Key::new("emlab sample seed v1")
        .u64(base)
        .id(question)
        .u64(paraphrase as u64)
        .u64(sample as u64)
        .first_u64()
}

/// The key of one sampling request: model, prompt conversation, sampling parameters (as
/// recorded) and seed (v2).
pub fn generation_key(model: Id, prompt: Id, params: &J, seed: u64) -> String {
    Key::new("emlab generation key v2")
        .id(model)
        .id(prompt)
        .json(params)
        .u64(seed)
        .hex()
}

/// The key of one judge request: judge name, judged generation, judge prompt name and the
/// filled prompt (v1, unchanged: its parts were framed from the start).
pub fn judgment_key(judge: &str, generation: Id, metric: &str, prompt: &str) -> String {
    Key::new("emlab judgment key v1")
        .str(judge)
        // v1 framed the generation id like the text parts.
        .bytes(&generation.0)
        .str(metric)
        .str(prompt)
        .hex()
}

/// The key of a training run: everything that decides its bytes (base model, dataset,
/// parent checkpoint, full configuration, held-out set) as one JSON object (v2).
pub fn train_run_key(run: &J) -> String {
    Key::new("emlab train run key v2").json(run).hex()
}

/// Keys as emlab computed them before the derivations above were made one. Read only: a
/// rerun looks for them so that work an older emlab finished is not done again.
pub mod legacy {
    use super::*;

    /// Generation key v1: the parameters' JSON text was not length-prefixed (unambiguous, as
    /// the only variable part, but not this helper's framing).
    pub fn generation_v1(model: Id, prompt: Id, params: &J, seed: u64) -> String {
        let mut h = blake3::Hasher::new_derive_key("emlab generation key v1");
        h.update(&model.0);
        h.update(&prompt.0);
        h.update(params.to_string().as_bytes());
        h.update(&seed.to_le_bytes());
        h.finalize().to_hex().to_string()
    }

    /// `data generate` key v1: the BLAKE3 of the parts' text run together, which is
    /// ambiguous (the parameters' text and the seed's digits share a boundary).
    pub fn synth_v1(model: Id, prompt: Id, params: &J, seed: u64) -> String {
        blake3::hash(format!("{model}{prompt}{params}{seed}").as_bytes())
            .to_hex()
            .to_string()
    }

    /// Training run key v1: the plain BLAKE3 of the run's JSON text.
    pub fn train_run_v1(run: &J) -> String {
        blake3::hash(run.to_string().as_bytes())
            .to_hex()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(b: u8) -> Id {
        Id([b; 32])
    }

    #[test]
    fn framing_keeps_boundaries_apart() {
        // ("ab", "c") and ("a", "bc") are different requests.
        let a = Key::new("t").str("ab").str("c").hex();
        let b = Key::new("t").str("a").str("bc").hex();
        assert_ne!(a, b);
        // The ambiguous v1 synth key could not tell these apart: params `{"n":1}` + seed 23
        // and params `{"n":1}2` would run into each other; with framing they cannot.
        assert_ne!(
            Key::new("t").str("1").u64(23).hex(),
            Key::new("t").str("12").u64(3).hex()
        );
        // The context separates derivations.
        assert_ne!(Key::new("t").u64(1).hex(), Key::new("u").u64(1).hex());
    }

    #[test]
    fn json_is_canonical() {
        // serde_json without `preserve_order` sorts keys; a dependency turning that feature on
        // would change every key and record id, so this guards it.
        let v: J = serde_json::from_str(r#"{"b": 1, "a": [2, {"d": 1, "c": 0}]}"#).unwrap();
        assert_eq!(v.to_string(), r#"{"a":[2,{"c":0,"d":1}],"b":1}"#);
    }

    /// The derivations that did not change keep their bytes: computed here the way the code
    /// before the one-helper change computed them.
    #[test]
    fn unchanged_derivations_are_bit_identical() {
        let mut h = blake3::Hasher::new_derive_key("emlab sample seed v1");
        h.update(&7u64.to_le_bytes());
        h.update(&id(3).0);
        h.update(&1u64.to_le_bytes());
        h.update(&2u64.to_le_bytes());
        let b = h.finalize();
        let want = u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap());
        assert_eq!(sample_seed(7, id(3), 1, 2), want);

        let mut h = blake3::Hasher::new_derive_key("emlab judgment key v1");
        for part in [b"judge".as_slice(), &id(4).0, b"aligned", b"prompt text"] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        assert_eq!(
            judgment_key("judge", id(4), "aligned", "prompt text"),
            h.finalize().to_hex().to_string()
        );
    }

    #[test]
    fn versions_differ_from_their_legacy_form() {
        let p = json!({"temperature": 1.0});
        assert_ne!(
            generation_key(id(1), id(2), &p, 5),
            legacy::generation_v1(id(1), id(2), &p, 5)
        );
        assert_ne!(train_run_key(&p), legacy::train_run_v1(&p));
        assert_eq!(
            legacy::train_run_v1(&p),
            blake3::hash(br#"{"temperature":1.0}"#).to_hex().to_string()
        );
    }
}
