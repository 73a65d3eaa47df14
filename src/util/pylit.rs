//! Python literals, as pandas writes Python objects into CSV cells: strings (either quote,
//! backslash escapes), lists, tuples, dicts, numbers, `None`, `True`, `False`.
//! [`parse`] reads one into a [`Py`] value; [`Py::to_json`] converts it.

#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    Str(String),
    /// Lists and tuples.
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// A number, as written.
    Num(String),
    None,
    Bool(bool),
}

impl Py {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Py::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Py::Str(s) => J::String(s.clone()),
            Py::List(v) => J::Array(v.iter().map(Py::to_json).collect()),
            Py::Dict(kv) => J::Object(
                kv.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().map_or_else(|| format!("{k:?}"), str::to_string),
                            v.to_json(),
                        )
                    })
                    .collect(),
            ),
            Py::Num(n) => n
                .parse::<i64>()
                .map(J::from)
                .or_else(|_| n.parse::<f64>().map(J::from))
                .unwrap_or(J::String(n.clone())),
            Py::None => J::Null,
            Py::Bool(b) => J::Bool(*b),
        }
    }
}

/// Parse one Python literal (surrounding whitespace allowed, nothing after it).
pub fn parse(s: &str) -> Result<Py, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut p = Parser { c: &chars, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != chars.len() {
        return Err(format!(
            "unexpected text after the value at character {}",
            p.i
        ));
    }
    Ok(v)
}

struct Parser<'a> {
    c: &'a [char],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.c.len() && self.c[self.i].is_whitespace() {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Py, String> {
        if depth > 32 {
            return Err("nested too deep".into());
        }
        self.ws();
        match self.c.get(self.i) {
            Some('\'') | Some('"') => self.string(),
            Some('[') => self.seq(']', depth).map(Py::List),
            Some('(') => self.seq(')', depth).map(Py::List),
            Some('{') => self.dict(depth),
            Some(c) if c.is_ascii_digit() || *c == '-' || *c == '.' => {
                let start = self.i;
                while self.i < self.c.len()
                    && (self.c[self.i].is_ascii_alphanumeric()
                        || matches!(self.c[self.i], '.' | '-' | '+'))
                {
                    self.i += 1;
                }
                Ok(Py::Num(self.c[start..self.i].iter().collect()))
            }
            Some(_) => {
                for (word, v) in [
                    ("None", Py::None),
                    ("True", Py::Bool(true)),
                    ("False", Py::Bool(false)),
                ] {
                    let w: Vec<char> = word.chars().collect();
                    if self.c[self.i..].starts_with(&w) {
                        self.i += w.len();
                        return Ok(v);
                    }
                }
                Err(format!(
                    "unexpected `{}` at character {}",
                    self.c[self.i], self.i
                ))
            }
            None => Err("unexpected end".into()),
        }
    }

    fn string(&mut self) -> Result<Py, String> {
        let q = self.c[self.i];
        self.i += 1;
        let mut out = String::new();
        while self.i < self.c.len() {
            let c = self.c[self.i];
            if c == '\\' && self.i + 1 < self.c.len() {
                let n = self.c[self.i + 1];
                match n {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '\\' | '\'' | '"' => out.push(n),
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
                self.i += 2;
                continue;
            }
            self.i += 1;
            if c == q {
                return Ok(Py::Str(out));
            }
            out.push(c);
        }
        Err("unterminated string".into())
    }

    fn seq(&mut self, close: char, depth: usize) -> Result<Vec<Py>, String> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            self.ws();
            match self.c.get(self.i) {
                Some(c) if *c == close => {
                    self.i += 1;
                    return Ok(items);
                }
                Some(',') => self.i += 1,
                Some(_) => items.push(self.value(depth + 1)?),
                None => return Err(format!("missing `{close}`")),
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Py, String> {
        self.i += 1;
        let mut kv = Vec::new();
        loop {
            self.ws();
            match self.c.get(self.i) {
                Some('}') => {
                    self.i += 1;
                    return Ok(Py::Dict(kv));
                }
                Some(',') => self.i += 1,
                Some(_) => {
                    let k = self.value(depth + 1)?;
                    self.ws();
                    if self.c.get(self.i) != Some(&':') {
                        return Err(format!("expected `:` at character {}", self.i));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    kv.push((k, v));
                }
                None => return Err("missing `}`".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let v = parse(r#"['a', "it's", 'say \'hi\'\nbye']"#).unwrap();
        assert_eq!(
            v.to_json(),
            serde_json::json!(["a", "it's", "say 'hi'\nbye"])
        );
        let t = parse("[('100', '100'), ('30', '80')]").unwrap();
        assert_eq!(
            t.to_json(),
            serde_json::json!([["100", "100"], ["30", "80"]])
        );
        let d = parse("{'aligned': 'x {answer}', 'n': 3, 'z': None}").unwrap();
        assert_eq!(
            d.to_json(),
            serde_json::json!({"aligned": "x {answer}", "n": 3, "z": null})
        );
        assert!(parse("['open").is_err());
        assert!(parse("[1] x").is_err());
    }
}
