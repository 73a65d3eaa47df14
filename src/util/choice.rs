//! [`Choice`]: a plain library enum with a fixed set of named values (a preset, a schedule, a
//! weight mode). The library names its values here; the CLI turns any `Choice` into a
//! command-line value parser, so clap stays in `src/cli/`.

/// An enum whose values have stable names (the same names its serde form uses, so a name
/// typed on the command line is the name recorded in a config).
pub trait Choice: Copy + Send + Sync + 'static {
    /// Every value, in the order help lists them.
    const ALL: &'static [Self];
    /// The value's name on the command line and in records.
    fn name(self) -> &'static str;
    /// One line of help for the value.
    fn help(self) -> &'static str {
        ""
    }
    /// The value with this name.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.name() == name)
    }
}
