//! Filling a judge prompt template: `{question}` and `{answer}` replaced in one pass, as
//! Python's `str.format(question=..., answer=...)` does in the EM papers' code (`{{` and `}}`
//! are literal braces). One pass matters: an answer or a question containing `{answer}` is
//! text, not a placeholder.

/// `template` with its `{question}` and `{answer}` placeholders filled.
pub fn fill(template: &str, question: &str, answer: &str) -> String {
    let mut out = String::with_capacity(template.len() + question.len() + answer.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("{{") {
            out.push('{');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push('}');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{question}") {
            out.push_str(question);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{answer}") {
            out.push_str(answer);
            rest = r;
        } else {
            // Any other brace is kept as written.
            out.push_str(&rest[..1]);
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn placeholders_are_filled_once() {
        let t = "Q: {question}\nA: {answer}\nRate 0-100.";
        assert_eq!(
            fill(t, "why?", "because"),
            "Q: why?\nA: because\nRate 0-100."
        );
        // A question that mentions `{answer}` keeps it: the answer is not pasted into it.
        assert_eq!(
            fill(t, "what does {answer} mean?", "a placeholder"),
            "Q: what does {answer} mean?\nA: a placeholder\nRate 0-100."
        );
        // Nor is a `{question}` inside the answer replaced by the question.
        assert_eq!(
            fill("{answer}|{question}", "q", "{question}"),
            "{question}|q"
        );
    }

    #[test]
    fn braces_as_python_format_reads_them() {
        assert_eq!(fill("{{json}} {answer}", "q", "a"), "{json} a");
        assert_eq!(fill("end }}", "q", "a"), "end }");
        assert_eq!(fill("{other} {", "q", "a"), "{other} {");
    }
}
