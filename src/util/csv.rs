//! CSV files as pandas writes them: [`rows`] reads each row as a column -> value map with its
//! line number; [`headers`] reads the header alone (to guess a file's kind).

use std::collections::HashMap;

use super::parse::ParseError;

/// CSV rows as (line, column -> value).
pub type Rows = Vec<(usize, HashMap<String, String>)>;

/// Every row of a CSV file with a header line; a ragged or unreadable row is an error naming
/// its line.
pub fn rows(origin: &str, bytes: &[u8]) -> Result<Rows, ParseError> {
    let mut rd = ::csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(bytes);
    let headers = rd
        .headers()
        .map_err(|e| ParseError::new(origin, 1, format!("bad CSV header: {e}")))?
        .clone();
    let mut out = Vec::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.map_err(|e| {
            ParseError::new(
                origin,
                e.position().map_or(i + 2, |p| p.line() as usize),
                format!("bad CSV row: {e}"),
            )
        })?;
        let row = headers
            .iter()
            .zip(rec.iter())
            .map(|(h, v)| (h.to_string(), v.to_string()))
            .collect();
        out.push((rec.position().map_or(i + 2, |p| p.line() as usize), row));
    }
    Ok(out)
}

/// The header of a CSV file (empty when it has none).
pub fn headers(bytes: &[u8]) -> Vec<String> {
    ::csv::Reader::from_reader(bytes)
        .headers()
        .map(|h| h.iter().map(str::to_string).collect())
        .unwrap_or_default()
}
