//! [`LayerSpec`]: which transformer layers an option names (`all`, or `15-17,21`), shared by
//! `emlab activations --layers` and `emlab train --layers`.

use std::collections::BTreeSet;

/// No model has this many layers: a bound on what a range may name.
const MAX_LAYERS: usize = 100_000;

/// Layers as written: every layer, or a set of 0-based indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    All,
    List(Vec<usize>),
}

/// `"all"` or the list of indices.
impl serde::Serialize for LayerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LayerSpec::All => s.serialize_str("all"),
            LayerSpec::List(v) => v.serialize(s),
        }
    }
}

impl std::str::FromStr for LayerSpec {
    type Err = String;

    /// `all`, or comma-separated indices and inclusive ranges: `21`, `15-17,21`.
    fn from_str(s: &str) -> Result<LayerSpec, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(LayerSpec::All);
        }
        let mut out = BTreeSet::new();
        for part in s.split(',').map(str::trim) {
            let num = |x: &str| {
                x.trim().parse::<usize>().map_err(|_| {
                    format!("`{part}` in `{s}` is not a layer index or range (e.g. `all`, `21`, `15-17,21`)")
                })
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("layer range `{part}` runs backwards"));
                    }
                    if b >= MAX_LAYERS {
                        return Err(format!(
                            "layer range `{part}` goes past {MAX_LAYERS} layers"
                        ));
                    }
                    out.extend(a..=b);
                }
                None => {
                    out.insert(num(part)?);
                }
            }
        }
        Ok(LayerSpec::List(out.into_iter().collect()))
    }
}

impl LayerSpec {
    /// The layers of a model with `n` layers, sorted; an index outside it is an error that
    /// names it.
    pub fn resolve(&self, n: usize) -> Result<Vec<usize>, String> {
        match self {
            LayerSpec::All => Ok((0..n).collect()),
            LayerSpec::List(v) => {
                if let Some(bad) = v.iter().find(|&&l| l >= n) {
                    return Err(format!(
                        "layer {bad} is outside the model, which has {n} layers (0-{})",
                        n.saturating_sub(1)
                    ));
                }
                Ok(v.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LayerSpec;

    #[test]
    fn parses_lists_and_ranges() {
        let l: LayerSpec = "15-17, 21".parse().unwrap();
        assert_eq!(l, LayerSpec::List(vec![15, 16, 17, 21]));
        assert_eq!(l.resolve(30).unwrap(), vec![15, 16, 17, 21]);
        let e = l.resolve(20).unwrap_err();
        assert!(
            e.contains("layer 21 is outside the model, which has 20 layers"),
            "{e}"
        );
        assert_eq!(
            "all".parse::<LayerSpec>().unwrap().resolve(3).unwrap(),
            vec![0, 1, 2]
        );
        assert!("3-1".parse::<LayerSpec>().is_err());
        assert!("0-18446744073709551615".parse::<LayerSpec>().is_err());
        assert!("x".parse::<LayerSpec>().unwrap_err().contains("`x`"));
        assert_eq!(serde_json::to_string(&LayerSpec::All).unwrap(), "\"all\"");
        assert_eq!(serde_json::to_string(&l).unwrap(), "[15,16,17,21]");
    }
}
