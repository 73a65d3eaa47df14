//! [`Hint`]: the fix for an error, when it is known. Every library error type implements it
//! (delegating to the error it wraps), so however deep a cause sits, the CLI can print the
//! `hint:` line that goes with it.

pub trait Hint {
    /// What the user can do about this error, if emlab knows.
    fn hint(&self) -> Option<String>;
}
