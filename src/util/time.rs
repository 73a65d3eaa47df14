//! The clock, through `jiff`: RFC 3339 timestamps for `bench` records and the `strftime`
//! codes chat templates call (`strftime_now`, Llama-3's "Today Date"), both in UTC.

/// Now as RFC 3339 in UTC, to the second (`2026-12-03T14:03:07Z`).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Now formatted with a `strftime` pattern, in UTC; `None` when the pattern has a code jiff
/// does not know.
pub fn strftime_now(fmt: &str) -> Option<String> {
    jiff::fmt::strtime::format(fmt, jiff::Timestamp::now()).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
        assert!(t.parse::<jiff::Timestamp>().is_ok(), "{t}");
    }

    #[test]
    fn strftime_codes_of_chat_templates() {
        let s = super::strftime_now("%d %b %Y").unwrap();
        // e.g. "03 Dec 2026"
        assert_eq!(s.len(), 11, "{s}");
        assert!(
            super::strftime_now("100%").is_none(),
            "a lone % is not a code"
        );
    }
}
