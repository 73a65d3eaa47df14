//! [`ParseError`]: a row-level failure in an input file, printed as `file:line: what was
//! expected`, shared by every importer (datasets, question sets, published results).

/// A row-level parse failure: file, 1-based line (0: the file as a whole), what was wrong or
/// expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub origin: String,
    pub line: usize,
    pub msg: String,
}

impl ParseError {
    pub fn new(origin: &str, line: usize, msg: impl Into<String>) -> ParseError {
        ParseError {
            origin: origin.to_string(),
            line,
            msg: msg.into(),
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.origin, self.line, self.msg)
    }
}

impl std::error::Error for ParseError {}
